"""Regional prompts: cross-attention where each region's pixels follow their own prompt.

The text conditioning handed to the UNet is the global prompt's embedding followed by each
region's, concatenated along the token axis (the negative prompt's, repeated as often, for the
unconditional half of guidance). :class:`RegionalAttnProcessor` wraps a cross-attention layer's
own processor: it runs it once per prompt and blends the results per pixel with the region
masks, pooled to the layer's resolution. Where regions overlap they are averaged; where none
reaches, the global prompt rules. A single region covering the canvas gets weight exactly 1 and
the global prompt exactly 0 (unless a ``base_weight`` keeps a share of the global prompt inside
regions, as A1111's Regional Prompter's base ratio does), so the image is the plain image of the region's prompt, bit for bit.

A conditioning of the whole image rather than of each pixel (SDXL's pooled prompt vector) is the
prompts' blend by their share of the canvas (:func:`canvas_shares`), so that holds there too.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


class RegionalAttnProcessor:
    """Wraps one cross-attention layer's processor; self-attention passes straight through."""

    def __init__(self, inner, masks: torch.Tensor, base_weight: float = 0.0) -> None:
        self.inner = inner
        self.masks = masks  # (regions, height, width) at latent resolution, values in [0, 1]
        self.base_weight = base_weight  # the global prompt's share inside regions
        self._weights: dict[int, torch.Tensor] = {}

    def weights(self, tokens: int) -> torch.Tensor:
        """(1 + regions, tokens) blend weights for a layer with ``tokens`` pixels: global first."""
        if tokens not in self._weights:
            self._weights[tokens] = blend_weights(self.masks, _grid(self.masks.shape[1:], tokens), self.base_weight)
        return self._weights[tokens]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, None, attention_mask, temb, **kwargs)
        prompts = encoder_hidden_states.chunk(1 + len(self.masks), dim=1)
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        weights = self.weights(tokens).to(hidden_states.device, hidden_states.dtype)
        out = None
        for prompt, weight in zip(prompts, weights):
            part = self.inner(attn, hidden_states, prompt, attention_mask, temb, **kwargs)
            weight = weight.view(1, -1, 1) if part.ndim == 3 else weight.view(1, 1, *part.shape[2:])
            out = part * weight if out is None else out + part * weight
        return out


def blend_weights(masks: torch.Tensor, grid: tuple[int, int], base_weight: float = 0.0) -> torch.Tensor:
    """(1 + regions, pixels) weights of each prompt at each pixel of a ``grid`` (height, width):
    regions share the pixels they cover, the global prompt has the rest (and ``base_weight`` of theirs)."""
    regions = F.adaptive_avg_pool2d(masks[None], grid)[0].flatten(1)
    regions = regions / regions.sum(0).clamp(min=1.0)
    if base_weight:
        regions = regions * (1.0 - base_weight)
    rest = (1.0 - regions.sum(0)).clamp(min=0.0)
    return torch.cat([rest[None], regions])


def canvas_shares(masks: torch.Tensor, base_weight: float = 0.0) -> list[float]:
    """Each prompt's share of the whole canvas, global first: how a per-image conditioning (SDXL's
    pooled prompt vector) is blended. A full-canvas region's share is exactly 1, the global's 0."""
    return blend_weights(masks, tuple(masks.shape[1:]), base_weight).mean(1).tolist()


def _grid(latent: torch.Size, tokens: int) -> tuple[int, int]:
    """The (height, width) of a layer with ``tokens`` pixels: the latent size halved k times (rounded up)."""
    height, width = latent
    for k in range(8):
        h, w = math.ceil(height / 2**k), math.ceil(width / 2**k)
        if h * w == tokens:
            return h, w
    raise ValueError(f"no UNet resolution of a {height}x{width} latent has {tokens} pixels")


def latent_masks(masks: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Pixel masks (regions, H, W) pooled to the latent grid (regions, H/f, W/f)."""
    h, w = masks.shape[1] // vae_scale_factor, masks.shape[2] // vae_scale_factor
    return F.adaptive_avg_pool2d(masks[None], (h, w))[0]


def _denoisers(pipe) -> list:
    nets = [pipe.unet]
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        nets += list(getattr(controlnet, "nets", [controlnet]))
    return nets


@contextmanager
def regional_attention(pipe, masks: torch.Tensor, base_weight: float = 0.0) -> Iterator[None]:
    """While active, every cross-attention layer of the UNet (and ControlNets) blends per region.

    ``masks`` are at latent resolution; the model's own processors are put back afterwards.
    """
    saved = [(net, net.attn_processors) for net in _denoisers(pipe)]
    try:
        for net, processors in saved:
            net.set_attn_processor({
                name: RegionalAttnProcessor(proc, masks, base_weight) if ".attn2." in name else proc
                for name, proc in processors.items()
            })
        yield
    finally:
        for net, processors in saved:
            net.set_attn_processor(processors)
