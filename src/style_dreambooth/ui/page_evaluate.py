"""Evaluate page: run `evaluate` on a run and show its report; start a `sweep` from a small grid form."""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr
import pandas as pd

from ..config import TrainConfig
from ..errors import UserError
from . import jobs
from .commands import sweep_argv
from .context import UIContext, problem
from .workspace import RUNS, SWEEPS

GRID_ROWS = 3
EVAL_DEFAULTS = {"seeds": "0,1,2,3", "steps": 25, "clip": "openai/clip-vit-base-patch32", "dino": "facebook/dinov2-small"}
FILE_ROUTE = "/workspace-file"


def report_frame(ctx: UIContext, report: Path) -> str:
    """An iframe of a report.html, served by the app's workspace-file route."""
    if not report.is_file():
        return ""
    url = f"{FILE_ROUTE}/{ctx.ws.relative(report)}?v={int(report.stat().st_mtime)}"
    return (f'<p><a href="{html.escape(url)}" target="_blank">Open the report in a new tab</a></p>'
            f'<iframe id="report-frame" src="{html.escape(url)}" style="width:100%;height:900px;border:1px solid #ccc"></iframe>')


def eval_summary(run: Path) -> tuple[str, list[list]]:
    """The chosen checkpoint, the overfitting alarm and the checkpoint table from RUN/eval/metrics.json."""
    path = run / "eval" / "metrics.json"
    if not path.is_file():
        return "Not evaluated yet.", []
    data = json.loads(path.read_text(encoding="utf-8"))
    choice, alarm = data.get("choice"), data.get("alarm")
    lines = [f"**Chosen checkpoint:** {choice['name']} (step {choice['step']}): {choice['reason']}" if choice
             else "**Chosen checkpoint:** none"]
    if alarm and alarm.get("fired"):
        lines.append(f"**Overfitting alarm** at step {alarm['step']}: {'; '.join(alarm['reasons'])}")
    else:
        lines.append("No overfitting alarm.")
    for name, reason in (data.get("skipped") or {}).items():
        lines.append(f"{name} skipped: {reason}")
    keys = sorted({k for p in data["points"] for k, v in p["metrics"].items() if isinstance(v, (int, float))})
    rows = [[p["name"], p["step"], *[_fmt(p["metrics"].get(k)) for k in keys]] for p in data["points"]]
    return "  \n".join(lines), [["checkpoint", "step", *keys], *rows]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _job_view(ctx: UIContext, folder: Path | None, kind: str) -> tuple[str, str]:
    job = jobs.read_job(folder, kind) if folder else None
    if not job:
        return "", ""
    return f"{kind}: **{job.shown_state}**", jobs.log_tail(job, 12)


def build(ctx: UIContext) -> dict[str, gr.components.Component]:
    gr.Markdown("### Evaluate a run\nScores the base model, every checkpoint and the final model; picks the best "
                "checkpoint and raises the overfitting alarm (see docs/metrics.md).")
    with gr.Row():
        run = gr.Dropdown(ctx.ws.folders(RUNS), label="Run", elem_id="eval-run", allow_custom_value=True)
        seeds = gr.Textbox(EVAL_DEFAULTS["seeds"], label="Seeds per prompt", elem_id="eval-seeds")
        steps = gr.Number(EVAL_DEFAULTS["steps"], label="Sampler steps", precision=0, elem_id="eval-steps")
    with gr.Row():
        clip = gr.Textbox(EVAL_DEFAULTS["clip"], label="CLIP weights ('none' to skip)", elem_id="eval-clip")
        dino = gr.Textbox(EVAL_DEFAULTS["dino"], label="DINO weights ('none' to skip)", elem_id="eval-dino")
        prompts = gr.Textbox(label="Prompt file (optional)", elem_id="eval-prompts",
                             info="Subjects (.txt, one per line) or YAML, in the workspace; default: the built-in set.")
    evaluate = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    eval_status = gr.Markdown(elem_id="eval-status")
    eval_log = gr.Textbox(label="Log (tail)", lines=6, max_lines=6, elem_id="eval-log")
    summary = gr.Markdown(elem_id="eval-summary")
    table = gr.Dataframe(label="Checkpoints", interactive=False, elem_id="eval-table", wrap=True)
    report = gr.HTML(elem_id="eval-report")

    gr.Markdown("### Sweep\nTrains every grid point from a run's config (shared class images), evaluates each, "
                "and writes one report.")
    keys = [k for k in TrainConfig.model_fields if k not in ("output_dir", "resume_from_checkpoint", "instance_dir")]
    with gr.Row():
        base_run = gr.Dropdown(ctx.ws.folders(RUNS), label="Base config: this run's config.yaml", elem_id="sweep-base",
                               allow_custom_value=True)
        sweep_name = gr.Textbox("my-sweep", label="Sweep name", info=f"Folder {SWEEPS}/<name>", elem_id="sweep-name")
    grid = []
    for i in range(GRID_ROWS):
        with gr.Row():
            grid.append(gr.Dropdown(keys, value=None, label=f"Key {i + 1}", elem_id=f"sweep-key-{i}"))
            grid.append(gr.Textbox(label="Values (comma-separated)", placeholder="400,800", elem_id=f"sweep-values-{i}"))
    sweep = gr.Button("Start sweep", elem_id="sweep-start")
    sweep_status = gr.Markdown(elem_id="sweep-status")
    sweep_log = gr.Textbox(label="Sweep log (tail)", lines=6, max_lines=6, elem_id="sweep-log")
    sweep_report = gr.HTML(elem_id="sweep-report")
    shown = gr.State(None)

    def eval_flags(seeds_text, n_steps, clip_id, dino_id, prompt_file) -> list[str]:
        flags = ["--seeds", str(seeds_text), "--steps", str(int(n_steps or 25)), "--clip", str(clip_id or "none"),
                 "--dino", str(dino_id or "none")]
        if prompt_file and prompt_file.strip():
            flags += ["--prompts", str(ctx.ws.resolve(prompt_file, "prompt file"))]
        return flags

    def on_evaluate(run_text, *flags):
        try:
            folder = ctx.ws.resolve(run_text or "", "run")
            if not (folder / "config.yaml").is_file():
                raise UserError(f"'{run_text}' is not a run folder (no config.yaml); train it first")
            jobs.submit(ctx.ws.root, "evaluate", folder, ["evaluate", str(folder), *eval_flags(*flags)])
            return f"evaluating `{run_text}` (it waits its turn if the device is busy)"
        except UserError as exc:
            return problem(exc)

    def on_sweep(base_text, name, *rest):
        grid_values, flags = rest[: 2 * GRID_ROWS], rest[2 * GRID_ROWS:]
        try:
            argv, out = sweep_argv(ctx, base_text, name, list(zip(grid_values[::2], grid_values[1::2])),
                                   eval_flags(*flags))
            jobs.submit(ctx.ws.root, "sweep", out, argv)
            return f"sweep `{ctx.ws.relative(out)}` queued: " + " ".join(argv[argv.index("--grid"):])
        except UserError as exc:
            return problem(exc)

    def on_refresh(run_text, name, last):
        try:
            folder = ctx.ws.resolve(run_text, "run") if run_text else None
            sweep_dir = ctx.ws.new_folder(SWEEPS, name, "sweep") if name else None
        except UserError as exc:
            return problem(exc), "", gr.skip(), gr.skip(), gr.skip(), "", "", gr.skip(), last
        e_status, e_log = _job_view(ctx, folder, "evaluate")
        s_status, s_log = _job_view(ctx, sweep_dir, "sweep")
        reports = [p / "report.html" for p in (folder, sweep_dir) if p]
        signature = tuple((str(r), r.stat().st_mtime if r.is_file() else 0) for r in reports)
        if signature == last:
            return e_status, e_log, gr.skip(), gr.skip(), gr.skip(), s_status, s_log, gr.skip(), last
        text, rows = eval_summary(folder) if folder else ("", [])
        frame = pd.DataFrame(rows[1:], columns=rows[0]) if rows else None
        e_report = report_frame(ctx, folder / "report.html") if folder else ""
        s_report = report_frame(ctx, sweep_dir / "report.html") if sweep_dir else ""
        return e_status, e_log, text, frame, e_report, s_status, s_log, s_report, signature

    def on_load():
        runs = ctx.ws.folders(RUNS)
        return gr.update(choices=runs), gr.update(choices=runs)

    evaluate.click(on_evaluate, [run, seeds, steps, clip, dino, prompts], eval_status)
    sweep.click(on_sweep, [base_run, sweep_name, *grid, seeds, steps, clip, dino, prompts], sweep_status)
    outputs = [eval_status, eval_log, summary, table, report, sweep_status, sweep_log, sweep_report, shown]
    run.change(on_refresh, [run, sweep_name, gr.State(None)], outputs)
    gr.Timer(3.0).tick(on_refresh, [run, sweep_name, shown], outputs, show_progress="hidden")
    return {"run": run, "base_run": base_run, "load": on_load}
