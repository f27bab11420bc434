#!/usr/bin/env python
"""Two-subject success in the proof world, four ways x three models (docs/proof-world.md).

    OMP_NUM_THREADS=1 python scripts/proof_world_composition.py --work WORK          # train, then measure
    python scripts/proof_world_composition.py --work WORK --models base             # the base alone
    python scripts/proof_world_composition.py --work WORK --sketch silhouettes      # a painted sketch

Models: the shipped base (plain prompts), the demo's full fine-tune and the LoRA recipe (rank 4,
lr 5e-3, 750 steps, same data), both prompted with the token. Ways: prompt only, regional prompts,
the shipped tiny ControlNet from the layout's sketch, both (toyworld/two_subjects.py). Held-out
pairs x seeds; a fine-tune already in WORK/<model>/run is reused. Writes WORK/composition.json,
WORK/composition.md (the table) and one grid per model and way.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from style_dreambooth.sampling.images import make_grid
from style_dreambooth.toyworld import two_subjects
from style_dreambooth.toyworld.demo import demo_config
from style_dreambooth.toyworld.evaluate import load_pipe
from style_dreambooth.toyworld.experiment import ExperimentConfig, _load_run, _prepare, train_config
from style_dreambooth.toyworld.judges import Judges
from style_dreambooth.training.loop import train

RECIPES = {
    "full": lambda cfg: cfg,
    # without the full recipe's min-SNR-5, which costs this LoRA its style (docs/proof-world.md, "Composition")
    "lora": lambda cfg: replace(cfg, method="lora", rank=4, learning_rate=5e-3, text_encoder_lr=None, max_train_steps=750,
                                train_overrides={k: v for k, v in cfg.train_overrides.items() if k != "snr_gamma"}),
}


def fine_tune(name: str, cfg: ExperimentConfig, work: Path) -> Path:
    run = work / name / "run"
    if (run / "model").is_dir():
        logging.info("%s: reusing %s", name, run)
        return run
    instance_dir, _ = _prepare(cfg, work / name)
    t0 = time.perf_counter()
    train(train_config(cfg, work / name, instance_dir))
    logging.info("%s: trained in %.0f s", name, time.perf_counter() - t0)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", default="base,full,lora")
    ap.add_argument("--ways", default=",".join(two_subjects.WAYS))
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--controlnet", type=Path, default=None, help="Default: the shipped tiny ControlNet.")
    ap.add_argument("--sketch", choices=two_subjects.SKETCHES, default="boxes",
                    help="The ControlNet's condition: the layout's boxes, or each pair's silhouettes.")
    ap.add_argument("--base-weight", type=float, default=two_subjects.BASE_WEIGHT,
                    help="The global prompt's share inside the regions.")
    args = ap.parse_args()
    two_subjects.BASE_WEIGHT = args.base_weight
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)

    cfg = demo_config()
    judges = Judges.load()
    pairs = two_subjects.heldout_pairs(cfg.heldout_subjects, cfg.heldout_colours, args.pairs)
    seeds = list(range(5000, 5000 + args.seeds))
    ways = tuple(args.ways.split(","))
    results: dict = {"pairs": pairs, "seeds": seeds, "steps": args.steps, "base_weight": args.base_weight,
                     "sketch": args.sketch, "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        if name == "base":
            pipe, suffix = load_pipe(cfg.base_model), ""
        else:
            pipe, suffix = _load_run(fine_tune(name, RECIPES[name](cfg), args.work)), f", {cfg.instance_prompt}"
        control = two_subjects.toy_controlnet_pipeline(pipe, args.controlnet)
        scores, images = two_subjects.measure(pipe, control, judges, pairs, seeds, suffix, ways, args.steps, label=name,
                                              sketch_kind=args.sketch)
        results["models"][name] = {way: s.as_dict() for way, s in scores.items()}
        results["models"][name]["seconds"] = time.perf_counter() - t0
        for way, groups in images.items():
            make_grid([im for ims in groups for im in ims], cols=len(seeds) * 2).save(args.work / f"{name}-{way}.png")
        (args.work / "composition.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (args.work / "composition.md").write_text(table(results), encoding="utf-8")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| model | way | two-subject success | both subjects (any colour) | left right | right right | "
             "style hit left | style hit right |", "|---|---|---|---|---|---|---|---|"]
    for name, by_way in results["models"].items():
        for way, s in by_way.items():
            if way == "seconds":
                continue
            lines.append(f"| {name} | {way} | **{s['success']:.2f}** | {s['subjects']:.2f} | {s['left']:.2f} | {s['right']:.2f} | "
                         f"{s['style_left']:.2f} | {s['style_right']:.2f} |")
    n = len(results["pairs"]) * len(results["seeds"])
    lines.append(f"\n{len(results['pairs'])} held-out pairs x {len(results['seeds'])} seeds = {n} images per cell, "
                 f"DPM++ {results['steps']} steps, guidance 7.5.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
