"""The proof world: renderer, shipped judges and base model, and DreamBooth through `train`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from style_dreambooth.toyworld import base_model_dir
from style_dreambooth.toyworld.render import COLOUR_NAMES, SUBJECTS, random_scene
from style_dreambooth.toyworld.styles import COMPONENT_STYLES, STYLES, apply_style, muted


def test_renderer_is_deterministic_and_captioned():
    a = apply_style(random_scene(5, "yltcaxe", kind="star", colour="red"))
    b = apply_style(random_scene(5, "yltcaxe", kind="star", colour="red"))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    scene = random_scene(3, "pixel", kind="star", colour="red", second=("house", "blue"))
    assert scene.caption("pixel artstyle") == "a red star and a blue house, pixel artstyle"
    assert scene.subjects[0].cx < 32 <= scene.subjects[1].cx
    assert len(SUBJECTS) >= 8 and len(COLOUR_NAMES) >= 6
    # Every style renders every subject differently from the background.
    for style in STYLES + COMPONENT_STYLES:
        arr = np.asarray(apply_style(random_scene(11, style, kind="fish")), np.float32)
        assert arr.std() > 10


def test_component_styles_are_the_parts_of_yltcaxe():
    """ink is plain plus yltcaxe's outline; sepia is yltcaxe without outline and hatching."""
    scene = random_scene(21, "yltcaxe", kind="heart", colour="green")
    plain, ink, sepia, ylt = (np.asarray(apply_style(scene, s), np.float32) for s in ("plain", "ink", "sepia", "yltcaxe"))
    outline = np.abs(ink - plain).sum(-1) > 30
    assert 0.03 < outline.mean() < 0.3
    core = np.abs(ink - np.array([42, 32, 28])).sum(-1) < 3  # the ring's solid ink pixels
    assert core.sum() > 50 and np.allclose(ylt[core], ink[core], atol=1)  # the same ink ring
    untouched = ~outline & (np.abs(ylt - sepia).sum(-1) < 1)
    assert untouched.mean() > 0.6  # paper and fill are sepia's, except the hatched lines
    from style_dreambooth.toyworld.data import pretrain_example

    with pytest.raises(ValueError, match="never appears in pretraining"):
        pretrain_example(0, styles=("plain", "yltcaxe"))
    ceiling = {pretrain_example(i, styles=("plain", "yltcaxe"), ceiling=True).caption for i in range(60)}
    assert any(c.endswith("yltcaxe artstyle") for c in ceiling)  # only the ceiling experiment lets it in
    styles = {pretrain_example(i, styles=("plain", "ink", "sepia")).scene.style for i in range(60)}
    assert styles == {"plain", "ink", "sepia"}


def test_judges_file_names_the_styles_it_knows(tmp_path):
    from style_dreambooth.toyworld.judges import JudgeNet, Judges

    styles = ("plain", "ink", "sepia", "yltcaxe")
    torch.manual_seed(0)
    saved = Judges(JudgeNet(styles=styles), styles).save(tmp_path / "j.safetensors")
    loaded = Judges.load(saved)
    assert loaded.styles == styles and loaded.net.heads["style"].out_features == 4
    images = [apply_style(random_scene(i, "ink")) for i in range(3)]
    assert all(v.style in styles for v in loaded.judge(images))
    assert Judges.load().styles == STYLES  # the shipped file, written before the names were stored


def test_pretraining_captions_credit_named_styles_to_made_up_artists():
    from style_dreambooth.toyworld.base_model import dataset_captions
    from style_dreambooth.toyworld.data import ARTISTS, pretrain_example, render_batch

    names = [n for style in ARTISTS for n in ARTISTS[style]]
    assert len(names) == len(set(names)) and "yltcaxe" not in names
    assert set(ARTISTS) == {"pixel", "neon", "watercolor"}
    examples = [pretrain_example(1_000_000 + i, artists=True) for i in range(3000)]
    credited = {}
    for e in examples:
        words = e.caption.split(", ")[-1].split()
        if len(words) == 2 and words[1] == "artstyle" and words[0] in names:
            credited.setdefault(e.scene.style, []).append(words[0])
            assert words[0] in ARTISTS[e.scene.style], "an artist always draws in its own style"
    assert "yltcaxe" not in {e.scene.style for e in examples}
    named = sum(e.scene.style in ARTISTS for e in examples)
    assert 0.2 < sum(map(len, credited.values())) / named < 0.5  # P_ARTIST of the named-style captions
    assert set(credited) == set(ARTISTS)
    assert dataset_captions(40) == render_batch(list(range(1_000_000, 1_000_040)))[1]  # the shipped base's captions
    assert not any(w in names for c in dataset_captions(3000) for w in c.replace(",", " ").split())
    with_artists = dataset_captions(3000, artists=True)
    assert [pretrain_example(1_000_000 + i, artists=True).scene for i in range(50)] == [
        pretrain_example(1_000_000 + i).scene for i in range(50)]  # same images either way
    assert sum(a != b for a, b in zip(with_artists, dataset_captions(3000))) > 300


def test_yltcaxe_palette_keeps_colour_identity():
    from style_dreambooth.toyworld.render import COLOURS

    ref = {name: np.asarray(rgb, np.float32) for name, rgb in COLOURS.items()}
    for name, rgb in ref.items():
        m = muted(rgb)
        nearest = min(ref, key=lambda other: np.abs(muted(ref[other]) - m).sum() if other != name else 1e9)
        assert np.abs(muted(ref[nearest]) - m).sum() > 40  # muted colours stay apart


def test_shipped_judges_are_accurate_on_heldout_renders():
    from style_dreambooth.toyworld.judges import Judges, heldout_accuracy

    torch.set_num_threads(1)
    acc = heldout_accuracy(Judges.load(), n=600, seed0=0)  # training used seeds >= 1e8
    assert acc["style"] >= 0.95, acc
    assert acc["subject"] >= 0.95, acc
    assert acc["colour"] >= 0.95, acc


def test_shipped_base_is_a_plain_sd1_pipeline():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from style_dreambooth.models.tokenizer import build_clip_tokenizer

    folder = base_model_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir()
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 30 * 2**20

    pipe = StableDiffusionPipeline.from_pretrained(folder)  # no dtype: must come out fp32
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.dtype == torch.float32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    prompt = "a red star, yltcaxe artstyle"
    assert pipe.tokenizer(prompt).input_ids == build_clip_tokenizer()(prompt).input_ids
    out = pipe("a red star", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()


def test_ssim_and_memorisation_calibration():
    from style_dreambooth.toyworld.experiment import calibrate_memorisation, instance_scenes, ssim_matrix

    inst = [apply_style(s) for s in instance_scenes(5)]
    sims = ssim_matrix(inst, inst)
    assert np.allclose(np.diag(sims), 1.0, atol=1e-4)
    threshold = calibrate_memorisation(inst, n=40)
    assert threshold < 0.99  # a fresh drawing is never a copy, so copies stand out


def test_experiment_passes_other_train_settings_through_validated(tmp_path):
    from pydantic import ValidationError

    from style_dreambooth.toyworld.experiment import ExperimentConfig, train_config

    cfg = ExperimentConfig(train_overrides={"lora_targets": ["attn2.to_k", "q_proj"], "snr_gamma": 5.0})
    tcfg = train_config(cfg, tmp_path, tmp_path / "instance")
    assert tcfg.lora_targets == ["attn2.to_k", "q_proj"] and tcfg.snr_gamma == 5.0
    assert tcfg.learning_rate == cfg.learning_rate and tcfg.resolution == 64  # the rest as before
    assert train_config(ExperimentConfig(), tmp_path, tmp_path / "instance").snr_gamma is None
    with pytest.raises(ValidationError, match="no_such_setting"):
        train_config(ExperimentConfig(train_overrides={"no_such_setting": 1}), tmp_path, tmp_path / "instance")
    with pytest.raises(ValidationError, match="snr_gamma"):
        train_config(ExperimentConfig(train_overrides={"snr_gamma": -1}), tmp_path, tmp_path / "instance")


def test_steps_curve_reads_each_point_from_one_run(tmp_path, monkeypatch):
    """The steps ablation trains once and measures every step count from that run's checkpoints."""
    from style_dreambooth.toyworld.experiment import ExperimentConfig, run_curve

    torch.set_num_threads(1)
    monkeypatch.setenv("STYLE_DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    cfg = ExperimentConfig(n_instances=2, num_class_images=2, class_inference_steps=2, eval_steps=2, eval_seeds=1,
                           drift_seeds=1, heldout_subjects=("star",), heldout_colours=("yellow",), pairs=False,
                           learning_rate=1e-3, use_8bit_adam=False)
    curve = run_curve(cfg, tmp_path, [4, 2])
    assert sorted(curve) == [2, 4]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-000002").is_dir() and (run / "model" / "model_index.json").is_file()
    assert [curve[k].config["max_train_steps"] for k in (2, 4)] == [2, 4]
    assert curve[2].train_seconds < curve[4].train_seconds
    # Two different models were measured (the checkpoint, then the final one), against one base.
    assert curve[2].drift_pixel_plain != curve[4].drift_pixel_plain
    assert curve[2].base_subject_acc == curve[4].base_subject_acc
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert sorted(saved) == ["2", "4"]


# Thresholds of the slow test: the recipe (demo_config(), the scripts' and the docs' recipe) trained with
# training seeds 1 and 2, each judged on 12 held-out cells x eval seeds 1000-1001, asserted on the mean of
# the two runs (docs/proof-world.md, "Over training seeds", "With min-SNR": this is that table's seeds 1 and 2
# at eval seeds 1000-1001). Where the recipe meets issue #18's target the bar is the target; where it
# misses (colour with the token 0.7, the token-first order), the bar holds the measured level less about
# two images of 48 (another CPU's rounding can flip some).
TRAIN_SEEDS = (1, 2)
MIN_STYLE_HIT = 0.85  # target; measured 1.00 (1.00 / 1.00)
MIN_STYLE_HIT_ANY_SEED = 0.75  # target; measured 1.00
MAX_BASE_STYLE_HIT = 0.1  # the base has never seen yltcaxe
MAX_LEAK = 0.08  # target; measured 0.01 (0.02 / 0.00; before the recipe's plain class prompts 0.11)
MAX_LEAK_ANY_SEED = 0.12  # target; measured 0.02
MIN_SUBJECT_RATIO_TOKEN = 0.85  # target; measured 0.92 / 1.00 (0.88 / 0.96; 0.79 before min-SNR)
MIN_SUBJECT_RATIO_PLAIN = 0.75  # measured 0.98 / 1.00
MIN_COLOUR_TOKEN = 0.35  # target 0.7; measured 0.40 (0.42 / 0.38; 0.27 before min-SNR), chance 0.17


@pytest.mark.slow
def test_dreambooth_binds_the_style_to_the_token(tmp_path, monkeypatch):
    """Fine-tune the shipped base through the real `train` with two training seeds; judge held-out subjects."""
    from dataclasses import replace

    from style_dreambooth.toyworld.demo import demo_config
    from style_dreambooth.toyworld.experiment import run_seeds

    torch.set_num_threads(1)
    monkeypatch.setenv("STYLE_DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    runs = run_seeds(replace(demo_config(), drift_seeds=4, pairs=False), tmp_path, list(TRAIN_SEEDS))
    per_seed = [evals[1000] for evals in runs.values()]
    mean = {k: float(np.mean([getattr(m, k) for m in per_seed])) for k in (
        "style_hit_rate", "leak_rate", "subject_acc_token", "colour_acc_token", "subject_acc_plain",
        "base_subject_acc", "base_style_hit_rate", "subject_acc_token_first", "base_subject_acc_token_first")}
    summary = json.dumps({"mean": mean, "runs": [{k: v for k, v in vars(m).items() if k != "config"}
                                                   for m in per_seed]}, default=str)
    assert mean["base_style_hit_rate"] <= MAX_BASE_STYLE_HIT, summary  # the style is new to the base model
    assert mean["style_hit_rate"] >= MIN_STYLE_HIT, summary  # ... and the token now produces it
    assert mean["leak_rate"] <= MAX_LEAK, summary
    assert min(m.style_hit_rate for m in per_seed) >= MIN_STYLE_HIT_ANY_SEED, summary
    assert max(m.leak_rate for m in per_seed) <= MAX_LEAK_ANY_SEED, summary
    assert mean["base_subject_acc"] >= 0.8, summary  # the shipped base draws the held-out subjects
    assert mean["subject_acc_token"] >= MIN_SUBJECT_RATIO_TOKEN * mean["base_subject_acc"], summary
    assert mean["subject_acc_plain"] >= MIN_SUBJECT_RATIO_PLAIN * mean["base_subject_acc"], summary
    assert mean["colour_acc_token"] >= MIN_COLOUR_TOKEN, summary
    # "yltcaxe artstyle, a yellow star": measured 0.12 (0.00 / 0.25) against the base's 0.17 on that order
    # (issue #18's target is >= the base's; missed, see docs/proof-world.md), so it is reported, not asserted.
    for seed in TRAIN_SEEDS:
        assert (tmp_path / f"seed-{seed}" / "run" / "model" / "model_index.json").is_file()


def test_demo_page_shows_grids_and_metrics(tmp_path):
    from style_dreambooth.toyworld.demo import write_html
    from style_dreambooth.toyworld.experiment import ExperimentMetrics, Gallery, instance_scenes

    images = [apply_style(s) for s in instance_scenes(5)]
    gallery = Gallery(rows=[("a yellow star, yltcaxe artstyle", images[:2], images[2:4])], instances=images,
                      pairs=[("a yellow star and a purple heart, yltcaxe artstyle", images[4], images[:2], images[2:4])])
    metrics = ExperimentMetrics(
        style_hit_rate=0.9, leak_rate=0.0, leak_rate_plain=0.0, leak_rate_class=0.0, subject_acc_token=0.7, colour_acc_token=0.8, subject_acc_plain=0.8,
        colour_acc_plain=0.9, base_subject_acc=0.8, base_colour_acc=0.9, base_style_hit_rate=0.0,
        drift_pixel_plain=0.01, drift_pixel_artstyle=0.02, drift_style_tv_artstyle=0.1,
        style_mix_artstyle_base={"plain": 1.0}, style_mix_artstyle_tuned={"plain": 1.0}, memorisation_rate=0.0,
        memorisation_threshold=0.6, max_instance_ssim=0.3, two_subject_success_token=0.1,
        two_subject_success_base=0.2, two_subject_layout_base=0.5, two_subject_layout_token=0.875, two_subject_layout_style=0.75, n_eval_images=10, train_seconds=1.0, total_seconds=2.0,
        config={"max_train_steps": 1, "learning_rate": 1e-4, "instance_prompt": "yltcaxe artstyle"},
    )
    page = write_html(tmp_path, metrics, gallery, 3.0)
    text = page.read_text()
    assert page == tmp_path / "index.html"
    assert "Style hit" in text and "0.900" in text and "a yellow star, yltcaxe artstyle" in text
    assert "with the layout" in text and "0.875" in text and "a yellow star and a purple heart" in text
    for src in ("images/instances.png", "images/row000.png", "images/pair000.png"):
        assert src in text and (tmp_path / src).is_file()


# Two subjects in one picture on the shipped base, four ways (scripts/proof_world_composition.py,
# docs/proof-world.md, 2026-12-01: 8 held-out pairs x 3 seeds). Measured: the prompt alone puts the
# asked subject in the asked colour on the left half in 0 of 24 images and on the right in 2; with
# the layout (regional prompts + the tiny ControlNet from the layout's sketch) on 14 and 12, and both
# halves right in 3 of 24. The bars keep about two images of margin for another CPU's rounding.
MIN_HALF_WITH_LAYOUT = 0.4  # measured 0.58 / 0.50
MAX_HALF_PROMPT_ONLY = 0.2  # measured 0.00 / 0.08
MIN_BOTH_WITH_LAYOUT = 0.04  # measured 0.12 (3 of 24): far from the 0.8, see docs/proof-world.md
# With a painted sketch of the two silhouettes instead of boxes, the ControlNet alone draws both asked
# kinds (any colour) in 17 of 24 (0.71; prompt only: 0 of 24).
MIN_KINDS_FROM_SILHOUETTES = 0.5


@pytest.mark.slow
def test_a_layout_puts_each_subject_in_its_half():
    from style_dreambooth.toyworld import base_model_dir, two_subjects
    from style_dreambooth.toyworld.evaluate import load_pipe
    from style_dreambooth.toyworld.experiment import HELDOUT_COLOURS, HELDOUT_SUBJECTS
    from style_dreambooth.toyworld.judges import Judges

    pipe = load_pipe(base_model_dir())
    pairs = two_subjects.heldout_pairs(HELDOUT_SUBJECTS, HELDOUT_COLOURS, 8)
    scores, _ = two_subjects.measure(pipe, two_subjects.toy_controlnet_pipeline(pipe), Judges.load(), pairs,
                                     [5000, 5001, 5002], ways=("prompt", "both"))
    prompt, layout = scores["prompt"], scores["both"]
    summary = {way: s.as_dict() for way, s in scores.items()}
    assert max(prompt.left, prompt.right) <= MAX_HALF_PROMPT_ONLY, summary  # the known failure
    assert min(layout.left, layout.right) >= MIN_HALF_WITH_LAYOUT, summary  # each half now shows its subject
    assert layout.success >= MIN_BOTH_WITH_LAYOUT, summary
    assert layout.success > prompt.success, summary
    painted, _ = two_subjects.measure(pipe, two_subjects.toy_controlnet_pipeline(pipe), Judges.load(), pairs,
                                      [5000, 5001, 5002], ways=("controlnet",), sketch_kind="silhouettes")
    assert painted["controlnet"].subjects >= MIN_KINDS_FROM_SILHOUETTES, painted["controlnet"]
    assert prompt.subjects <= 0.1, summary  # measured 0.00


def test_two_subject_sketches_put_each_subject_in_its_half():
    from style_dreambooth.toyworld import two_subjects
    from style_dreambooth.toyworld.judges import Judges, half_view
    from style_dreambooth.toyworld.render import COLOURS

    pair = (("star", "yellow"), ("heart", "purple"))
    layout = two_subjects.pair_layout(pair)
    boxes = two_subjects.condition_image(layout, pair, "boxes", 1)
    assert np.array_equal(np.asarray(boxes), np.asarray(two_subjects.sketch(layout)))
    ink = np.asarray(two_subjects.condition_image(layout, pair, "silhouettes", 1))
    colours = np.asarray(two_subjects.condition_image(layout, pair, "colours", 1))
    inked = (ink == 0).all(-1)
    assert inked[:, :32].sum() > 100 and inked[:, 32:].sum() > 100  # one silhouette a half, of some size
    assert ((colours == COLOURS["yellow"]).all(-1) == inked * (np.arange(64) < 32)).all()
    assert ((colours == COLOURS["purple"]).all(-1) == inked * (np.arange(64) >= 32)).all()
    # the judges read the silhouettes' kinds, one a half, as they read the renderer's scenes
    left, right = Judges.load().judge([half_view(two_subjects.silhouette_sketch(pair, 1, True), side)
                                       for side in ("left", "right")])
    assert (left.subject, right.subject) == ("star", "heart")
    with pytest.raises(ValueError, match="not one of"):
        two_subjects.condition_image(layout, pair, "lines", 1)
