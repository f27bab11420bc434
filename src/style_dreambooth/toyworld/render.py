"""Procedural, captioned 64x64 scenes whose ground truth (subject, colour, style) is known.

A :class:`Scene` is pure data drawn from a seed. :func:`scene_layers` turns it into masks
(drawn at 2x and averaged down, so edges are anti-aliased); a style (see ``styles.py``)
composes the masks into pixels. Captions are built from the attributes: ``"a red star"``,
``"a red star, pixel artstyle"``, ``"a red star and a blue house"`` (first subject on the left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 2  # supersampling factor for anti-aliased masks

SUBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "house", "tree", "fish")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 45, 185),
    "orange": (245, 125, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
TRUNK = (110, 70, 35)
DOOR = (70, 45, 25)


@dataclass(frozen=True)
class Subject:
    kind: str
    colour: str
    cx: float  # centre, in 64 px image coordinates
    cy: float
    size: float  # "radius" in px
    angle: float = 0.0  # degrees, for square/triangle/star
    flip: bool = False  # fish facing left
    rgb: tuple[int, int, int] = (0, 0, 0)  # the jittered colour actually drawn


@dataclass(frozen=True)
class Scene:
    subjects: tuple[Subject, ...]
    background: tuple[int, int, int]
    gradient: float  # vertical background gradient strength (-1..1)
    style: str = "plain"
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def main(self) -> Subject:
        return self.subjects[0]

    def subject_phrase(self) -> str:
        return " and ".join(f"a {s.colour} {s.kind}" for s in self.subjects)

    def caption(self, style_phrase: str | None = None) -> str:
        """``"a red star"`` or, with a style phrase, ``"a red star, pixel artstyle"``."""
        text = self.subject_phrase()
        return f"{text}, {style_phrase}" if style_phrase else text


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 14) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, low-saturation background, so every subject colour stands out from it."""
    hue = rng.uniform(0, 2 * math.pi)
    value = rng.uniform(205, 248)
    sat = rng.uniform(0, 22)
    return tuple(int(np.clip(value + sat * math.cos(hue + k * 2 * math.pi / 3), 0, 255)) for k in range(3))  # type: ignore[return-value]


def random_subject(
    rng: np.random.Generator,
    kind: str | None = None,
    colour: str | None = None,
    region: tuple[float, float] = (0.0, SIZE),
    size_range: tuple[float, float] = (11.0, 22.0),
) -> Subject:
    """A subject with random (or given) kind and colour, placed inside the x-range ``region``."""
    kind = kind or SUBJECTS[int(rng.integers(len(SUBJECTS)))]
    colour = colour or COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    size = float(rng.uniform(*size_range))
    x0, x1 = region
    margin = size + 2
    cx = float(rng.uniform(x0 + margin, x1 - margin)) if x1 - x0 > 2 * margin else (x0 + x1) / 2
    cy = float(rng.uniform(margin, SIZE - margin))
    return Subject(
        kind=kind, colour=colour, cx=cx, cy=cy, size=size,
        angle=float(rng.uniform(-15, 15)), flip=bool(rng.integers(2)), rgb=_jitter(COLOURS[colour], rng),
    )


def random_scene(
    seed: int,
    style: str = "plain",
    kind: str | None = None,
    colour: str | None = None,
    two_subjects: bool = False,
    second: tuple[str, str] | None = None,
) -> Scene:
    """A scene fully determined by ``seed`` (and the fixed attributes passed)."""
    rng = np.random.default_rng([seed, 7919])
    if two_subjects or second is not None:
        left = random_subject(rng, kind, colour, region=(0, SIZE / 2), size_range=(9.0, 13.0))
        k2, c2 = second if second is not None else (None, None)
        right = random_subject(rng, k2, c2, region=(SIZE / 2, SIZE), size_range=(9.0, 13.0))
        subjects: tuple[Subject, ...] = (left, right)
    else:
        subjects = (random_subject(rng, kind, colour),)
    return Scene(subjects=subjects, background=_background(rng), gradient=float(rng.uniform(-1, 1)),
                 style=style, seed=seed)


# --------------------------------------------------------------------------- masks


@dataclass
class Layer:
    """One flat-coloured part of a subject: an anti-aliased mask in [0, 1] and its colour."""

    mask: np.ndarray  # (64, 64) float32
    rgb: np.ndarray  # (3,) float32
    subject: int  # index into scene.subjects
    main: bool  # the part that carries the subject's colour


def _poly(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]]) -> None:
    draw.polygon([(x * _SS, y * _SS) for x, y in points], fill=255)


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float) -> None:
    draw.ellipse([(cx - rx) * _SS, (cy - ry) * _SS, (cx + rx) * _SS, (cy + ry) * _SS], fill=255)


def _new() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    return img, ImageDraw.Draw(img)


def _done(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _subject_parts(s: Subject) -> list[tuple[np.ndarray, tuple[int, int, int], bool]]:
    """(mask, colour, is_main) parts of one subject, drawn back to front."""
    cx, cy, r = s.cx, s.cy, s.size
    main, draw = _new()
    parts: list[tuple[np.ndarray, tuple[int, int, int], bool]] = []
    if s.kind == "circle":
        _ellipse(draw, cx, cy, r, r)
    elif s.kind == "square":
        h = r * 0.85
        _poly(draw, _rotate([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], cx, cy, s.angle))
    elif s.kind == "triangle":
        pts = [(cx + r * math.cos(math.radians(-90 + 120 * k)), cy + 0.15 * r + r * math.sin(math.radians(-90 + 120 * k)))
               for k in range(3)]
        _poly(draw, _rotate(pts, cx, cy, s.angle * 0.5))
    elif s.kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        _poly(draw, _rotate(pts, cx, cy, s.angle))
    elif s.kind == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 17, cy - y * r / 17 - 0.1 * r))
        _poly(draw, pts)
    elif s.kind == "house":
        body_top = cy - 0.1 * r
        _poly(draw, [(cx - 0.75 * r, body_top), (cx + 0.75 * r, body_top), (cx + 0.75 * r, cy + 0.85 * r),
                     (cx - 0.75 * r, cy + 0.85 * r)])
        roof, rdraw = _new()
        _poly(rdraw, [(cx - r, body_top + 0.5), (cx, cy - r), (cx + r, body_top + 0.5)])
        door, ddraw = _new()
        _poly(ddraw, [(cx - 0.2 * r, cy + 0.3 * r), (cx + 0.2 * r, cy + 0.3 * r), (cx + 0.2 * r, cy + 0.85 * r),
                      (cx - 0.2 * r, cy + 0.85 * r)])
        parts.append((_done(main), s.rgb, True))
        parts.append((_done(roof), tuple(int(c * 0.65) for c in s.rgb), False))  # type: ignore[arg-type]
        parts.append((_done(door), DOOR, False))
        return parts
    elif s.kind == "tree":
        trunk, tdraw = _new()
        _poly(tdraw, [(cx - 0.17 * r, cy + 0.2 * r), (cx + 0.17 * r, cy + 0.2 * r), (cx + 0.17 * r, cy + r),
                      (cx - 0.17 * r, cy + r)])
        parts.append((_done(trunk), TRUNK, False))
        _ellipse(draw, cx, cy - 0.3 * r, 0.72 * r, 0.7 * r)
        _ellipse(draw, cx - 0.38 * r, cy - 0.05 * r, 0.42 * r, 0.38 * r)
        _ellipse(draw, cx + 0.38 * r, cy - 0.05 * r, 0.42 * r, 0.38 * r)
        parts.append((_done(main), s.rgb, True))
        return parts
    elif s.kind == "fish":
        d = -1.0 if s.flip else 1.0
        _ellipse(draw, cx - d * 0.15 * r, cy, 0.75 * r, 0.48 * r)
        _poly(draw, [(cx + d * 0.45 * r, cy), (cx + d * r, cy - 0.5 * r), (cx + d * r, cy + 0.5 * r)])
        eye, edraw = _new()
        _ellipse(edraw, cx - d * 0.55 * r, cy - 0.1 * r, 0.1 * r + 0.6, 0.1 * r + 0.6)
        parts.append((_done(main), s.rgb, True))
        parts.append((_done(eye), (25, 25, 25), False))
        return parts
    else:
        raise ValueError(f"unknown subject kind {s.kind!r}")
    parts.append((_done(main), s.rgb, True))
    return parts


def scene_layers(scene: Scene) -> list[Layer]:
    layers = []
    for i, s in enumerate(scene.subjects):
        for mask, rgb, is_main in _subject_parts(s):
            layers.append(Layer(mask=mask, rgb=np.asarray(rgb, np.float32), subject=i, main=is_main))
    return layers


def subject_mask(layers: list[Layer], subject: int | None = None) -> np.ndarray:
    """Union (max) of the masks of one subject, or of all subjects."""
    masks = [l.mask for l in layers if subject is None or l.subject == subject]
    return np.max(np.stack(masks), axis=0) if masks else np.zeros((SIZE, SIZE), np.float32)


def background_array(scene: Scene) -> np.ndarray:
    """(64, 64, 3) float32 background with a gentle vertical gradient."""
    ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)[:, None, None] * scene.gradient * 10.0
    bg = np.asarray(scene.background, np.float32)[None, None, :] + ramp
    return np.broadcast_to(np.clip(bg, 0, 255), (SIZE, SIZE, 3)).copy()


def composite(base: np.ndarray, layers: list[Layer], colour_of=None) -> np.ndarray:
    """Paint flat layers over ``base`` (float RGB); ``colour_of(layer)`` may remap colours."""
    out = base.copy()
    for layer in layers:
        rgb = colour_of(layer) if colour_of is not None else layer.rgb
        m = layer.mask[..., None]
        out = out * (1 - m) + rgb[None, None, :] * m
    return out


def render(scene: Scene) -> Image.Image:
    """The scene in its style as a 64x64 RGB image."""
    from .styles import apply_style

    return apply_style(scene)
