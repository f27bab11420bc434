#!/usr/bin/env python
"""Probe the proof world's fine-tune: one run read at several checkpoints, or a run's parts swapped.

    # one run of the demo's setting with changes, judged at steps 250..1000 (docs/proof-world.md)
    python scripts/proof_world_probe.py curve te-lr-1e-5 --steps 250,500,750,1000 --set text_encoder_lr=1e-5
    python scripts/proof_world_probe.py curve lora-kv --steps 250,500 --set method=lora --set rank=16 \\
        --set 'lora_targets=[attn2.to_k,attn2.to_v,q_proj,k_proj,v_proj,out_proj]' --set learning_rate=1e-3
    # the same, training only the identifier's token embeddings in the text encoder (pivotal-tuning style)
    python scripts/proof_world_probe.py curve rows --set text_encoder_lr=1e-3 --set text_encoder_scope=identifier
    # the same recipe with instance images in a style the base can draw (hit and leak then judge it)
    python scripts/proof_world_probe.py curve watercolor --steps 250,500 --instance-style watercolor
    # another base and the judges trained with it (docs/proof-world.md, stage 5)
    python scripts/proof_world_probe.py --judges WORK/judges.safetensors curve nb --set base_model=WORK/base5
    # which part of a fine-tuned model carries the style and the leak: UNet or text encoder
    python scripts/proof_world_probe.py swap WORK/te-lr-1e-5 --checkpoint step-000500
    # how much latent error each style's colours survive through the base's VAE (no training)
    python scripts/proof_world_probe.py latents --styles plain,ink,sepia,yltcaxe
    # how well the tiny models draw the artist style when pretrained on it (train_toyworld.py base --ceiling)
    python scripts/proof_world_probe.py ceiling src/style_dreambooth/toyworld/assets/base WORK/basey
    # sampling that mixes the prompt without the identifier into a fine-tune's: does style + colour rise?
    python scripts/proof_world_probe.py mix WORK/recipe/seed-1/run --ways edit:0.5,guide:5,weight:2

``--set`` takes an ExperimentConfig field or any TrainConfig field (``key=YAML value``). The
evaluation is the demo's (24 class images, 12 held-out cells x 2 seeds, DPM++ 20 steps, no pairs).
Each curve appends one line per step to ``WORK/summary.md``. Use ``OMP_NUM_THREADS=1``
and at most one process per core.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import yaml

from style_dreambooth.models.backbones import SD1, PromptEncoder
from style_dreambooth.toyworld import experiment
from style_dreambooth.toyworld.demo import demo_config
from style_dreambooth.toyworld.experiment import ExperimentConfig, ExperimentMetrics, _load_run, _prepare, _Probe, run_curve
from style_dreambooth.toyworld.evaluate import load_pipe
from style_dreambooth.toyworld.judges import Judges

COLUMNS = ("style_hit_rate", "leak_rate", "leak_rate_plain", "leak_rate_class", "subject_acc_token", "colour_acc_token", "subject_acc_plain",
           "colour_acc_plain", "max_instance_ssim")
PROMPTS = ("a yellow star, yltcaxe artstyle", "a yellow star, artstyle", "a yellow star", "a yellow heart", "",
           "yltcaxe artstyle", "artstyle")


def experiment_config(settings: list[str], base: ExperimentConfig | None = None) -> ExperimentConfig:
    cfg = replace(base or demo_config(), pairs=False)
    own = {f.name for f in fields(ExperimentConfig)}
    overrides: dict = {}
    for item in settings:
        key, _, value = item.partition("=")
        if key in own:
            setattr(cfg, key, yaml.safe_load(value))
        else:
            overrides[key] = yaml.safe_load(value)  # validated as a TrainConfig field by train_config
    return replace(cfg, train_overrides={**cfg.train_overrides, **overrides})


def row(label: str, m: ExperimentMetrics) -> str:
    return f"| {label} | " + " | ".join(f"{getattr(m, c):.2f}" for c in COLUMNS) + " |"


def curve(args) -> None:
    cfg = experiment_config(args.set)
    if args.instance_style:
        experiment.ARTIST_STYLE = args.instance_style  # instance images, hit and leak all read this style
    t0 = time.perf_counter()
    out = run_curve(cfg, args.work / args.name, [int(s) for s in args.steps.split(",")], Judges.load(args.judges))
    settings = " ".join(args.set)
    settings += f" instance-style={args.instance_style}" if args.instance_style else ""
    lines = [row(f"{args.name} ({settings or 'defaults'}) step {k}", m) for k, m in out.items()]
    with open(args.work / "summary.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"| run | {' | '.join(COLUMNS)} |\n" + "\n".join(lines) + f"\n{time.perf_counter() - t0:.0f} s")


def _encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return PromptEncoder(SD1, [pipe.tokenizer], torch.device("cpu"))({"text_encoder": pipe.text_encoder}, [prompt]).hidden[0]


def swap(args) -> None:
    cfg = experiment_config([])
    _, instances = _prepare(cfg, args.work / "swap-instances")
    probe = _Probe(cfg, Judges.load(args.judges), instances)
    tuned = _load_run(args.run / "run", args.checkpoint)
    base = load_pipe(cfg.base_model)
    for prompt in PROMPTS:
        before, after = _encode(base, prompt), _encode(tuned, prompt)
        print(f"text-encoder drift {prompt!r}: {float((after - before).norm() / before.norm()):.3f}")
    tuned_unet = copy.copy(tuned)
    tuned_unet.text_encoder = base.text_encoder
    tuned_te = copy.copy(tuned)
    tuned_te.unet = base.unet
    print(f"| model | {' | '.join(COLUMNS)} |")
    for label, pipe in (("fine-tuned UNet + fine-tuned text encoder", tuned),
                        ("fine-tuned UNet + base text encoder", tuned_unet),
                        ("base UNet + fine-tuned text encoder", tuned_te)):
        print(row(label, probe.measure(pipe, 0.0, time.perf_counter())), flush=True)


LATENT_ERRORS = ("as encoded", "noise 0.3 std", "contrast -20%", "3x3 blur")


def _perturbed(z: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """A latent as encoded, and the kinds of error a sampler makes (LATENT_ERRORS): noise, lost contrast,
    lost detail."""
    return [
        z,
        z + 0.3 * z.std() * torch.randn(z.shape, generator=generator),
        0.8 * z + 0.2 * z.mean((2, 3), keepdim=True),
        torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False),
    ]


def latents(args) -> None:
    """Render the held-out subjects in all colours in each style, encode them with the base's VAE, perturb
    the latents, decode, and judge the colour: which palettes survive a generator's latent error."""
    from style_dreambooth.toyworld.data import to_array, to_images
    from style_dreambooth.toyworld.render import COLOUR_NAMES, random_scene
    from style_dreambooth.toyworld.styles import apply_style

    vae, judges = load_pipe(demo_config().base_model).vae, Judges.load(args.judges)
    cells = [(k, c, s) for k in experiment.HELDOUT_SUBJECTS for c in COLOUR_NAMES for s in (1000, 1001)]
    print(f"| style | {' | '.join(LATENT_ERRORS)} |")
    for style in args.styles.split(","):
        pixels = torch.from_numpy(to_array([apply_style(random_scene(s, kind=k, colour=c), style) for k, c, s in cells]))
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mean
            accs = []
            for zz in _perturbed(z, torch.Generator().manual_seed(0)):
                verdicts = judges.judge(to_images(vae.decode(zz).sample))
                accs.append(sum(v.colour == c for v, (_, c, _) in zip(verdicts, cells)) / len(cells))
        print(f"| {style} | " + " | ".join(f"{a:.2f}" for a in accs) + " |", flush=True)


def ceiling(args) -> None:
    """Judge base models on the recipe's colour metric prompts ("a yellow star, yltcaxe artstyle"; the
    held-out subjects in the held-out colours at the demo's eval seeds and steps), on the same cells
    without the token, and on the instance cells with it: for a base pretrained with the artist style
    (`train_toyworld.py base --ceiling`), how well the tiny models draw it when they have seen thousands
    of its images rather than five."""
    from style_dreambooth.toyworld.evaluate import generate_jobs, grid_jobs, score_single

    cfg, judges = demo_config(), Judges.load(args.judges)
    seeds = range(cfg.eval_seed0, cfg.eval_seed0 + cfg.eval_seeds)
    cells = {"held-out, token": (cfg.heldout_subjects, cfg.heldout_colours, "yltcaxe"),
             "held-out, plain": (cfg.heldout_subjects, cfg.heldout_colours, None),
             "instance, token": (experiment.INSTANCE_SUBJECTS, experiment.INSTANCE_COLOURS, "yltcaxe")}
    print("| model | prompts | images | judged yltcaxe | subject | colour |")
    for model in args.models:
        pipe = load_pipe(model)
        for name, (kinds, colours, style) in cells.items():
            jobs = grid_jobs(kinds, colours, seeds, style)
            scores = score_single(judges, jobs, generate_jobs(pipe, jobs, cfg.eval_steps))
            print(f"| {model} | {name} | {scores.n} | {scores.style_rate('yltcaxe'):.2f} | {scores.subject_acc:.2f} "
                  f"| {scores.colour_acc:.2f} |", flush=True)


MIX_WAYS = {
    "edit": "the prompt without the identifier for the first F of the steps, then the prompt (A1111's prompt editing)",
    "guide": "guidance 7.5 towards the prompt without the identifier, F towards the identifier from there",
    "weight": "the colour word's encoding x F, the mean kept (A1111's (word:F) weighting)",
}


def _weighted(pipe, prompt: str, word: str, weight: float) -> torch.Tensor:
    e = _encode(pipe, prompt)[None]
    if weight == 1.0:
        return e
    ids, wid = pipe.tokenizer(prompt).input_ids, pipe.tokenizer(word, add_special_tokens=False).input_ids
    scale = torch.ones(e.shape[1])
    for i in range(len(ids) - len(wid) + 1):
        if ids[i:i + len(wid)] == wid:
            scale[i:i + len(wid)] = weight
    scaled = e * scale[None, :, None]
    return scaled * (e.mean() / scaled.mean())


@torch.no_grad()
def _mixed_images(pipe, plain: str, token: str, colour: str, seeds, way: str, f: float, steps: int):
    """One image per seed, sampled as the pipeline does at the evaluation's guidance, with the noise
    prediction mixed as ``way`` says."""
    from diffusers.utils.torch_utils import randn_tensor

    from style_dreambooth.toyworld.evaluate import GUIDANCE as guidance

    n = len(seeds)
    size = pipe.unet.config.sample_size  # the proof world samples at the UNet's own size, as evaluate does
    latents = randn_tensor((n, pipe.unet.config.in_channels, size, size),
                           generator=[torch.Generator().manual_seed(s) for s in seeds])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    weight = f if way == "weight" else 1.0
    cond = torch.cat([_encode(pipe, "")[None], _encode(pipe, plain)[None], _weighted(pipe, token, colour, weight)])
    cond = cond.repeat_interleave(n, 0)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(latents, t)
        uncond, eps_plain, eps_token = pipe.unet(torch.cat([x] * 3), t, encoder_hidden_states=cond).sample.chunk(3)
        if way == "guide":
            eps = uncond + guidance * (eps_plain - uncond) + f * (eps_token - eps_plain)
        else:
            use_plain = way == "edit" and i < f * steps
            eps = uncond + guidance * ((eps_plain if use_plain else eps_token) - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample,
                                            output_type="pil")


def mix(args) -> None:
    """Judge a fine-tune on the colour metric's cells, sampled with the prompt without the identifier mixed
    in (MIX_WAYS), with the identifier last and first; joint = judged yltcaxe and in the asked colour."""
    from style_dreambooth.toyworld.evaluate import grid_jobs

    cfg, judges = demo_config(), Judges.load(args.judges)
    pipe = _load_run(args.run)
    jobs = grid_jobs(cfg.heldout_subjects, cfg.heldout_colours, range(cfg.eval_seed0, cfg.eval_seed0 + cfg.eval_seeds))
    print("| way | identifier | hit | subject | colour | joint |")
    for item in args.ways.split(","):
        way, _, f = item.partition(":")
        if way not in MIX_WAYS:
            raise SystemExit(f"unknown way {way!r}: one of {', '.join(MIX_WAYS)}")
        for order in ("last", "first"):
            images, truth = [], []
            for job in jobs:
                token = f"{job.prompt}, {cfg.instance_prompt}" if order == "last" else f"{cfg.instance_prompt}, {job.prompt}"
                kind, colour = job.subjects[0]
                images += _mixed_images(pipe, job.prompt, token, colour, list(job.seeds), way, float(f), cfg.eval_steps)
                truth += [(kind, colour)] * len(job.seeds)
            v = judges.judge(images)
            rate = lambda ok: sum(map(ok, v, truth)) / len(v)  # noqa: E731
            print(f"| {item} | {order} | {rate(lambda a, t: a.style == 'yltcaxe'):.2f} | {rate(lambda a, t: a.subject == t[0]):.2f} "
                  f"| {rate(lambda a, t: a.colour == t[1]):.2f} "
                  f"| {rate(lambda a, t: a.style == 'yltcaxe' and a.colour == t[1]):.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/proof-world-probe"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--judges", type=Path, default=None, help="judges file (default: the shipped judges)")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curve", help="one run, judged at several checkpoints")
    c.add_argument("name")
    c.add_argument("--steps", default="250,500,750,1000")
    c.add_argument("--set", action="append", default=[], help="key=value (ExperimentConfig or TrainConfig field)")
    c.add_argument("--instance-style", default=None,
                   help="draw the instance images in this style instead of yltcaxe (hit and leak then judge it)")
    s = sub.add_parser("swap", help="judge a run with its UNet or text encoder swapped for the base's")
    s.add_argument("run", type=Path, help="a curve's work folder (holding run/)")
    s.add_argument("--checkpoint", default=None, help="step-N folder (default: the final model)")
    v = sub.add_parser("latents", help="colour accuracy of VAE round trips with perturbed latents, per style")
    v.add_argument("--styles", default="plain,ink,sepia,yltcaxe")
    e = sub.add_parser("ceiling", help="judge base models on the colour metric's prompts (the ceiling experiment)")
    e.add_argument("models", nargs="+", help="pipeline folders")
    m = sub.add_parser("mix", help="judge a fine-tune sampled with the prompt without the identifier mixed in")
    m.add_argument("run", type=Path, help="a trained run folder (run/ of a proof_world_seeds seed)")
    m.add_argument("--ways", default="edit:0.5,guide:5,weight:2",
                   help="WAY:F,...; WAY one of " + ", ".join(f"{k} ({v})" for k, v in MIX_WAYS.items()))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"curve": curve, "swap": swap, "latents": latents, "ceiling": ceiling, "mix": mix}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
