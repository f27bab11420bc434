"""Small image helpers shared by the weight-free metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, str, Path]


def as_rgb(image: ImageLike) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a PIL image (any mode; transparency is composited onto white), a path, or an
    ``HxW`` / ``HxWx3`` / ``HxWx4`` uint8 array.
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8, got {arr.dtype}")
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        kind = type(image).__name__
        raise TypeError(f"expected a PIL image, a path or a uint8 array, got {kind}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image) -> Image.Image:
    """Largest centred square crop."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def resize_square(image: ImageLike, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` x ``size`` (antialiased).

    Returns float32 RGB in [0, 1], shape (size, size, 3).
    """
    im = center_square(as_rgb(image))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0
