"""Generation with a trained model: resolve a run folder or model, sample, write PNGs and a grid."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from ..errors import UserError
from ..files import make_output_dir
from ..models.backbones import backbone_of, family_of_lora
from ..models.loading import load_pipeline, load_run_base
from ..progress import progress_bar
from ..run_layout import LORA_FILE, best_checkpoint_spec, resolve_checkpoint
from .composition import Conditioning, plan_composition
from .images import SCHEDULERS, GenerationParams, make_grid, make_scheduler, save_png

log = logging.getLogger(__name__)


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and not (path / "model_index.json").exists()


def resolve_model(model: str, checkpoint: str | None = None, allow_pickle: bool = False, dtype=None,
                  base_config: str | None = None):
    """A run folder -> its final model (or `checkpoint`); anything else -> `load_pipeline` (a single
    file takes its component configs from `base_config`).

    Returns (pipeline, label) where label names what was loaded.
    """
    path = Path(model).expanduser()
    if not _is_run_folder(path):
        if checkpoint is not None:
            raise UserError(f"--checkpoint needs a run folder, but '{model}' is not one (no config.yaml)")
        return (load_pipeline(model, torch_dtype=dtype, allow_pickle=allow_pickle, single_file_config=base_config),
                path.name or model)
    if checkpoint == "best":
        checkpoint = best_checkpoint_spec(path)
    if checkpoint is None:
        final = path / "model"
        if (final / "model_index.json").is_file():
            return load_pipeline(str(final), torch_dtype=dtype), path.name
        if not (final / LORA_FILE).is_file():
            raise UserError(
                f"run '{path}' has no final model yet (training unfinished?); pass --checkpoint latest or step-N"
            )
        folder, label = final, path.name
    else:
        folder = resolve_checkpoint(path, checkpoint)
        label = f"{path.name}/{folder.name}"
    config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    base = load_run_base(config, dtype)
    if (folder / LORA_FILE).is_file():
        backbone_of(base).load_lora(base, folder / LORA_FILE, "run")
        return base, label
    backbone = backbone_of(base)
    denoiser = backbone.denoiser(base)
    unet = type(denoiser).from_pretrained(folder / backbone.denoiser_name, dtype=dtype)
    text_encoders = {name: type(module).from_pretrained(folder / name, dtype=dtype)
                     for name, module in backbone.text_encoders(base).items() if (folder / name).is_dir()}
    return backbone.assemble(base, unet, text_encoders), label


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:SCALE' -> (path, scale); the scale defaults to 1.0."""
    file, scale = Path(spec).expanduser(), 1.0
    head, sep, tail = spec.rpartition(":")
    if not file.is_file() and sep and head:  # a file name may hold a colon itself
        try:
            file, scale = Path(head).expanduser(), float(tail)
        except ValueError:
            if Path(head).expanduser().is_file():
                raise UserError(f"--lora '{spec}': the scale '{tail}' is not a number; pass FILE.safetensors[:SCALE]") from None
        if not math.isfinite(scale):
            raise UserError(f"--lora '{spec}': the scale must be a finite number, not {tail}")
    if not file.is_file():
        raise UserError(f"LoRA file '{file}' not found; pass --lora FILE.safetensors[:SCALE]")
    if file.suffix != ".safetensors":
        raise UserError(f"LoRA file '{file}' is not a .safetensors file; convert it first")
    return file, scale


def check_lora_family(pipe, file: Path) -> None:
    """Refuse a LoRA trained for another model family, naming both."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            found = family_of_lora(f.metadata() or {}, set(f.keys()))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader below
        return
    ours = backbone_of(pipe)
    if found is not None and found is not ours:
        raise UserError(
            f"LoRA file '{file}' was trained for {found.family} ({found.title}) but the model is {ours.family} "
            f"({ours.title}); use a LoRA of the same family"
        )


def apply_loras(pipe, specs: list[str]) -> list[str]:
    """Load each LoRA as its own adapter and activate them all with their scales (stacked)."""
    if not specs:
        return []
    names = [n for n in (pipe.get_active_adapters() if hasattr(pipe, "get_active_adapters") else [])]
    weights = [1.0] * len(names)
    labels = []
    for i, spec in enumerate(specs):
        file, scale = parse_lora_spec(spec)
        check_lora_family(pipe, file)
        name = f"lora{i}"
        try:
            backbone_of(pipe).load_lora(pipe, file, name)
        except OSError:  # what diffusers raises for a file it cannot read as safetensors
            raise UserError(f"LoRA file '{file}' is not a readable .safetensors file (damaged or not a LoRA)") from None
        except (ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UserError(f"LoRA file '{file}' does not fit this model ({first})") from None
        names.append(name)
        weights.append(scale)
        labels.append(f"{file.stem}:{scale:g}")
    pipe.set_adapters(names, adapter_weights=weights)
    return labels


def sample(
    pipe,
    prompt: str,
    seeds: list[int],
    *,
    negative_prompt: str = "",
    steps: int = 25,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 4,
    conditioning: Conditioning | None = None,
) -> list[Image.Image]:
    """One image per seed; each image depends only on its own seed, not on batching.

    ``conditioning`` adds regional prompts and ControlNet images (see composition.py); ``guidance`` is the
    family's default when not given (see :func:`sampling_guidance`).
    """
    device = pipe.device
    backbone = backbone_of(pipe)
    width = width or backbone.default_image_size(pipe)
    height = height or backbone.default_image_size(pipe)
    guidance = sampling_guidance(pipe, guidance)
    conditioning = conditioning or Conditioning()
    images: list[Image.Image] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        gens = [torch.Generator(device=device).manual_seed(s) for s in chunk]
        with conditioning.active(pipe):
            out = pipe(
                **conditioning.pipe_kwargs(pipe, prompt, negative_prompt, len(chunk), guidance),
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=gens,
                **backbone.pipe_call_kwargs(pipe),
            )
        images.extend(out.images)
    return images


@dataclass
class GenerateRequest:
    model: str
    prompt: str | None
    out: Path
    negative_prompt: str = ""
    n: int = 4
    steps: int = 25
    guidance: float | None = None
    scheduler: str | None = None
    seed: int = 0
    width: int | None = None
    height: int | None = None
    checkpoint: str | None = None
    allow_pickle: bool = False
    lora: tuple[str, ...] = ()
    base_config: str | None = None
    overwrite: bool = False
    layout: Path | None = None
    control: tuple[Path, ...] = ()
    controlnet: tuple[str, ...] = ()
    control_scale: tuple[float, ...] = ()


def sampling_guidance(pipe, requested: float | None) -> float:
    """The guidance scale to sample with: the one asked for, else the family's default. FLUX.1-dev reads it as
    its distilled guidance; a model without a guidance embedding (FLUX.1-schnell) takes none."""
    backbone = backbone_of(pipe)
    denoiser_config = backbone.denoiser(pipe).config
    if "guidance_embeds" in denoiser_config and not denoiser_config.guidance_embeds:
        if requested is not None:
            raise UserError(f"--guidance {requested:g}: this {backbone.title} model has no guidance embedding "
                            "(schnell is not guidance-distilled); drop --guidance")
        return 0.0
    return backbone.default_guidance if requested is None else requested


def sampling_scheduler(pipe, name: str | None) -> str:
    """The sampler to use: the one asked for if the family's objective can be sampled with it, else the family's."""
    backbone = backbone_of(pipe)
    if name is None:
        return backbone.samplers[0]
    if name not in backbone.samplers:
        raise UserError(f"--scheduler {name} does not sample {backbone.family} ({backbone.title}) models; "
                        f"use {' or '.join(backbone.samplers)}")
    return name


def _check_request(req: GenerateRequest) -> None:
    if req.guidance is not None and not math.isfinite(req.guidance):
        raise UserError(f"--guidance must be a finite number, not {req.guidance}")
    if req.scheduler is not None and req.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{req.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
    for name, value in (("--width", req.width), ("--height", req.height)):
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{name} {value} must be a positive multiple of 8")


def generate(req: GenerateRequest) -> list[Path]:
    """Write `req.n` PNGs (each with its parameters) and a grid into `req.out`."""
    _check_request(req)
    plan = plan_composition(req.layout, req.prompt, req.negative_prompt, list(req.control), list(req.controlnet),
                            list(req.control_scale))
    if req.out.exists() and not req.out.is_dir():
        raise UserError(f"--out '{req.out}' is a file; pass a folder path")
    seeds = [req.seed + i for i in range(req.n)]
    targets = [req.out / f"{s:06d}.png" for s in seeds]
    taken = [path for path in targets if path.exists()]
    if taken and not req.overwrite:
        raise UserError(f"--out '{req.out}' already holds '{taken[0].name}' from an earlier run; "
                        "pass --overwrite, another --seed or another --out")
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else None
    pipe, label = resolve_model(req.model, req.checkpoint, req.allow_pickle, dtype, req.base_config)
    lora_labels = apply_loras(pipe, list(req.lora))
    if lora_labels:
        label += " + " + " + ".join(lora_labels)
    scheduler = sampling_scheduler(pipe, req.scheduler)
    guidance = sampling_guidance(pipe, req.guidance)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    backbone = backbone_of(pipe)
    width = req.width or plan.width or backbone.default_image_size(pipe)
    height = req.height or plan.height or backbone.default_image_size(pipe)
    for name, side in (("--width", width), ("--height", height)):
        if side % backbone.resolution_multiple:
            raise UserError(f"{name} {side} is not a multiple of {backbone.resolution_multiple}, which "
                            f"{backbone.title} needs (the VAE's downscale times its patch size)")
    pipe, conditioning = plan.prepare(pipe, width, height, label, dtype)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    with progress_bar("generating", req.n) as bar:
        for start in range(0, req.n, 4):
            chunk = seeds[start : start + 4]
            images += sample(
                pipe, plan.prompt, chunk, negative_prompt=plan.negative_prompt, steps=req.steps,
                guidance=req.guidance, width=width, height=height, conditioning=conditioning,
            )
            if bar:
                bar.advance(0, len(chunk))
    make_output_dir(req.out, "--out")
    for s, path, image in zip(seeds, targets, images):
        params = GenerationParams(
            plan.prompt, plan.negative_prompt, req.steps, scheduler, guidance, s,
            image.width, image.height, label, plan.record(),
        )
        save_png(image, path, params)
    save_png(make_grid(images), req.out / "grid.png")
    log.info("wrote %d images and grid.png to %s", len(targets), req.out)
    return targets
