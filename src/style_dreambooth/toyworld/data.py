"""Pretraining data for the toy world: scenes with captions, in every style but the artist's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .render import Scene, random_scene
from .styles import PRETRAIN_STYLES, apply_style, style_phrase

# Probabilities of the pretraining mix.
P_PLAIN = 0.4  # the rest is split evenly over the named pretraining styles
P_TWO = 0.12  # two subjects, "a red star and a blue house" (first on the left)
P_BARE_ARTSTYLE = 0.12  # caption ends in ", artstyle" (no style name): "artstyle" means any style
P_NO_SUBJECT = 0.05  # caption is only the style phrase ("pixel artstyle" / "artstyle")
P_EMPTY = 0.1  # empty caption, for classifier-free guidance


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str


def pretrain_example(seed: int) -> Example:
    """One captioned pretraining scene, a pure function of ``seed``."""
    rng = np.random.default_rng([seed, 31337])
    if rng.random() < P_PLAIN:
        style = "plain"
    else:
        named = [s for s in PRETRAIN_STYLES if s != "plain"]
        style = named[int(rng.integers(len(named)))]
    scene = random_scene(seed, style=style, two_subjects=bool(rng.random() < P_TWO))
    u = rng.random()
    phrase = style_phrase(style)
    if rng.random() < P_BARE_ARTSTYLE:
        phrase = "artstyle"
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


def render_batch(seeds: list[int]) -> tuple[np.ndarray, list[str], list[Example]]:
    examples = [pretrain_example(s) for s in seeds]
    return to_array([apply_style(e.scene) for e in examples]), [e.caption for e in examples], examples
