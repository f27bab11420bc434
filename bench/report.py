"""Render bench JSON as the markdown tables of BENCHMARKS.md (one section per device call).

usage: python bench/report.py OUT/train_bench.json [OUT/generate_bench.json OUT/train_sdxl_bench.json
                              OUT/generate_sdxl_bench.json ...] >> BENCHMARKS.md
Each file is rendered as a training or a generation table, as its contents say.

MFU uses the issue's FLOP counts for SD 1.5 at 512 px: a training step is 4.8 TFLOP of UNet forward
and backward on 2 samples plus 0.1 of text encoder (the VAE encode, 2.2 more, is work a trainer
can avoid, so it is not counted as useful for either side); an image of 25 CFG steps is about
44 TFLOP (the issue's 18 img/s limit). Peak: 790 TFLOP/s (H100 dense bf16/fp16 matrix products).
MFU is left out (-) for other shapes and settings (the SDXL rows among them: the issue gives no FLOP
counts for SDXL).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN_TFLOP, IMAGE_TFLOP, PEAK_TFLOPS = 4.9, 790 / 18, 790.0


def _num(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _failed(row: dict, side: str) -> str:
    if f"{side}_skipped" in row:
        return "skipped (budget)"
    if f"{side}_error" in row:
        error = row[f"{side}_error"]
        how = error.split(":", 1)[0] if error.startswith("exit ") else "failed"  # "exit 1", "exit timeout"
        return f"{how}: " + error.strip().splitlines()[-1][:80].replace("|", "/")
    return "-"


def train_table(data: dict) -> str:
    v = data["versions"]
    lines = [
        f"### Training, {data['shape']} at {data['resolution']} px, steps {data['steps'][0]}-{data['steps'][1]} "
        f"({data['date']})",
        "",
        f"{v['gpu']}, driver {v['driver']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers "
        f"{v['transformers']}, accelerate {v['accelerate']}, bitsandbytes {v['bitsandbytes']}, peft {v['peft']}.",
        "",
        "| config | ours it/s | ours peak GiB | ours MFU | ours load / warm-up s | diffusers it/s | diffusers peak GiB "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        ours = _num(row.get("ours_it_s")) if "ours_it_s" in row else _failed(row, "ours")
        theirs = _num(row.get("diffusers_it_s")) if "diffusers_it_s" in row else _failed(row, "diffusers")
        sd15 = data["shape"] == "sd15" and data["resolution"] == 512  # the FLOP counts hold for that only
        mfu = row["ours_it_s"] * TRAIN_TFLOP / PEAK_TFLOPS if "ours_it_s" in row and sd15 else None
        cap = f" (cap {row['mem_gib']} GiB)" if row.get("mem_gib") else ""
        lines.append(
            f"| {row['config']}{cap} | {ours} | {_num(row.get('ours_peak_gib'), '{:.1f}')} | {_num(mfu, '{:.1%}')} "
            f"| {_num(row.get('ours_load_s'), '{:.0f}')} / {_num(row.get('ours_warmup_s'), '{:.0f}')} | {theirs} "
            f"| {_num(row.get('diffusers_peak_gib'), '{:.1f}')} | {_num(row.get('speedup'), '{:.2f}x')} |"
        )
    return "\n".join(lines) + "\n"


def generate_table(data: dict) -> str:
    pipeline = data.get("pipeline", "StableDiffusionPipeline")  # files from before SDXL name none
    lines = [
        f"### Generation, {pipeline}, {data['size']} px, {data['steps']} DPM++ steps, CFG 7.5, {data['dtype']}",
        "",
        "| side | batch | img/s | MFU | warm-up s |",
        "|---|---|---|---|---|",
    ]
    sd15 = pipeline == "StableDiffusionPipeline" and (data["size"], data["steps"]) == (512, 25)  # the count
    for row in data["rows"]:
        if "img_s" not in row:
            why = row.get("error") or f"skipped ({row.get('skipped')})"
            lines.append(f"| {row['side']} | {row.get('batch', '-')} | {why[:80].replace('|', '/')} | - | - |")
            continue
        mfu = row["img_s"] * IMAGE_TFLOP / PEAK_TFLOPS if sd15 else None
        lines.append(f"| {row['side']} | {row['batch']} | {row['img_s']:.2f} | {_num(mfu, '{:.1%}')} "
                     f"| {row['warmup_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for name in sys.argv[1:]:
        data = json.loads(Path(name).read_text())
        print(train_table(data) if "versions" in data else generate_table(data))


if __name__ == "__main__":
    main()
