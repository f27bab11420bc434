"""Atomic checkpoints: ``checkpoints/step-000400/`` holding trained weights and training state.

A checkpoint is written under a hidden temporary name and renamed when complete, so a folder
named ``step-N`` is always whole. The trained modules are saved in diffusers format
(``unet/``, ``text_encoder/``); the optimizer and LR-schedule state sit in ``training_state.pt``.
Finding and naming checkpoints is shared with the run's readers and lives in ``run_layout``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..files import replace_folder
from ..run_layout import LORA_FILE, STATE_FILE, checkpoint_name, list_checkpoints, resolve_checkpoint

__all__ = ["STATE_FILE", "checkpoint_name", "list_checkpoints", "resolve_checkpoint", "save_checkpoint",
           "checkpoint_method", "check_checkpoint_method", "state_bytes", "load_training_state"]

log = logging.getLogger(__name__)


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    """Write checkpoint `step` atomically (weights via `write_weights(folder)`), then prune the
    oldest beyond `total_limit`."""
    final = run_dir / "checkpoints" / checkpoint_name(step)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_weights(tmp)
        torch.save({"step": step, **state}, tmp / STATE_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only takes space a full disk needs
        raise
    replace_folder(tmp, final)
    log.info("saved checkpoint %s", final)
    if total_limit is not None:
        existing = list_checkpoints(run_dir)
        for _, old in existing[: max(0, len(existing) - total_limit)]:
            shutil.rmtree(old)
            log.info("removed old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
    return final


def checkpoint_method(folder: Path) -> str | None:
    """'lora' or 'full': which method wrote the checkpoint `folder` (None if neither's files are there)."""
    if (folder / LORA_FILE).is_file():
        return "lora"
    if (folder / "unet").is_dir() or (folder / "transformer").is_dir():  # the denoiser of a full run
        return "full"
    return None


def check_checkpoint_method(folder: Path, method: str) -> None:
    """Refuse to resume a run of `method` from a checkpoint the other method wrote."""
    found = checkpoint_method(folder)
    if found is not None and found != method:
        raise UserError(
            f"checkpoint '{folder}' was written by method {found}, but this run trains method {method}; "
            f"resume a {found} run from it (--method {found}) or remove it from this run's checkpoints/"
        )


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in `obj` (a module, tensor, or nested dicts/lists of them): what saving it takes."""
    if isinstance(obj, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler state written by `save_checkpoint` (our own file)."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
