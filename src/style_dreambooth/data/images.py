"""Loading and validating training images and their captions.

Every problem a user can cause (missing folder, corrupt or tiny image, bad caption
encoding) is raised as a one-sentence :class:`UserError` that names the file.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from style_dreambooth.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    | ({".avif"} if features.check("avif") else set())  # Pillow 11.2+ reads AVIF where built with libavif
)
"""Lower-case file extensions (with the dot) treated as images."""

# Photo formats this Pillow cannot read: skipped with a warning, not silently.
UNREADABLE_PHOTO_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif", ".avif"}) - IMAGE_EXTENSIONS

CAPTION_EXTENSION = ".txt"

_WHITE = (255, 255, 255)

# Exceptions Pillow's decoders raise for broken data (besides OSError, which covers
# "image file is truncated"). Deliberately excludes MemoryError and friends.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _show(path: Path) -> str:
    """Render a path for a one-line message (line breaks in odd file names escaped)."""
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


def _corrupt(path: Path) -> UserError:
    return UserError(f"image '{_show(path)}' is truncated or corrupt; re-export it or remove it")


def _to_uint8_sixteen_bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer holding 16-bit data) greyscale image to 8-bit 'L'."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        return _stretch(arr)
    arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8))


def _stretch(arr: np.ndarray) -> Image.Image:
    """Min-max stretch an arbitrary numeric array to 8-bit 'L'."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        out = np.zeros(arr.shape, dtype=np.uint8)
    else:
        out = np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return Image.fromarray(out)


def _float_to_uint8(img: Image.Image) -> Image.Image:
    """Scale a 32-bit float greyscale image to 8-bit 'L'.

    Values within [0, 1] are scaled by 255, within [0, 255] kept, within [0, 65535]
    divided by 257; anything else (negative values, larger ranges) is min-max stretched.
    NaN becomes 0 and infinities are clipped.
    """
    arr = np.asarray(img).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if arr.size == 0:
        return Image.new("L", img.size)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        return _stretch(arr)
    if hi <= 1.0:
        scaled = arr * 255.0
    elif hi <= 255.0:
        scaled = arr
    elif hi <= 65535.0:
        scaled = arr / 257.0
    else:
        return _stretch(arr)
    return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8))


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten an image with alpha (or a transparency key) onto a white background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _to_uint8_sixteen_bit(img).convert("RGB")
    if mode == "F":
        return _float_to_uint8(img).convert("RGB")
    has_alpha = mode in {"RGBA", "RGBa", "LA", "La", "PA"} or "transparency" in img.info
    if has_alpha:
        return _composite_on_white(img)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UserError(
            f"image '{_show(path)}' uses colour mode {mode!r}, which cannot be converted to RGB; "
            "re-export it as an 8-bit RGB PNG or JPEG"
        ) from exc


def load_image(path: Path, min_size: int = 64) -> Image.Image:
    """Return the image at ``path`` fully decoded, EXIF-oriented and converted to RGB.

    Raises UserError if the file is missing, unreadable, not an image, truncated or
    corrupt, or if its shorter side is below ``min_size`` pixels.
    """
    path = Path(path)
    shown = _show(path)
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"image '{shown}' is a broken link (its target is missing, or the link loops back on itself); "
            "fix the link or remove it"
        )
    try:
        img = Image.open(path)
    except FileNotFoundError as exc:
        raise UserError(f"image '{shown}' does not exist; check the path") from exc
    except IsADirectoryError as exc:
        raise UserError(f"'{shown}' is a directory, not an image; pass an image file") from exc
    except PermissionError as exc:
        raise UserError(
            f"image '{shown}' cannot be read (permission denied); fix its permissions"
        ) from exc
    except UnidentifiedImageError as exc:
        raise UserError(
            f"'{shown}' is not a readable image (unknown format, or corrupt); "
            "re-export it as PNG or JPEG or remove it"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise UserError(f"image '{shown}' is too large to load safely; downscale it or remove it") from exc
    except _DECODE_ERRORS as exc:
        raise _corrupt(path) from exc

    with img:
        width, height = img.size
        if min(width, height) < min_size:
            raise UserError(
                f"image '{shown}' is {width}x{height} pixels, smaller than the minimum of "
                f"{min_size} pixels on its shorter side; use a larger image or remove it"
            )
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise UserError(f"image '{shown}' is too large to load safely; downscale it or remove it") from exc
        except _DECODE_ERRORS as exc:
            raise _corrupt(path) from exc

        oriented: Image.Image = img
        try:
            oriented = ImageOps.exif_transpose(img)
        except _DECODE_ERRORS as exc:
            logger.warning("ignoring unreadable EXIF orientation in %s: %s", shown, exc)
        rgb = _to_rgb(oriented, path)
        if rgb is img:
            rgb = rgb.copy()
    return rgb


def read_caption(image_path: Path) -> str | None:
    """Return the stripped text of the ``.txt`` file with the image's stem, or None if absent or blank."""
    image_path = Path(image_path)
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        upper = image_path.with_suffix(CAPTION_EXTENSION.upper())
        if not upper.is_file():
            return None
        caption_path = upper
    shown = _show(caption_path)
    try:
        raw = caption_path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"caption file '{shown}' cannot be read ({exc.strerror}); fix its permissions or remove it"
        ) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption file '{shown}' is not valid UTF-8 (bad byte at offset {exc.start}); re-save it as UTF-8"
        ) from exc
    text = text.strip()
    return text or None


def list_images(directory: Path, role: str = "instance", min_size: int = 64) -> list[Path]:
    """Return the image files in ``directory`` sorted by name, after checking every one loads.

    ``.txt`` captions and hidden files are skipped silently, other files and
    subdirectories are ignored with a log note. ``role`` ("instance", "class") is
    used in error messages.
    """
    directory = Path(directory)
    shown = _show(directory)
    label = f"{role} dir"
    if not directory.exists():
        raise UserError(f"{label} '{shown}' does not exist; check the path or create it and add images")
    if not directory.is_dir():
        raise UserError(
            f"{label} '{shown}' is a file, not a directory; pass the folder that contains the images"
        )
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise UserError(f"{label} '{shown}' cannot be listed ({exc.strerror}); fix its permissions") from exc

    images: list[Path] = []
    other_files = 0
    for entry in entries:
        name = entry.name
        if entry.is_dir():
            if not name.startswith("."):
                logger.info("ignoring subdirectory %s in %s '%s'", name, label, shown)
            continue
        suffix = entry.suffix.lower()
        if name.startswith("."):
            other_files += 1
            continue
        if suffix in IMAGE_EXTENSIONS:
            images.append(entry)
        elif suffix == CAPTION_EXTENSION:
            other_files += 1
        elif suffix in UNREADABLE_PHOTO_EXTENSIONS:
            other_files += 1
            logger.warning(
                "skipping %s in %s '%s': this Pillow cannot read %s images; convert it to PNG or JPEG to train on it",
                _show(entry), label, shown, suffix[1:].upper(),
            )
        else:
            other_files += 1
            logger.info("ignoring non-image file %s in %s '%s'", _show(entry), label, shown)

    if not images:
        raise UserError(
            f"{label} '{shown}' has no usable images (found {other_files} other files); add .png/.jpg images"
        )

    stems: dict[str, Path] = {}
    for image_path in images:
        previous = stems.setdefault(image_path.stem, image_path)
        if previous is not image_path:
            logger.warning(
                "%s and %s share the stem %r and so share one caption file",
                previous.name,
                image_path.name,
                image_path.stem,
            )
        load_image(image_path, min_size=min_size)
    return images
