"""The noise a training step adds to the latents: Gaussian, plus the optional low-frequency parts.

* ``--offset-noise S`` adds one random value per image and channel (scaled by S), so the model
  learns to move an image's overall brightness and colour.
* ``--multires-noise-iterations N`` (kohya-ss's multi-resolution, or pyramid, noise) adds Gaussian
  noise drawn at 1/2, 1/4, ... of the latent size, upsampled, each level scaled by
  ``--multires-noise-discount`` to the power of its depth, and rescales the sum to unit variance per
  image. Coarse noise hides what fine noise leaves readable (a shape's colour, a region's tone), so
  the loss asks the model to restore those too, not only the texture.
* ``--ip-noise-gamma G`` (input perturbation, Ning et al. 2023) noises the latents with ``noise`` plus
  G times a second draw, while the target stays ``noise``: training inputs then carry some of the
  error a sampler's own inputs do (against exposure bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def training_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0,
                   multires_iterations: int = 0, multires_discount: float = 0.3) -> torch.Tensor:
    """Noise shaped like ``latents``, drawn from ``generator`` in a fixed order."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if offset:
        noise = noise + offset * _draw(latents, (1, 1), generator)
    if multires_iterations:
        noise = _add_coarse_levels(noise, generator, multires_iterations, multires_discount)
    return noise


def perturbed(noise: torch.Tensor, generator: torch.Generator, gamma: float) -> torch.Tensor:
    """The noise that goes into the noisy latents under input perturbation; ``noise`` itself when
    ``gamma`` is 0, with nothing drawn, so runs without it reproduce bit for bit."""
    if not gamma:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device)


def _draw(like: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn((*like.shape[:2], *size), generator=generator, device=like.device)


def _add_coarse_levels(noise: torch.Tensor, generator: torch.Generator, levels: int,
                       discount: float) -> torch.Tensor:
    height, width = noise.shape[-2:]
    for depth in range(1, levels + 1):
        size = (max(1, height >> depth), max(1, width >> depth))
        coarse = F.interpolate(_draw(noise, size, generator), size=(height, width), mode="bilinear",
                               align_corners=False)
        noise = noise + discount ** depth * coarse
        if size == (1, 1):
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)
