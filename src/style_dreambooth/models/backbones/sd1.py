"""Stable Diffusion 1.x: one CLIP ViT-L text encoder (last layer), epsilon prediction, 512 px."""

from __future__ import annotations

from typing import Any

import torch

from .base import Backbone, ImageSize, PromptEmbeds
from .random_parts import UNET_COMMON, clip_text_config, vae_config


def _components(unet: dict[str, Any], text, vae: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..tokenizer import build_clip_tokenizer

    return {"unet": UNet2DConditionModel(**unet), "vae": AutoencoderKL(**vae), "text_encoder": CLIPTextModel(text),
            "tokenizer": build_clip_tokenizer()}


def sd15_unet() -> dict[str, Any]:
    return {
        **UNET_COMMON, "sample_size": 64,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "norm_num_groups": 32,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,  # diffusers' legacy name: SD 1.x has 8 heads per attention
    }


def tiny_unet(cross_attention_dim: int = 32) -> dict[str, Any]:
    return {
        **UNET_COMMON, "sample_size": 32,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 2,
    }


def sd15() -> dict[str, Any]:
    """SD 1.5's exact architecture (UNet 859.5M, VAE 83.65M, CLIP ViT-L/14 text tower 123.06M)."""
    return _components(sd15_unet(), clip_text_config(768, 3072, 12, 12, 768), vae_config(full=True))


def tiny() -> dict[str, Any]:
    """The same structure shrunk so a CPU training step of two 64 px images takes a fraction of a second."""
    return _components(tiny_unet(), clip_text_config(32, 37, 2, 4, 32), vae_config(full=False))


class SD1(Backbone):
    family = "sd1"
    title = "Stable Diffusion 1.x"
    default_resolution = 512
    pipeline_class_name = "StableDiffusionPipeline"
    folder_class_names = ("StableDiffusionImg2ImgPipeline",)
    controlnet_pipeline_class_name = "StableDiffusionControlNetPipeline"
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"
    shapes = {"tiny": tiny, "sd15": sd15}

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        return not _is_sd2_unet(config) and not config.get("addition_embed_type") and not _is_transformer(config)

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        return any(k.startswith("cond_stage_model.transformer.") for k in keys)

    @classmethod
    def encode_prompts(cls, text_encoders: dict[str, torch.nn.Module], ids: list[torch.Tensor]) -> PromptEmbeds:
        return PromptEmbeds(text_encoders["text_encoder"](ids[0])[0])

    @classmethod
    def denoise(cls, unet, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                sizes: list[ImageSize], guidance: float | None = None) -> torch.Tensor:
        return unet(noisy, timesteps, embeds.hidden).sample


def _is_transformer(config: dict[str, Any]) -> bool:
    """A diffusion transformer's config (MM-DiT: FLUX.1, SD 3.5) rather than a UNet's."""
    return "joint_attention_dim" in config


def _is_sd2_unet(unet_config: dict[str, Any]) -> bool:
    """SD 2.x's UNet uses linear projections in its transformers and 1024-wide OpenCLIP context."""
    return bool(unet_config.get("use_linear_projection")) or unet_config.get("cross_attention_dim") == 1024
