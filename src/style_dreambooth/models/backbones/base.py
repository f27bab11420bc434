"""The interface every model family implements; the training loop, generation and export only call it.

A family module (sd1.py, sd2.py, sdxl.py) owns everything that differs between backbones: the
pipeline classes, how its files are recognised, prompt encoding, the denoiser call, which text
encoders exist, the LoRA and single-file key layouts, the default resolution and the random shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length (77 for CLIP)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids


@dataclass
class PromptEmbeds:
    """What the denoiser is conditioned on: per-token states, and (SDXL) a pooled vector per prompt."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class ImageSize:
    """What SDXL's micro-conditioning needs of one training image (pixels): its size before resizing,
    where the crop starts in the resized image, and the crop's size."""

    original: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]
    target: tuple[int, int]


class Backbone:
    """One model family. Subclasses fill the class attributes and override what differs."""

    family: ClassVar[str]
    title: ClassVar[str]
    default_resolution: ClassVar[int]
    pipeline_class_name: ClassVar[str]
    # model_index.json class names a folder of this family may carry (the pipeline it was saved from).
    folder_class_names: ClassVar[tuple[str, ...]] = ()
    controlnet_pipeline_class_name: ClassVar[str | None] = None
    scheduler_class_name: ClassVar[str] = "PNDMScheduler"  # what the family's releases ship with
    # Component names of the pipeline, in the pipeline's own spelling.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # The text encoders --train-text-encoder trains unless a per-encoder flag says otherwise.
    default_trained_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # kohya LoRA key prefixes per trained module.
    lora_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    # Original (LDM / sgm) single-file layout: each text encoder's key prefix and its layout,
    # "openai" (CLIP as transformers names it) or "openclip" (fused qkv, resblocks); the UNet is
    # always under model.diffusion_model. and the VAE under first_stage_model.
    single_file_text_encoders: ClassVar[dict[str, tuple[str, str]]] = {
        "text_encoder": ("cond_stage_model.transformer.", "openai"),
    }
    kohya_base_version: ClassVar[str]  # ss_base_model_version in a kohya LoRA's metadata
    modelspec_architecture: ClassVar[str]
    # Random-weight shapes this family can build: name -> () -> components (see random_model.py).
    shapes: ClassVar[dict[str, Callable[[], dict[str, Any]]]] = {}
    # Keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16).
    vae_needs_fp32: ClassVar[bool] = False

    # ------------------------------------------------------------------ classes

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def controlnet_pipeline_class(cls):
        import diffusers

        if cls.controlnet_pipeline_class_name is None:
            return None
        return getattr(diffusers, cls.controlnet_pipeline_class_name)

    @classmethod
    def modelspec(cls, prediction_type: str | None = None) -> str:
        """The modelspec architecture name other tools read from a file's metadata."""
        return cls.modelspec_architecture

    # ------------------------------------------------------------------ recognising files

    @classmethod
    def owns_pipeline_class(cls, class_name: str, unet_config: dict[str, Any]) -> bool:
        """Whether a diffusers folder with this model_index `_class_name` and UNet config is ours."""
        return class_name in (cls.pipeline_class_name, *cls.folder_class_names) and cls.owns_unet_config(unet_config)

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        """Whether a UNet (or ControlNet) config has this family's shape."""
        raise NotImplementedError

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        """Whether an original-layout checkpoint with these tensor names is ours."""
        raise NotImplementedError

    # ------------------------------------------------------------------ components

    @classmethod
    def text_encoders(cls, pipe) -> dict[str, torch.nn.Module]:
        return {name: getattr(pipe, name) for name in cls.text_encoder_names}

    @classmethod
    def unused_modules(cls, name: str, text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
        """Parts of a text encoder the conditioning never reads (they get no gradient, which multi-GPU
        training refuses), so they stay frozen."""
        return []

    @classmethod
    def tokenizers(cls, pipe) -> list:
        return [getattr(pipe, name) for name in cls.tokenizer_names]

    @classmethod
    def assemble(cls, base, unet, text_encoders: dict[str, torch.nn.Module]):
        """The base pipeline with trained modules swapped in (no safety checker)."""
        parts = {name: getattr(base, name) for name in base.components}
        parts.update(unet=unet, **text_encoders)
        for name in ("safety_checker", "feature_extractor", "image_encoder"):
            if name in parts:
                parts[name] = None
        kwargs = {"requires_safety_checker": False} if "safety_checker" in parts else {}
        return type(base)(**parts, **kwargs)

    # ------------------------------------------------------------------ the maths that differs

    @classmethod
    def encode_prompts(cls, text_encoders: dict[str, torch.nn.Module], ids: list[torch.Tensor]) -> PromptEmbeds:
        """Token ids (one tensor per tokenizer) -> the denoiser's conditioning."""
        raise NotImplementedError

    @classmethod
    def denoise(cls, unet, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                sizes: list[ImageSize]) -> torch.Tensor:
        raise NotImplementedError


class PromptEncoder:
    """Prompts -> conditioning, through a family's tokenizers and text encoders.

    The token ids of each distinct prompt list are made once and kept on the device (a training run
    has about as many as it has captions), so a training step does no tokenizing."""

    def __init__(self, backbone: type[Backbone], tokenizers: list, device: torch.device) -> None:
        self.backbone = backbone
        self.tokenizers = tokenizers
        self.device = device
        self._ids: dict[tuple[str, ...], list[torch.Tensor]] = {}

    def __call__(self, text_encoders: dict[str, torch.nn.Module], prompts: list[str]) -> PromptEmbeds:
        key = tuple(prompts)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = [tokenize(t, prompts).to(self.device) for t in self.tokenizers]
        return self.backbone.encode_prompts(text_encoders, ids)


def prediction_type(scheduler) -> str:
    return scheduler.config.get("prediction_type", "epsilon")
