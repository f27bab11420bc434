"""Pipelines of any known family with random weights, for tests and offline dry runs.

Each family declares its shapes (models/backbones): the full architectures (``sd15``, ``sd21``,
``sdxl``: exact parameter counts, to check memory and speed on a GPU without downloading) and
miniatures (``tiny``, ``sd2-tiny``, ``sdxl-tiny``: the same structure shrunk so that a training
step of a batch of two 64 px images takes a fraction of a second on a CPU). All use the real CLIP
tokenizer and their family's noise schedule (FLUX.1's shapes an offline T5 tokenizer, t5_tokenizer.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import give_usual_modes
from .backbones import FAMILIES, shape_family
from .backbones.random_parts import BOS_TOKEN_ID, EOS_TOKEN_ID
from .tokenizer import write_vocab_files

logger = logging.getLogger(__name__)

Shape = str
__all__ = ["BOS_TOKEN_ID", "EOS_TOKEN_ID", "SHAPES", "build_random_components", "build_random_pipeline",
           "save_random_model", "scheduler_config"]
SHAPES: tuple[str, ...] = tuple(s for b in FAMILIES.values() for s in b.shapes)


def scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """SD 1.5's ``scheduler/scheduler_config.json`` (PNDM), with a chosen prediction type."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        # Not a PNDM argument, but kept in the config (as in SD 1.5's) so that
        # DDIMScheduler.from_config(pipe.scheduler.config) does not clip samples.
        "clip_sample": False,
        "timestep_spacing": "leading",
        "prediction_type": prediction_type,
    }


def build_random_components(shape: Shape) -> dict[str, Any]:
    """The networks and tokenizers of a shape with freshly initialised weights.

    Seeds nothing itself, and respects an active ``torch.device`` context, so
    ``with torch.device("meta"): build_random_components("sdxl")`` counts parameters for free.
    """
    return shape_family(shape).shapes[shape]()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_random_pipeline(shape: Shape, seed: int = 0, prediction_type: str = "epsilon", dtype: str = "fp32",
                          device: str = "cpu"):
    """The family's pipeline with random weights, deterministic in ``seed`` (for one dtype and device).

    ``dtype`` and ``device`` are where the weights are made: FLUX.1-dev's 17 billion parameters fit a
    64 GB disk only in half precision, and a GPU draws them in seconds."""
    family = shape_family(shape)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"unknown prediction type {prediction_type!r}; use 'epsilon' or 'v_prediction'"
        )
    # Fork the global RNG so building a model does not disturb the caller's random stream.
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} needs a CUDA GPU; use --device cpu")
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(DTYPES[dtype])
        try:
            parts = build_random_components(shape)
        finally:
            torch.set_default_dtype(default_dtype)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    import diffusers

    # Each family's releases ship with their own scheduler class; the UNet families' read SD's config.
    config = family.random_scheduler_config(prediction_type) or scheduler_config(prediction_type)
    scheduler = getattr(diffusers, family.scheduler_class_name).from_config(config)
    pipeline_class = family.pipeline_class()
    extra = {}
    if "safety_checker" in pipeline_class._optional_components:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return pipeline_class(**parts, scheduler=scheduler, **extra)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_random_model(
    shape: Shape,
    out_dir: Path,
    seed: int = 0,
    prediction_type: str = "epsilon",
    overwrite: bool = False,
    dtype: str = "fp32",
    device: str = "cpu",
) -> Path:
    """Save a random-weight pipeline as a diffusers folder (safetensors), atomically.

    The folder is written next to ``out_dir`` and renamed into place, so a crash never leaves a
    half-written model. Returns the resolved ``out_dir``.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"'{out_dir}' exists and is not a folder; choose another output path")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise UserError(
            f"output folder '{out_dir}' already exists and is not empty; choose another path or pass --overwrite"
        )
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as exc:
        raise UserError(
            f"cannot write to '{parent}' ({exc.strerror or exc}); choose a writable output folder"
        ) from exc

    try:
        pipe = build_random_pipeline(shape, seed=seed, prediction_type=prediction_type, dtype=dtype, device=device)
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; add the classic files for older readers of CLIP's.
        for name, part in pipe.components.items():
            if name.startswith("tokenizer") and "CLIP" in type(part).__name__:
                write_vocab_files(tmp_dir / name)
        give_usual_modes(tmp_dir)  # mkdtemp and safetensors make them private (0700, 0600)
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("saved random %s model (seed %d, %s) to %s", shape, seed, prediction_type, out_dir)
    return out_dir


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then removed."""
    old: Path | None = None
    if out_dir.exists():
        if _is_nonempty_dir(out_dir):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "model")
        else:
            out_dir.rmdir()
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        if old is not None:  # put the previous model back
            os.rename(old / "model", out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
