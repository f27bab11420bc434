"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder (stored without its last layer, so its
output is the penultimate layer), linear projections in the UNet's transformers, v-prediction at
768 px (2.x-v) or epsilon at 512 px (2.x-base). Prompt encoding and the denoiser call are SD 1.x's."""

from __future__ import annotations

from typing import Any

from .random_parts import UNET_COMMON, clip_text_config, vae_config
from .sd1 import SD1, _components, _is_sd2_unet, _is_transformer, tiny_unet


def sd21() -> dict[str, Any]:
    """SD 2.1's exact architecture (UNet 865.9M, OpenCLIP ViT-H text tower of 23 layers)."""
    unet = {
        **UNET_COMMON, "sample_size": 96,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "norm_num_groups": 32,
        "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
    }
    return _components(unet, clip_text_config(1024, 4096, 23, 16, 512, act="gelu"), vae_config(full=True))


def sd2_tiny() -> dict[str, Any]:
    unet = {**tiny_unet(), "use_linear_projection": True, "attention_head_dim": (2, 4)}
    return _components(unet, clip_text_config(32, 37, 2, 4, 32, act="gelu"), vae_config(full=False))


class SD2(SD1):
    family = "sd2"
    title = "Stable Diffusion 2.x"
    default_resolution = 768
    kohya_base_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2"
    shapes = {"sd2-tiny": sd2_tiny, "sd21": sd21}
    single_file_text_encoders = {"text_encoder": ("cond_stage_model.model.", "openclip")}

    @classmethod
    def modelspec(cls, prediction_type: str | None = None) -> str:
        """SD 2.x has one name per release: 768 px v-prediction, 512 px epsilon."""
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        return _is_sd2_unet(config) and not config.get("addition_embed_type") and not _is_transformer(config)

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        return any(k.startswith("cond_stage_model.model.") for k in keys)
