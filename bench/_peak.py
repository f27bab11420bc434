"""Run a training script or module as __main__ with a step clock; record step times and peak CUDA memory.

usage: python bench/_peak.py RESULT.json SCRIPT.py [args...]
       python bench/_peak.py RESULT.json -m MODULE [args...]

Both trainers call `accelerate.Accelerator.backward` once per step (batch 1, no accumulation), so
that call is the clock: after backward number 1, N1 and N2 (BENCH_WINDOW="N1,N2") the GPU is
synchronised and the time noted. Steady-state it/s = (N2 - N1) / (t[N2] - t[N1]); loading (up to
the last `Accelerator.prepare`) and warm-up (steps 1..N1 beyond steady pace: compilation) are
reported apart. After step N2 the result is written
and the process ends at once, so neither side's final save is timed or waited for.

BENCH_MEM_GIB caps this process's CUDA memory (torch.cuda.set_per_process_memory_fraction), e.g.
15 for a 16 GB T4; a run that needs more fails with an out-of-memory error.
"""

import json
import os
import runpy
import sys
import time


def main() -> None:
    result_file, target, *rest = sys.argv[1:]
    start = time.perf_counter()
    n1, n2 = (int(s) for s in os.environ.get("BENCH_WINDOW", "20,60").split(","))
    marks: dict[int, float] = {}

    import accelerate
    import torch

    cap = os.environ.get("BENCH_MEM_GIB")
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(float(cap) * 2**30 / total)

    def write(done: bool) -> None:
        cuda = torch.cuda.is_available()
        result = {
            "done": done, "wall_s": time.perf_counter() - start, "marks": marks,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "mem_cap_gib": float(cap) if cap else None,
        }
        if n1 in marks and n2 in marks:
            result["it_s"] = (n2 - n1) / (marks[n2] - marks[n1])
            result["load_s"] = prepared[-1] if prepared else None  # start -> last accelerator.prepare
            # Steps 1..N1 beyond what N1 steady steps would take: compilation, autotuning, allocator warm-up.
            result["warmup_s"] = (marks[n1] - (prepared[-1] if prepared else 0.0)) - n1 / result["it_s"]
        with open(result_file, "w") as f:
            json.dump(result, f)

    if os.environ.get("BENCH_SKIP_PEFT_CHECK"):
        # transformers' PEFT integration may ask for a newer peft than the one installed; the check
        # guards features neither trainer uses here (the baseline LoRA script goes through it).
        import transformers.integrations.peft as tpeft
        import transformers.utils.peft_utils as putils

        putils.check_peft_version = tpeft.check_peft_version = lambda *a, **k: None

    prepared: list[float] = []
    original_prepare = accelerate.Accelerator.prepare

    def prepare(self, *args, **kwargs):
        out = original_prepare(self, *args, **kwargs)
        prepared.append(time.perf_counter() - start)
        return out

    accelerate.Accelerator.prepare = prepare
    original = accelerate.Accelerator.backward
    count = 0

    def backward(self, loss, **kwargs):
        nonlocal count
        out = original(self, loss, **kwargs)
        count += 1
        if count in (1, n1, n2):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[count] = time.perf_counter() - start
            if count == n2:
                write(done=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        return out

    accelerate.Accelerator.backward = backward
    try:
        if target == "-m":
            module, *args = rest
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *rest]
            runpy.run_path(target, run_name="__main__")
    finally:
        write(done=False)  # ended before step N2 (too few steps, or an error): what was measured so far


if __name__ == "__main__":
    main()
