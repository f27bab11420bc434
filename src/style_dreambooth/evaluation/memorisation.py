"""Memorisation check: is a generated image a (near-)copy of one of the instance images?

Each output is compared with every instance image under the tiled SSIM of
:mod:`.similarity` (64 px, 8 px tiles, Y/Cb/Cr), horizontally mirrored instances included by
default because training augments with flips.  The most similar instance and its similarity
are reported; :func:`is_copy` flags similarities at or above :data:`COPY_THRESHOLD`.

Calibration of :data:`COPY_THRESHOLD` (see ``tests/test_metrics.py``): on procedural images,
lightly perturbed copies (Gaussian noise sigma 5/255, JPEG q=75, a 2-pixel shift, slight colour
jitter, and all four combined) must score at or above it, and different images drawn by the same
generator with the same palette but a different layout must score below it.  It is checked on
proof-world pictures by :func:`style_dreambooth.toyworld.scoring.calibrate_copy_threshold`
(docs/metrics.md has the numbers); callers may pass their own ``threshold``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._images import ImageLike
from .similarity import similarity_matrix

#: Default copy threshold.  Synthetic calibration (tests/test_metrics.py; images drawn at 128, 256
#: and 512 px): perturbed copies scored >= 0.74 at 128 px and >= 0.90 at 256/512 px; same-style,
#: different-layout images scored <= 0.64 at 128 px and <= 0.55 at 256/512 px.
COPY_THRESHOLD: float = 0.7


def nearest_instance(
    images: Sequence[ImageLike],
    instances: Sequence[ImageLike],
    consider_flips: bool = True,
) -> list[tuple[int, float]]:
    """For each output image: (index of the most similar instance image, similarity in [0, 1])."""
    images = list(images)
    instances = list(instances)
    if not instances:
        raise ValueError("nearest_instance needs at least one instance image")
    if not images:
        return []
    sim = similarity_matrix(images, instances, consider_flips=consider_flips)
    best = sim.argmax(axis=1)
    return [(int(j), float(sim[i, j])) for i, j in enumerate(best)]


def is_copy(similarity: float, threshold: float | None = None) -> bool:
    """True when ``similarity`` (from :func:`nearest_instance`) marks a near-copy."""
    return bool(similarity >= (COPY_THRESHOLD if threshold is None else threshold))


def copy_rate(
    images: Sequence[ImageLike],
    instances: Sequence[ImageLike],
    threshold: float | None = None,
    consider_flips: bool = True,
) -> float:
    """Fraction of ``images`` flagged as copies of some instance image (0.0 for no images)."""
    hits = nearest_instance(images, instances, consider_flips)
    if not hits:
        return 0.0
    return float(np.mean([is_copy(s, threshold) for _, s in hits]))
