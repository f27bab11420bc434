"""Writing files and folders so that a crash at any moment leaves the old or the new version whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_folder(staged: Path, final: Path) -> None:
    """Rename the complete folder `staged` to `final`. A previous `final` is renamed aside first
    and removed last, so there is always a whole copy on disk."""
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
