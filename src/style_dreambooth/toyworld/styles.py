"""Styles as rendering transforms of a scene's layers.

* ``plain``: flat colours on a light background (the base look; captions carry no style).
* ``pixel``, ``neon``, ``watercolor``: pretraining styles, captioned ``"<name> artstyle"``, so
  the base model learns the "X artstyle" phrasing.
* ``ink``, ``sepia`` (an experiment, not in the shipped base's pretraining): each carries one
  part of the artist's look: a thick dark ink outline on the plain look (ink); cream paper with
  grain and the muted palette (sepia). Real SD has seen outlines, paper and sepia tones many
  times, and an artist's style is a new combination of such parts; ``train_toyworld.py base
  --styles`` can give the toy base the same footing (see docs/proof-world.md).
* ``yltcaxe``: the artist style of the experiment. It never appears in pretraining: cream paper
  with grain, a muted palette (each colour mixed towards sepia, so it stays identifiable),
  diagonal hatching across the fill and a thick dark ink outline; it is sepia and ink at once,
  plus hatching, a combination no pretraining image shows.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .render import Layer, Scene, background_array, composite, scene_layers, subject_mask

STYLES: tuple[str, ...] = ("plain", "pixel", "neon", "watercolor", "yltcaxe")  # the shipped judges' classes
PRETRAIN_STYLES: tuple[str, ...] = ("plain", "pixel", "neon", "watercolor")  # the shipped base's
COMPONENT_STYLES: tuple[str, ...] = ("ink", "sepia")  # parts of yltcaxe's look, for experiments
ARTIST_STYLE = "yltcaxe"


def style_phrase(style: str) -> str | None:
    """The caption phrase of a style: None for plain, else ``"<style> artstyle"``."""
    if style not in _STYLE_FUNCS:
        raise ValueError(f"unknown style {style!r}")
    return None if style == "plain" else f"{style} artstyle"


def _filter(mask: np.ndarray, f: ImageFilter.Filter) -> np.ndarray:
    img = Image.fromarray(np.clip(mask * 255, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(f), np.float32) / 255.0


def _blur_rgb(arr: np.ndarray, radius: float) -> np.ndarray:
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), np.float32)


def _plain(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    return composite(background_array(scene), layers)


def _pixel(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    flat = composite(background_array(scene), layers)
    small = Image.fromarray(np.clip(flat, 0, 255).astype(np.uint8)).resize((16, 16), Image.Resampling.BOX)
    q = np.round(np.asarray(small, np.float32) / 51.0) * 51.0
    big = Image.fromarray(q.astype(np.uint8)).resize((64, 64), Image.Resampling.NEAREST)
    return np.asarray(big, np.float32)


def _neon(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    tint = (np.asarray(scene.background, np.float32) - 200.0) * 0.15
    out = np.broadcast_to(np.clip(np.array([14, 12, 30], np.float32) + tint, 0, 60), (64, 64, 3)).copy()
    for layer in layers:
        rgb = layer.rgb * (255.0 / max(float(layer.rgb.max()), 1.0))
        edge = np.clip(_filter(layer.mask, ImageFilter.MaxFilter(3)) - _filter(layer.mask, ImageFilter.MinFilter(3)), 0, 1)
        glow = _filter(edge, ImageFilter.GaussianBlur(2.0))
        out = out + rgb * (1.6 * glow[..., None] + 0.18 * layer.mask[..., None])
        out = out * (1 - edge[..., None]) + np.minimum(rgb + 60, 255) * edge[..., None]
    return out


def _watercolor(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    bg = background_array(scene) * 0.3 + 250 * 0.7
    light = composite(bg, layers, colour_of=lambda l: l.rgb * 0.72 + 255 * 0.28)
    out = _blur_rgb(light, 1.3)
    for layer in layers:
        soft = _filter(layer.mask, ImageFilter.GaussianBlur(1.0))
        pooled = np.clip(soft - _filter(layer.mask, ImageFilter.GaussianBlur(3.0)), 0, 1)
        out = out - 70 * pooled[..., None] * (1 - layer.rgb / 255.0)[None, None, :]
    return out


_SEPIA = np.array([150, 132, 112], np.float32)
_INK = np.array([42, 32, 28], np.float32)


def muted(rgb: np.ndarray) -> np.ndarray:
    """yltcaxe's palette: the colour mixed 38% towards sepia (hue kept, so colour stays readable)."""
    return rgb * 0.62 + _SEPIA * 0.38


def _paper(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Cream paper with grain and blotches, tinted slightly by the scene's background."""
    paper = np.array([236, 226, 200], np.float32) + (np.asarray(scene.background, np.float32) - 226.0) * 0.12
    blotch = rng.normal(0, 1, (8, 8)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(blotch, mode="F").resize((64, 64), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0, 7, (64, 64)).astype(np.float32) + 4 * blotch
    return paper[None, None, :] + grain[..., None]


def _outline(out: np.ndarray, scene: Scene, layers: list[Layer]) -> np.ndarray:
    """A thick dark ink ring around each subject."""
    for i in range(len(scene.subjects)):
        m = subject_mask(layers, i)
        ring = np.clip(_filter(m, ImageFilter.MaxFilter(5)) - m, 0, 1)
        out = out * (1 - ring[..., None]) + _INK * ring[..., None]
    return out


def _ink(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    return _outline(composite(background_array(scene), layers), scene, layers)


def _sepia(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    return composite(_paper(scene, rng), layers, colour_of=lambda l: muted(l.rgb))


def _yltcaxe(scene: Scene, layers: list[Layer], rng: np.random.Generator) -> np.ndarray:
    out = _sepia(scene, layers, rng)
    yy, xx = np.mgrid[:64, :64]
    hatch = (((xx + yy) % 4) == 0).astype(np.float32) * 0.55
    out = out * (1 - hatch * subject_mask(layers))[..., None]
    return _outline(out, scene, layers)


_STYLE_FUNCS = {"plain": _plain, "pixel": _pixel, "neon": _neon, "watercolor": _watercolor, "ink": _ink,
                "sepia": _sepia, "yltcaxe": _yltcaxe}


def apply_style(scene: Scene, style: str | None = None) -> Image.Image:
    """Render ``scene`` in ``style`` (default: ``scene.style``) as a 64x64 RGB image."""
    style = style or scene.style
    if style not in _STYLE_FUNCS:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(_STYLE_FUNCS)}")
    rng = np.random.default_rng([scene.seed, 104729])
    arr = _STYLE_FUNCS[style](scene, scene_layers(scene), rng)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")
