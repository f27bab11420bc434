"""One HTML report for one run or a sweep: image grids, metric tables, metric-vs-step plots.

The report is a folder: ``report.html`` plus ``report_files/`` (plots), with images referenced by
relative paths inside the same folder tree, so it opens offline and can be zipped as is. A
self-contained report is the one file ``report.html``: plots and images are inlined as data URIs,
so it can be kept, sent or committed without the run folders it was made from.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from ..evaluation.agreement import format_rho, pooled_rank_correlation
from ..evaluation.evaluate import RunEvaluation
from ..files import write_text_atomically

PLOTTED = (
    ("style_distance", "style distance (token prompts; lower = closer to the artist)"),
    ("style_distance_no_token", "style distance without the token (leak if it falls)"),
    ("diversity", "diversity within a prompt"),
    ("max_instance_similarity", "similarity to nearest instance image"),
    ("copy_rate", "copy rate (memorisation)"),
    ("prior_drift", "prior drift on the class prompt vs base"),
    ("prompt_fidelity", "prompt fidelity"),
    ("judge_style_hit", "judges: style-hit rate with the token (higher = more of the artist's style)"),
    ("judge_leak_plain", "judges: style leak into plain prompts"),
    ("judge_leak_class", "judges: style leak into class prompts"),
)
TABLE_KEYS = (
    "style_distance", "palette", "texture", "edges", "style_distance_no_token", "diversity",
    "max_instance_similarity", "copy_rate", "prior_drift", "clip_t", "clip_i", "dino",
)

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
tr.chosen td{background:#e6f4e6;font-weight:bold}tr.alarm td{background:#fde8e8}
tr.judges-best td:first-child{outline:2px solid #68c}
.grid img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}
.grid td{padding:2px;vertical-align:middle}.note{color:#555;font-size:.9em}
.alarm-box{background:#fde8e8;border:1px solid #e99;padding:8px;margin:8px 0}
.plots img{width:420px;margin:4px;border:1px solid #eee}
"""


def format_cell(value, missing: str = "skipped") -> str:
    """A metric for an HTML table cell: floats to 3 decimals, None as ``missing``, text escaped."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _src(path: Path, out_dir: Path, inline: bool) -> str:
    """An <img> source: the file's path relative to the report, or its bytes as a data URI."""
    return _data_uri(path.read_bytes()) if inline else _rel(path, out_dir)


def _plot(evals: list[RunEvaluation], key: str, title: str, out: Path | io.BytesIO) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for ev in evals:
        pts = [(p.step, p.get(key)) for p in sorted(ev.points, key=lambda p: p.step) if p.get(key) is not None]
        if pts:
            series.append((ev, pts))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=90)
    for ev, pts in series:
        line, = ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=ev.run.name)
        if ev.choice is not None:
            chosen = [v for s, v in pts if s == ev.choice.step]
            if chosen:
                ax.plot([ev.choice.step], chosen, marker="*", ms=14, color=line.get_color(), mec="black")
        if ev.alarm is not None and ev.alarm.fired:
            ax.axvline(ev.alarm.step, color=line.get_color(), ls=":", lw=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if len(series) > 1:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return True


def _image_grid(ev: RunEvaluation, out_dir: Path, rows: list, first_seed: int, inline: bool = False) -> str:
    prompts = ev.settings.prompts
    cols = [("token", i, p) for i, p in enumerate(prompts.token)] + [("class", i, p) for i, p in enumerate(prompts.klass)]
    head = "".join(f"<th>{html.escape(p)}</th>" for _, _, p in cols)
    body = []
    for label, point_name in rows:
        cells = []
        for kind, i, _ in cols:
            path = ev.image_path(point_name, kind, i, first_seed)
            cells.append(f'<td><img src="{_src(path, out_dir, inline)}" alt="{kind} {i}"></td>' if path.is_file() else "<td>-</td>")
        body.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return f'<table class="grid"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def _agreement_line(ev: RunEvaluation) -> str:
    """One line under a run's table: rank correlation with the judges, and rule pick vs judges' best."""
    a = ev.agreement
    if a is None:
        return ""
    pick = f"{html.escape(a.rule_pick)} (step {a.rule_pick_step})" if a.rule_pick else "-"
    best = f"{html.escape(a.judges_best)} (step {a.judges_best_step})" if a.judges_best else "-"
    hits = ""
    if a.judges_best_style_hit is not None:
        hits = f", judged style-hit {format_cell(a.rule_pick_style_hit)} vs {format_cell(a.judges_best_style_hit)}"
    verdict = "they agree" if a.agree else "they differ"
    return (f"<p class='note judge-agreement'>Judges vs weight-free style: Spearman rank correlation of "
            f"&minus;style_distance with judge_style_hit over {a.n} models: <b>{format_rho(a.spearman)}</b>. "
            f"Rule picked {pick}; judges rank {best} best{hits} ({verdict}).</p>")


def _metric_table(ev: RunEvaluation) -> str:
    keys = [k for k in TABLE_KEYS if any(k in p.metrics for p in ev.points)]
    extra = sorted({k for p in ev.points for k in p.metrics} - set(TABLE_KEYS) - {"prompt_fidelity"})
    keys += extra
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for p in sorted(ev.points, key=lambda p: p.step):
        cls = ""
        classes = []
        if ev.choice is not None and p.step == ev.choice.step:
            classes.append("chosen")
        elif ev.alarm is not None and ev.alarm.fired and p.step == ev.alarm.step:
            classes.append("alarm")
        if ev.agreement is not None and p.step == ev.agreement.judges_best_step:
            classes.append("judges-best")
        if classes:
            cls = f' class="{" ".join(classes)}"'
        cells = "".join(f"<td>{format_cell(p.metrics.get(k))}</td>" for k in keys)
        rows.append(f"<tr{cls}><td>{html.escape(p.name)} ({p.step})</td>{cells}</tr>")
    return f"<table><tr><th>model (step)</th>{head}</tr>{''.join(rows)}</table>"


def write_report(evals: list[RunEvaluation], out_dir: Path, title: str, self_contained: bool = False) -> Path:
    """Write out_dir/report.html (+ report_files/); images must live under out_dir. With
    ``self_contained``, report.html alone, its images inlined (they may live anywhere)."""
    files = out_dir / "report_files"
    if self_contained:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        files.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    first_seed = evals[0].settings.seeds[0] if evals else 0

    # Summary: one row per run with its chosen checkpoint and alarm (and the judges' view, if any).
    judged = any(ev.agreement is not None for ev in evals)
    judge_head = "<th>judges' best</th><th>rank corr. with judges</th>" if judged else ""
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>chosen checkpoint</th><th>why</th>"
                 f"<th>overfitting alarm</th>{judge_head}</tr>")
    for ev in evals:
        choice = f"{ev.choice.name} (step {ev.choice.step})" if ev.choice else "-"
        why = html.escape(ev.choice.reason) if ev.choice else "-"
        alarm = (f"step {ev.alarm.step}: " + html.escape("; ".join(ev.alarm.reasons))) if ev.alarm and ev.alarm.fired else "none"
        judge_cells = ""
        if judged:
            a = ev.agreement
            best = f"{html.escape(a.judges_best)} (step {a.judges_best_step})" if a and a.judges_best else "-"
            judge_cells = f"<td>{best}</td><td>{format_rho(a.spearman) if a else 'n/a'}</td>"
        parts.append(f"<tr><td>{html.escape(ev.run.name)}</td><td>{choice}</td><td>{why}</td><td>{alarm}</td>"
                     f"{judge_cells}</tr>")
    parts.append("</table>")
    if judged and len(evals) > 1:
        rho, n = pooled_rank_correlation([ev.points for ev in evals])
        parts.append(f"<p class='note judge-agreement'>All runs pooled: Spearman rank correlation of "
                     f"&minus;style_distance with judge_style_hit over {n} models (the shared base counted once): "
                     f"<b>{format_rho(rho)}</b>.</p>")

    if len(evals) > 1:
        parts.append(f"<h2>Runs &times; prompts at each run's chosen checkpoint (seed {first_seed})</h2>")
        rows_html = []
        for ev in evals:
            if ev.choice is not None:
                rows_html.append(_image_grid(ev, out_dir, [(ev.run.name, ev.choice.name)], first_seed, self_contained))
        parts.append("".join(rows_html))

    parts.append("<h2>Metrics against steps</h2><div class='plots'>")
    for key, label in PLOTTED:
        out = io.BytesIO() if self_contained else files / f"{key}.png"
        if _plot(evals, key, label, out):
            src = _data_uri(out.getvalue()) if isinstance(out, io.BytesIO) else _rel(out, out_dir)
            parts.append(f'<img src="{src}" alt="{html.escape(label)}">')
    legend = " In the tables, a blue outline marks the checkpoint the judges rank best." if judged else ""
    parts.append("</div><p class='note'>&#9733; marks the chosen checkpoint; a dotted line marks where the overfitting "
                 f"alarm fired.{legend}</p>")

    for ev in evals:
        parts.append(f"<h2>Run {html.escape(ev.run.name)}</h2>")
        if ev.alarm is not None and ev.alarm.fired:
            parts.append(f"<div class='alarm-box'>Overfitting alarm at step {ev.alarm.step}: "
                         f"{html.escape('; '.join(ev.alarm.reasons))}</div>")
        parts.append(_metric_table(ev))
        parts.append(_agreement_line(ev))
        rows = [(f"{p.name} ({p.step})", p.name) for p in sorted(ev.points, key=lambda p: p.step)]
        parts.append(f"<p class='note'>Images per checkpoint, seed {first_seed}:</p>")
        parts.append(_image_grid(ev, out_dir, rows, first_seed, self_contained))
        if ev.skipped:
            items = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in sorted(ev.skipped.items()))
            parts.append(f"<p class='note'>Skipped metrics:</p><ul class='note'>{items}</ul>")
    parts.append("<p class='note'>Metric definitions: docs/metrics.md in the Style-DreamBooth repository.</p></body></html>")
    path = out_dir / "report.html"
    write_text_atomically(path, "".join(parts))
    return path
