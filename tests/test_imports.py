"""The library's layering: no import circle between its packages, the proof world a client of the
library (its judges plug into evaluate by name), and the extra-scorer registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from style_dreambooth.errors import UserError
from style_dreambooth.evaluation import scorers as scorer_registry
from style_dreambooth.evaluation.scorers import judge_scorers, register_scorer, scorer_name

SRC = Path(__file__).resolve().parents[1] / "src" / "style_dreambooth"


def _package_imports() -> dict[str, set[str]]:
    """'evaluation' -> {'sampling', 'run_layout', ...}: which packages (or top-level modules) each imports."""
    def unit(parts: list[str]) -> str:
        return parts[0].removesuffix(".py") if parts else ""

    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = list(path.relative_to(SRC).parts)
        here = rel[:-1]  # the package the file sits in, relative to style_dreambooth
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level - 1 > len(here):
                        continue
                    target = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
                    if not target:  # `from . import x` at the top: x is the unit
                        target = [node.names[0].name]
                elif (node.module or "").startswith("style_dreambooth."):
                    target = node.module.split(".")[1:]
                else:
                    continue
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("style_dreambooth.")]
                if not names:
                    continue
                target = names[0].split(".")[1:]
            else:
                continue
            a, b = unit(rel), unit(target)
            if a != b and a not in ("__init__", "__main__") and b:
                edges.setdefault(a, set()).add(b)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circle_between_packages():
    edges = _package_imports()
    assert "sampling" in edges.get("training", set())  # the walk sees imports at all
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])
    # The proof world is a client: nothing of the library imports it, bar the command line.
    assert [a for a, bs in edges.items() if "toyworld" in bs and a != "cli"] == []


def test_evaluate_and_generate_load_without_the_proof_world():
    code = ("import sys, style_dreambooth.evaluation.evaluate, style_dreambooth.sampling.generate; "
            "print(sorted(m for m in sys.modules if m.startswith('style_dreambooth.toyworld')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scorers_plug_in_by_name_or_module_callable(monkeypatch):
    monkeypatch.setattr(scorer_registry, "_REGISTRY", dict(scorer_registry._REGISTRY))

    def factory():
        def scorer(images, prompts, kind):
            return {"n": float(len(images))}
        return scorer

    register_scorer("Test-Counter", factory, "counts images")
    (scorer,) = judge_scorers(" test-counter ")
    assert scorer([1, 2], ["a", "b"], "token") == {"n": 2.0} and scorer_name(scorer) == "scorer"
    assert judge_scorers("none") == [] and judge_scorers(None) == []
    with pytest.raises(UserError, match=r"unknown judges 'oracle'; use .*--judges test-counter \(counts images\)"):
        judge_scorers("oracle")
    (made,) = judge_scorers("collections:OrderedDict")  # any importable callable that returns a scorer
    assert type(made).__name__ == "OrderedDict"
    with pytest.raises(UserError, match="cannot import module 'no_such_module_here'"):
        judge_scorers("no_such_module_here:make")
    with pytest.raises(UserError, match="has no 'nothing'"):
        judge_scorers("collections:nothing")


def test_the_proof_world_registers_its_judges():
    import style_dreambooth.toyworld  # noqa: F401 - registers 'toyworld'
    from style_dreambooth.toyworld.scoring import JudgeScorer

    (scorer,) = judge_scorers("toyworld")
    assert isinstance(scorer, JudgeScorer) and scorer_name(scorer) == "toyworld-judges"
