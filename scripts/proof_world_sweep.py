"""The proof world's worked example of `sweep`: does the weight-free style distance rank checkpoints
the way the ground-truth judges do, and does the checkpoint rule pick what the judges would?

Writes a base config for the shipped tiny SD 1.x base (5 yltcaxe instance images, prior
preservation, text encoder trained: the demo's recipe), runs `run_sweep` over a small grid with the judges
switched on and the proof world's held-out prompt file, then writes OUT/report.html as one
self-contained file (its images inlined) and OUT/README.md with, per run, the rank correlation, the
rule's pick against the judges' best and a small metric table.

Training runs (weights, checkpoints, evaluation images) stay in --work, which is resumable: re-running
the same command skips finished runs and evaluations, and only rewrites the report.

    nice -n 10 python scripts/proof_world_sweep.py --threads 1                      # the default sweep
    python scripts/proof_world_sweep.py --out /tmp/pw --work /tmp/pw-work --steps 16 --grid learning_rate=1e-4

    # the ablation report (docs/proof-world-ablation): named variants instead of a grid
    python scripts/proof_world_sweep.py --runs examples/proof-world-ablation.yaml --steps 500 \
        --checkpoint-every 250 --table-step 500 --out docs/proof-world-ablation --work runs/proof-world-ablation
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TABLE = (
    ("style_distance", "style dist."),
    ("judge_style_hit", "style hit"),
    ("judge_leak_plain", "leak plain"),
    ("judge_leak_class", "leak class"),
    ("judge_prompt_fidelity", "fidelity"),
    ("judge_subject_acc_token", "subject acc"),
    ("judge_colour_acc_token", "colour acc"),
    ("judge_subject_acc_plain", "subject acc plain"),
    ("diversity", "diversity"),
    ("copy_rate", "copy rate"),
    ("prior_drift", "prior drift"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "proof-world-sweep",
                    help="report folder: report.html, README.md, base.yaml, prompts.yaml, instance/ (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "proof-world-sweep",
                    help="sweep folder with the trained runs and class images (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=800, help="max_train_steps; a checkpoint every steps/8 (default: %(default)s)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="checkpointing_steps (default: steps/8)")
    ap.add_argument("--grid", action="append", default=None,
                    help="key=v1,v2 (repeatable) like `style-dreambooth sweep --grid` "
                         "(default without --runs: learning_rate=5e-5,1e-4,2e-4)")
    ap.add_argument("--runs", type=Path, default=None, help="YAML of named variants, like `style-dreambooth sweep --runs`")
    ap.add_argument("--table-step", type=int, default=None,
                    help="also tabulate every run at this step (an ablation), and every checkpoint of longer runs")
    ap.add_argument("--adam", choices=["8bit", "torch"], default="8bit",
                    help="optimizer: bitsandbytes 8-bit AdamW (the reference recipe) or torch AdamW (faster on CPU)")
    ap.add_argument("--eval-seeds", default="1000,1001", help="seeds per evaluation prompt (default: %(default)s)")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampler steps for evaluation images (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    return ap.parse_args(argv)


def base_config(out: Path, work: Path, steps: int, every: int | None = None, adam8: bool = True) -> dict:
    from style_dreambooth.toyworld import base_model_dir
    from style_dreambooth.toyworld.demo import demo_config

    from style_dreambooth.toyworld.experiment import extra_class_prompts

    demo = demo_config()  # the demo's recipe; the rows below are its train settings
    return {
        "base_model": str(base_model_dir()),
        "instance_dir": str((out / "instance").resolve()),
        "instance_prompt": demo.instance_prompt,
        "class_prompt": demo.class_prompt,
        "class_dir": str((work / "class-images").resolve()),
        "with_prior_preservation": True,
        "class_prompts_from_captions": demo.class_prompts_from_captions,
        "class_prompts": extra_class_prompts(demo),
        "shuffle_caption": bool(demo.train_overrides.get("shuffle_caption", False)),
        "num_class_images": demo.num_class_images,
        "sample_batch_size": 16,
        "class_inference_steps": demo.class_inference_steps,
        "train_text_encoder": True,
        "resolution": 64,
        "train_batch_size": demo.train_batch_size,
        "use_8bit_adam": adam8,
        "offset_noise": demo.offset_noise,
        "learning_rate": demo.learning_rate,
        "text_encoder_lr": demo.text_encoder_lr,
        "text_encoder_scope": demo.text_encoder_scope,
        "max_train_steps": steps,
        "checkpointing_steps": every or max(1, steps // 8),
        "validation_steps": 0,
        "logging_steps": 10,
        "seed": 0,
    }


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def record_time(work: Path, seconds: float, command: str) -> tuple[float, int]:
    """Add this invocation to WORK/timing.json; return the total wall time and the number of invocations
    (a resumed sweep reuses the runs and evaluations of earlier ones)."""
    path = work / "timing.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": round(seconds, 1),
                    "command": command})
    path.write_text(json.dumps(history, indent=1), encoding="utf-8")
    return wall_seconds(history), len(history)


def wall_seconds(history: list[dict]) -> float:
    """Wall time the invocations covered: ones that ran side by side (e.g. one per core) count once."""
    spans = []
    for h in history:
        end = datetime.datetime.fromisoformat(h["date"]).timestamp()
        spans.append((end - h["seconds"], end))
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _metric_row(label: str, p) -> str:
    return f"| {label} | " + " | ".join(_f(p.get(k)) for k, _ in TABLE) + " |"


def ablation_tables(evals, step: int) -> list[str]:
    """Markdown: every run at ``step`` (one row each), then every checkpoint of the runs that went
    further (the steps ablation), each with the base model's row for reference."""
    head = ["| run | " + " | ".join(label for _, label in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    base = next((p for ev in evals for p in ev.points if p.step == 0), None)
    lines = [f"### Every run at step {step}", "", *head]
    if base is not None:
        lines.append(_metric_row("base model (step 0)", base))
    for ev in evals:
        at = next((p for p in ev.points if p.step == step), None)
        lines.append(_metric_row(ev.run.name, at) if at else f"| {ev.run.name} | no model at step {step} |")
    longer = [ev for ev in evals if max((p.step for p in ev.points), default=0) > step]
    for ev in longer:
        lines += ["", f"### Steps: every checkpoint of {ev.run.name}", "", *head]
        for p in sorted(ev.points, key=lambda p: p.step):
            lines.append(_metric_row(f"step {p.step}", p))
    return lines + [""]


def write_readme(out: Path, evals, args: argparse.Namespace, grid: dict, timing: tuple[float, int], command: str,
                 runs: dict | None = None) -> Path:
    import torch

    from style_dreambooth.evaluation.agreement import format_rho, pooled_rank_correlation
    from style_dreambooth.toyworld.demo import demo_config

    settings = evals[0].settings
    seconds, invocations = timing
    wall = f"wall time {seconds:.0f} s" + (f" over {invocations} invocations (resumed, or side by side)" if invocations > 1 else "")
    rho, n = pooled_rank_correlation([ev.points for ev in evals])
    docs = (REPO / "docs").resolve()
    metrics_link = (f"[docs/metrics.md]({os.path.relpath(docs / 'metrics.md', out.resolve())})"
                    if out.resolve().is_relative_to(docs) else "docs/metrics.md")
    demo = demo_config()  # the recipe base_config() wrote
    lines = [
        "# Proof-world sweep: does the weight-free style distance rank checkpoints like the judges?",
        "",
        f"Made by `{command}` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), {wall}). "
        "Open [report.html](report.html) for image grids, all metrics and plots against steps.",
        "",
        "Setup: the shipped tiny SD 1.x base fine-tuned through `train` on the 5 captioned yltcaxe images in "
        f"[instance/](instance/) with prior preservation (class prompt `{demo.class_prompt}`, "
        f"{demo.num_class_images} class images generated from the captions), the text encoder's identifier "
        f"embeddings trained at lr {demo.text_encoder_lr:g}, UNet lr {demo.learning_rate:g}, 64 px, batch "
        f"{demo.train_batch_size}, {'8-bit' if args.adam == '8bit' else 'torch'} AdamW, offset noise "
        f"{demo.offset_noise:g}, seed 0, "
        f"{args.steps} steps with a checkpoint every {args.checkpoint_every or max(1, args.steps // 8)} "
        "([base.yaml](base.yaml))"
        + ("; runs ([runs.yaml](runs.yaml)): " + "; ".join(
            f"`{name}` " + (", ".join(f"{k}={v}" for k, v in over.items()) or "(the base config)")
            for name, over in runs.items()) if runs else "")
        + ("; grid: " + ", ".join(f"`{k}` = {', '.join(str(v) for v in vs)}" for k, vs in grid.items())
           if grid else "")
        + f". Evaluation: [prompts.yaml](prompts.yaml) ({len(settings.prompts.token)} held-out subject x colour "
        f"cells with the token, the same without it, and {len(settings.prompts.klass)} class prompts), seeds "
        f"{', '.join(map(str, settings.seeds))}, DPM++ {settings.steps} steps, CFG {settings.guidance}, "
        "judges on (`--judges toyworld`). Metric definitions: " + metrics_link + ".",
        "",
        "**Rank correlation** is Spearman's rho between -style_distance (weight-free, lower = closer to the artist) "
        "and the judges' style-hit rate with the token, over every evaluated model of a run (the base included); "
        "+1 means the weight-free metric orders the checkpoints exactly as the judges do. The **judges' best** is the "
        "trained checkpoint with the highest style-hit rate (ties: higher judged prompt fidelity, then the earlier step).",
        "",
        "| run | rank correlation | models | rule's pick | judges' best | style hit at pick / at best |",
        "|---|---|---|---|---|---|",
    ]
    for ev in evals:
        a = ev.agreement
        if a is None:
            lines.append(f"| {ev.run.name} | n/a | 0 | {ev.choice.name if ev.choice else '-'} | - | - |")
            continue
        lines.append(f"| {ev.run.name} | {format_rho(a.spearman)} | {a.n} | {a.rule_pick} | {a.judges_best} | "
                     f"{_f(a.rule_pick_style_hit)} / {_f(a.judges_best_style_hit)} |")
    lines += ["", f"All runs pooled (the shared base counted once): rank correlation **{format_rho(rho)}** over {n} models.", ""]
    if args.table_step:
        lines += ablation_tables(evals, args.table_step)
    for ev in evals:
        lines += [f"## {ev.run.name}", ""]
        if ev.choice:
            lines.append(f"Rule's pick: **{ev.choice.name}** ({ev.choice.reason}).")
        if ev.agreement:
            lines.append(f"Judges' best: **{ev.agreement.judges_best}**. Rank correlation {format_rho(ev.agreement.spearman)}.")
        alarm = ev.alarm
        lines.append(f"Overfitting alarm: step {alarm.step}: {'; '.join(alarm.reasons)}." if alarm and alarm.fired
                     else "Overfitting alarm: none.")
        lines += ["", "| model (step) | " + " | ".join(label for _, label in TABLE) + " |",
                  "|---" * (len(TABLE) + 1) + "|"]
        for p in sorted(ev.points, key=lambda p: p.step):
            mark = (" (rule)" if ev.choice and p.step == ev.choice.step else "") + (
                " (judges)" if ev.agreement and p.step == ev.agreement.judges_best_step else "")
            lines.append(f"| {p.name} ({p.step}){mark} | " + " | ".join(_f(p.get(k)) for k, _ in TABLE) + " |")
        lines.append("")
    path = out / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from style_dreambooth.cli import _quiet_libraries, _setup_logging
    from style_dreambooth.errors import UserError
    from style_dreambooth.evaluation.evaluate import RunEvaluation
    from style_dreambooth.reports.html import write_report
    from style_dreambooth.sweep import parse_grid, read_runs_file, run_sweep, sweep_plan, write_judge_agreement
    from style_dreambooth.toyworld.experiment import write_instance_images
    from style_dreambooth.toyworld.scoring import JudgeScorer, write_prompt_file

    _setup_logging(False)
    _quiet_libraries()
    log = logging.getLogger("style_dreambooth.proof_world_sweep")
    t0 = time.perf_counter()
    try:
        runs = read_runs_file(args.runs) if args.runs else None
        grid = parse_grid(args.grid or ([] if runs else ["learning_rate=5e-5,1e-4,2e-4"]))
        seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
        out, work = args.out.resolve(), args.work.resolve()
        out.mkdir(parents=True, exist_ok=True)
        write_instance_images(out / "instance", n=5, seed=0, caption="yltcaxe artstyle")
        prompt_file = write_prompt_file(out / "prompts.yaml")
        config_file = out / "base.yaml"
        config_file.write_text(yaml.safe_dump(base_config(out, work, args.steps, args.checkpoint_every,
                                                          args.adam == "8bit"), sort_keys=False), encoding="utf-8")
        if runs and args.runs.resolve() != (out / "runs.yaml").resolve():
            shutil.copy2(args.runs, out / "runs.yaml")
        run_sweep(config_file, grid, work, runs=runs, eval_kwargs={
            "prompt_file": prompt_file, "seeds": seeds, "steps": args.sample_steps, "learned": None,
            "scorers": [JudgeScorer()],
        })
        evals = [RunEvaluation.from_summary(work / "runs" / name) for name, _ in sweep_plan(grid, runs)]
        seconds = time.perf_counter() - t0
        write_report(evals, out, "Proof-world sweep: weight-free style distance vs the judges", self_contained=True)
        write_judge_agreement(evals, out)
        command = ("python scripts/proof_world_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        readme = write_readme(out, evals, args, grid, record_time(work, seconds, command), command, runs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s and %s in %.0f s", readme, out / "report.html", seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
