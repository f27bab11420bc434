"""Ablations of the toy-world DreamBooth experiment, written as markdown and HTML tables."""

from __future__ import annotations

import html
import json
import logging
import platform
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .experiment import ExperimentConfig, ExperimentMetrics, run_curve, run_experiment

log = logging.getLogger(__name__)


def ablation_config() -> ExperimentConfig:
    """The default variant: the demo's and the CI test's configuration, without two-subject prompts."""
    from .demo import demo_config

    return replace(demo_config(), pairs=False, drift_seeds=4)


def step_points(base: ExperimentConfig) -> list[int]:
    """The steps ablation: 1/4x to 4x the default, read off the checkpoints of one long run."""
    s = base.max_train_steps
    return [s // 4, s // 2, s, 2 * s, 4 * s]


def variants(base: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """Named variants mirroring the reference experiments (lr, prior, text encoder, class prompt, N).

    The default and the steps variants are not here: they come from one long run (see
    :func:`step_points`), whose checkpoint at the default step count is the "default" row.
    """
    out: dict[str, ExperimentConfig] = {}
    for lr in (base.learning_rate / 4, base.learning_rate * 4):
        out[f"lr={lr:g}"] = replace(base, learning_rate=lr)
    out["no prior preservation"] = replace(base, with_prior_preservation=False)
    out["frozen text encoder"] = replace(base, train_text_encoder=False)
    out["class prompt 'painting'"] = replace(base, class_prompt="painting")
    out["class images=10"] = replace(base, num_class_images=10)
    out["class images=100"] = replace(base, num_class_images=100)
    out["LoRA rank 4, lr x10"] = replace(base, method="lora", rank=4, learning_rate=base.learning_rate * 10)
    return out


COLUMNS = (
    ("style_hit_rate", "style hit"), ("leak_rate", "leak"), ("subject_acc_token", "subject (token)"),
    ("colour_acc_token", "colour (token)"), ("subject_acc_plain", "subject (plain)"),
    ("drift_pixel_plain", "drift px plain"), ("drift_pixel_artstyle", "drift px class"),
    ("drift_style_tv_artstyle", "drift style-mix class"), ("memorisation_rate", "memorised"),
    ("max_instance_ssim", "max SSIM to an instance"), ("train_seconds", "train s"),
)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _cell(values: list[float | None], key: str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    fmt = "{:.0f}" if key == "train_seconds" else "{:.2f}"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(_mean(vals))} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def run_ablations(work: Path, docs: Path, seeds: int = 1, only: list[str] | None = None,
                  base: ExperimentConfig | None = None) -> dict[str, list[ExperimentMetrics]]:
    base = base or ablation_config()
    results_file = work / "results.json"
    work.mkdir(parents=True, exist_ok=True)
    stored: dict[str, list[dict]] = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in range(seeds):
        points = step_points(base)
        names = ["default" if k == base.max_train_steps else f"steps={k}" for k in points]
        if (not only or any(n in only for n in names)) and any(len(stored.get(n, [])) <= seed for n in names):
            curve = run_curve(replace(base, seed=seed), work / f"steps-seed{seed}", points)
            for k, name in zip(points, names):
                if len(stored.get(name, [])) <= seed:
                    stored.setdefault(name, []).append(asdict(curve[k]))
            results_file.write_text(json.dumps(stored, indent=1))
    for name, cfg in variants(base).items():
        if only and name not in only:
            continue
        for seed in range(seeds):
            if len(stored.get(name, [])) > seed:
                continue
            run_cfg = replace(cfg, seed=seed)
            slug = name.replace(" ", "_").replace("'", "").replace("=", "-")
            metrics = run_experiment(run_cfg, work / f"{slug}-seed{seed}")
            stored.setdefault(name, []).append(asdict(metrics))
            results_file.write_text(json.dumps(stored, indent=1))
            log.info("ablation %s seed %d: %s", name, seed, metrics.to_json())
    write_docs(stored, docs)
    return {k: [ExperimentMetrics(**m) for m in v] for k, v in stored.items()}


def write_docs(stored: dict[str, list[dict]], docs: Path) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    env = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, {stamp}"
    header = "| variant | runs | " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|---|---|" + "---|" * len(COLUMNS)
    rows = []
    for name, runs in stored.items():
        cells = [_cell([r.get(k) for r in runs], k) for k, _ in COLUMNS]
        rows.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    table = "\n".join([header, sep, *rows])
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "proof-world").mkdir(exist_ok=True)
    (docs / "proof-world" / "ablations.json").write_text(json.dumps(stored, indent=1))
    marker_start, marker_end = "<!-- ablation-table:start -->", "<!-- ablation-table:end -->"
    md_path = docs / "proof-world.md"
    block = f"{marker_start}\n_Measured on {env}._\n\n{table}\n{marker_end}"
    if md_path.exists() and marker_start in md_path.read_text():
        text = md_path.read_text()
        before, rest = text.split(marker_start, 1)
        after = rest.split(marker_end, 1)[1]
        md_path.write_text(before + block + after)
    elif md_path.exists():  # keep the hand-written discussion; add the table at the end
        md_path.write_text(md_path.read_text().rstrip() + f"\n\n## Ablation table\n\n{block}\n")
    else:
        md_path.write_text(f"# Proof world: ablations\n\n{block}\n")
    th = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    trs = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{len(runs)}</td>"
        + "".join(f"<td>{html.escape(_cell([r.get(k) for r in runs], k))}</td>" for k, _ in COLUMNS) + "</tr>"
        for name, runs in stored.items()
    )
    (docs / "proof-world" / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>proof world ablations</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:3px 8px;border-bottom:1px solid #ddd}"
        "td{text-align:right}td:first-child{text-align:left}</style>"
        f"<h1>Proof world: ablations</h1><p>{html.escape(env)}. See proof-world.md for the discussion.</p>"
        f"<table><tr><th>variant</th><th>runs</th>{th}</tr>{trs}</table>",
        encoding="utf-8",
    )
