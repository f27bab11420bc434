#!/usr/bin/env python
"""Retrain the toy world's shipped assets from scratch on a CPU: VAE, base model, judges.

    python scripts/train_toyworld.py vae        # -> <work>/vae
    python scripts/train_toyworld.py base       # UNet + text encoder on the VAE -> <work>/base
    python scripts/train_toyworld.py judges     # -> <work>/judges.safetensors
    python scripts/train_toyworld.py controlnet # the tiny ControlNet on the shipped base -> <work>/controlnet
    python scripts/train_toyworld.py evaluate   # judge the base model's samples
    python scripts/train_toyworld.py install    # copy <work>/base, judges and controlnet into the package
    python scripts/train_toyworld.py all        # vae, judges, base, evaluate, install
    python scripts/train_toyworld.py experiment # one fine-tune through `train`, metrics JSON

Each stage prints its wall time. Run it niced (`nice -n 10`) on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from style_dreambooth.toyworld import assets_dir
from style_dreambooth.toyworld.styles import PRETRAIN_STYLES, STYLES

log = logging.getLogger("train_toyworld")


def stage_vae(args) -> None:
    from style_dreambooth.toyworld.base_model import train_vae

    vae = train_vae(steps=args.vae_steps, seed=args.seed)
    vae.save_pretrained(args.work / "vae", safe_serialization=True)


def stage_base(args) -> None:
    from diffusers import AutoencoderKL

    from style_dreambooth.toyworld.base_model import dataset_captions, encode_dataset, save_base, train_diffusion

    if args.ceiling and args.name == "base":
        sys.exit("--ceiling needs a --name of its own: `install` copies WORK/base into the package")
    vae = AutoencoderKL.from_pretrained(args.work / "vae").eval()
    styles = tuple(args.styles.split(","))
    suffix = "" if styles == PRETRAIN_STYLES else "-" + "-".join(s for s in styles if s not in PRETRAIN_STYLES)
    cache = args.work / f"latents-{args.dataset}{suffix}.pt"
    if cache.is_file():
        latents, _ = torch.load(cache)
    else:
        latents, default_captions = encode_dataset(vae, args.dataset, styles=styles, ceiling=args.ceiling)
        torch.save((latents, default_captions), cache)
    # images are fixed by seeds
    captions = dataset_captions(len(latents), args.artist_captions, styles=styles, ceiling=args.ceiling)

    def checkpoint(step, pipe):
        save_base(pipe, args.work / f"{args.name}-step{step}")
        print(f"checkpoint at step {step}: {args.work / f'{args.name}-step{step}'} ({time.time() - t0:.0f} s)", flush=True)

    t0 = time.time()
    pipe = train_diffusion(vae, latents, captions, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                           on_checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
                           offset_noise=args.offset_noise, init=args.init, warmup=args.warmup,
                           snr_gamma=args.snr_gamma)
    save_base(pipe, args.work / args.name)


def stage_judges(args) -> None:
    from style_dreambooth.toyworld.judges import train_judges

    vae_dir = args.work / "vae"
    styles = tuple(s for s in STYLES if s != "yltcaxe") + tuple(s for s in args.styles.split(",") if s not in STYLES)
    judges = train_judges(steps=args.judge_steps, seed=args.seed, vae_dir=vae_dir if vae_dir.is_dir() else None,
                          styles=styles + ("yltcaxe",))
    judges.save(args.work / "judges.safetensors")


def stage_controlnet(args) -> None:
    from style_dreambooth.toyworld.controlnet import train_controlnet

    base = args.work / "base" if (args.work / "base").is_dir() else None  # else the shipped base
    train_controlnet(args.work / "controlnet", steps=args.cn_steps, n_pairs=args.cn_pairs, batch=args.cn_batch,
                     lr=args.cn_lr, seed=args.seed, base=base, save_every=args.checkpoint_every,
                     p_colour=args.cn_colour, init=args.cn_init, warmup=args.warmup)


def stage_evaluate(args) -> None:
    from style_dreambooth.toyworld.evaluate import evaluate_base
    from style_dreambooth.toyworld.judges import Judges

    model = args.model or args.work / "base"
    judges_path = args.work / "judges.safetensors"
    judges = Judges.load(judges_path if judges_path.is_file() else None)
    result = evaluate_base(str(model), judges, n_per_cell=args.eval_n, steps=25)
    print(json.dumps(result, indent=1))
    (Path(model) / "eval.json").write_text(json.dumps(result, indent=1)) if Path(model).is_dir() else None


def stage_install(args) -> None:
    dest = assets_dir()
    if (args.work / "base").is_dir():
        if (dest / "base").exists():
            shutil.rmtree(dest / "base")
        shutil.copytree(args.work / "base", dest / "base", ignore=shutil.ignore_patterns("eval.json"))
    if (args.work / "judges.safetensors").is_file():
        shutil.copy2(args.work / "judges.safetensors", dest / "judges.safetensors")
    if (args.work / "controlnet").is_dir():
        if (dest / "controlnet").exists():
            shutil.rmtree(dest / "controlnet")
        shutil.copytree(args.work / "controlnet", dest / "controlnet", ignore=shutil.ignore_patterns("step-*"))
    print(f"installed into {dest}")


def stage_experiment(args) -> None:
    from style_dreambooth.toyworld.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(seed=args.seed)
    for kv in args.set or []:
        key, value = kv.split("=", 1)
        getattr(cfg, key)  # unknown keys fail here
        parsed = yaml.safe_load(value)
        setattr(cfg, key, float(parsed) if isinstance(parsed, str) and parsed[:1].isdigit() else parsed)
    out = args.work / f"experiment-seed{args.seed}"
    metrics = run_experiment(cfg, out)
    print(metrics.to_json())


STAGES = {"vae": stage_vae, "judges": stage_judges, "base": stage_base, "controlnet": stage_controlnet,
          "evaluate": stage_evaluate,
          "install": stage_install, "experiment": stage_experiment}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--work", type=Path, default=Path("toyworld-work"), help="folder for intermediate outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--judge-steps", type=int, default=1200)
    p.add_argument("--dataset", type=int, default=12000, help="pretraining scenes (latents cached once)")
    p.add_argument("--steps", type=int, default=2600, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--offset-noise", type=float, default=0.1)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="base: min-SNR-gamma loss weighting (0: off)")
    p.add_argument("--artist-captions", action="store_true",
                   help="base: credit some named-style captions to made-up artists (the stage-4 experiment)")
    p.add_argument("--styles", default=",".join(PRETRAIN_STYLES),
                   help="base: the pretraining styles; judges: also tell these apart (e.g. add ink,sepia)")
    p.add_argument("--ceiling", action="store_true",
                   help="base: let the artist style into --styles (the ceiling experiment; never install that base)")
    p.add_argument("--init", type=Path, default=None, help="base: continue from this pipeline folder")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--name", default="base", help="base: output folder name under --work")
    p.add_argument("--cn-steps", type=int, default=2500, help="controlnet: training steps")
    p.add_argument("--cn-batch", type=int, default=16)
    p.add_argument("--cn-lr", type=float, default=5e-4)
    p.add_argument("--cn-pairs", type=int, default=3000, help="controlnet: (sketch, scene) training pairs")
    p.add_argument("--cn-colour", type=float, default=0.0,
                   help="controlnet: share of sketches filled with each subject's colour instead of ink")
    p.add_argument("--cn-init", type=Path, default=None, help="controlnet: continue from this ControlNet folder")
    p.add_argument("--model", type=Path, default=None, help="model to evaluate (default <work>/base)")
    p.add_argument("--eval-n", type=int, default=4, help="samples per (subject, colour) cell in evaluate")
    p.add_argument("--set", action="append", help="experiment: override an ExperimentConfig field, key=value")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ["vae", "judges", "base", "controlnet", "evaluate", "install"] if args.stage == "all" else [args.stage]
    for name in stages:
        t = time.time()
        STAGES[name](args)
        print(f"stage {name}: {time.time() - t:.1f} s wall", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
