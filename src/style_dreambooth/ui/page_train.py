"""Train page: the form generated from TrainConfig, Start/Stop/Resume, and the live view of a run."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from ..errors import UserError
from ..training.checkpoints import list_checkpoints
from . import jobs
from .context import UIContext, problem
from .form import (BASIC_FIELDS, REQUEST_FILE, FormField, config_from_form, form_fields, form_values_from_run,
                   write_request)
from .runs import read_losses, run_status, sample_grids
from .workspace import RUNS

REFRESH_S = 2.0


def _input(field: FormField) -> gr.components.Component:
    label = field.name + (" (required)" if field.required else "")
    elem_id = f"cfg-{field.name}"
    if field.kind == "bool":
        return gr.Checkbox(field.default, label=label, info=field.help, elem_id=elem_id)
    if field.kind == "choice":
        choices = [("default" if c == "" else c, c) for c in field.choices]
        return gr.Dropdown(choices, value=field.default, label=label, info=field.help, elem_id=elem_id)
    lines = 2 if field.kind == "list" else 1
    return gr.Textbox(field.default, label=label, info=field.help + (" One per line." if lines > 1 else ""),
                      lines=lines, elem_id=elem_id)


def queue_text(ctx: UIContext) -> str:
    active = jobs.active_jobs(ctx.ws.root)
    if not active:
        return "Device idle: nothing running or queued."
    lines = [f"{i + 1}. {j.kind} `{ctx.ws.relative(Path(j.folder))}`: {j.state}" for i, j in enumerate(active)]
    return "One job at a time on this device; later starts wait in line:  \n" + "  \n".join(lines)


def training_now(ctx: UIContext) -> str | None:
    """The run being trained (or first in line to be), as a workspace path."""
    for job in jobs.active_jobs(ctx.ws.root):
        if job.kind == "train":
            return ctx.ws.relative(Path(job.folder))
    return None


def default_run(ctx: UIContext) -> str | None:
    """The run to watch after a page load or restart: the one training now, else the newest."""
    if active := training_now(ctx):
        return active
    runs = sorted((ctx.ws.root / RUNS).glob("*/"), key=lambda p: p.stat().st_mtime)
    return ctx.ws.relative(runs[-1]) if runs else None


def loss_frame(losses: list[tuple[int, float]]) -> pd.DataFrame:
    """The plot's data with numeric columns even when empty (an untyped empty frame makes the axes categorical)."""
    return pd.DataFrame({"step": pd.Series([s for s, _ in losses], dtype="int64"),
                         "loss": pd.Series([v for _, v in losses], dtype="float64")})


def _progress_html(fraction: float) -> str:
    return f'<progress id="train-progress-bar" value="{fraction:.3f}" max="1" style="width:100%"></progress>'


def build(ctx: UIContext) -> dict[str, gr.components.Component]:
    fields = form_fields()
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column(scale=1):
            run_name = gr.Textbox("my-style", label="Run name", elem_id="train-run-name",
                                  info=f"The run folder is {RUNS}/<name> in the workspace.")
            for field in fields:
                if field.name in BASIC_FIELDS:
                    inputs[field.name] = _input(field)
            with gr.Accordion("All options (every train flag)", open=False):
                for field in fields:
                    if field.name not in BASIC_FIELDS:
                        inputs[field.name] = _input(field)
        with gr.Column(scale=1):
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume = gr.Button("Resume", elem_id="train-resume")
            message = gr.Markdown(elem_id="train-message")
            with gr.Row():
                watch = gr.Dropdown(ctx.ws.folders(RUNS), label="Watch run", elem_id="train-watch",
                                    allow_custom_value=True, scale=3)
                load = gr.Button("Load settings", elem_id="train-load", scale=1)
            status = gr.Markdown(elem_id="train-status")
            progress = gr.HTML(_progress_html(0.0), elem_id="train-progress")
            plot = gr.LinePlot(x="step", y="loss", title="Training loss (metrics.jsonl)", elem_id="loss-plot", height=260)
            grids = gr.Gallery(label="Validation grids", columns=3, elem_id="val-grids", height=260)
            log = gr.Textbox(label="Log (tail)", lines=8, max_lines=8, elem_id="train-log", autoscroll=True)
            queue = gr.Markdown(elem_id="train-queue")
    seen = gr.State(None)

    names = list(inputs)

    def on_start(name, *values):
        try:
            cfg = config_from_form(ctx.ws, name, dict(zip(names, values)))
            request = write_request(cfg)
            job = jobs.submit(ctx.ws.root, "train", Path(cfg.output_dir), ["train", "--config", str(request)])
        except UserError as exc:
            return problem(exc), gr.skip()
        run = ctx.ws.relative(Path(job.folder))
        return f"started `{run}` (it waits its turn if the device is busy)", gr.update(choices=ctx.ws.folders(RUNS), value=run)

    def on_stop(run):
        try:
            return jobs.stop(ctx.ws.resolve(run or "", "run"), "train")
        except UserError as exc:
            return problem(exc)

    def on_resume(run):
        try:
            folder = ctx.ws.resolve(run or "", "run")
            request = folder / REQUEST_FILE
            if list_checkpoints(folder):
                base = ["--config", str(request)] if request.is_file() else ["--output-dir", str(folder)]
                argv = ["train", *base, "--resume-from-checkpoint", "latest"]
            elif request.is_file():
                argv = ["train", "--config", str(request)]  # nothing saved yet: start it again
            else:
                raise UserError(f"run '{run}' has no checkpoint to resume from")
            jobs.submit(ctx.ws.root, "train", folder, argv)
            return f"resuming `{run}`" + (" from its last checkpoint" if "--resume-from-checkpoint" in argv else "")
        except UserError as exc:
            return problem(exc)

    def on_load_settings(run):
        try:
            values = form_values_from_run(ctx.ws.resolve(run or "", "run"))
        except UserError as exc:
            return problem(exc), gr.skip(), *[gr.skip()] * len(names)
        for key in ("instance_dir", "class_dir", "base_model", "base_config"):  # workspace-relative, as typed
            if values.get(key) and Path(values[key]).is_relative_to(ctx.ws.root):
                values[key] = ctx.ws.relative(Path(values[key]))
        return (f"loaded the settings of `{run}`", Path(run).name,
                *[values.get(name, gr.skip()) for name in names])

    def on_refresh(run, last):
        queue_md = queue_text(ctx)
        if not run:
            return "No run yet: fill in the form and press Start.", _progress_html(0), gr.skip(), gr.skip(), "", queue_md, last
        try:
            folder = ctx.ws.resolve(run, "run")
        except UserError as exc:
            return problem(exc), _progress_html(0), gr.skip(), gr.skip(), "", queue_md, last
        st = run_status(folder)
        losses = read_losses(folder)
        found = sample_grids(folder)
        signature = (run, len(losses), [p.name for p in found])
        log_text = jobs.log_tail(st.job) if st.job else ""
        if signature == last:
            return st.line(), _progress_html(st.fraction), gr.skip(), gr.skip(), log_text, queue_md, last
        frame = loss_frame(losses)
        gallery = [(str(p), p.stem) for p in found]
        return st.line(), _progress_html(st.fraction), frame, gallery, log_text, queue_md, signature

    def on_load():
        run = default_run(ctx)
        return gr.update(choices=ctx.ws.folders(RUNS), value=run)

    refresh_outputs = [status, progress, plot, grids, log, queue, seen]
    start.click(on_start, [run_name, *inputs.values()], [message, watch])
    stop.click(on_stop, watch, message)
    load.click(on_load_settings, watch, [message, run_name, *inputs.values()])
    resume.click(on_resume, watch, message)
    watch.change(on_refresh, [watch, gr.State(None)], refresh_outputs)
    gr.Timer(REFRESH_S).tick(on_refresh, [watch, seen], refresh_outputs, show_progress="hidden")
    return {"inputs": inputs, "watch": watch, "load": on_load, "run_name": run_name}
