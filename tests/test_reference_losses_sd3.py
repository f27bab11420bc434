"""Stable Diffusion 3.5 through the one loop: `train`'s first 20 losses against a flow-matching step written out
from the published equations (fp32, tiny shape).

The reference shares with `train` only the data order and the per-step seeds. Everything else is written here
the plain way: the VAE encodes every batch, latents are normalised with the VAE config's shift and scale, sigma
is drawn (logit-normal: the sigmoid of a standard normal) and shifted by s u / (1 + (s - 1) u) with SD 3.5's
s = 3, x_t = (1 - sigma) x0 + sigma noise, the transformer takes t = 1000 sigma, the target is noise - x0, and
torch's AdamW steps. The conditioning is spelled out: CLIP-L's and CLIP-G's second-to-last hidden states side by
side, zeros appended up to T5's width, T5's last states after them on the sequence axis, and the two CLIPs'
projected pooled vectors side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clihelp import run_cli, train_args
from conftest import write_style_images

STEPS = 20
LR = 1e-4


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> Path:
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("sd3-tiny", tmp_path_factory.mktemp("models") / "sd3-tiny", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-reference")
    return write_style_images(root / "instance"), write_style_images(root / "class", n=6, size=(64, 64), seed=5)


def _sigmas(n: int, gen: torch.Generator, sampling: str, shift: float) -> torch.Tensor:
    if sampling == "uniform":
        u = torch.rand(n, generator=gen)
    elif sampling == "logit_normal":  # SD3 paper's rf/lognorm(0, 1)
        u = 1 / (1 + torch.exp(-torch.randn(n, generator=gen)))
    else:
        raise AssertionError(sampling)
    return shift * u / (1 + (shift - 1) * u)


def _conditioning(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    def ids(tokenizer, length):
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    clip_l = pipe.text_encoder(ids(pipe.tokenizer, 77), output_hidden_states=True)
    clip_g = pipe.text_encoder_2(ids(pipe.tokenizer_2, 77), output_hidden_states=True)
    t5 = pipe.text_encoder_3(ids(pipe.tokenizer_3, pipe.tokenizer_3.model_max_length)).last_hidden_state
    clips = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=2)
    b, tokens, width = clips.shape
    clips = torch.cat([clips, torch.zeros(b, tokens, t5.shape[2] - width)], dim=2)
    return torch.cat([clips, t5], dim=1), torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=1)


def reference_losses(model: Path, instance_dir: Path, class_dir: Path, steps: int, train_clip: bool = True,
                     sampling: str = "logit_normal", shift: float = 3.0, weighting: str = "none",
                     seed: int = 1337) -> list[float]:
    from diffusers import StableDiffusion3Pipeline

    from style_dreambooth.data.dataset import ImageBank, SampleOrder, class_examples, instance_examples, make_batch
    from style_dreambooth.data.images import list_images
    from style_dreambooth.training.loop import _step_seed

    pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=torch.float32)
    vae, transformer, clip_l = pipe.vae, pipe.transformer, pipe.text_encoder
    instances = ImageBank(instance_examples(list_images(instance_dir), "yltcaxe artstyle"), 64, name="instance")
    classes = ImageBank(class_examples(list_images(class_dir, role="class"), "artstyle"), 64, name="class")
    i_order, c_order = SampleOrder(len(instances), seed, 0), SampleOrder(len(classes), seed, 1)
    for m in (vae, pipe.text_encoder_2, pipe.text_encoder_3):
        m.requires_grad_(False)
    trained = [transformer, clip_l] if train_clip else [transformer]
    if not train_clip:
        clip_l.requires_grad_(False)
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
        sigma = _sigmas(x0.shape[0], gen, sampling, shift).view(-1, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * noise
        states, pooled = _conditioning(pipe, batch.prompts)
        pred = transformer(hidden_states=xt, timestep=1000 * sigma.flatten(), encoder_hidden_states=states,
                           pooled_projections=pooled).sample
        per_sample = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
        if weighting == "sigma_sqrt":
            per_sample = per_sample / sigma.flatten() ** 2
        loss = per_sample[0] + per_sample[1]  # instance + prior (weight 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


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
    dict(flags=[], ref={}),  # the family's defaults: logit-normal sigma, shift 3, CLIP-L trains, no weighting
    dict(flags=["--no-train-text-encoder"], ref={"train_clip": False}),  # conditioning encoded once per prompt
    dict(flags=["--timestep-sampling", "uniform", "--flow-shift", "1", "--weighting-scheme", "sigma_sqrt"],
         ref={"sampling": "uniform", "shift": 1.0, "weighting": "sigma_sqrt"}),
], ids=["defaults", "frozen-text-encoders", "uniform-no-shift-sigma-sqrt"])
def test_sd3_fp32_matches_reference(capsys, tmp_path, sd3_model, data, case):
    ours = _train(capsys, tmp_path, sd3_model, data, *case["flags"])
    ref = reference_losses(sd3_model, *data, STEPS, **case["ref"])
    assert ref[-1] != pytest.approx(ref[0], rel=1e-3), "reference losses did not change; the comparison is empty"
    assert len(ours) == STEPS
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6), max(abs(a - b) for a, b in zip(ours, ref))
