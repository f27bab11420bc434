"""Training objectives: how a clean latent is noised, what the denoiser should predict, how the noise
level is drawn and how each sample's loss is weighted. A family names its objective; the training
loop only calls it.

* :class:`DDPMObjective` (SD 1.x, 2.x, SDXL): integer timesteps drawn uniformly from a range,
  ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` on the scheduler's cumulative alphas, an epsilon or a
  velocity target, optional min-SNR-gamma weights.
* :class:`FlowMatchingObjective` (FLUX.1, SD 3.5, ...): a noise level sigma in (0, 1),
  ``x_t = (1 - sigma) x0 + sigma noise``, the target ``noise - x0`` (the velocity of the straight
  path), sigma drawn by one of :data:`SIGMA_SAMPLINGS` and optionally shifted towards noise, each
  sample weighted by one of :data:`WEIGHTINGS`.

Every draw comes from the step's generator, in a fixed order, so a run reproduces bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ...errors import UserError

SIGMA_SAMPLINGS = ("uniform", "logit_normal", "mode", "logsnr")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class Objective(Protocol):
    def draw_timesteps(self, n: int, generator: torch.Generator, device: torch.device,
                       image_tokens: int) -> torch.Tensor: ...

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None: ...


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view((-1,) + (1,) * (like.dim() - 1))


# --------------------------------------------------------------------------- DDPM


class DDPMObjective:
    """The denoising objective of the UNet families, on the scheduler's noise schedule."""

    def __init__(self, scheduler_config: dict, timestep_range: tuple[int, int], prediction_type: str,
                 snr_gamma: float | None, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.timestep_range = timestep_range
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma

    def draw_timesteps(self, n: int, generator: torch.Generator, device: torch.device,
                       image_tokens: int = 0) -> torch.Tensor:
        return torch.randint(*self.timestep_range, (n,), generator=generator, device=device)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.prediction_type, latents, noise, timesteps, self.alphas_cumprod)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        return min_snr_weights(timesteps, self.alphas_cumprod, self.snr_gamma, self.prediction_type)


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (Hang et al. 2023) for epsilon or v targets."""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def diffusion_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What a DDPM denoiser should predict: the noise (epsilon) or the velocity sqrt(a) noise - sqrt(1 - a) x0 (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod.to(latents.device)[timesteps].float(), latents)
        return (a.sqrt() * noise.float() - (1.0 - a).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


# --------------------------------------------------------------------------- flow matching


@dataclass(frozen=True)
class SigmaSchedule:
    """How a flow-matching run draws sigma: the density, its parameters and the shift.

    ``shift`` is a static shift s (sigma -> s sigma / (1 + (s - 1) sigma); 1 is none) or, with
    ``shift_by_resolution``, FLUX.1's shift mu interpolated linearly in the image's token count from
    ``base_shift`` at ``base_tokens`` to ``max_shift`` at ``max_tokens`` and applied as
    sigma -> e^mu / (e^mu + 1/sigma - 1).
    """

    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    logsnr_mean: float = -6.0
    logsnr_std: float = 2.0
    shift: float = 1.0
    shift_by_resolution: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096

    def draw(self, n: int, generator: torch.Generator, device: torch.device, image_tokens: int) -> torch.Tensor:
        sigmas = self._unshifted(n, generator, device)
        if self.shift_by_resolution:
            mu = self.resolution_shift(image_tokens)
            return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        if self.shift != 1.0:
            return self.shift * sigmas / (1.0 + (self.shift - 1.0) * sigmas)
        return sigmas

    def resolution_shift(self, image_tokens: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return image_tokens * slope + (self.base_shift - slope * self.base_tokens)

    def _unshifted(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        if self.sampling == "uniform":
            sigmas = torch.rand((n,), generator=generator, device=device)
        elif self.sampling == "logit_normal":
            normal = torch.randn((n,), generator=generator, device=device)
            sigmas = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        elif self.sampling == "mode":  # SD3 paper eq. 20
            u = torch.rand((n,), generator=generator, device=device)
            sigmas = 1.0 - u - self.mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
        elif self.sampling == "logsnr":  # the style-friendly sampler: log-SNR lambda ~ N(mean, std)
            log_snr = self.logsnr_mean + self.logsnr_std * torch.randn((n,), generator=generator, device=device)
            sigmas = torch.sigmoid(-log_snr / 2.0)  # SNR = ((1 - sigma) / sigma)^2
        else:
            raise ValueError(f"unknown sigma sampling {self.sampling!r}; use one of {', '.join(SIGMA_SAMPLINGS)}")
        # sigma 0 or 1 would make the shift, the log-SNR or cosmap infinite.
        return sigmas.clamp(1e-5, 1.0 - 1e-5)


class FlowMatchingObjective:
    """Rectified flow: the straight path from the data (sigma 0) to the noise (sigma 1)."""

    def __init__(self, schedule: SigmaSchedule, weighting: str = "none") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        self.schedule = schedule
        self.weighting = weighting

    def draw_timesteps(self, n: int, generator: torch.Generator, device: torch.device,
                       image_tokens: int) -> torch.Tensor:
        """The noise level sigma of each sample (the family turns it into its denoiser's timestep units)."""
        return self.schedule.draw(n, generator, device, image_tokens)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigmas, latents)
        return (1.0 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """SD3 paper's sigma_sqrt (sigma^-2) or cosmap (2 / (pi (1 - 2 sigma + 2 sigma^2))); none: None."""
        if self.weighting == "sigma_sqrt":
            return (sigmas.float() ** -2.0)
        if self.weighting == "cosmap":
            return 2.0 / (math.pi * (1.0 - 2.0 * sigmas.float() + 2.0 * sigmas.float() ** 2))
        return None


def flow_matching_objective(cfg, title: str, scheduler_config: dict, sampling: str, shift: float,
                            shift_by_resolution: bool = False) -> FlowMatchingObjective:
    """A flow-matching family's objective from the run's config: the DDPM-only options refused naming the
    family, the sigma density (``sampling`` unless --timestep-sampling says otherwise) and its parameters,
    the shift the family settled, the resolution shift's range from the scheduler config, the weighting."""
    for name in ("snr_gamma", "max_timestep"):
        if getattr(cfg, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} is for the DDPM families (sd1, sd2, sdxl); {title} "
                            "trains by flow matching: see --timestep-sampling, --flow-shift, --weighting-scheme")
    if cfg.min_timestep:
        raise UserError(f"--min-timestep is for the DDPM families (sd1, sd2, sdxl); {title} trains by flow "
                        "matching: see --timestep-sampling and --flow-shift")
    schedule = SigmaSchedule(
        sampling=cfg.timestep_sampling or sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale, logsnr_mean=cfg.logsnr_mean, logsnr_std=cfg.logsnr_std,
        shift=shift, shift_by_resolution=shift_by_resolution,
        base_shift=scheduler_config.get("base_shift", 0.5), max_shift=scheduler_config.get("max_shift", 1.15),
        base_tokens=scheduler_config.get("base_image_seq_len", 256),
        max_tokens=scheduler_config.get("max_image_seq_len", 4096),
    )
    return FlowMatchingObjective(schedule, cfg.weighting_scheme or "none")
