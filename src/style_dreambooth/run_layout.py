"""What a run folder holds, as its readers see it: the checkpoints, the LoRA file, the checkpoint
``evaluate`` chose.

Training writes a run folder and ``generate``, ``evaluate``, ``sweep`` and the UI read it. The
names they share live here, below all of them, so that no reader imports another to find a file:
``checkpoints/step-000400/`` (complete when it holds ``training_state.pt``), ``lora.safetensors``
for the LoRA method, and ``eval/metrics.json``, where ``evaluate`` records its chosen checkpoint
(``generate --checkpoint best`` reads it back).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import UserError

LORA_FILE = "lora.safetensors"
STATE_FILE = "training_state.pt"
EVAL_SUMMARY = Path("eval") / "metrics.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_checkpoint(run_dir: Path, spec: str) -> Path:
    """'latest', 'step-N', 'N' or a path -> a checkpoint folder; UserError if there is none."""
    if spec == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(
                f"--resume-from-checkpoint latest: no checkpoint in '{run_dir / 'checkpoints'}'; "
                "drop the flag to start fresh"
            )
        return found[-1][1]
    candidates = [Path(spec)]
    if spec.isdigit():
        candidates.append(run_dir / "checkpoints" / checkpoint_name(int(spec)))
    m = _STEP_DIR.match(spec)
    if m:
        candidates.append(run_dir / "checkpoints" / checkpoint_name(int(m.group(1))))
    for path in candidates:
        if path.is_dir() and (path / STATE_FILE).is_file():
            owner = path.resolve().parent.parent
            if owner != run_dir.resolve():
                # its weights, optimizer state and metrics history belong to that run's config
                raise UserError(
                    f"checkpoint '{spec}' belongs to the run in '{owner}', not to --output-dir '{run_dir}'; "
                    f"resume that run with --output-dir '{owner}'"
                )
            return path
    raise UserError(f"checkpoint '{spec}' not found (looked in '{run_dir / 'checkpoints'}'); use 'latest' or a step-N folder")


def read_summary(run: Path) -> dict[str, Any]:
    """RUN/eval/metrics.json, as ``evaluate`` wrote it."""
    path = run / EVAL_SUMMARY
    if not path.is_file():
        raise UserError(f"run '{run}' has not been evaluated; run 'style-dreambooth evaluate {run}' first")
    return json.loads(path.read_text(encoding="utf-8"))


def best_checkpoint_spec(run: Path) -> str | None:
    """The checkpoint ``evaluate`` chose, as a `--checkpoint` value; None means the final model."""
    choice = read_summary(run).get("choice")
    if not choice:
        raise UserError(f"run '{run}' has no evaluated checkpoints to choose from")
    return None if choice["name"] == "final" else choice["name"]
