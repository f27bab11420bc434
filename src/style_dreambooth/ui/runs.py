"""What the UI shows of a run folder: progress, losses, validation grids, checkpoints (read-only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..training.checkpoints import list_checkpoints
from ..training.run_folder import RunFolder
from .form import REQUEST_FILE
from .jobs import Job, read_job


def read_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) for every complete line of metrics.jsonl (a line being written is skipped)."""
    path = RunFolder(run).metrics
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            out.append((int(record["step"]), float(record["loss"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def sample_grids(run: Path) -> list[Path]:
    """Validation grids, oldest first (files still being written have a temp name and are left out)."""
    folder = RunFolder(run).samples
    return sorted(folder.glob("step-*.png")) if folder.is_dir() else []


def total_steps(run: Path) -> int | None:
    for name in ("config.yaml", REQUEST_FILE):
        path = run / name
        if path.is_file():
            try:
                return int(yaml.safe_load(path.read_text(encoding="utf-8"))["max_train_steps"])
            except (yaml.YAMLError, KeyError, TypeError, ValueError, OSError):
                continue
    return None


def checkpoint_choices(run: Path) -> list[str]:
    """What `generate --checkpoint` takes for this run: final model, latest, best (if evaluated), steps."""
    choices = ["final"] if RunFolder(run).is_finished() else []
    steps = [path.name for _, path in list_checkpoints(run)]
    if steps:
        choices.append("latest")
    if (run / "eval" / "metrics.json").is_file():
        choices.append("best")
    return choices + steps


@dataclass
class RunStatus:
    job: Job | None
    step: int
    total: int | None
    finished: bool

    def line(self) -> str:
        state = self.job.shown_state if self.job else ("finished" if self.finished else "not started from the UI")
        if self.finished and state in ("interrupted", "not started from the UI"):
            state = "finished"
        done = f"step {self.step}/{self.total}" if self.total else f"step {self.step}"
        return f"**{state}** · {done}"

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


def run_status(run: Path) -> RunStatus:
    losses = read_losses(run)
    return RunStatus(read_job(run, "train"), losses[-1][0] if losses else 0, total_steps(run),
                     RunFolder(run).is_finished())
