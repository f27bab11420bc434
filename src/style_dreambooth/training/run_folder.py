"""The run folder: checks before a run starts, and where each artefact lives."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..files import make_output_dir, replace_folder, tidy_folder, write_text_atomically
from .checkpoints import list_checkpoints

log = logging.getLogger(__name__)

# Artefacts a run writes; --overwrite replaces exactly these and nothing else.
_RUN_ARTEFACTS = (
    "model", "checkpoints", "samples", "logs", "metrics.jsonl", "config.yaml", "eval", "report.html", "report_files",
)

_PREVIOUS = ".previous-run"
_RECORD = "set-aside.json"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def is_finished(self) -> bool:
        return (self.model / "model_index.json").is_file() or (self.model / "lora.safetensors").is_file()

    def prepare(self, overwrite: bool, resuming: bool) -> None:
        """Refuse to clobber a run and check the folder is writable. Deletes nothing of value (only
        half-written staging folders): a fresh run calls `set_aside_previous` once its inputs are checked."""
        root = self.root
        if root.is_dir():
            self.tidy()
        if resuming and not overwrite and self.is_finished():
            raise UserError(
                f"output dir '{root}' already holds a finished model in '{self.model}', which resuming would "
                "replace; pass --overwrite to allow that, or copy the model elsewhere first"
            )
        if not resuming and not overwrite:
            if self.is_finished():
                raise UserError(
                    f"output dir '{root}' already holds a finished run; pass --overwrite to replace it "
                    "or choose another --output-dir"
                )
            if list_checkpoints(root):
                raise UserError(
                    f"output dir '{root}' holds an unfinished run with checkpoints; pass "
                    "--resume-from-checkpoint latest to continue it or --overwrite to start over"
                )
        make_output_dir(root, "--output-dir")

    def tidy(self) -> None:
        """Undo what a crash left: a model renamed aside, half-written staging folders, and the previous
        run set aside by a re-run that never installed its model."""
        tidy_folder(self.model)
        folder = self.root / "checkpoints"
        if folder.is_dir():
            for leftover in list(folder.glob(".step-*")):
                tidy_folder(leftover.with_name(leftover.name[1:].rsplit(".", 1)[0]))
        self.restore_previous()

    @property
    def previous(self) -> Path:
        """Where a re-run keeps the previous run's artefacts until its own model is installed."""
        return self.root / _PREVIOUS

    def set_aside_previous(self) -> None:
        """Before a fresh run writes its artefacts: a previous run of value (a finished model or
        checkpoints) has its artefacts but model/ moved into `previous`; model/ stays in place and
        loadable until `install_model` replaces it, and `restore_previous` puts everything back if the
        new run fails. Leftovers of no value (a run stopped before its first checkpoint) are removed."""
        self.restore_previous()  # a set-aside left by a killed run goes back first
        present = [name for name in _RUN_ARTEFACTS if name != "model" and (self.root / name).exists()]
        if not self.is_finished() and not list_checkpoints(self.root):
            for name in present:
                _remove(self.root / name)
            return
        staging = self.root / f"{_PREVIOUS}.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        record = {"model_inode": self.model.stat().st_ino if self.model.is_dir() else None, "moved": present}
        (staging / _RECORD).write_text(json.dumps(record), encoding="utf-8")
        staging.rename(self.previous)
        for name in present:
            (self.root / name).rename(self.previous / name)
        log.info("the previous run's artefacts are kept in %s until the new model is installed", self.previous)

    def restore_previous(self) -> None:
        """Undo `set_aside_previous` unless the new model got installed (then drop the previous run)."""
        if (self.root / f"{_PREVIOUS}.tmp").is_dir():
            shutil.rmtree(self.root / f"{_PREVIOUS}.tmp")
        if not self.previous.is_dir():
            return
        try:
            record = json.loads((self.previous / _RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {"model_inode": None, "moved": []}
        if self.is_finished() and self.model.stat().st_ino != record["model_inode"]:
            self.discard_previous()  # the new run's model is in place: it is complete
            return
        for name in _RUN_ARTEFACTS:
            saved = self.previous / name
            if saved.exists():
                _remove(self.root / name)
                saved.rename(self.root / name)
            elif name != "model" and name not in record["moved"]:
                _remove(self.root / name)  # the failed run's own
        shutil.rmtree(self.previous)
        log.info("restored the previous run in %s", self.root)

    def what_is_kept(self) -> str:
        """After a failure: what of value is still on disk and what to do, for a one-line error."""
        if self.previous.is_dir():
            return f"the previous run in '{self.root}' is kept as it was"
        found = list_checkpoints(self.root)
        if found:
            return (
                f"the last good checkpoint '{found[-1][1]}' is kept; free some space, then continue with "
                "--resume-from-checkpoint latest"
            )
        return "no checkpoint had been saved yet; free some space and run again"

    def discard_previous(self) -> None:
        if self.previous.is_dir():
            shutil.rmtree(self.previous)

    def install_model(self, staged: Path) -> None:
        """Move a fully written model folder into place. The old model is renamed aside first and
        removed last, so a crash at any point leaves a whole model (old or new) on disk."""
        replace_folder(staged, self.model)

    def write_config(self, data: dict[str, Any]) -> None:
        write_text_atomically(self.config, yaml.safe_dump(data, sort_keys=False))

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past `after_step` (a resumed run rewrites them)."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write; its step is written again
            if record.get("step", 0) <= after_step:
                kept.append(line)
        write_text_atomically(self.metrics, "".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
