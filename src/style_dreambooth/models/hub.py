"""Whether the Hugging Face Hub may be used, read the way its own libraries read it."""

from __future__ import annotations

import os

import huggingface_hub.constants

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether Hugging Face Hub access is disabled (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    huggingface_hub reads these variables once, at import, so this also reads the environment now.
    """
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return env in _TRUE or bool(getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False))
