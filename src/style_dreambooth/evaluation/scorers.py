"""Extra scorers for ``evaluate``, plugged in by name (``--judges NAME``).

A scorer is ``(images, prompts, kind) -> metrics``; an optional ``name`` attribute identifies it
in the score cache (stored scores are recomputed when the set of scorers changes). The library
knows no scorer itself: a client registers a factory under a name (the proof world registers
``toyworld`` when ``style_dreambooth.toyworld`` is imported), or ``--judges`` names one as
``module:callable``, a callable that returns a scorer. A factory registered as a
``"module:callable"`` string is imported only when chosen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from ..errors import UserError

Scorer = Callable[[list[Image.Image], list[str], str], dict[str, float]]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[], Scorer] | str
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_scorer(name: str, factory: Callable[[], Scorer] | str, description: str = "") -> None:
    """Make ``--judges NAME`` build a scorer with ``factory()``, or with the ``"module:callable"``
    it names, imported and called only when chosen."""
    _REGISTRY[name.strip().lower()] = _Entry(factory, description)


def scorer_name(scorer: Scorer) -> str:
    return str(getattr(scorer, "name", None) or getattr(scorer, "__name__", None) or type(scorer).__name__)


def judge_scorers(name: str | None) -> list[Scorer]:
    """The extra scorers for ``--judges NAME``: a registered name, ``module:callable``, or 'none'."""
    key = (name or "").strip().lower()
    if key in ("", "none"):
        return []
    if key in _REGISTRY:
        factory = _REGISTRY[key].factory
        return [(_load_factory(factory) if isinstance(factory, str) else factory)()]
    if ":" in key:
        return [_load_factory(name.strip())()]
    known = ", ".join(f"--judges {n}" + (f" ({e.description})" if e.description else "") for n, e in sorted(_REGISTRY.items()))
    raise UserError(f"unknown judges '{name}'; use {known + ', ' if known else ''}"
                    "--judges module:callable (a callable that returns a scorer) or --judges none")


def _load_factory(spec: str) -> Callable[[], Scorer]:
    module_name, _, attr = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--judges '{spec}': cannot import module '{module_name}' ({err})") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"--judges '{spec}': module '{module_name}' has no '{attr}'")
    if not callable(target):
        raise UserError(f"--judges '{spec}': '{attr}' is not callable")
    return target
