"""Sweeps: a grid over config keys, or a file of named variants -> runs (resumable, sharing
class-image caches) -> one report."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .config import build_config, load_yaml, normalize_keys, read_yaml
from .errors import UserError
from .locks import hold_folder
from .files import make_output_dir
from .evaluation.agreement import pooled_rank_correlation
from .evaluation.evaluate import RunEvaluation, evaluate_run
from .reports.html import write_report
from .training.checkpoints import list_checkpoints
from .training.inputs import resolve_family
from .training.loop import train
from .training.run_folder import RunFolder

log = logging.getLogger(__name__)


def _parse_value(text: str) -> Any:
    """Numbers as numbers (YAML 1.1 reads '1e-3' as a string), then YAML (true, null, ...)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['max_train_steps=400,800', ...] -> {'max_train_steps': [400, 800], ...} (YAML-typed values)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise UserError(f"--grid '{item}' must look like key=value1,value2")
        (name,) = normalize_keys({key.strip(): None}, "--grid")
        parsed = [_parse_value(v.strip()) for v in values.split(",") if v.strip()]
        if name in grid:
            raise UserError(f"--grid names '{key}' twice; give all its values in one --grid")
        grid[name] = parsed
    return grid


def grid_combos(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order the sweep runs them."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(combo: dict[str, Any]) -> str:
    raw = "__".join(f"{k}={v}" for k, v in combo.items()) or "base"
    return _safe_name(raw)


def _safe_name(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", raw)


def read_runs_file(path: Path) -> dict[str, dict[str, Any]]:
    """A YAML mapping of run name -> config overrides (empty: the base config as it is).

    This is how an ablation is written: one named variant per line, each changing one thing
    (or two that belong together, like ``{method: lora, learning_rate: 1e-3}``).
    """
    data = load_yaml(path, "--runs file")
    if not isinstance(data, dict) or not data:
        raise UserError(f"--runs file '{path}' must map run names to overrides, e.g. 'lr-low: {{learning_rate: 5e-5}}'")
    runs: dict[str, dict[str, Any]] = {}
    for name, overrides in data.items():
        label = _safe_name(str(name).strip())
        if not label.strip("-."):
            raise UserError(f"run name {name!r} in '{path}' is not a usable folder name; use letters or digits")
        if label.startswith("."):
            raise UserError(f"run name {name!r} in '{path}' starts with a dot; folders of runs must be visible")
        if label.lower() in {r.lower() for r in runs}:
            raise UserError(f"run name '{name}' in '{path}' clashes with another one as folder name '{label}'")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise UserError(f"run '{name}' in '{path}' must be a mapping of config keys, not {overrides!r}")
        runs[label] = normalize_keys(overrides, f"run '{name}' of '{path}'")
    return runs


def sweep_plan(grid: dict[str, list[Any]], runs: dict[str, dict[str, Any]] | None = None
               ) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, overrides) of every run: each named run (or the base) x each grid combination."""
    combos = grid_combos(grid)
    if not runs:
        plan = [(run_name(c), c) for c in combos]
    elif not grid:
        plan = list(runs.items())
    else:
        for name, over in runs.items():
            shared = sorted(set(over) & set(grid))
            if shared:
                raise UserError(f"run '{name}' sets '{shared[0]}', which --grid also varies; drop one of them")
        plan = [(f"{name}__{run_name(c)}", {**over, **c}) for name, over in runs.items() for c in combos]
    folders: dict[str, dict[str, Any]] = {}
    for name, over in plan:
        if name.lower() in folders and folders[name.lower()] == over:
            raise UserError(f"the sweep asks for the same run twice ('{name}'); list each value once")
        if name.lower() in folders:
            raise UserError(f"two runs of the sweep would share the folder '{name}' ({folders[name.lower()]} and "
                            f"{over}); give values that differ after spaces and symbols become '-'")
        folders[name.lower()] = over
    return plan


def _check_same_run(run: RunFolder, cfg) -> None:
    """A run folder from an earlier sweep must have been trained with the same settings."""
    if not run.config.is_file():
        return
    saved = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    wanted = resolve_family(cfg).to_yaml_dict()  # as the run recorded it: --backbone auto made concrete
    for key, value in wanted.items():
        if key in ("output_dir", "mixed_precision", "class_prompt") or value is None:
            continue
        saved_value = saved.get(key)
        if isinstance(value, str) and saved_value is not None and Path(value).exists():
            value, saved_value = str(Path(value).absolute()), str(Path(str(saved_value)).absolute())
        if key in saved and saved_value != value:
            raise UserError(
                f"sweep run '{run.root}' was trained with {key}={saved.get(key)!r}, the sweep now asks for "
                f"{value!r}; use a new --out or delete that run"
            )


def write_judge_agreement(evals: list[RunEvaluation], out: Path) -> Path | None:
    """OUT/judge_agreement.json: each run's agreement with the judges and the pooled rank correlation."""
    if not any(ev.agreement is not None for ev in evals):
        return None
    rho, n = pooled_rank_correlation([ev.points for ev in evals])
    data = {
        "pooled": {"spearman": None if math.isnan(rho) else rho, "n": n},
        "runs": {ev.run.name: ev.agreement.to_dict() if ev.agreement else None for ev in evals},
    }
    path = out / "judge_agreement.json"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def run_sweep(
    config_file: Path,
    grid: dict[str, list[Any]],
    out: Path,
    *,
    runs: dict[str, dict[str, Any]] | None = None,
    eval_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Train and evaluate every run of the plan (named ``runs`` x ``grid``) under out/runs/,
    then write out/report.html."""
    base = read_yaml(config_file)
    if not grid and not runs:
        raise UserError("a sweep needs --grid key=v1,v2 or --runs FILE")
    if "output_dir" in grid or any("output_dir" in r for r in (runs or {}).values()):
        raise UserError("a sweep cannot vary output_dir; it names each run's folder")
    plan = sweep_plan(grid, runs)
    # Validate every run's config before any training starts.
    configs = [build_config(base, {**over, "output_dir": out / "runs" / name}) for name, over in plan]
    make_output_dir(out, "--out")
    with hold_folder(out, "sweep folder"):  # each run also locks its own folder
        record = {"config": str(config_file), "grid": grid, **({"runs": runs} if runs else {})}
        (out / "sweep.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        evals: list[RunEvaluation] = []
        for i, cfg in enumerate(configs, 1):
            run = RunFolder(cfg.output_dir)
            _check_same_run(run, cfg)
            if run.is_finished():
                log.info("sweep %d/%d: %s already trained", i, len(configs), cfg.output_dir.name)
            else:
                if list_checkpoints(cfg.output_dir):
                    cfg = cfg.model_copy(update={"resume_from_checkpoint": "latest"})
                    log.info("sweep %d/%d: resuming %s", i, len(configs), cfg.output_dir.name)
                else:
                    cfg = cfg.model_copy(update={"overwrite": True})
                    log.info("sweep %d/%d: training %s", i, len(configs), cfg.output_dir.name)
                train(cfg)
            evals.append(evaluate_run(cfg.output_dir, shared_base=out / "base-eval", **(eval_kwargs or {})))
        write_judge_agreement(evals, out)
        return write_report(evals, out, f"Sweep report: {config_file.name}")
