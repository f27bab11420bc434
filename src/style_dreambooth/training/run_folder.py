"""The run folder: checks before a run starts, and where each artefact lives."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..files import make_output_dir, replace_folder, tidy_folder, write_text_atomically
from .checkpoints import list_checkpoints

# Artefacts a run writes; --overwrite removes exactly these and nothing else.
_RUN_ARTEFACTS = (
    "model", "checkpoints", "samples", "logs", "metrics.jsonl", "config.yaml", "eval", "report.html", "report_files",
)


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
        half-written staging folders): a fresh run calls `clear_artefacts` once its inputs are checked."""
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
        """Undo what a crash mid-save left: a model renamed aside, half-written staging folders."""
        tidy_folder(self.model)
        folder = self.root / "checkpoints"
        if folder.is_dir():
            for leftover in list(folder.glob(".step-*")):
                tidy_folder(leftover.with_name(leftover.name[1:].rsplit(".", 1)[0]))

    def clear_artefacts(self) -> None:
        """Remove a previous run's artefacts (and nothing else) before a fresh run writes its own."""
        root = self.root
        for name in _RUN_ARTEFACTS:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

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
