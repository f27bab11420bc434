"""Writing files and folders so that a crash at any moment leaves the old or the new version whole."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_mode(path: Path) -> None:
    """Give a file we wrote the mode a plain `open` would (0666 less the umask): writers that go through
    private temporary files (safetensors) leave 0600, which other users and a UI cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def give_usual_modes(folder: Path) -> None:
    """`give_usual_mode` for every file under `folder`, and the usual 0777-less-umask for its folders."""
    mask = _umask()
    for parent, dirs, files in os.walk(folder):
        os.chmod(parent, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for ENOSPC/EDQUOT, or a library's error (safetensors, torch) that wraps one in its text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


@contextmanager
def disk_full_is_user_error(target: Path, needed: int | None, kept: Callable[[], str]) -> Iterator[None]:
    """Turn a full disk while writing `target` into one line: the file, the space needed (`needed` bytes,
    when known) and free, and `kept()` (what is still safe on disk and what to do, asked after the failure)."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        name = getattr(exc, "filename", None) or target
        need = f"needs about {format_bytes(needed)}, " if needed else ""
        raise UserError(
            f"disk full while writing '{name}' ({need}{format_bytes(free_bytes(target))} free); {kept()}"
        ) from None


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_folder(staged: Path, final: Path) -> None:
    """Rename the complete folder `staged` to `final` (its files given the usual modes). A previous
    `final` is renamed aside first and removed last, so there is always a whole copy on disk."""
    give_usual_modes(staged)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    if old.exists():
        shutil.rmtree(old)


def tidy_folder(final: Path) -> None:
    """After a crash: put back an old copy that `replace_folder` had renamed aside (when the new
    one never arrived), and remove a half-written staging folder `.<name>.tmp`."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)


def make_output_dir(path: Path, flag: str) -> Path:
    """Create the folder `path` (named by the option `flag` in errors) and check it takes files."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} '{path}' is a file; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} '{path}' is not writable ({exc.strerror or exc}); choose another {flag}") from None
    return path
