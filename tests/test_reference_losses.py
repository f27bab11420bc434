"""Speed must not change what is learned: `train`'s first 20 losses against a plain fp32 reference.

The reference below is the DreamBooth step written out the slow, obvious way: the VAE encodes
every batch, the prompt is tokenized every step, everything runs in fp32 with torch's AdamW and
gradient clipping. It shares with `train` only the data order and the per-step seeds (the
conventions that decide *which* sample and noise a step sees), not the maths. `train` runs with
its fast paths on (cached latents, fused optimizer where available), in fp32 and in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from clihelp import run_cli, train_args
from conftest import write_style_images

STEPS = 20
LR = 1e-4


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


TEXT_ENCODERS = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


def reference_losses(
    model: Path, instance_dir: Path, class_dir: Path, steps: int, seed: int = 1337, device: str = "cpu",
    family: str = "sd1",
) -> list[float]:
    """The DreamBooth step the slow, obvious way, with each family's conditioning spelled out: SD 1.x's
    last CLIP layer; SD 2.x the same with the velocity target when the scheduler asks for it; SDXL's two
    text encoders' penultimate layers, pooled vector and six time ids per image."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    from style_dreambooth.data.dataset import ImageBank, SampleOrder, class_examples, instance_examples, make_batch
    from style_dreambooth.data.images import list_images
    from style_dreambooth.training.loop import _step_seed

    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32).to(device)
    vae, unet = pipe.vae, pipe.unet
    encoders = [getattr(pipe, n) for n in TEXT_ENCODERS[family]]
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    instances = ImageBank(instance_examples(list_images(instance_dir), "yltcaxe artstyle"), 64, name="instance")
    classes = ImageBank(class_examples(list_images(class_dir, role="class"), "artstyle"), 64, name="class")
    i_order, c_order = SampleOrder(len(instances), seed, 0), SampleOrder(len(classes), seed, 1)
    vae.requires_grad_(False)
    params = [p for m in [unet, *encoders] for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    for m in [unet, *encoders]:
        m.train()
    losses = []
    for step in range(steps):
        batch = make_batch([step], instances, i_order, classes, c_order, center_crop=False)
        gen = torch.Generator(device).manual_seed(_step_seed(seed, step, 0, 0))
        torch.manual_seed(_step_seed(seed, step, 0, 0))
        with torch.no_grad():
            moments = vae.encode(batch.pixels().to(device)).latent_dist.parameters
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            latents = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
        a = sched.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        ids = [tok(batch.prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device) for tok in tokenizers]
        if family == "sdxl":
            first = encoders[0](ids[0], output_hidden_states=True)
            second = encoders[1](ids[1], output_hidden_states=True)
            hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            sizes = [Image.open(c.bank.examples[c.index].path).size for c in batch.crops]  # (width, height)
            time_ids = torch.tensor([[h, w, c.top, c.left, 64, 64] for (w, h), c in zip(sizes, batch.crops)],
                                    dtype=torch.float32, device=device)
            pred = unet(noisy, t, hidden, added_cond_kwargs={"text_embeds": second.text_embeds, "time_ids": time_ids}).sample
        else:
            pred = unet(noisy, t, encoders[0](ids[0])[0]).sample
        target = noise if sched.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = per_sample[0] + per_sample[1]  # instance + prior (weight 1), one of each per step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("reference")
    instance_dir = write_style_images(root / "instance")  # 80x72: random crops, cached as drawn
    class_dir = write_style_images(root / "class", n=6, size=(64, 64), seed=5)  # square: cached up front
    return instance_dir, class_dir, reference_losses(tiny_model, instance_dir, class_dir, STEPS)


def _train(capsys, tmp_path, model, reference, *extra) -> list[float]:
    instance_dir, class_dir, _ = reference
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(
        model, instance_dir, run, "--class-dir", class_dir, "--max-train-steps", STEPS, "--learning-rate", LR,
        "--no-8bit-adam", *extra,
    ))
    assert code == 0, err
    return _losses(run)


@pytest.mark.parametrize("extra", [
    [],  # the defaults: latents cached, fused AdamW, losses read back every 10 steps
    ["--no-cache-latents"],
    ["--channels-last"],
    ["--logging-steps", "7"],  # 20 steps: flushed at 7, 14 and the end; still one line per step
], ids=["defaults", "no-cache-latents", "channels-last", "logging-7"])
def test_fp32_matches_reference(capsys, tmp_path, tiny_model, reference, extra):
    ours = _train(capsys, tmp_path, tiny_model, reference, *extra)
    ref = reference[2]
    assert len(ours) == STEPS
    assert ref[-1] != pytest.approx(ref[0], rel=1e-3), "reference losses did not change; the comparison is empty"
    assert ours == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_bf16_mixed_precision_within_tolerance(capsys, tmp_path, tiny_model, reference):
    ours = _train(capsys, tmp_path, tiny_model, reference, "--mixed-precision", "bf16")
    ref = reference[2]
    # bf16 keeps 8 bits of mantissa; measured: within 4e-4 of the reference over the 20 steps.
    assert ours == pytest.approx(ref, rel=0.01)
    assert ours != pytest.approx(ref, rel=1e-6), "bf16 made no difference at all: autocast was not applied"


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["--mixed-precision", "fp16"], ["--mixed-precision", "fp16", "--compile"]],
                         ids=["fp16", "fp16-compile"])
def test_gpu_fast_path_matches_gpu_reference(capsys, tmp_path, tiny_model, reference, extra):
    """On a GPU the generators draw other numbers than on the CPU, so the reference runs there too."""
    instance_dir, class_dir, _ = reference
    ref = reference_losses(tiny_model, instance_dir, class_dir, STEPS, device="cuda")
    ours = _train(capsys, tmp_path, tiny_model, reference, *extra)
    assert ours == pytest.approx(ref, rel=0.01)
