"""The workspace: one folder that holds every path the UI reads or writes.

A path typed in the UI is taken relative to the workspace; an absolute path is accepted only when it
lies inside. `..` and symlinks are resolved before the check, so neither can lead outside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DATASETS = "datasets"
RUNS = "runs"
SWEEPS = "sweeps"
GENERATED = "generated"
MODELS = "models"

# A Hugging Face hub id ("owner/name"): passed through as a model name, never read as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def create(cls, root: Path) -> "Workspace":
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise UserError(f"--workspace '{root}' is a file; pass a folder")
        root.mkdir(parents=True, exist_ok=True)
        ws = cls(root.resolve())
        for sub in (DATASETS, RUNS, SWEEPS, GENERATED, MODELS):
            (ws.root / sub).mkdir(exist_ok=True)
        return ws

    def resolve(self, path: str | Path, what: str = "path") -> Path:
        """The absolute, symlink-free form of `path` (relative to the workspace); UserError if outside it."""
        text = str(path).strip()
        if not text:
            raise UserError(f"{what} is empty; give a path inside the workspace '{self.root}'")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.root):
            raise UserError(f"{what} '{text}' is outside the workspace '{self.root}'; use a path inside it")
        return resolved

    def relative(self, path: Path) -> str:
        """How the UI shows a workspace path: relative to the workspace root."""
        return str(Path(path).resolve().relative_to(self.root))

    def model_or_hub_id(self, value: str, what: str = "base model") -> str:
        """A base model field: a path inside the workspace (made absolute) or a hub id (kept as is)."""
        text = value.strip()
        inside = (self.root / text).resolve()
        if _HUB_ID.match(text) and not inside.exists() and not text.startswith("."):
            return text
        return str(self.resolve(text, what))

    def folders(self, under: str) -> list[str]:
        """Sub-folders of a workspace area (datasets, runs, sweeps), as workspace-relative paths."""
        base = self.root / under
        if not base.is_dir():
            return []
        inside = (p for p in base.iterdir() if p.resolve().is_relative_to(self.root))  # no symlinks out
        return sorted(self.relative(p) for p in inside if p.is_dir() and not p.name.startswith("."))

    def new_folder(self, under: str, name: str, what: str) -> Path:
        """`<area>/<name>` for a name the user typed: letters, digits, '-', '_', '.' only."""
        name = name.strip()
        if not _SAFE_NAME.match(name):
            raise UserError(f"{what} name '{name}' must be letters, digits, '-', '_' or '.' (no slashes); pick another")
        return self.resolve(Path(under) / name, what)
