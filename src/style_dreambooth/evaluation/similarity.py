"""Tiled SSIM image similarity in [0, 1], shared by memorisation and diversity checks.

Both images are centre-cropped to a square and resized (antialiased) to ``SIZE`` x ``SIZE``
(64), converted to Y/Cb/Cr (BT.601, chroma offset to [0, 1]), cut into ``TILE`` x ``TILE`` (8)
tiles with stride ``STRIDE`` (4, so tiles overlap by half), and SSIM (data range 1,
C1 = 0.01^2, C2 = 0.03^2) is computed per tile and channel from that tile's means, variances and
covariance.  Per-tile SSIM is clipped at 0 (anti-correlated structure counts as "not similar",
not as "negatively similar") and averaged over tiles with weights ``max(std_a, std_b) + 0.005``
(the larger of the two tiles' standard deviations), so two flat tiles of the same colour -- a
shared background, common among images of one artist -- count little.  The channels are then
combined with weights ``CHANNEL_WEIGHTS`` (Y 0.5, Cb 0.25, Cr 0.25): the grey structure and the
colour layout.

1.0 means identical at 64 px; unrelated images score near 0; images that share only a palette
score low because their tiles' structures and colours do not line up.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._images import ImageLike, resize_square

SIZE = 64
TILE = 8
STRIDE = 4
CHANNEL_WEIGHTS = (0.5, 0.25, 0.25)
_C1 = 0.01**2
_C2 = 0.03**2
_WEIGHT_FLOOR = 0.005


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 0.5
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 0.5
    return np.stack([y, cb, cr], axis=0)  # (3, H, W)


def _tiles(planes: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C, n_tiles, TILE*TILE)."""
    win = np.lib.stride_tricks.sliding_window_view(planes, (TILE, TILE), axis=(1, 2))
    win = win[:, ::STRIDE, ::STRIDE]
    c, ny, nx = win.shape[:3]
    return win.reshape(c, ny * nx, TILE * TILE)


def prepare(images: Sequence[ImageLike], flip: bool = False) -> np.ndarray:
    """Tile stacks for a list of images: float64 (N, C, n_tiles, TILE*TILE)."""
    out = []
    for im in images:
        rgb = resize_square(im, SIZE).astype(np.float64)
        if flip:
            rgb = rgb[:, ::-1]
        out.append(_tiles(_ycbcr(rgb)))
    return np.stack(out)


def similarity_matrix_from_tiles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tiled SSIM similarity between every pair of prepared images: (len(a), len(b)) in [0, 1]."""
    mu_a = a.mean(-1)  # (Na, C, T)
    mu_b = b.mean(-1)
    ca = a - mu_a[..., None]
    cb = b - mu_b[..., None]
    var_a = (ca**2).mean(-1)
    var_b = (cb**2).mean(-1)
    # Covariance of every pair, per channel and tile: batched matmul over (C, T).
    cov = np.matmul(
        ca.transpose(1, 2, 0, 3), cb.transpose(1, 2, 3, 0)
    ) / a.shape[-1]  # (C, T, Na, Nb)
    cov = cov.transpose(2, 3, 0, 1)  # (Na, Nb, C, T)
    ma, mb = mu_a[:, None], mu_b[None]
    va, vb = var_a[:, None], var_b[None]
    ssim = ((2 * ma * mb + _C1) * (2 * cov + _C2)) / ((ma**2 + mb**2 + _C1) * (va + vb + _C2))
    ssim = np.clip(ssim, 0.0, 1.0)
    # Tiles weighted by the larger of the two tiles' standard deviations: two flat tiles of the
    # same colour (a shared background) say little about copying.
    w = np.sqrt(np.maximum(va, vb)) + _WEIGHT_FLOOR
    per_channel = (ssim * w).sum(-1) / w.sum(-1)  # (Na, Nb, C)
    weights = np.asarray(CHANNEL_WEIGHTS) / np.sum(CHANNEL_WEIGHTS)
    return np.clip(per_channel @ weights, 0.0, 1.0)


def similarity_matrix(
    images_a: Sequence[ImageLike], images_b: Sequence[ImageLike], consider_flips: bool = False
) -> np.ndarray:
    """Tiled SSIM similarity of every ``images_a[i]`` to every ``images_b[j]``, in [0, 1].

    With ``consider_flips`` each pair's score is the larger of the plain and the horizontally
    mirrored ``images_b[j]`` (training usually augments with flips).
    """
    a = prepare(images_a)
    sim = similarity_matrix_from_tiles(a, prepare(images_b))
    if consider_flips:
        sim = np.maximum(sim, similarity_matrix_from_tiles(a, prepare(images_b, flip=True)))
    return sim


def tiled_similarity(a: ImageLike, b: ImageLike, consider_flips: bool = False) -> float:
    """Tiled SSIM similarity of two images, in [0, 1] (1 = identical at 64 px)."""
    return float(similarity_matrix([a], [b], consider_flips)[0, 0])
