"""Stable Diffusion 1.x pipelines with random weights, for tests and offline dry runs.

Two shapes:

* ``"sd15"``: exactly SD 1.5's architecture (UNet ~859.5M, VAE ~83.65M, CLIP ViT-L/14 text
  tower ~123.06M parameters), useful to check memory and speed on a GPU without downloading.
* ``"tiny"``: the same structure (cross-attention UNet with a plain down/up block, KL VAE,
  CLIP text transformer, real 49408-token tokenizer) shrunk so that a training step of a batch
  of two 64 px images takes a fraction of a second on a CPU.

Both use the real SD 1.x tokenizer and SD 1.5's scheduler configuration.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import UserError
from ..files import give_usual_modes
from .tokenizer import VOCAB_SIZE, build_clip_tokenizer, write_vocab_files

logger = logging.getLogger(__name__)

Shape = Literal["tiny", "sd15"]
SHAPES: tuple[str, ...] = ("tiny", "sd15")

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407


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


def unet_config(shape: Shape) -> dict[str, Any]:
    """Arguments of :class:`UNet2DConditionModel` for a shape."""
    common: dict[str, Any] = {
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_eps": 1e-5,
    }
    if shape == "sd15":
        return {
            **common,
            "sample_size": 64,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,  # diffusers' legacy name: SD 1.x has 8 heads per attention
        }
    if shape == "tiny":
        return {
            **common,
            "sample_size": 32,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
        }
    raise _bad_shape(shape)


def vae_config(shape: Shape) -> dict[str, Any]:
    """Arguments of :class:`AutoencoderKL` for a shape."""
    if shape == "sd15":
        n, channels, layers, groups, size = 4, (128, 256, 512, 512), 2, 32, 512
    elif shape == "tiny":
        n, channels, layers, groups, size = 2, (16, 32), 1, 8, 64
    else:
        raise _bad_shape(shape)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": size,
        "scaling_factor": 0.18215,
    }


def text_encoder_config(shape: Shape) -> CLIPTextConfig:
    """:class:`CLIPTextConfig` for a shape (``sd15``: CLIP ViT-L/14's text tower)."""
    if shape == "sd15":
        hidden, intermediate, layers, heads, projection = 768, 3072, 12, 12, 768
    elif shape == "tiny":
        hidden, intermediate, layers, heads, projection = 32, 37, 2, 4, 32
    else:
        raise _bad_shape(shape)
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=projection,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )


def _bad_shape(shape: object) -> UserError:
    return UserError(f"unknown random model shape {shape!r}; use one of: {', '.join(SHAPES)}")


def build_random_components(shape: Shape) -> dict[str, torch.nn.Module]:
    """The three networks (unet, vae, text_encoder) with freshly initialised weights.

    Seeds nothing itself, and respects an active ``torch.device`` context, so
    ``with torch.device("meta"): build_random_components("sd15")`` counts parameters for free.
    """
    if shape not in SHAPES:
        raise _bad_shape(shape)
    unet = UNet2DConditionModel(**unet_config(shape))
    vae = AutoencoderKL(**vae_config(shape))
    text_encoder = CLIPTextModel(text_encoder_config(shape))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_random_pipeline(
    shape: Shape, seed: int = 0, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """A :class:`StableDiffusionPipeline` with random weights, deterministic in ``seed``."""
    if shape not in SHAPES:
        raise _bad_shape(shape)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"unknown prediction type {prediction_type!r}; use 'epsilon' or 'v_prediction'"
        )
    # Fork the global RNG so building a model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = build_random_components(shape)
    for module in parts.values():
        module.eval()
    scheduler = PNDMScheduler.from_config(scheduler_config(prediction_type))
    return StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=build_clip_tokenizer(),
        unet=parts["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_random_model(
    shape: Shape,
    out_dir: Path,
    seed: int = 0,
    prediction_type: str = "epsilon",
    overwrite: bool = False,
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
        pipe = build_random_pipeline(shape, seed=seed, prediction_type=prediction_type)
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; add the classic files for older readers.
        write_vocab_files(tmp_dir / "tokenizer")
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
