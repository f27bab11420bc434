"""`style-dreambooth demo`: the whole proof-world flow offline on a CPU in a few minutes.

Class images from the shipped base -> DreamBooth fine-tune through the real ``train`` ->
sampling of base and fine-tuned model at the same prompts and seeds -> judging -> an HTML page
with before/after grids and the metric table.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ..files import make_output_dir
from ..reports.html import format_cell
from ..sampling.images import make_grid
from .experiment import ExperimentConfig, ExperimentMetrics, Gallery, run_experiment
from .judges import Judges

log = logging.getLogger(__name__)


# The recipe's prior also holds the instance subjects in every colour, with and without the class prompt.
PRIOR_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def demo_config(steps: int | None = None, quick: bool = False) -> ExperimentConfig:
    """The recipe with a smaller evaluation than the full experiment (the scripts' base recipe and the
    slow CI test's): captions shuffled per sample, prior preservation on class images of the captions and
    of the instance subjects in every colour, with and without "artstyle" (48 images), UNet lr 5e-5,
    min-SNR-5 loss weighting (as the base was pretrained).

    ``quick`` is what ``style-dreambooth demo`` runs, so a newcomer waits about three minutes:
    half the steps at twice the UNet learning rate (250 at 2e-4, measured hit 1.00 and leak 0.02,
    docs/proof-world.md) and 15 sampler steps instead of 20.
    """
    cfg = ExperimentConfig(num_class_images=24, class_inference_steps=20, eval_steps=20, eval_seeds=2, drift_seeds=8)
    if quick:
        cfg = replace(cfg, max_train_steps=250, learning_rate=2e-4, class_inference_steps=15, eval_steps=15)
    else:  # held over training seeds 0-2 (docs/proof-world.md, "Over training seeds"); quick is not re-measured
        cfg = replace(cfg, num_class_images=48, plain_class_prompts=True, class_prompt_colours=PRIOR_COLOURS,
                      learning_rate=5e-5, train_overrides={"shuffle_caption": True, "snr_gamma": 5.0})
    if steps is not None:
        cfg.max_train_steps = steps
    return cfg


_ROWS = (
    ("style_hit_rate", "Style hit: held-out subjects with the token judged yltcaxe", "higher is better"),
    ("leak_rate", "Leak: prompts without the token judged yltcaxe", "lower is better"),
    ("leak_rate_plain", "Leak, plain prompts ('a yellow star')", "lower is better"),
    ("leak_rate_class", "Leak, class-prompt prompts ('a yellow star, artstyle')", "lower is better"),
    ("subject_acc_token", "Subject accuracy with the token", ""),
    ("colour_acc_token", "Colour accuracy with the token", ""),
    ("subject_acc_plain", "Subject accuracy, plain prompts (fine-tuned)", ""),
    ("base_subject_acc", "Subject accuracy, plain prompts (base)", ""),
    ("base_colour_acc", "Colour accuracy, plain prompts (base)", ""),
    ("base_style_hit_rate", "Base model with the token judged yltcaxe", "should be ~0"),
    ("drift_pixel_plain", "Prior drift: mean pixel change, plain prompts", "lower is better"),
    ("drift_pixel_artstyle", "Prior drift: mean pixel change, class prompt", "lower is better"),
    ("drift_style_tv_artstyle", "Prior drift: style-mix change (TV distance), class prompt", "lower is better"),
    ("memorisation_rate", "Memorisation: outputs nearly copying an instance image", "lower is better"),
    ("two_subject_success_token", "Two subjects (held-out pairs) right, with token, prompt only", "the known failure"),
    ("two_subject_layout_token", "Two subjects right, with token, with the layout (regions + ControlNet)", "the fix"),
    ("two_subject_layout_style", "Two subjects with the layout: style hit, lower of the two halves", "higher is better"),
    ("two_subject_success_base", "Two subjects right, base model, prompt only", "the known failure"),
    ("two_subject_layout_base", "Two subjects right, base model, with the layout", "the fix, where it works"),
)


def _fmt(value) -> str:
    return format_cell(value, missing="n/a")


def metrics_table(metrics: ExperimentMetrics) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td class=num>{_fmt(getattr(metrics, key))}</td>"
        f"<td class=note>{html.escape(note)}</td></tr>"
        for key, label, note in _ROWS
    )
    return f"<table><tr><th>metric</th><th>value</th><th></th></tr>{rows}</table>"


def write_html(out: Path, metrics: ExperimentMetrics, gallery: Gallery, wall_seconds: float) -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    def save(img: Image.Image, name: str, scale: int = 2) -> str:
        img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(images / name)
        return f"images/{name}"

    parts = [
        "<!doctype html><meta charset=utf-8><title>style-dreambooth demo</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "td,th{padding:3px 10px;border-bottom:1px solid #ddd}td.num{text-align:right;font-family:monospace}"
        "td.note{color:#777}img{image-rendering:pixelated}figure{display:inline-block;margin:6px}"
        "figcaption{font-size:12px;max-width:270px}</style>",
        "<h1>style-dreambooth demo: a proof world where the truth is known</h1>",
        "<p>A tiny Stable Diffusion 1.x model pretrained on procedural scenes (plain, pixel, neon and watercolor "
        "styles; never the artist style) is fine-tuned with DreamBooth on the instance images below, through the "
        "same <code>train</code> code as a real run. Small CNN judges trained on the renderer's ground truth score "
        "the outputs. Evaluation uses subjects and colours that are <b>not</b> in the instance images.</p>",
        f"<p>Wall time: {wall_seconds:.0f} s. Training: {metrics.train_seconds:.0f} s, "
        f"{metrics.config.get('max_train_steps')} steps at lr {metrics.config.get('learning_rate')}; text encoder: "
        f"{html.escape(str(metrics.config.get('text_encoder_scope', 'all')))} at lr "
        f"{metrics.config.get('text_encoder_lr') or metrics.config.get('learning_rate')}; class images from the "
        f"instance captions: {'yes' if metrics.config.get('class_prompts_from_captions') else 'no'}.</p>",
        "<h2>Instance images (prompt: <code>" + html.escape(str(metrics.config.get("instance_prompt"))) + "</code>)</h2>",
        f"<img src='{save(make_grid(gallery.instances, cols=len(gallery.instances)), 'instances.png', 3)}'>",
        "<h2>Metrics</h2>",
        metrics_table(metrics),
        "<h2>Before / after (same prompt, same seeds; left: base, right: fine-tuned)</h2>",
    ]
    for i, (prompt, before, after) in enumerate(gallery.rows):
        grid = make_grid(before + after, cols=len(before) + len(after))
        parts.append(f"<figure><img src='{save(grid, f'row{i:03d}.png', 2)}'>"
                     f"<figcaption>{html.escape(prompt)}</figcaption></figure>")
    parts += _pairs_section(gallery, save)
    parts.append("<h2>Raw metrics</h2><pre>" + html.escape(metrics.to_json()) + "</pre>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _pairs_section(gallery: Gallery, save) -> list[str]:
    """The known failure and its fix side by side: the same two-subject prompt and seeds, prompt
    only (left) and with the layout (right), with the layout's sketch."""
    if not gallery.pairs:
        return []
    parts = ["<h2>Two subjects: prompt only (left) and with a layout (right), same seeds</h2>",
             "<p>The layout gives each half of the canvas its own prompt (regional prompts in cross-attention, with "
             "the pair prompt keeping a 0.3 share), and two boxes where the subjects go, drawn by "
             "<code>layout-sketch --style solid</code> (shown first), steer the proof world's tiny ControlNet, which "
             "was trained on the base model in the pretraining styles only. On the base model the layout puts each "
             "asked subject in its half far more often; on the fine-tune both halves rarely come out right (see "
             "docs/proof-world.md, 'Composition').</p>"]
    for i, (prompt, sketch, plain, laid) in enumerate(gallery.pairs):
        grid = make_grid([sketch, *plain, *laid], cols=1 + len(plain) + len(laid))
        parts.append(f"<figure><img src='{save(grid, f'pair{i:03d}.png', 2)}'>"
                     f"<figcaption>{html.escape(prompt)}</figcaption></figure>")
    return parts


def run_demo(out: Path, *, steps: int | None = None) -> Path:
    """Run the proof-world demo into ``out`` (created if needed); return the path of ``out/index.html``."""
    t0 = time.perf_counter()
    out = make_output_dir(Path(out), "--out")
    gallery = Gallery()
    metrics = run_experiment(demo_config(steps, quick=True), out / "work", Judges.load(), gallery)
    path = write_html(out, metrics, gallery, time.perf_counter() - t0)
    log.info("demo finished in %.0f s: %s", time.perf_counter() - t0, path)
    return path
