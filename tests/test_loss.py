"""The prior-preservation loss against a hand computation on fixed tensors."""

import math

import pytest
import torch

from style_dreambooth.models.backbones.objectives import diffusion_target, min_snr_weights
from style_dreambooth.training.loss import dreambooth_loss

# A small fixed schedule: alpha_bar for timesteps 0..3.
ALPHAS = torch.tensor([0.9, 0.5, 0.2, 0.05])


def _fixed():
    # Batch of 4: rows 0-1 instance, rows 2-3 class; each sample has 2 elements.
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0], [2.0, 2.0]]).view(4, 2, 1, 1)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [2.0, 0.0]]).view(4, 2, 1, 1)
    t = torch.tensor([0, 3, 1, 2])
    return pred, target, t


def test_prior_loss_matches_hand_computation():
    pred, target, t = _fixed()
    # per-sample MSE: (1+4)/2=2.5, (1+1)/2=1.0, (4+0)/2=2.0, (0+4)/2=2.0
    parts = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=0.5)
    assert parts.instance.item() == pytest.approx((2.5 + 1.0) / 2)
    assert parts.prior.item() == pytest.approx((2.0 + 2.0) / 2)
    assert parts.total.item() == pytest.approx(1.75 + 0.5 * 2.0)


def test_without_class_half_prior_is_none():
    pred, target, t = _fixed()
    parts = dreambooth_loss(pred[:2], target[:2], n_instance=2, prior_loss_weight=1.0)
    assert parts.prior is None
    assert parts.total.item() == pytest.approx(1.75)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_uses_each_samples_own_timestep(prediction_type):
    pred, target, t = _fixed()
    gamma = 2.0
    snr = [a / (1 - a) for a in ALPHAS.tolist()]  # 9, 1, 0.25, 0.0526
    if prediction_type == "epsilon":
        w = [min(s, gamma) / s for s in snr]
    else:
        w = [min(s, gamma) / (s + 1) for s in snr]
    mse = [2.5, 1.0, 2.0, 2.0]
    inst = (mse[0] * w[t[0]] + mse[1] * w[t[1]]) / 2
    prior = (mse[2] * w[t[2]] + mse[3] * w[t[3]]) / 2
    weights = min_snr_weights(t, ALPHAS, gamma, prediction_type)
    parts = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=1.0, weights=weights)
    assert parts.instance.item() == pytest.approx(inst, rel=1e-6)
    assert parts.prior.item() == pytest.approx(prior, rel=1e-6)
    assert parts.total.item() == pytest.approx(inst + prior, rel=1e-6)
    # The buggy variant (weights from the instance half's timesteps applied to the class half) differs.
    wrong_prior = (mse[2] * w[t[0]] + mse[3] * w[t[1]]) / 2
    assert not math.isclose(parts.prior.item(), wrong_prior, rel_tol=1e-3)


def test_min_snr_weights_values():
    w = min_snr_weights(torch.tensor([0, 1]), ALPHAS, gamma=5.0, prediction_type="epsilon")
    assert w.tolist() == pytest.approx([5.0 / 9.0, 1.0])


def test_v_target_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    ours = diffusion_target("v_prediction", latents, noise, t, sched.alphas_cumprod)
    assert torch.allclose(ours, sched.get_velocity(latents, noise, t), atol=1e-6)
    assert diffusion_target("epsilon", latents, noise, t, sched.alphas_cumprod) is noise
