"""The proof world's tiny ControlNet: "put a subject where the sketch says", for the shipped base.

It mirrors a public ControlNet trained on base SD 1.5 and used with a style fine-tune it has
never seen: it starts from the base UNet (``ControlNetModel.from_unet``) and learns, with the
UNet and text encoder frozen, from pairs of (sketch, scene) in the plain and pretraining styles,
never in the artist style. A sketch is what ``style-dreambooth layout-sketch`` draws from a
layout with ``--style solid``: each subject's box filled black on white (here the renderer's
ground-truth box, loosened at random as a user's box would be), or, for some examples, the
subject's filled silhouette, as a user might paint it. Two-subject scenes are over-represented.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..progress import progress_bar
from ..training.noise import training_noise
from . import assets_dir, base_model_dir
from .base_model import optimizer_step
from .data import to_array
from .render import COLOURS, SIZE, random_scene, scene_layers, subject_mask
from .styles import PRETRAIN_STYLES, apply_style, style_phrase

log = logging.getLogger(__name__)

CONTROLNET_DIR = "controlnet"
P_TWO = 0.5  # two-subject scenes: the case the ControlNet exists for
P_SILHOUETTE = 0.3  # a silhouette outline instead of a box outline
P_COLOUR = 0.0  # the sketch's shapes filled with each subject's colour instead of ink (tried at 0.5: see docs)
P_NO_CAPTION = 0.1  # empty caption, so the unconditional pass of guidance learns the sketch too


def controlnet_dir() -> Path:
    """The shipped tiny ControlNet folder (``ControlNetModel.from_pretrained``)."""
    return assets_dir() / CONTROLNET_DIR


def _box(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """The subject's bounding box, loosened on each side by up to a quarter of its size."""
    ys, xs = np.nonzero(mask > 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    grow = rng.uniform(0, 0.25, 4)
    return (max(0, x0 - grow[0] * w), max(0, y0 - grow[1] * h),
            min(SIZE, x1 + grow[2] * w), min(SIZE, y1 + grow[3] * h))


def sketch_of(scene, rng: np.random.Generator, p_colour: float = 0.0) -> Image.Image:
    """A sketch of where each subject of ``scene`` is: its box filled black on white (as
    ``layout-sketch --style solid`` draws a layout), or for some examples its filled silhouette
    (as a user might paint it); with probability ``p_colour`` the shapes are filled with each
    subject's colour instead of ink (``layout-sketch --style colours``, or a user's colour drawing)."""
    silhouette = rng.random() < P_SILHOUETTE
    coloured = p_colour > 0 and rng.random() < p_colour  # no draw at 0: the shipped model's pairs stay the same
    if silhouette:
        return painted_sketch(scene, coloured)
    layers = scene_layers(scene)
    arr = np.full((SIZE, SIZE, 3), 255, np.uint8)
    for i, subject in enumerate(scene.subjects):
        x0, y0, x1, y1 = (int(round(v)) for v in _box(subject_mask(layers, i) > 0.5, rng))
        arr[y0:y1, x0:x1] = _ink(subject, coloured)
    return Image.fromarray(arr)


def painted_sketch(scene, coloured: bool = False) -> Image.Image:
    """Each subject of ``scene`` as its filled silhouette on white: in ink, or in the subject's named colour."""
    layers = scene_layers(scene)
    arr = np.full((SIZE, SIZE, 3), 255, np.uint8)
    for i, subject in enumerate(scene.subjects):
        arr[subject_mask(layers, i) > 0.5] = _ink(subject, coloured)
    return Image.fromarray(arr)


def _ink(subject, coloured: bool) -> tuple[int, int, int]:
    return COLOURS[subject.colour] if coloured else (0, 0, 0)


def training_pairs(n: int, seed: int = 0, p_colour: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` (scene, sketch, caption) triples in the plain and pretraining styles (never yltcaxe):
    images as (N, 3, 64, 64) in [-1, 1], sketches in [0, 1] as the ControlNet pipeline feeds them."""
    rng = np.random.default_rng([seed, 4711])
    scenes, sketches, captions = [], [], []
    for i in range(n):
        style = PRETRAIN_STYLES[int(rng.integers(len(PRETRAIN_STYLES)))]
        scene = random_scene(7_000_000 + 1000 * seed + i, style=style, two_subjects=bool(rng.random() < P_TWO))
        scenes.append(apply_style(scene))
        sketches.append(sketch_of(scene, rng, p_colour))
        captions.append("" if rng.random() < P_NO_CAPTION else scene.caption(style_phrase(style)))
    cond = np.stack([np.asarray(s, np.float32) / 255.0 for s in sketches]).transpose(0, 3, 1, 2)
    return to_array(scenes), cond, captions


@torch.no_grad()
def _encode(pipe, images: np.ndarray, captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    latents, hidden = [], []
    scale = pipe.vae.config.scaling_factor
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch])
        latents.append(pipe.vae.encode(x).latent_dist.mean * scale)
        ids = pipe.tokenizer(captions[start : start + batch], padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        hidden.append(pipe.text_encoder(ids)[0])
    return torch.cat(latents), torch.cat(hidden)


def train_controlnet(out: Path, *, steps: int = 3000, n_pairs: int = 6000, batch: int = 32, lr: float = 5e-4,
                     seed: int = 0, offset_noise: float = 0.1, base: Path | None = None, save_every: int = 0,
                     p_colour: float = P_COLOUR, init: Path | None = None, warmup: int = 100):
    """Train the tiny ControlNet on the frozen shipped base and save it to ``out`` (fp16 safetensors);
    with ``save_every``, also ``out/step-N`` snapshots along the way; with ``init``, continue from
    that ControlNet folder instead of starting from the UNet."""
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(base or base_model_dir()), dtype=torch.float32)
    images, cond, captions = training_pairs(n_pairs, seed, p_colour)
    latents, hidden = _encode(pipe, images, captions)
    cond_t = torch.from_numpy(cond)
    unet = pipe.unet.requires_grad_(False).eval()
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    channels = (16, 32, 64, 128)[: int(np.log2(factor)) + 1]  # one stride-2 step per VAE downsampling
    if init is not None:
        net = ControlNetModel.from_pretrained(str(init), torch_dtype=torch.float32).train()
    else:
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    with progress_bar("ControlNet", steps) as bar:
        for step in range(steps):
            idx = torch.randint(0, len(latents), (batch,), generator=g)
            x0 = latents[idx]
            noise = training_noise(x0, g, offset_noise)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
            noisy = noise_sched.add_noise(x0, noise, t)
            down, mid = net(noisy, t, hidden[idx], controlnet_cond=cond_t[idx], return_dict=False)
            pred = unet(noisy, t, hidden[idx], down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            loss = F.mse_loss(pred, noise)
            optimizer_step(opt, loss, net.parameters(), lr * min(1.0, (step + 1) / max(1, warmup)))
            if bar:
                bar.update(0, completed=step + 1, info=f"loss {loss.item():.4f}")
            if step % 25 == 0:
                log.info("controlnet step %d loss %.4f (%.0f s)", step, loss.item(), time.perf_counter() - t0)
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                _save(net, Path(out) / f"step-{step + 1}")
    out = Path(out)
    _save(net, out)
    log.info("ControlNet trained in %.0f s (%d steps, batch %d): %s", time.perf_counter() - t0, steps, batch, out)
    return net.eval()


def _save(net, out: Path) -> None:
    half = copy.deepcopy(net).to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
