"""Diversity of the images generated for one prompt.

``diversity(images)`` is the mean over all unordered pairs of ``1 - tiled_similarity`` (the
tiled SSIM of :mod:`.similarity`, no flips): 0.0 when all images are identical, towards 1.0
when no two images share structure or colour layout.  With a single image there are no pairs,
and the function returns 0.0 (never NaN); an empty list raises ``ValueError``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._images import ImageLike
from .similarity import prepare, similarity_matrix_from_tiles


def diversity(images: Sequence[ImageLike]) -> float:
    """Mean pairwise (1 - tiled similarity) of ``images``; 0.0 for a single image."""
    images = list(images)
    if not images:
        raise ValueError("diversity needs at least one image")
    if len(images) == 1:
        return 0.0
    tiles = prepare(images)
    sim = similarity_matrix_from_tiles(tiles, tiles)
    iu = np.triu_indices(len(images), k=1)
    return float(np.clip(np.mean(1.0 - sim[iu]), 0.0, 1.0))
