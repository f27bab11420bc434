"""Run a script or module as __main__, then record its wall time and peak CUDA memory.

usage: python bench/_peak.py RESULT.json SCRIPT.py [args...]
       python bench/_peak.py RESULT.json -m MODULE [args...]
"""

import atexit
import json
import runpy
import sys
import time


def main() -> None:
    result_file, target, *rest = sys.argv[1:]
    start = time.perf_counter()

    def record() -> None:
        peak = None
        try:
            import torch

            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated() / 2**30
        except Exception:  # noqa: BLE001 - measuring must never break the run
            pass
        with open(result_file, "w") as f:
            json.dump({"wall_s": time.perf_counter() - start, "peak_gib": peak}, f)

    atexit.register(record)
    if target == "-m":
        module, *args = rest
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
