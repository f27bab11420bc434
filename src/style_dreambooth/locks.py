"""Folder locks: one process at a time writes a run folder, a sweep folder or a class-image cache key.

An OS file lock (``filelock``: ``flock`` on Unix) on ``<folder>/.style-dreambooth.lock``. The kernel
drops it when its process ends, however it ends, so a lock left by a killed run never blocks the next
one. The holder writes its pid, host and start time into the file so that a refused process can name it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".style-dreambooth.lock"


def _write_owner(fd: int) -> None:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200],
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(owner).encode("utf-8", "backslashreplace"))


def describe_owner(lock_path: Path) -> str:
    """'pid 123 on host, since 2026-01-01 10:00:00' from a held lock file, or a vaguer phrase."""
    try:
        owner = json.loads(lock_path.read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']}, since {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _lock(folder: Path) -> FileLock:
    return FileLock(str(folder / LOCK_FILE), on_acquired=_write_owner)


@contextmanager
def hold_folder(folder: Path, what: str) -> Iterator[None]:
    """Hold the lock of the existing folder `folder` (named `what` in errors); a UserError naming the
    holder if another process has it."""
    lock = _lock(folder)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"{what} '{folder}' is in use by a running style-dreambooth process ({describe_owner(folder / LOCK_FILE)}); "
            "wait for it to finish or stop it, then run this again"
        ) from None
    try:
        yield
    finally:
        lock.release()
        # Leave the folder as the run made it. Nobody waits on this lock (others are refused at once), and
        # filelock re-checks after locking that the path still names the inode it locked.
        (folder / LOCK_FILE).unlink(missing_ok=True)


@contextmanager
def wait_for_folder(folder: Path, what: str) -> Iterator[None]:
    """Hold the lock of `folder`, waiting (and saying so) while another process has it."""
    lock = _lock(folder)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for %s to finish with %s '%s'", describe_owner(folder / LOCK_FILE), what, folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()

