"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG, penultimate layers concatenated), a pooled
prompt vector and six "time ids" per image (original size, crop corner, target size), 1024 px.
Its VAE overflows in fp16, so it stays fp32 unless a fixed VAE is given with --vae."""

from __future__ import annotations

from typing import Any

import torch

from .base import Backbone, ImageSize, PromptEmbeds
from .random_parts import UNET_COMMON, clip_text_config, vae_config

SDXL_VAE_SCALING = 0.13025


def _components(unet: dict[str, Any], text_1, text_2, vae: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..tokenizer import build_clip_tokenizer

    return {
        "unet": UNet2DConditionModel(**unet), "vae": AutoencoderKL(**vae),
        "text_encoder": CLIPTextModel(text_1), "text_encoder_2": CLIPTextModelWithProjection(text_2),
        "tokenizer": build_clip_tokenizer(), "tokenizer_2": build_clip_tokenizer(pad_token="!"),
    }


def _unet(time_dim: int, pooled_dim: int, **shape: Any) -> dict[str, Any]:
    return {
        **UNET_COMMON, "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim, "projection_class_embeddings_input_dim": 6 * time_dim + pooled_dim,
        **shape,
    }


def sdxl() -> dict[str, Any]:
    """SDXL base 1.0's exact architecture (UNet 2,567,463,684 parameters)."""
    unet = _unet(
        256, 1280, sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    )
    return _components(
        unet, clip_text_config(768, 3072, 12, 12, 768),
        clip_text_config(1280, 5120, 32, 20, 1280, act="gelu", pad_token_id=0),
        vae_config(full=True, scaling_factor=SDXL_VAE_SCALING),
    )


def sdxl_tiny() -> dict[str, Any]:
    """Miniature SDXL. The second text encoder is wider than the first, as in SDXL (768 and 1280): diffusers'
    single-file reader tells the two apart by width."""
    unet = _unet(
        8, 48, sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32 + 48,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
    )
    return _components(
        unet, clip_text_config(32, 37, 2, 4, 32), clip_text_config(48, 37, 2, 4, 48, act="gelu", pad_token_id=0),
        vae_config(full=False, scaling_factor=SDXL_VAE_SCALING),
    )


def time_ids(sizes: list[ImageSize], device: torch.device) -> torch.Tensor:
    """(B, 6): original (h, w), crop (top, left), target (h, w) of each image, as SDXL was trained."""
    rows = [[*s.original, *s.crop_top_left, *s.target] for s in sizes]
    return torch.tensor(rows, dtype=torch.float32, device=device)


class SDXL(Backbone):
    family = "sdxl"
    title = "Stable Diffusion XL"
    default_resolution = 1024
    pipeline_class_name = "StableDiffusionXLPipeline"
    folder_class_names = ("StableDiffusionXLImg2ImgPipeline",)
    controlnet_pipeline_class_name = "StableDiffusionXLControlNetPipeline"
    scheduler_class_name = "EulerDiscreteScheduler"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    # Training the 695M-parameter second encoder too is opt-in (--train-text-encoder-2), as in kohya's and
    # diffusers' SDXL trainers: with it a full fine-tune's optimizer state alone outgrows a 48 GB card.
    default_trained_text_encoders = ("text_encoder",)
    lora_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    shapes = {"sdxl-tiny": sdxl_tiny, "sdxl": sdxl}
    single_file_text_encoders = {
        "text_encoder": ("conditioner.embedders.0.transformer.", "openai"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    }
    vae_needs_fp32 = True

    @classmethod
    def unused_modules(cls, name: str, text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
        """The first encoder is read at its penultimate layer, so its last layer and final norm are unused
        (the second's feed the pooled vector)."""
        if name != "text_encoder":
            return []
        model = getattr(text_encoder, "text_model", text_encoder)
        return [model.encoder.layers[-1], model.final_layer_norm]

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        return config.get("addition_embed_type") == "text_time"

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        return "model.diffusion_model.label_emb.0.0.weight" in keys or any(
            k.startswith("conditioner.embedders.") for k in keys)

    @classmethod
    def encode_prompts(cls, text_encoders: dict[str, torch.nn.Module], ids: list[torch.Tensor]) -> PromptEmbeds:
        first = text_encoders["text_encoder"](ids[0], output_hidden_states=True)
        second = text_encoders["text_encoder_2"](ids[1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return PromptEmbeds(hidden, pooled=second.text_embeds)

    @classmethod
    def denoise(cls, unet, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                sizes: list[ImageSize], guidance: float | None = None) -> torch.Tensor:
        added = {"text_embeds": embeds.pooled, "time_ids": time_ids(sizes, noisy.device).to(embeds.pooled.dtype)}
        return unet(noisy, timesteps, embeds.hidden, added_cond_kwargs=added).sample
