"""The tiny SD 1.x base model of the toy world, and its pretraining from scratch on the renderer.

Real SD 1.x structure, shrunk: a KL autoencoder with 3 blocks (64 px -> 16x16x4 latents),
a 3-layer CLIP text transformer fed by the real CLIP tokenizer, a cross-attention UNet, and
SD 1.5's scheduler configuration. Pretraining is two stages: the VAE (reconstruction), then
UNet + text encoder (epsilon prediction) on cached latents of captioned scenes in every
pretraining style. The artist style (yltcaxe) is never shown.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.random_model import BOS_TOKEN_ID, EOS_TOKEN_ID, scheduler_config
from ..models.tokenizer import VOCAB_SIZE, build_clip_tokenizer, write_vocab_files
from ..progress import progress_bar
from ..models.backbones.objectives import min_snr_weights
from ..training.noise import training_noise
from .data import pretrain_example, render_batch
from .styles import PRETRAIN_STYLES

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def vae_config() -> dict:
    return {
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (32, 64, 64), "layers_per_block": 1, "act_fn": "silu",
        "latent_channels": 4, "norm_num_groups": 16, "sample_size": 64, "scaling_factor": 0.18215,
    }


def unet_config() -> dict:
    return {
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (64, 64, 128), "layers_per_block": 1, "cross_attention_dim": 64,
        "attention_head_dim": 8, "norm_num_groups": 16, "flip_sin_to_cos": True, "freq_shift": 0,
        "act_fn": "silu", "norm_eps": 1e-5,
    }


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=256, projection_dim=64,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
    )


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config(scheduler_config("epsilon")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_base(pipe: StableDiffusionPipeline, out: Path, fp16: bool = True) -> Path:
    """Save as a plain diffusers folder (safetensors).

    With ``fp16``, UNet and VAE weights are stored in half precision (diffusers loads them back
    in fp32 unless asked otherwise); the text encoder stays fp32, because transformers loads a
    model in the dtype it was saved in, and a half text encoder would feed a float UNet.
    """
    out = Path(out)
    pipe = copy.deepcopy(pipe)
    if fp16:
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    write_vocab_files(out / "tokenizer")
    return out


@dataclass
class Timer:
    seconds: float = 0.0


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    """One step of the toy world's trainers: set the learning rate, backpropagate, clip to norm 1, step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# --------------------------------------------------------------------------- VAE


def train_vae(steps: int = 600, batch: int = 16, crop: int = 32, lr: float = 1e-3, seed: int = 0) -> AutoencoderKL:
    """Train the autoencoder on random crops of fresh pretraining scenes (any style, incl. yltcaxe:
    the autoencoder is the "image format", the artist style must still be representable)."""
    from .render import random_scene
    from .styles import STYLES, apply_style
    from .data import to_array

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    vae.train()
    with progress_bar("VAE", steps) as bar:
        for step in range(steps):
            seeds = rng.integers(0, 2**31, batch)
            images = [apply_style(random_scene(int(s), STYLES[int(s) % len(STYLES)], two_subjects=bool(s % 7 == 0)))
                      for s in seeds]
            x = torch.from_numpy(to_array(images))
            if crop < 64:
                i, j = (int(v) for v in rng.integers(0, 64 - crop + 1, 2) // 4 * 4)
                x = x[:, :, i : i + crop, j : j + crop]
            dist = vae.encode(x).latent_dist
            rec = vae.decode(dist.sample()).sample
            kl = dist.kl().mean() / x[0].numel()
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
            optimizer_step(opt, loss, vae.parameters(), _cosine_lr(step, steps, lr, 50))
            if bar:
                bar.update(0, completed=step + 1, info=f"loss {loss.item():.4f}")
            if step % 25 == 0:
                log.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()
    return vae


DATASET_SEED = 1_000_000


def dataset_captions(n: int, artists: bool = False, seed_offset: int = DATASET_SEED,
                     styles: tuple[str, ...] = PRETRAIN_STYLES, ceiling: bool = False) -> list[str]:
    """The captions of the first ``n`` pretraining examples (cheap: nothing is rendered), so a
    latent cache can be reused with other captions of the same images."""
    return [pretrain_example(seed_offset + i, artists, styles, ceiling).caption for i in range(n)]


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, n: int, seed_offset: int = DATASET_SEED, batch: int = 128,
                   styles: tuple[str, ...] = PRETRAIN_STYLES, ceiling: bool = False):
    """Latent means (unscaled) and captions of ``n`` pretraining examples."""
    latents, captions = [], []
    with progress_bar("encoding", n) as bar:
        for start in range(0, n, batch):
            seeds = list(range(seed_offset + start, seed_offset + min(n, start + batch)))
            x, caps, _ = render_batch(seeds, styles, ceiling)
            latents.append(vae.encode(torch.from_numpy(x)).latent_dist.mean)
            captions += caps
            if bar:
                bar.update(0, completed=min(n, start + batch))
    return torch.cat(latents), captions


# --------------------------------------------------------------------------- UNet + text encoder


def train_diffusion(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    captions: list[str],
    steps: int = 3000,
    batch: int = 32,
    lr: float = 8e-4,
    seed: int = 0,
    ema_decay: float = 0.998,
    on_checkpoint: Callable[[int, StableDiffusionPipeline], None] | None = None,
    checkpoint_every: int = 0,
    offset_noise: float = 0.1,
    init: Path | None = None,
    warmup: int = 100,
    snr_gamma: float | None = None,
) -> StableDiffusionPipeline:
    """Train UNet + text encoder (epsilon prediction, SD 1.5 noise schedule), from scratch or
    from the pipeline folder ``init``.

    Offset noise matters here: the scenes are mostly flat background, and SD 1.5's schedule
    leaks the image mean at the last timestep (non-zero terminal SNR). Without it, the seed
    rather than the prompt decides the background, and that swamps everything else.
    ``snr_gamma`` weights each sample's loss by min-SNR-gamma (faster convergence of shapes).
    """
    torch.manual_seed(seed)
    if init is not None:
        unet = UNet2DConditionModel.from_pretrained(Path(init) / "unet", dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(Path(init) / "text_encoder", dtype=torch.float32)
        scale = float(AutoencoderKL.load_config(Path(init) / "vae")["scaling_factor"])
    else:
        unet = UNet2DConditionModel(**unet_config())
        text_encoder = CLIPTextModel(text_encoder_config())
        scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    tokenizer = build_clip_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in (("unet", unet), ("text_encoder", text_encoder))}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    noise_sched = DDPMScheduler.from_config(scheduler_config("epsilon"))
    g = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()

    def snapshot() -> StableDiffusionPipeline:
        return assemble(vae, copy.deepcopy(ema["text_encoder"]).eval(), copy.deepcopy(ema["unet"]).eval())

    with progress_bar("UNet + text encoder", steps) as bar:
        for step in range(steps):
            idx = torch.randint(0, len(latents), (batch,), generator=g)
            x0 = latents[idx]
            noise = training_noise(x0, g, offset_noise)
            t = torch.randint(0, 1000, (batch,), generator=g)
            noisy = noise_sched.add_noise(x0, noise, t)
            hidden = text_encoder(ids[idx])[0]
            pred = unet(noisy, t, hidden).sample
            per_sample = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
            if snr_gamma:
                per_sample = per_sample * min_snr_weights(t, noise_sched.alphas_cumprod, snr_gamma, "epsilon")
            loss = per_sample.mean()
            optimizer_step(opt, loss, params, _cosine_lr(step, steps, lr, warmup))
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for name, m in (("unet", unet), ("text_encoder", text_encoder)):
                    for pe, p in zip(ema[name].parameters(), m.parameters()):
                        pe.lerp_(p, 1 - decay)
            if bar:
                bar.update(0, completed=step + 1, info=f"loss {loss.item():.4f}")
            if step % 100 == 0:
                log.info("diffusion step %d loss %.4f", step, loss.item())
            if on_checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                on_checkpoint(step + 1, snapshot())
    return snapshot()
