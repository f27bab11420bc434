"""What every page of the UI shares: the workspace and its limits (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .workspace import Workspace


@dataclass
class UIContext:
    ws: Workspace
    max_upload_mb: float
    _tokenizer: Any = field(default=None, repr=False)

    def tokenizer(self):
        """SD 1.x's CLIP tokenizer (built once, from the bundled BPE file) for the identifier check."""
        if self._tokenizer is None:
            from ..models.tokenizer import build_clip_tokenizer

            self._tokenizer = build_clip_tokenizer()
        return self._tokenizer


def problem(exc: Exception) -> str:
    """A user error as the pages show it: one line."""
    return f"⚠️ {exc}"
