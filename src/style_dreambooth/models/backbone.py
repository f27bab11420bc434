"""What differs between backbones, in one place: prompt encoding and pipeline assembly.

Today this serves SD 1.x and SD 2.x (one CLIP text encoder, epsilon or v prediction); the
training loop only calls these functions and never branches on the backbone.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length (77 for CLIP)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class PromptEncoder:
    """Prompts -> the per-token hidden states the UNet cross-attends to.

    The token ids of each distinct prompt list are made once and kept on the device (a training run
    has about as many as it has captions), so a training step does no tokenizing."""

    def __init__(self, tokenizer, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self._ids: dict[tuple[str, ...], torch.Tensor] = {}

    def __call__(self, text_encoder, prompts: list[str]) -> torch.Tensor:
        key = tuple(prompts)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = tokenize(self.tokenizer, prompts).to(self.device)
        return text_encoder(ids)[0]


def prediction_type(scheduler) -> str:
    return scheduler.config.get("prediction_type", "epsilon")


def assemble_pipeline(base: StableDiffusionPipeline, unet, text_encoder) -> StableDiffusionPipeline:
    """The base pipeline with trained modules swapped in (no safety checker, as in training)."""
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
