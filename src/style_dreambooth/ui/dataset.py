"""Dataset page logic: what is wrong with each image, uploads, and captions (no Gradio here)."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data.images import CAPTION_EXTENSION, IMAGE_EXTENSIONS, load_image, read_caption
from ..errors import UserError
from ..files import write_text_atomically

log = logging.getLogger(__name__)

MIN_SIZE = 64  # the same minimum as `train` (data.images.list_images)
DEFAULT_MAX_UPLOAD_MB = 20.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class ImageInfo:
    path: Path
    size: tuple[int, int] | None  # None when the image cannot be loaded
    caption: str
    problems: list[str]

    @property
    def usable(self) -> bool:
        return self.size is not None


def image_files(folder: Path) -> list[Path]:
    """The image files `train` would look at in `folder`, sorted by name (hidden files skipped)."""
    if not folder.is_dir():
        raise UserError(f"dataset folder '{folder}' does not exist; upload images or pick another folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def inspect_folder(folder: Path) -> list[ImageInfo]:
    """Every image in `folder` with the problems `train` would find (unreadable, too small) and duplicates."""
    infos: list[ImageInfo] = []
    seen: dict[str, str] = {}
    for path in image_files(folder):
        problems: list[str] = []
        size = None
        try:
            image = load_image(path, min_size=MIN_SIZE)
            size = image.size
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            if digest in seen:
                problems.append(f"duplicate of {seen[digest]}")
            else:
                seen[digest] = path.name
        except UserError as exc:
            problems.append(str(exc))
        try:
            caption = read_caption(path) or ""
        except UserError as exc:
            caption = ""
            problems.append(str(exc))
        infos.append(ImageInfo(path, size, caption, problems))
    return infos


def _safe_file_name(name: str) -> str:
    stem, suffix = Path(Path(name).name).stem, Path(name).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise UserError(f"'{Path(name).name}' is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return (_UNSAFE.sub("_", stem).strip("._") or "image") + suffix


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    n = 1
    while target.exists():
        target = folder / f"{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    return target


def save_uploads(files: list[tuple[Path, str]], folder: Path, max_mb: float = DEFAULT_MAX_UPLOAD_MB
                 ) -> tuple[list[Path], list[str]]:
    """Copy uploaded `(temp_path, original_name)` files into `folder` after the `train` image checks.

    Returns the saved paths and one line per refused file (too large, not an image, unreadable, too small).
    """
    folder.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    refused: list[str] = []
    for temp, original in files:
        shown = Path(original).name
        try:
            if temp.stat().st_size > max_mb * 1024 * 1024:
                raise UserError(f"'{shown}' is larger than the upload limit of {max_mb:g} MB; downscale it")
            name = _safe_file_name(original)
            load_image(temp, min_size=MIN_SIZE)
        except UserError as exc:
            refused.append(str(exc).replace(str(temp), shown))
            continue
        target = _free_name(folder, name)
        shutil.copyfile(temp, target)
        saved.append(target)
        log.info("uploaded %s to %s", shown, target)
    return saved, refused


def write_caption(image: Path, text: str) -> None:
    """Write (or, for a blank text, remove) the `.txt` caption beside `image`."""
    caption = image.with_suffix(CAPTION_EXTENSION)
    if text.strip():
        write_text_atomically(caption, text.strip() + "\n")
    elif caption.exists():
        caption.unlink()
