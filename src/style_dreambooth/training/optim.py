"""Optimizers and learning-rate schedules."""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import UserError


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    use_8bit: bool,
) -> torch.optim.Optimizer:
    """AdamW: 8-bit (bitsandbytes) when asked, else torch's fused kernel; `params` may be parameter groups with their own lr."""
    params = list(params)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
            raise UserError(
                f"--use-8bit-adam needs a working bitsandbytes ({type(exc).__name__}); "
                "install it or pass --no-8bit-adam"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    # The fused kernel does the same AdamW maths in one launch per step instead of several per tensor, and
    # takes the fp16 grad scaler's inf check without a host sync.
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
