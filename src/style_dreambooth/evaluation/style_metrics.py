"""Style distance between generated images and the artist's instance images, with no network.

Every image is analysed at a fixed size (shorter side resized to ``ANALYSIS_SIZE`` = 128 px,
centre crop) and summarised by three hand-made feature sets:

``palette``
    The colour distribution: a fixed (seeded) subset of 4096 pixels converted to CIELAB (D65),
    projected on 64 fixed random unit directions (seeded), each projection summarised by 64
    quantiles.  Two images are
    compared with the sliced Wasserstein-2 distance (in Lab units, i.e. roughly Delta-E).
``texture``
    The luminance spectrum's shape: mean amplitude of a log-Gabor filter bank (4 scales x 6
    orientations, applied in the Fourier domain to a mirror-padded luminance image), in log
    units with the mean log amplitude removed, so a global contrast change does not count as
    texture.  Compared with the root-mean-square difference of the 24 log amplitudes.
``edges``
    Sobel gradients of the luminance (divided by its standard deviation, so global contrast is
    left to the palette): a 16-bin histogram of the gradient magnitude (log-spaced
    bins), the edge density (fraction of pixels with magnitude above ``EDGE_THRESHOLD``), and a
    12-bin magnitude-weighted orientation histogram over [0, pi).  Compared as the mean of the
    two histograms' total-variation distances and the absolute density difference.

:class:`StyleReference` stores the features of the instance images and, per component, the
*within-set spread*: the mean pairwise distance among the instance images.  A generated
image's component distance is its mean distance to the instance images divided by that spread,
so 1.0 means "as far from the artist's images as two of the artist's own images are from each
other"; ``style`` is the mean of the three normalised components.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from typing import Sequence

import numpy as np

from ._images import ImageLike, resize_square

ANALYSIS_SIZE = 128
COMPONENTS = ("palette", "texture", "edges")

# Palette: sliced Wasserstein.
N_DIRECTIONS = 64
N_QUANTILES = 64
N_PALETTE_PIXELS = 4096  # fixed (seeded) random subset of the analysis image's pixels
PROJECTION_SEED = 20240611

# Texture: log-Gabor bank.
GABOR_WAVELENGTHS = (3.0, 6.0, 12.0, 24.0)  # pixels at the analysis size
GABOR_ORIENTATIONS = 6
GABOR_RADIAL_SIGMA = 0.55  # sigma_f / f0 (about two octaves of bandwidth)
GABOR_ANGULAR_SIGMA = np.pi / GABOR_ORIENTATIONS / 1.2
_AMPLITUDE_FLOOR = 1e-4

# Edges.
# Gradients are measured on the luminance divided by its standard deviation (floored by
# _MIN_LUM_STD), so a global contrast change -- which belongs to the palette -- leaves them alone.
_MIN_LUM_STD = 0.05
EDGE_THRESHOLD = 0.25  # Sobel magnitude in luminance-std units per pixel
_MAG_BIN_EDGES = np.concatenate([[0.0], np.geomspace(0.01, 5.0, 15), [np.inf]])
N_ORIENTATION_BINS = 12
_ORIENTATION_MIN_MAG = 0.05

# Floors for the within-set spread: a set of (near-)identical instance images would otherwise
# give a zero spread and infinite normalised distances.  Each floor is well below the spread of
# any realistic set of different images (Lab units, log-amplitude units, histogram units).
MIN_SPREAD = {"palette": 0.5, "texture": 0.01, "edges": 0.005}


# --------------------------------------------------------------------------- colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert sRGB values in [0, 1] (``...x3``) to CIELAB (D65 white), float64.

    L is in [0, 100]; a and b are roughly in [-128, 127].
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    # Linear sRGB -> XYZ (D65), IEC 61966-2-1 matrix.
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ m.T
    white = np.array([0.95047, 1.0, 1.08883])
    t = xyz / white
    delta = 6.0 / 29.0
    f = np.where(t > delta**3, np.cbrt(t), t / (3 * delta**2) + 4.0 / 29.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


@lru_cache(maxsize=1)
def _directions() -> np.ndarray:
    rng = np.random.default_rng(PROJECTION_SEED)
    d = rng.normal(size=(N_DIRECTIONS, 3))
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=4)
def _pixel_subset(n_pixels: int) -> np.ndarray:
    if n_pixels <= N_PALETTE_PIXELS:
        return np.arange(n_pixels)
    rng = np.random.default_rng(PROJECTION_SEED + 1)
    return np.sort(rng.choice(n_pixels, N_PALETTE_PIXELS, replace=False))


def _palette_features(lab: np.ndarray) -> np.ndarray:
    """Quantiles (N_DIRECTIONS x N_QUANTILES) of the Lab pixels projected on fixed directions."""
    pixels = lab.reshape(-1, 3).astype(np.float32)
    pixels = pixels[_pixel_subset(len(pixels))]
    # (n_directions, n_pixels), sorted along contiguous rows.
    proj = np.sort(_directions() @ pixels.T, axis=1)
    n = proj.shape[1]
    # Mid-point quantile levels, read off the sorted projections by linear interpolation.
    levels = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES * (n - 1)
    lo = np.floor(levels).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (levels - lo)[None, :]
    return ((1 - w) * proj[:, lo] + w * proj[:, hi]).astype(np.float32)


def palette_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Sliced Wasserstein-2 distance between two palette features (Lab units)."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


# --------------------------------------------------------------------------- texture


@lru_cache(maxsize=4)
def _log_gabor_bank(n: int) -> np.ndarray:
    """One-sided log-Gabor filters for an ``n x n`` Fourier grid: (scales*orientations, n, n)."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0  # avoid log(0); the DC term is zeroed below
    theta = np.arctan2(fy, fx)
    filters = []
    for wavelength in GABOR_WAVELENGTHS:
        f0 = 1.0 / wavelength
        radial = np.exp(-(np.log(radius / f0) ** 2) / (2 * np.log(GABOR_RADIAL_SIGMA) ** 2))
        radial[0, 0] = 0.0
        for k in range(GABOR_ORIENTATIONS):
            angle = k * np.pi / GABOR_ORIENTATIONS
            # Angular distance on the full circle: one-sided filter -> analytic (complex) output.
            d = np.angle(np.exp(1j * (theta - angle)))
            angular = np.exp(-(d**2) / (2 * GABOR_ANGULAR_SIGMA**2))
            filters.append(radial * angular)
    return np.stack(filters).astype(np.float64)


def _texture_features(lum: np.ndarray) -> np.ndarray:
    """Contrast-normalised log mean amplitude per log-Gabor band (24 values)."""
    h, w = lum.shape
    x = lum - lum.mean()
    # Mirror padding makes the image periodic without a seam, so the FFT sees no fake edges.
    padded = np.pad(x, ((h // 2, h - h // 2), (w // 2, w - w // 2)), mode="symmetric")
    n = padded.shape[0]
    spectrum = np.fft.fft2(padded)
    responses = np.fft.ifft2(spectrum[None] * _log_gabor_bank(n), axes=(-2, -1))
    crop = responses[:, h // 2 : h // 2 + h, w // 2 : w // 2 + w]
    amplitude = np.abs(crop).mean(axis=(1, 2))
    log_amp = np.log(amplitude + _AMPLITUDE_FLOOR)
    return (log_amp - log_amp.mean()).astype(np.float32)


def texture_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference of two texture features (log-amplitude units)."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


# --------------------------------------------------------------------------- edges


def _sobel(lum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(lum, 1, mode="edge")
    gx = (
        (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    ) / 8.0
    gy = (
        (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    ) / 8.0
    return gx, gy


def _edge_features(lum: np.ndarray) -> np.ndarray:
    """[16 magnitude-histogram bins, edge density, 12 orientation bins] (29 values)."""
    gx, gy = _sobel(lum / max(float(lum.std()), _MIN_LUM_STD))
    mag = np.hypot(gx, gy)
    mag_hist = np.histogram(mag, bins=_MAG_BIN_EDGES)[0].astype(np.float64)
    mag_hist /= mag_hist.sum()
    density = float((mag > EDGE_THRESHOLD).mean())
    strong = mag > _ORIENTATION_MIN_MAG
    if strong.any():
        angle = np.mod(np.arctan2(gy[strong], gx[strong]), np.pi)
        orient = np.histogram(
            angle, bins=N_ORIENTATION_BINS, range=(0.0, np.pi), weights=mag[strong]
        )[0]
        orient = orient / orient.sum()
    else:
        orient = np.full(N_ORIENTATION_BINS, 1.0 / N_ORIENTATION_BINS)
    return np.concatenate([mag_hist, [density], orient]).astype(np.float32)


def edge_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of the magnitude- and orientation-histogram TV distances and the density gap."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    nm = len(_MAG_BIN_EDGES) - 1
    mag_tv = 0.5 * np.abs(a[:nm] - b[:nm]).sum()
    density = abs(a[nm] - b[nm])
    orient_tv = 0.5 * np.abs(a[nm + 1 :] - b[nm + 1 :]).sum()
    return float((mag_tv + density + orient_tv) / 3.0)


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class StyleFeatures:
    """Weight-free style features of one image (see the module docstring)."""

    palette: np.ndarray  # (N_DIRECTIONS, N_QUANTILES) Lab projection quantiles
    texture: np.ndarray  # (len(GABOR_WAVELENGTHS) * GABOR_ORIENTATIONS,) log amplitudes
    edges: np.ndarray  # (16 + 1 + N_ORIENTATION_BINS,) histograms and density


_DISTANCES = {"palette": palette_distance, "texture": texture_distance, "edges": edge_distance}


def style_features(image: ImageLike, size: int = ANALYSIS_SIZE) -> StyleFeatures:
    """Compute :class:`StyleFeatures` for a PIL image (or path / uint8 array)."""
    rgb = resize_square(image, size)
    lab = srgb_to_lab(rgb)
    lum = lab[..., 0] / 100.0
    return StyleFeatures(
        palette=_palette_features(lab),
        texture=_texture_features(lum),
        edges=_edge_features(lum),
    )


def component_distances(a: StyleFeatures, b: StyleFeatures) -> dict[str, float]:
    """Raw (un-normalised) per-component distances between two images' features."""
    return {name: _DISTANCES[name](getattr(a, name), getattr(b, name)) for name in COMPONENTS}


# --------------------------------------------------------------------------- reference


class StyleReference:
    """The instance images' style features and their within-set spread.

    Build with :meth:`from_images`; then :meth:`distance` scores one image and
    :meth:`mean_distance` a list.  All distances are normalised by the spread, so the instance
    images themselves score about 1.0 against the others (exactly 1.0 on average with
    :meth:`leave_one_out`).
    """

    def __init__(self, features: Sequence[StyleFeatures], size: int = ANALYSIS_SIZE):
        if len(features) < 2:
            raise ValueError(
                f"a style reference needs at least 2 instance images, got {len(features)}"
            )
        self.features = list(features)
        self.size = size
        raw = {name: [] for name in COMPONENTS}
        for a, b in combinations(self.features, 2):
            for name, d in component_distances(a, b).items():
                raw[name].append(d)
        #: Mean pairwise raw distance among the instance images, per component (unfloored).
        self.raw_spread = {name: float(np.mean(v)) for name, v in raw.items()}
        #: The spread actually used for normalisation (floored by ``MIN_SPREAD``).
        self.spread = {name: max(self.raw_spread[name], MIN_SPREAD[name]) for name in COMPONENTS}

    @classmethod
    def from_images(
        cls, images: Sequence[ImageLike], size: int = ANALYSIS_SIZE
    ) -> "StyleReference":
        """Build the reference from the instance images (at least two)."""
        images = list(images)
        if len(images) < 2:
            raise ValueError(
                f"a style reference needs at least 2 instance images, got {len(images)}"
            )
        return cls([style_features(im, size) for im in images], size=size)

    def __len__(self) -> int:
        return len(self.features)

    def _normalised(self, feats: StyleFeatures, exclude: int | None = None) -> dict[str, float]:
        sums = {name: 0.0 for name in COMPONENTS}
        count = 0
        for i, ref in enumerate(self.features):
            if i == exclude:
                continue
            for name, d in component_distances(feats, ref).items():
                sums[name] += d
            count += 1
        out = {name: sums[name] / count / self.spread[name] for name in COMPONENTS}
        out["style"] = float(np.mean([out[name] for name in COMPONENTS]))
        return out

    def distance(self, image: ImageLike | StyleFeatures) -> dict[str, float]:
        """Normalised distances of one image: keys ``palette``, ``texture``, ``edges``, ``style``.

        Each component is the image's mean raw distance to the instance images divided by the
        instance set's spread for that component; ``style`` is the mean of the three.
        """
        feats = image if isinstance(image, StyleFeatures) else style_features(image, self.size)
        return self._normalised(feats)

    def mean_distance(self, images: Sequence[ImageLike | StyleFeatures]) -> dict[str, float]:
        """:meth:`distance` averaged over ``images`` (same keys)."""
        images = list(images)
        if not images:
            raise ValueError("mean_distance needs at least one image")
        per_image = [self.distance(im) for im in images]
        return {k: float(np.mean([d[k] for d in per_image])) for k in (*COMPONENTS, "style")}

    def leave_one_out(self) -> list[dict[str, float]]:
        """Each instance image's distance to the *other* instance images.

        Per component this averages to exactly 1.0 unless the spread was floored by
        ``MIN_SPREAD`` (near-identical instance images).
        """
        return [self._normalised(f, exclude=i) for i, f in enumerate(self.features)]
