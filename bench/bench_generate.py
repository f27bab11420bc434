"""Generation speed: our `generate` path against a plain diffusers pipeline, same model and GPU.

Settings of the issue's baseline: fp16, 512 px, 25 DPM++ (multistep) steps, CFG 7.5, batch 1 and 4.
Each row: one warm-up batch (compilation lands there and is reported apart), then timed batches
with the GPU synchronised around them. diffusers runs eager and with `torch.compile` on its UNet.
The diffusers pipeline is the model's own class (model_index.json): StableDiffusionPipeline for
SD 1.x, StableDiffusionXLPipeline for SDXL (run at 1024 px: --size 1024).

usage (GPU, offline):  python bench/bench_generate.py --model bench-out/model-sd15 --out bench-out
                       python bench/bench_generate.py --model bench-out/model-sdxl --out bench-out --size 1024 \\
                           --batches 1:3,4:2 --json bench-out/generate_sdxl_bench.json
CPU smoke:             python bench/bench_generate.py --model /tmp/b/model-tiny --out /tmp/b --cpu --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch

PROMPT = "a boy in yltcaxe artstyle"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_pipe(call, batch: int, batches: int) -> dict:
    """img/s over `batches` batches after one warm-up batch; `call(seeds)` makes one batch."""
    t = time.perf_counter()
    call(list(range(batch)))
    _sync()
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    for b in range(batches):
        call([1000 + b * batch + i for i in range(batch)])
    _sync()
    dt = time.perf_counter() - t
    return {"img_s": batch * batches / dt, "warmup_s": warmup}


def pipeline_class_name(model: Path) -> str:
    return json.loads((model / "model_index.json").read_text())["_class_name"]


def diffusers_pipe(model: Path, device: str, dtype, compiled: bool):
    import diffusers
    from diffusers import DPMSolverMultistepScheduler

    name = pipeline_class_name(model)
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ValueError(f"{model} is a {name}; this benchmark knows SD 1.x and SDXL")
    extra = {"safety_checker": None} if name == "StableDiffusionPipeline" else {}
    pipe = getattr(diffusers, name).from_pretrained(model, torch_dtype=dtype, **extra)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        # One static graph per batch size: after batch 1, a dynamic-shape graph would serve batch 4 more slowly.
        torch._dynamo.config.automatic_dynamic_shapes = False
        pipe.unet = torch.compile(pipe.unet)

    def call(seeds, steps, size):
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        pipe([PROMPT] * len(seeds), num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
             generator=gens, output_type="pil")

    return call


def ours_pipe(model: Path, device: str, dtype):
    from style_dreambooth.sampling.generate import resolve_model, sample
    from style_dreambooth.sampling.images import make_scheduler

    pipe, _ = resolve_model(str(model), dtype=dtype)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(seeds, steps, size):
        sample(pipe, PROMPT, seeds, steps=steps, guidance=7.5, width=size, height=size, batch_size=len(seeds))

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", default="1:4,4:3", help="batch:timed-batches pairs")
    ap.add_argument("--sides", default="ours,diffusers,diffusers-compiled")
    ap.add_argument("--cpu", action="store_true", help="smoke test: fp32 on the CPU")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="start no new side, nor batch size, after this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="where the results go (default: OUT/generate_bench.json); "
                    "written after every side")
    args = ap.parse_args()

    t0 = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.float16
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_class_name(args.model)
    rows = []
    for side in args.sides.split(","):
        if time.perf_counter() - t0 > args.budget_s:
            rows.append({"side": side, "skipped": "budget"})
            print(f"{side}: skipped (budget)", flush=True)
            continue
        try:
            call = ours_pipe(args.model, device, dtype) if side == "ours" else diffusers_pipe(
                args.model, device, dtype, compiled=side.endswith("compiled"))
            for spec in args.batches.split(","):
                batch, batches = (int(x) for x in spec.split(":"))
                if time.perf_counter() - t0 > args.budget_s:  # an SDXL batch size alone can take minutes
                    rows.append({"side": side, "batch": batch, "skipped": "budget"})
                    print(f"{side} batch {batch}: skipped (budget)", flush=True)
                    continue
                got = time_pipe(lambda seeds: call(seeds, args.steps, args.size), batch, batches)
                rows.append({"side": side, "batch": batch, **got})
                print(f"{side} batch {batch}: {got['img_s']:.2f} img/s (warm-up {got['warmup_s']:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - one side failing must not lose the others
            rows.append({"side": side, "error": f"{type(exc).__name__}: {exc}"[:1500]})
            print(f"{side}: FAILED {type(exc).__name__}: {exc}"[:800], flush=True)
            traceback.print_exc()  # the whole story goes to the log; the row keeps the message
        call = None  # free this side's pipeline before the next one loads (an SDXL pipeline is 7 GB in fp16)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (args.json or args.out / "generate_bench.json").write_text(json.dumps(
            {"pipeline": pipeline, "steps": args.steps, "size": args.size, "dtype": str(dtype), "rows": rows},
            indent=1))


if __name__ == "__main__":
    main()
