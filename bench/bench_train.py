"""Training speed and memory: our `train` against diffusers' train_dreambooth.py, same model, data, GPU.

Steady-state it/s is measured by running each side twice, for N1 and N2 steps, and dividing the
extra steps by the extra wall time: model loading, warm-up, compilation and the final save cancel
out. Peak memory is torch.cuda.max_memory_allocated() in the training process (the long run).

usage (on a GPU machine, offline):
  python bench/bench_train.py --out bench-out --diffusers-script /path/to/train_dreambooth.py
  python bench/bench_train.py --out /tmp/b --shape tiny --resolution 64 --precision no --steps 4,8   # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
PROMPT, CLASS_PROMPT = "yltcaxe artstyle", "artstyle"


def make_images(folder: Path, n: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if (folder / f"{i:03d}.png").exists():
            continue
        yy, xx = np.mgrid[:size, :size] / size
        base = np.stack([np.sin(xx * rng.uniform(3, 9) + rng.uniform(0, 6)) for _ in range(3)], -1)
        arr = ((base * 0.5 + 0.5) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


def run_timed(cmd: list[str], result: Path, log: Path, env: dict[str, str]) -> dict:
    full = [sys.executable, str(HERE / "_peak.py"), str(result), *cmd]
    with log.open("w") as f:
        proc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
    return json.loads(result.read_text())


def ours_cmd(model: Path, data: Path, out: Path, steps: int, cfg: dict, resolution: int) -> list[str]:
    cmd = ["-m", "style_dreambooth", "train", "--base-model", str(model), "--instance-dir", str(data / "instance"),
           "--class-dir", str(data / "class"), "--instance-prompt", PROMPT, "--class-prompt", CLASS_PROMPT,
           "--output-dir", str(out), "--resolution", str(resolution), "--max-train-steps", str(steps),
           "--validation-steps", "0", "--checkpointing-steps", "0", "--overwrite",
           "--mixed-precision", cfg["precision"]]
    if cfg.get("gc"):
        cmd.append("--gradient-checkpointing")
    if cfg.get("lora"):
        cmd += ["--method", "lora", "--rank", "4"]
    return cmd


def diffusers_cmd(script: Path, model: Path, data: Path, out: Path, steps: int, cfg: dict, resolution: int) -> list[str]:
    cmd = [str(script), f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={data / 'instance'}",
           f"--class_data_dir={data / 'class'}", f"--instance_prompt={PROMPT}", f"--class_prompt={CLASS_PROMPT}",
           "--with_prior_preservation", "--prior_loss_weight=1.0", "--num_class_images=50", "--sample_batch_size=4",
           f"--output_dir={out}", "--seed=1337", f"--resolution={resolution}", "--train_batch_size=1",
           "--train_text_encoder", "--use_8bit_adam", "--gradient_accumulation_steps=1",
           "--learning_rate=1e-6" if not cfg.get("lora") else "--learning_rate=1e-4",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={steps}",
           "--checkpointing_steps=1000000", f"--mixed_precision={cfg['precision']}"]
    if cfg.get("lora"):
        cmd.append("--rank=4")
    if cfg.get("gc"):
        cmd.append("--gradient_checkpointing")
    return cmd


CONFIGS = {
    "full-fp16": {"precision": "fp16"},
    "full-fp16-gc": {"precision": "fp16", "gc": True},
    "full-bf16": {"precision": "bf16"},
    "lora-fp16": {"precision": "fp16", "lora": True},
}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "missing"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip()
        out["gpu"], out["driver"] = [s.strip() for s in smi.splitlines()[0].split(",")]
    except Exception:  # noqa: BLE001
        out["gpu"], out["driver"] = "none (CPU)", "-"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="diffusers folder; default: build a random one")
    ap.add_argument("--shape", default="sd15", choices=["tiny", "sd15"])
    ap.add_argument("--diffusers-script", type=Path, default=None, help="diffusers' train_dreambooth.py (or _lora.py for lora configs)")
    ap.add_argument("--diffusers-lora-script", type=Path, default=None)
    ap.add_argument("--configs", default="full-fp16,full-fp16-gc,full-bf16,lora-fp16")
    ap.add_argument("--steps", default="20,60", help="N1,N2: short and long run lengths")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--precision", default=None, help="override every config's precision (e.g. 'no' on CPU)")
    args = ap.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    model = args.model or out / f"model-{args.shape}"
    if not (model / "model_index.json").exists():
        subprocess.run([sys.executable, "-m", "style_dreambooth", "random-model", "--shape", args.shape, str(model)],
                       check=True, env=env)
    data = out / "data"
    make_images(data / "instance", 5, args.resolution, 0)
    make_images(data / "class", 50, args.resolution, 1)
    n1, n2 = (int(s) for s in args.steps.split(","))
    rows = []
    for name in args.configs.split(","):
        cfg = dict(CONFIGS[name])
        if args.precision:
            cfg["precision"] = args.precision
        row = {"config": name, **cfg}
        sides = {"ours": lambda n, o: ours_cmd(model, data, o, n, cfg, args.resolution)}
        script = args.diffusers_lora_script if cfg.get("lora") else args.diffusers_script
        if script:
            sides["diffusers"] = lambda n, o, s=script: diffusers_cmd(s.resolve(), model, data, o, n, cfg, args.resolution)
        for side, make in sides.items():
            times = {}
            for n in (n1, n2):
                tag = f"{name}-{side}-{n}"
                times[n] = run_timed(make(n, out / "runs" / tag), out / f"{tag}.json", out / f"{tag}.log", env)
            dt = times[n2]["wall_s"] - times[n1]["wall_s"]
            row[f"{side}_it_s"] = (n2 - n1) / dt if dt > 0 else float("nan")
            row[f"{side}_peak_gib"] = times[n2]["peak_gib"]
            print(f"{name} {side}: {row[f'{side}_it_s']:.2f} it/s, peak {row[f'{side}_peak_gib']} GiB", flush=True)
        if "diffusers_it_s" in row:
            row["speedup"] = row["ours_it_s"] / row["diffusers_it_s"]
        rows.append(row)
    result = {"date": datetime.date.today().isoformat(), "versions": versions(), "steps": [n1, n2],
              "resolution": args.resolution, "shape": args.shape, "rows": rows}
    (out / "train_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
