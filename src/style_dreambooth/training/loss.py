"""The DreamBooth loss: instance half + weighted prior half, each with its own timesteps.

min-SNR weighting is applied per sample from that sample's own timestep, so it stays
correct when the batch is the concatenation of instance and class samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (Hang et al. 2023) for epsilon or v targets."""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def diffusion_target(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device)[timesteps].float()
        shape = (-1,) + (1,) * (latents.dim() - 1)
        sqrt_a = a.sqrt().view(shape)
        sqrt_1ma = (1.0 - a).sqrt().view(shape)
        return (sqrt_a * noise.float() - sqrt_1ma * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    n_instance: int,
    prior_loss_weight: float = 1.0,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> LossParts:
    """Loss over a batch whose first `n_instance` rows are instance samples and the rest class samples.

    Each half is the mean over its own samples of the per-sample MSE, weighted per sample by
    min-SNR when `snr_gamma` is set; total = instance + prior_loss_weight * prior.
    """
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(timesteps, alphas_cumprod, snr_gamma, prediction_type)
    instance = per_sample[:n_instance].mean()
    if n_instance < per_sample.shape[0]:
        prior = per_sample[n_instance:].mean()
        return LossParts(instance + prior_loss_weight * prior, instance, prior)
    return LossParts(instance, instance, None)
