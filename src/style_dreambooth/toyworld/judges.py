"""Judges: one small CNN with three heads (style, subject, colour of the main subject),
trained on renderer ground truth. Used to score generated images.

Two-subject images are judged half by half: :func:`half_view` pads the left or right half back
to 64x64, and the judge names the subject and colour it sees there (it is trained on such views).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import save_file

from ..progress import progress_bar
from . import assets_dir
from .data import to_array, to_images
from .render import COLOUR_NAMES, SUBJECTS, random_scene
from .styles import STYLES, apply_style

log = logging.getLogger(__name__)

JUDGES_FILE = "judges.safetensors"


def heads(styles: tuple[str, ...] = STYLES) -> dict[str, tuple[str, ...]]:
    """The label names of each head; the style head's depend on which styles the judges know."""
    return {"style": styles, "subject": SUBJECTS, "colour": COLOUR_NAMES}


def half_view(image: Image.Image, side: str) -> Image.Image:
    """The left or right half of a 64x64 image, edge-padded back to 64x64."""
    arr = np.asarray(image.convert("RGB"))
    half = arr[:, :32] if side == "left" else arr[:, 32:]
    return Image.fromarray(np.pad(half, ((0, 0), (16, 16), (0, 0)), mode="edge"))


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32, styles: tuple[str, ...] = STYLES) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.trunk = nn.Sequential(
            block(3, w, 1), block(w, w, 2), block(w, 2 * w, 1), block(2 * w, 2 * w, 2),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 2),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(v)) for k, v in heads(styles).items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)
        return {k: head(h) for k, head in self.heads.items()}


@dataclass
class Verdict:
    style: str
    subject: str
    colour: str
    style_probs: dict[str, float]


class Judges:
    """The trained judge network with label names; ``judge(images)`` -> one :class:`Verdict` each.
    The file records the styles its style head tells apart (the shipped one: ``STYLES``)."""

    def __init__(self, net: JudgeNet, styles: tuple[str, ...] = STYLES) -> None:
        self.net = net.eval()
        self.styles = styles
        self.heads = heads(styles)

    @classmethod
    def load(cls, path: Path | None = None) -> "Judges":
        path = Path(path) if path is not None else assets_dir() / JUDGES_FILE
        with safe_open(str(path), framework="pt") as f:  # one read: the weights and the style names
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k).float() for k in f.keys()}
        styles = tuple(meta["styles"].split(",")) if "styles" in meta else STYLES
        net = JudgeNet(styles=styles)
        net.load_state_dict(weights)
        return cls(net, styles)

    def save(self, path: Path) -> Path:
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in self.net.state_dict().items()}, str(path),
                  metadata={"styles": ",".join(self.styles)})
        return Path(path)

    @torch.no_grad()
    def logits(self, images: list[Image.Image], batch: int = 256) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in self.heads}
        for start in range(0, len(images), batch):
            chunk = [im.convert("RGB").resize((64, 64)) if im.size != (64, 64) else im.convert("RGB")
                     for im in images[start : start + batch]]
            out = self.net(torch.from_numpy(to_array(chunk)))
            for k in self.heads:
                outs[k].append(out[k])
        return {k: torch.cat(v) if v else torch.zeros(0, len(self.heads[k])) for k, v in outs.items()}

    def judge(self, images: list[Image.Image]) -> list[Verdict]:
        out = self.logits(images)
        probs = out["style"].softmax(-1)
        verdicts = []
        for i in range(len(images)):
            verdicts.append(Verdict(
                style=self.styles[int(out["style"][i].argmax())],
                subject=SUBJECTS[int(out["subject"][i].argmax())],
                colour=COLOUR_NAMES[int(out["colour"][i].argmax())],
                style_probs={s: float(p) for s, p in zip(self.styles, probs[i])},
            ))
        return verdicts


# --------------------------------------------------------------------------- training data


def labelled_views(seeds: list[int], styles: tuple[str, ...] = STYLES) -> tuple[list[Image.Image], dict[str, list[int]]]:
    """Rendered ground truth: one view per seed (a whole scene, or half of a two-subject scene)."""
    images, labels = [], {k: [] for k in heads(styles)}
    for seed in seeds:
        rng = np.random.default_rng([seed, 555])
        style = styles[int(rng.integers(len(styles)))]
        two = rng.random() < 0.25
        scene = random_scene(seed, style=style, two_subjects=two)
        image = apply_style(scene)
        subject = scene.main
        if two:
            side = "left" if rng.random() < 0.5 else "right"
            image = half_view(image, side)
            subject = scene.subjects[0 if side == "left" else 1]
        images.append(image)
        labels["style"].append(styles.index(style))
        labels["subject"].append(SUBJECTS.index(subject.kind))
        labels["colour"].append(COLOUR_NAMES.index(subject.colour))
    return images, labels


def _degrade(images: list[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
    """Mild blur/noise so the judges also read imperfect generated images."""
    out = []
    for im in images:
        u = rng.random()
        if u < 0.2:
            im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
        elif u < 0.35:
            arr = np.asarray(im, np.float32) + rng.normal(0, rng.uniform(2, 8), (64, 64, 3))
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        out.append(im)
    return out


@torch.no_grad()
def _vae_roundtrip(vae, images: list[Image.Image], batch: int = 64) -> list[Image.Image]:
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(to_array(images[start : start + batch]))
        out += to_images(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return out


def train_judges(steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                 vae_dir: Path | None = None, pool: int = 4000, styles: tuple[str, ...] = STYLES) -> Judges:
    """Train the judges on fresh renders; half of each batch from a pool of VAE round-trips
    (what generated images look like) when ``vae_dir`` is given. Seeds are >= 10**8, so held-out
    evaluation with small seeds never sees training scenes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = JudgeNet(styles=styles)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    pool_x, pool_y = None, None
    if vae_dir is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        imgs, labels = labelled_views(list(range(2 * 10**8, 2 * 10**8 + pool)), styles)
        pool_x = torch.from_numpy(to_array(_vae_roundtrip(vae, imgs)))
        pool_y = {k: torch.tensor(v) for k, v in labels.items()}
    net.train()
    with progress_bar("judges", steps) as bar:
        for step in range(steps):
            n_fresh = batch // 2 if pool_x is not None else batch
            seeds = [int(s) for s in rng.integers(10**8, 2 * 10**8, n_fresh)]
            imgs, labels = labelled_views(seeds, styles)
            x = torch.from_numpy(to_array(_degrade(imgs, rng)))
            y = {k: torch.tensor(v) for k, v in labels.items()}
            if pool_x is not None:
                idx = torch.from_numpy(rng.integers(0, len(pool_x), batch - n_fresh))
                x = torch.cat([x, pool_x[idx]])
                y = {k: torch.cat([y[k], pool_y[k][idx]]) for k in y}
            frac = step / steps
            for g in opt.param_groups:
                g["lr"] = lr * (0.5 * (1 + np.cos(np.pi * frac))) * min(1.0, (step + 1) / 50)
            out = net(x)
            loss = sum(F.cross_entropy(out[k], y[k]) for k in out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar:
                bar.update(0, completed=step + 1, info=f"loss {loss.item():.3f}")
            if step % 100 == 0:
                log.info("judges step %d loss %.4f", step, loss.item())
    return Judges(net.eval(), styles)


def heldout_accuracy(judges: Judges, n: int = 600, seed0: int = 0) -> dict[str, float]:
    """Accuracy of each head on fresh renders with seeds ``seed0 .. seed0+n`` (never used in training)."""
    imgs, labels = labelled_views(list(range(seed0, seed0 + n)), judges.styles)
    out = judges.logits(imgs)
    return {k: float((out[k].argmax(-1) == torch.tensor(labels[k])).float().mean()) for k in judges.heads}
