"""FLUX.1 through the one loop: `train`'s first 20 losses against a flow-matching step written out from the
published equations (fp32, tiny shape).

The reference shares with `train` only the data order and the per-step seeds. Everything else is written
here the plain way: the VAE encodes every batch, latents are normalised with the VAE config's shift and
scale, sigma is drawn and shifted by its formula, x_t = (1 - sigma) x0 + sigma noise, the 2x2 patches are
made with pixel_unshuffle (channel-major, as BFL packs them), position ids from a meshgrid, CLIP's pooled
vector and T5's last states condition the transformer, the target is noise - x0, and torch's AdamW steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clihelp import run_cli, train_args
from conftest import write_style_images

STEPS = 20
LR = 1e-4


def _sigmas(n: int, gen: torch.Generator, sampling: str, shift: float | str, tokens: int) -> torch.Tensor:
    if sampling == "uniform":
        u = torch.rand(n, generator=gen)
    elif sampling == "logit_normal":  # SD3 paper: sigmoid of N(0, 1)
        u = 1 / (1 + torch.exp(-torch.randn(n, generator=gen)))
    elif sampling == "logsnr":  # log-SNR lambda ~ N(-6, 2); SNR = ((1 - t) / t)^2 -> t = 1 / (1 + e^(lambda / 2))
        lam = -6.0 + 2.0 * torch.randn(n, generator=gen)
        u = 1 / (1 + torch.exp(lam / 2))
    else:
        raise AssertionError(sampling)
    if shift == "resolution":  # FLUX.1's mu, linear in tokens from 0.5 at 256 to 1.15 at 4096
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return shift * u / (1 + (shift - 1) * u)


def reference_losses(model: Path, instance_dir: Path, class_dir: Path, steps: int, train_clip: bool = True,
                     sampling: str = "uniform", shift: float | str = 1.0, weighting: str = "none",
                     seed: int = 1337) -> list[float]:
    from diffusers import FluxPipeline

    from style_dreambooth.data.dataset import ImageBank, SampleOrder, class_examples, instance_examples, make_batch
    from style_dreambooth.data.images import list_images
    from style_dreambooth.training.loop import _step_seed

    pipe = FluxPipeline.from_pretrained(model, dtype=torch.float32)
    vae, transformer, clip, t5 = pipe.vae, pipe.transformer, pipe.text_encoder, pipe.text_encoder_2
    instances = ImageBank(instance_examples(list_images(instance_dir), "yltcaxe artstyle"), 64, name="instance")
    classes = ImageBank(class_examples(list_images(class_dir, role="class"), "artstyle"), 64, name="class")
    i_order, c_order = SampleOrder(len(instances), seed, 0), SampleOrder(len(classes), seed, 1)
    for m in (vae, t5):
        m.requires_grad_(False)
    trained = [transformer, clip] if train_clip else [transformer]
    if not train_clip:
        clip.requires_grad_(False)
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    for m in trained:
        m.train()
    losses = []
    for step in range(steps):
        batch = make_batch([step], instances, i_order, classes, c_order, center_crop=False)
        gen = torch.Generator().manual_seed(_step_seed(seed, step, 0, 0))
        torch.manual_seed(_step_seed(seed, step, 0, 0))
        with torch.no_grad():
            moments = vae.encode(batch.pixels()).latent_dist.parameters
            mean, logvar = moments.chunk(2, dim=1)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)
            x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        b, c, h, w = x0.shape
        sigma = _sigmas(b, gen, sampling, shift, (h // 2) * (w // 2)).view(b, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * noise
        tokens = F.pixel_unshuffle(xt, 2).flatten(2).transpose(1, 2)  # (b, h/2 * w/2, 4c), channel-major
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        clip_ids = pipe.tokenizer(batch.prompts, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        t5_ids = pipe.tokenizer_2(batch.prompts, padding="max_length", max_length=pipe.tokenizer_2.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = clip(clip_ids).pooler_output
        states = t5(t5_ids).last_hidden_state
        out = transformer(hidden_states=tokens, timestep=sigma.flatten(), guidance=torch.full((b,), 3.5),
                          pooled_projections=pooled, encoder_hidden_states=states,
                          txt_ids=torch.zeros(states.shape[1], 3), img_ids=img_ids).sample
        pred = F.pixel_shuffle(out.transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2), 2)
        per_sample = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
        s = sigma.flatten()
        if weighting == "cosmap":
            per_sample = per_sample * 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
        loss = per_sample[0] + per_sample[1]  # instance + prior (weight 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-reference")
    return write_style_images(root / "instance"), write_style_images(root / "class", n=6, size=(64, 64), seed=5)


def _train(capsys, tmp_path, model, data, *extra) -> list[float]:
    instance_dir, class_dir = data
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(
        model, instance_dir, run, "--class-dir", class_dir, "--max-train-steps", STEPS, "--learning-rate", LR,
        "--no-8bit-adam", *extra,
    ))
    assert code == 0, err
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", [
    dict(flags=[], ref={}),  # the family's defaults: uniform sigma, no shift, CLIP-L trains, guidance 3.5
    dict(flags=["--no-train-text-encoder"], ref={"train_clip": False}),  # conditioning encoded once per prompt
    dict(flags=["--timestep-sampling", "logit_normal", "--flow-shift", "3", "--weighting-scheme", "cosmap"],
         ref={"sampling": "logit_normal", "shift": 3.0, "weighting": "cosmap"}),
    dict(flags=["--timestep-sampling", "logsnr", "--flow-shift", "resolution"],
         ref={"sampling": "logsnr", "shift": "resolution"}),
], ids=["defaults", "frozen-text-encoders", "logit-normal-shift3-cosmap", "logsnr-resolution-shift"])
def test_flux_fp32_matches_reference(capsys, tmp_path, flux_model, data, case):
    ours = _train(capsys, tmp_path, flux_model, data, *case["flags"])
    ref = reference_losses(flux_model, *data, STEPS, **case["ref"])
    assert ref[-1] != pytest.approx(ref[0], rel=1e-3), "reference losses did not change; the comparison is empty"
    assert len(ours) == STEPS
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)
