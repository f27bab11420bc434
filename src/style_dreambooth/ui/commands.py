"""The commands the pages run (`sweep`, `generate`), built from form values with every path checked
against the workspace. No Gradio here, so they are tested directly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..errors import UserError
from .context import UIContext
from .workspace import GENERATED, SWEEPS


def sweep_argv(ctx: UIContext, base_run: str, name: str, grid: list[tuple[str | None, str]],
               eval_flags: list[str]) -> tuple[list[str], Path]:
    """The `style-dreambooth sweep` command for the grid form: a run's config.yaml crossed with the grid."""
    base = ctx.ws.resolve(base_run or "", "base run") / "config.yaml"
    if not base.is_file():
        raise UserError(f"'{base_run}' has no config.yaml to sweep from; train it first")
    out = ctx.ws.new_folder(SWEEPS, name, "sweep")
    pairs = [(k, v.strip()) for k, v in grid if k and v and v.strip()]
    if not pairs:
        raise UserError("give at least one key and its values, e.g. max_train_steps and 400,800")
    argv = ["sweep", "--config", str(base), "--out", str(out), *eval_flags]
    for key, values in pairs:
        argv += ["--grid", f"{key}={values}"]
    return argv, out


def generate_argv(ctx: UIContext, model: str, checkpoint: str | None, loras: list[tuple[str, float]], prompt: str,
                  negative: str, n: int, seed: int, steps: int, guidance: float | None,
                  scheduler: str | None) -> tuple[list[str], Path]:
    """The `style-dreambooth generate` command for the form, every path checked against the workspace; a blank
    guidance and the 'auto' scheduler leave them to the model's family."""
    if not prompt.strip():
        raise UserError("the prompt is empty; describe what to paint, e.g. 'a boy in yltcaxe artstyle'")
    model_path = ctx.ws.resolve(model or "", "model")
    out = ctx.ws.resolve(Path(GENERATED) / f"{model_path.name}-{time.strftime('%Y%m%d-%H%M%S')}", "output folder")
    argv = ["generate", "--model", str(model_path), "--prompt", prompt, "--negative-prompt", negative or "",
            "-n", str(int(n)), "--seed", str(int(seed)), "--steps", str(int(steps)), "--out", str(out)]
    if guidance is not None:
        argv += ["--guidance", str(float(guidance))]
    if scheduler and scheduler != "auto":
        argv += ["--scheduler", scheduler]
    if checkpoint and checkpoint != "final":
        argv += ["--checkpoint", checkpoint]
    for lora, scale in loras:
        argv += ["--lora", f"{ctx.ws.resolve(lora, 'LoRA file')}:{float(scale)}"]
    return argv, out


def run_generate(argv: list[str]) -> None:
    """Run the command; its one-line error (or the log's last line) becomes a UserError."""
    proc = subprocess.run([sys.executable, "-m", "style_dreambooth", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        raise UserError((errors or lines or [f"generate exited with code {proc.returncode}"])[-1].removeprefix("error: "))
