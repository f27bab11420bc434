"""Training speed and memory: our `train` against diffusers' DreamBooth scripts, same model, data, GPU.

Each (configuration, side) is one process run under `_peak.py`, whose step clock gives the
steady-state it/s between steps N1 and N2, the time before the first step (loading), the warm-up
beyond steady steps (compilation, autotuning) and the peak allocated CUDA memory; the process ends
at step N2, so no final save is timed. Results are written after every run, so a run that fails or a
budget that runs out still leaves the rows measured so far.

One call measures one model family: the rows of the model's family (SD 1.x: train_dreambooth.py and
_lora.py; SDXL: train_dreambooth_lora_sdxl.py; FLUX.1: train_dreambooth_lora_flux.py), at that family's
resolution unless --resolution.

usage (on a GPU machine, offline):
  python bench/bench_train.py --out bench-out --diffusers-script .baseline/train_dreambooth.py \\
      --diffusers-lora-script .baseline/train_dreambooth_lora.py
  python bench/bench_train.py --out bench-out --shape sdxl --json bench-out/train_sdxl_bench.json \\
      --diffusers-sdxl-lora-script .baseline/train_dreambooth_lora_sdxl.py
  python bench/bench_train.py --out bench-out --shape flux-dev --model MODEL --json bench-out/train_flux_bench.json \
      --diffusers-flux-lora-script .baseline/train_dreambooth_lora_flux.py
  python bench/bench_train.py --out /tmp/b --shape tiny --resolution 64 --precision no --steps 3,6   # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
PROMPT, CLASS_PROMPT = "yltcaxe artstyle", "artstyle"
# Random-model shapes by family, and each family's training resolution (as `train` defaults it).
SHAPES = {"tiny": "sd1", "sd15": "sd1", "sdxl-tiny": "sdxl", "sdxl": "sdxl", "flux-tiny": "flux", "flux-dev": "flux"}
RESOLUTION = {"sd1": 512, "sdxl": 1024, "flux": 1024}


def make_images(folder: Path, n: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if (folder / f"{i:03d}.png").exists():
            continue
        yy, xx = np.mgrid[:size, :size] / size
        base = np.stack([np.sin(xx * rng.uniform(3, 9) + yy * rng.uniform(0, 4) + rng.uniform(0, 6)) for _ in range(3)], -1)
        arr = ((base * 0.5 + 0.5) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


def run_clocked(cmd: list[str], result: Path, log: Path, env: dict[str, str], timeout: float) -> dict:
    """Run `cmd` under the step clock; the clock's JSON, plus `error` (log tail) when it failed."""
    full = [sys.executable, str(HERE / "_peak.py"), str(result), *cmd]
    result.unlink(missing_ok=True)
    with log.open("w") as f:
        try:
            proc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    data = json.loads(result.read_text()) if result.is_file() else {}
    if code != 0 or not data.get("done"):
        data["error"] = f"exit {code}: " + log.read_text(errors="replace")[-1500:]
    return data


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
    return cmd + list(cfg.get("ours_flags", []))


def diffusers_cmd(script: Path, model: Path, data: Path, out: Path, steps: int, cfg: dict, resolution: int) -> list[str]:
    if cfg.get("family") == "flux":
        return diffusers_flux_cmd(script, model, data, out, steps, cfg, resolution)
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
    if cfg.get("family") == "sdxl":
        # Its text encoders' LoRA has its own learning rate (default 5e-6); ours follows --learning-rate.
        cmd.append("--text_encoder_lr=1e-4")
    if cfg.get("gc"):
        cmd.append("--gradient_checkpointing")
    return cmd


def diffusers_flux_cmd(script: Path, model: Path, data: Path, out: Path, steps: int, cfg: dict,
                       resolution: int) -> list[str]:
    """train_dreambooth_lora_flux.py as ours runs: LoRA rank 4 on the transformer (its default layers), text
    encoders frozen, prior preservation on the same 50 class images, 8-bit AdamW, lr 1e-4 constant, guidance 3.5,
    T5 at 512 tokens, sigma uniform (its default weighting scheme 'none')."""
    cmd = [str(script), f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={data / 'instance'}",
           f"--class_data_dir={data / 'class'}", f"--instance_prompt={PROMPT}", f"--class_prompt={CLASS_PROMPT}",
           "--with_prior_preservation", "--prior_loss_weight=1.0", "--num_class_images=50", "--sample_batch_size=1",
           f"--output_dir={out}", "--seed=1337", f"--resolution={resolution}", "--train_batch_size=1", "--rank=4",
           "--optimizer=AdamW", "--use_8bit_adam", "--learning_rate=1e-4", "--lr_scheduler=constant",
           "--lr_warmup_steps=0", f"--max_train_steps={steps}", "--checkpointing_steps=1000000",
           "--guidance_scale=3.5", "--max_sequence_length=512", "--weighting_scheme=none", "--cache_latents",
           f"--mixed_precision={cfg['precision']}"]
    if cfg.get("gc"):
        cmd.append("--gradient_checkpointing")
    return cmd


def baseline_script(cfg: dict, args: argparse.Namespace) -> Path | None:
    """diffusers' script for a config: one per family and method."""
    if cfg.get("family") == "flux":
        return args.diffusers_flux_lora_script if cfg.get("lora") else None
    if cfg.get("family") == "sdxl":
        return args.diffusers_sdxl_lora_script if cfg.get("lora") else None
    return args.diffusers_lora_script if cfg.get("lora") else args.diffusers_script


def model_family(model: Path) -> str:
    """sdxl, flux or sd1, from the pipeline class a diffusers folder names."""
    class_name = json.loads((model / "model_index.json").read_text()).get("_class_name", "")
    return "sdxl" if "XL" in class_name else "flux" if class_name.startswith("Flux") else "sd1"


# train_dreambooth_lora_flux.py's default LoRA layers (ours add proj_mlp, the single blocks' MLP input).
FLUX_BASELINE_LAYERS = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,ff.net.0.proj,ff.net.2,"
                        "ff_context.net.0.proj,ff_context.net.2")


# Rows in the order they run: the reference configuration first, so a short budget still measures it.
# "baseline": whether diffusers' script runs it too; "mem_gib": a T4-sized cap on this process's memory;
# "family": the model family it needs (default sd1).
CONFIGS = {
    "full-fp16": {"precision": "fp16", "baseline": True},
    "lora-fp16": {"precision": "fp16", "lora": True, "baseline": True},
    "t4-fp16": {"precision": "fp16", "mem_gib": 15},
    "full-bf16": {"precision": "bf16", "baseline": True},
    "full-fp16-gc": {"precision": "fp16", "gc": True, "baseline": True},
    "t4-fp16-gc": {"precision": "fp16", "gc": True, "mem_gib": 15},
    "full-fp16-compile": {"precision": "fp16", "ours_flags": ["--compile"]},
    "full-fp16-no-cache": {"precision": "fp16", "ours_flags": ["--no-cache-latents"]},
    "full-fp16-adamw": {"precision": "fp16", "ours_flags": ["--no-8bit-adam"]},
    # SDXL base 1.0 shapes, 1024 px: LoRA rank 4 on the UNet and both text encoders, VAE in fp32 (no fixed VAE).
    "sdxl-lora-fp16": {"family": "sdxl", "precision": "fp16", "lora": True, "baseline": True},
    # FLUX.1-dev shapes (11.9 B transformer, T5-XXL), 1024 px, bf16: LoRA rank 4 on the transformer, text encoders
    # frozen (their conditioning encoded once per prompt on our side, cached by the baseline too), with and
    # without gradient checkpointing (without it, 1024 px with prior preservation may not fit 80 GB).
    "flux-lora-bf16-gc": {"family": "flux", "precision": "bf16", "lora": True, "gc": True, "baseline": True,
                          "ours_flags": ["--no-train-text-encoder", "--lora-targets", FLUX_BASELINE_LAYERS]},
    "flux-lora-bf16": {"family": "flux", "precision": "bf16", "lora": True, "baseline": True,
                       "ours_flags": ["--no-train-text-encoder", "--lora-targets", FLUX_BASELINE_LAYERS]},
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
    ap.add_argument("--shape", default="sd15", choices=list(SHAPES),
                    help="the random model to build (without --model), and the shape the results name")
    ap.add_argument("--diffusers-script", type=Path, default=None, help="diffusers' examples/dreambooth/train_dreambooth.py")
    ap.add_argument("--diffusers-lora-script", type=Path, default=None, help="... and train_dreambooth_lora.py")
    ap.add_argument("--diffusers-sdxl-lora-script", type=Path, default=None, help="... and train_dreambooth_lora_sdxl.py")
    ap.add_argument("--diffusers-flux-lora-script", type=Path, default=None, help="... and train_dreambooth_lora_flux.py")
    ap.add_argument("--configs", default=None, help="comma-separated rows; default: every row of the model's family")
    ap.add_argument("--steps", default="20,60", help="N1,N2: the steady-state window (steps)")
    ap.add_argument("--resolution", type=int, default=None, help="default: the family's (512 SD 1.x, 1024 SDXL)")
    ap.add_argument("--precision", default=None, help="override every config's precision (e.g. 'no' on CPU)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=300,
                    help="kill a run after this long (and never let one end more than 60 s past the budget)")
    ap.add_argument("--json", type=Path, default=None, help="where the results go (default: OUT/train_bench.json); "
                    "written after every run")
    args = ap.parse_args()

    t0 = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "BENCH_WINDOW": args.steps}
    model = args.model or out / f"model-{args.shape}"
    if not (model / "model_index.json").exists():
        subprocess.run([sys.executable, "-m", "style_dreambooth", "random-model", "--shape", args.shape, str(model)],
                       check=True, env=env)
    family = model_family(model)
    if family != SHAPES[args.shape]:
        raise SystemExit(f"{model} is an {family} model, but --shape is {args.shape}; pass the shape it was built as")
    rows_of_family = [n for n, c in CONFIGS.items() if c.get("family", "sd1") == family]
    names = args.configs.split(",") if args.configs else rows_of_family
    if unknown := [n for n in names if n not in rows_of_family]:
        raise SystemExit(f"{', '.join(unknown)}: not a row for this {family} model; its rows: {', '.join(rows_of_family)}")
    args.resolution = args.resolution or RESOLUTION[family]
    data = out / f"data-{args.resolution}"  # one set of images per resolution, given to both sides
    make_images(data / "instance", 5, args.resolution, 0)
    make_images(data / "class", 50, args.resolution, 1)
    n1, n2 = (int(s) for s in args.steps.split(","))
    result = {"date": datetime.date.today().isoformat(), "versions": versions(), "steps": [n1, n2],
              "resolution": args.resolution, "shape": args.shape, "family": family, "rows": []}
    for name in names:
        cfg = dict(CONFIGS[name])
        if args.precision:
            cfg["precision"] = args.precision
        row = {"config": name, **cfg}
        sides = {"ours": lambda o: ours_cmd(model, data, o, n2, cfg, args.resolution)}
        script = baseline_script(cfg, args)
        if script and cfg.get("baseline"):
            sides["diffusers"] = lambda o, s=script: diffusers_cmd(s.resolve(), model, data, o, n2, cfg, args.resolution)
        for side, make in sides.items():
            if time.perf_counter() - t0 > args.budget_s:
                row[f"{side}_skipped"] = "budget"
                continue
            tag = f"{name}-{side}"
            run_env = {**env, **({"BENCH_MEM_GIB": str(cfg["mem_gib"])} if cfg.get("mem_gib") else {})}
            timeout = min(args.run_timeout_s, args.budget_s + 60 - (time.perf_counter() - t0))
            got = run_clocked(make(out / "runs" / tag), out / f"{tag}.json", out / f"{tag}.log", run_env, timeout)
            for key in ("it_s", "peak_gib", "peak_reserved_gib", "load_s", "warmup_s", "error"):
                if key in got:
                    row[f"{side}_{key}"] = got[key]
            print(f"{name} {side}: " + (f"{got['it_s']:.2f} it/s, peak {got['peak_gib']} GiB, warm-up "
                  f"{got['warmup_s']:.1f} s" if "it_s" in got else f"FAILED {got.get('error', '')[-300:]}"), flush=True)
        if "ours_it_s" in row and "diffusers_it_s" in row:
            row["speedup"] = row["ours_it_s"] / row["diffusers_it_s"]
        result["rows"].append(row)
        (args.json or out / "train_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
