"""Pretraining data for the toy world: scenes with captions, in every style but the artist's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .render import Scene, random_scene
from .styles import ARTIST_STYLE, PRETRAIN_STYLES, apply_style, style_phrase

# Probabilities of the pretraining mix.
P_PLAIN = 0.4  # the rest is split evenly over the named pretraining styles
P_TWO = 0.12  # two subjects, "a red star and a blue house" (first on the left)
P_BARE_ARTSTYLE = 0.12  # caption ends in ", artstyle" (no style name): "artstyle" means any style
P_NO_SUBJECT = 0.05  # caption is only the style phrase ("pixel artstyle" / "artstyle")
P_EMPTY = 0.1  # empty caption, for classifier-free guidance
P_ARTIST = 0.4  # with artists=True: a named style credited to a made-up artist instead, "qorvup artstyle"
ARTISTS_PER_STYLE = 100


def _artists() -> dict[str, tuple[str, ...]]:
    """Made-up artist names, each drawing in one pretraining style (never the identifier).

    Real SD knows thousands of rare names that stand for a style; DreamBooth for style leans on
    that pathway (rare word -> look). These names give the toy text encoder the same pathway, and
    train the embeddings of many rare BPE pieces, the identifier's among them.
    """
    rng = np.random.default_rng(20261126)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    named = [s for s in PRETRAIN_STYLES if s != "plain"]
    out: dict[str, list[str]] = {s: [] for s in named}
    seen = {ARTIST_STYLE}
    while any(len(v) < ARTISTS_PER_STYLE for v in out.values()):
        name = "".join(rng.choice(letters, int(rng.integers(5, 9))))
        style = min(out, key=lambda k: len(out[k]))
        if name not in seen:
            seen.add(name)
            out[style].append(name)
    return {k: tuple(v) for k, v in out.items()}


ARTISTS = _artists()


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str


def pretrain_example(seed: int, artists: bool = False, styles: tuple[str, ...] = PRETRAIN_STYLES,
                     ceiling: bool = False) -> Example:
    """One captioned pretraining scene, a pure function of ``seed`` and the style set ``styles``;
    ``artists`` credits some named-style captions to made-up artists (an experiment, see
    docs/proof-world.md). Only ``ceiling`` (the ceiling experiment: how well the tiny models can draw
    the artist style when pretrained on it) lets the artist style into ``styles``."""
    if ARTIST_STYLE in styles and not ceiling:
        raise ValueError(f"the artist style {ARTIST_STYLE!r} never appears in pretraining")
    rng = np.random.default_rng([seed, 31337])
    if rng.random() < P_PLAIN:
        style = "plain"
    else:
        named = [s for s in styles if s != "plain"]
        style = named[int(rng.integers(len(named)))]
    scene = random_scene(seed, style=style, two_subjects=bool(rng.random() < P_TWO))
    u = rng.random()
    phrase = style_phrase(style)
    if rng.random() < P_BARE_ARTSTYLE:
        phrase = "artstyle"
    elif artists and style in ARTISTS:  # its own stream, so the scenes (and cached latents) stay as they were
        artist_rng = np.random.default_rng([seed, 4243])
        if artist_rng.random() < P_ARTIST:
            phrase = f"{ARTISTS[style][int(artist_rng.integers(ARTISTS_PER_STYLE))]} artstyle"
    if u < P_EMPTY:
        caption = ""
    elif u < P_EMPTY + P_NO_SUBJECT:
        caption = phrase or "artstyle"
    else:
        caption = scene.caption(phrase)
    return Example(scene, caption)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """(N, 3, 64, 64) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im, np.float32) for im in images])
    return arr.transpose(0, 3, 1, 2) / 127.5 - 1.0


def to_images(arr) -> list[Image.Image]:
    """The inverse of ``to_array``: (N, 3, H, W) in [-1, 1] (clipped), an array or CPU tensor, to RGB images."""
    pixels = ((np.clip(np.asarray(arr, np.float32), -1, 1).transpose(0, 2, 3, 1) + 1) * 127.5).round()
    return [Image.fromarray(a) for a in pixels.astype(np.uint8)]


def render_batch(seeds: list[int], styles: tuple[str, ...] = PRETRAIN_STYLES, ceiling: bool = False
                 ) -> tuple[np.ndarray, list[str], list[Example]]:
    examples = [pretrain_example(s, styles=styles, ceiling=ceiling) for s in seeds]
    return to_array([apply_style(e.scene) for e in examples]), [e.caption for e in examples], examples
