"""The DreamBooth loss: instance half + weighted prior half, each sample weighted on its own.

The per-sample weights (min-SNR, a flow-matching weighting) come from the family's objective
(models/backbones/objectives.py), computed from each sample's own noise level, so they stay correct
when the batch is the concatenation of instance and class samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    n_instance: int,
    prior_loss_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> LossParts:
    """Loss over a batch whose first `n_instance` rows are instance samples and the rest class samples.

    Each half is the mean over its own samples of the per-sample MSE, times that sample's weight when
    `weights` are given; total = instance + prior_loss_weight * prior.
    """
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    instance = per_sample[:n_instance].mean()
    if n_instance < per_sample.shape[0]:
        prior = per_sample[n_instance:].mean()
        return LossParts(instance + prior_loss_weight * prior, instance, prior)
    return LossParts(instance, instance, None)
