"""Evaluation metrics: weight-free style distance, memorisation, diversity; learned-metric paths.

All images are procedural (PIL drawings); the learned metrics run on tiny random-weight models
built here, so the tests check code paths and invariants, never the quality of real weights.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from style_dreambooth.evaluation.diversity import diversity
from style_dreambooth.evaluation.memorisation import (
    COPY_THRESHOLD,
    copy_rate,
    is_copy,
    nearest_instance,
)
from style_dreambooth.evaluation.similarity import similarity_matrix, tiled_similarity
from style_dreambooth.evaluation.style_metrics import (
    StyleReference,
    component_distances,
    srgb_to_lab,
    style_features,
)

WARM = [(232, 96, 44), (245, 190, 70), (140, 40, 30), (250, 235, 200), (90, 60, 40)]
COOL = [(40, 90, 160), (120, 190, 210), (30, 50, 80), (200, 225, 240), (90, 140, 110)]


def draw(seed: int, palette=WARM, hatched: bool = True, size: int = 128) -> Image.Image:
    """A stand-in "artwork": random shapes in a palette; hatched + outlined, or smooth + soft.

    The seed sets the layout; ``palette`` and ``hatched`` set the "style".
    """
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), palette[3])
    d = ImageDraw.Draw(im)
    for _ in range(7):
        x0, y0 = rng.integers(-size // 4, size, 2)
        w, h = rng.integers(size // 6, size // 2, 2)
        colour = palette[int(rng.integers(0, len(palette)))]
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        outline = palette[4] if hatched else None
        if rng.random() < 0.5:
            d.ellipse(box, fill=colour, outline=outline, width=2)
        else:
            d.rectangle(box, fill=colour, outline=outline, width=2)
    if hatched:
        step = max(4, size // 24)
        for k in range(-size, size, step):
            d.line([(k, 0), (k + size, size)], fill=palette[2], width=1)
    else:
        im = im.filter(ImageFilter.GaussianBlur(size / 40))
    return im


def perturb(im: Image.Image, kind: str, seed: int = 0) -> Image.Image:
    """Light perturbations a memorised output might carry."""
    rng = np.random.default_rng(seed)
    if kind == "noise":  # Gaussian noise, sigma 5/255
        a = np.asarray(im, np.float32) + rng.normal(0, 5, (im.size[1], im.size[0], 3))
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if kind == "jpeg":  # JPEG quality 75
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=75)
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    if kind == "shift":  # 2-pixel shift right and down, edge pixels repeated
        a = np.asarray(im)
        a = np.pad(a, ((2, 0), (2, 0), (0, 0)), mode="edge")[: a.shape[0], : a.shape[1]]
        return Image.fromarray(np.ascontiguousarray(a))
    if kind == "jitter":  # slight colour jitter: brightness, saturation, channel gains
        im = ImageEnhance.Brightness(im).enhance(1.05)
        im = ImageEnhance.Color(im).enhance(0.92)
        a = np.asarray(im, np.float32) * np.array([1.03, 1.0, 0.97])
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if kind == "all":
        for k in ("jitter", "shift", "jpeg", "noise"):
            im = perturb(im, k, seed)
        return im
    raise ValueError(kind)


PERTURBATIONS = ("noise", "jpeg", "shift", "jitter", "all")


@pytest.fixture(scope="module")
def reference() -> StyleReference:
    return StyleReference.from_images([draw(s) for s in range(5)])


# --------------------------------------------------------------------------- style distance


def test_srgb_to_lab_reference_values():
    rgb = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lab = srgb_to_lab(rgb)
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.1)
    np.testing.assert_allclose(lab[3], [32.30, 79.19, -107.86], atol=0.1)


def test_style_distance_keys_and_self_distance(reference):
    d = reference.distance(draw(0))
    assert set(d) == {"palette", "texture", "edges", "style"}
    assert all(np.isfinite(v) and v >= 0 for v in d.values())
    assert d["style"] == pytest.approx(np.mean([d["palette"], d["texture"], d["edges"]]))
    f = style_features(draw(3))
    assert all(v == 0.0 for v in component_distances(f, f).values())


def test_same_style_closer_than_different_style(reference):
    same = reference.mean_distance([draw(s) for s in (10, 11, 12)])
    different = reference.mean_distance([draw(s, COOL, hatched=False) for s in (10, 11, 12)])
    assert same["style"] < 1.5
    assert different["style"] > 3 * same["style"]
    for name in ("palette", "texture", "edges"):
        assert different[name] > same[name], name


def test_instance_images_average_about_one(reference):
    own = reference.mean_distance([draw(s) for s in range(5)])  # includes the zero self-distance
    for name in ("palette", "texture", "edges", "style"):
        assert 0.5 <= own[name] <= 1.5, (name, own)
    loo = reference.leave_one_out()
    for name in ("palette", "texture", "edges"):
        assert np.mean([d[name] for d in loo]) == pytest.approx(1.0)


def test_palette_change_moves_palette_most(reference):
    d = reference.distance(draw(10, COOL))  # same layout and hatching, other palette
    assert d["palette"] > 1.5
    assert d["palette"] > d["texture"] and d["palette"] > d["edges"], d


def test_blur_moves_texture_and_edges_more_than_palette(reference):
    base = reference.distance(draw(10))
    blurred = reference.distance(draw(10).filter(ImageFilter.GaussianBlur(2)))
    moved = {k: blurred[k] - base[k] for k in ("palette", "texture", "edges")}
    assert moved["texture"] > 2 * abs(moved["palette"]), moved
    assert moved["edges"] > 2 * abs(moved["palette"]), moved


def test_reference_needs_two_images_and_guards_zero_spread():
    with pytest.raises(ValueError):
        StyleReference.from_images([draw(0)])
    twins = StyleReference.from_images([draw(0), draw(0)])
    assert all(v > 0 for v in twins.spread.values())
    assert all(np.isfinite(v) for v in twins.distance(draw(1)).values())


def test_analysis_is_size_independent_for_resized_inputs(reference):
    small, big = draw(21), draw(21).resize((512, 512), Image.Resampling.NEAREST)
    a, b = reference.distance(small), reference.distance(big)
    assert abs(a["style"] - b["style"]) < 0.5


# --------------------------------------------------------------------------- memorisation


@pytest.mark.parametrize("size", [128, 256, 512])
@pytest.mark.parametrize("hatched", [True, False])
def test_copy_threshold_calibration(size, hatched):
    instances = [draw(s, hatched=hatched, size=size) for s in range(6)]
    for kind in PERTURBATIONS:
        copies = [perturb(im, kind, seed=i) for i, im in enumerate(instances)]
        hits = nearest_instance(copies, instances)
        assert [j for j, _ in hits] == list(range(len(instances))), kind
        for _, sim in hits:
            assert is_copy(sim), (kind, sim)
    others = [draw(s, hatched=hatched, size=size) for s in range(100, 110)]
    for _, sim in nearest_instance(others, instances):
        assert 0.0 <= sim < COPY_THRESHOLD, sim
    assert copy_rate(others, instances) == 0.0


def test_mirrored_copy_is_found():
    instances = [draw(s, size=256) for s in range(3)]
    mirrored = instances[1].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (j, sim), = nearest_instance([mirrored], instances)
    assert j == 1 and sim > 0.99
    (_, sim_plain), = nearest_instance([mirrored], instances, consider_flips=False)
    assert sim_plain < sim


def test_similarity_range_and_identity():
    a, b = draw(1, size=200), draw(2, COOL, hatched=False, size=200)
    assert tiled_similarity(a, a) == pytest.approx(1.0)
    s = similarity_matrix([a, b], [a, b])
    assert np.all((s >= 0) & (s <= 1))
    assert s[0, 1] == pytest.approx(s[1, 0])
    assert s[0, 1] < 0.5


# --------------------------------------------------------------------------- diversity


def test_diversity():
    im = draw(0, size=256)
    assert diversity([im]) == 0.0
    assert diversity([im, im.copy(), im.copy()]) == pytest.approx(0.0, abs=1e-9)
    near = diversity([im, perturb(im, "all")])
    varied = diversity([draw(s, size=256) for s in range(4)])
    assert 0.0 < near < 0.1
    assert varied > 0.3 and varied > 5 * near
    with pytest.raises(ValueError):
        diversity([])


# --------------------------------------------------------------------------- learned metrics


@pytest.fixture(scope="module")
def tiny_learned_models(tmp_path_factory):
    """Tiny random CLIP (+ tokenizer + image processor) and DINOv2 folders."""
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    from style_dreambooth.models.tokenizer import build_clip_tokenizer

    root = tmp_path_factory.mktemp("learned")
    torch.manual_seed(0)
    clip_dir = root / "clip"
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(clip_dir)
    build_clip_tokenizer(clip_dir)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(clip_dir)

    dino_dir = root / "dino"
    Dinov2Model(
        Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            image_size=32, patch_size=8,
        )
    ).save_pretrained(dino_dir)
    BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def test_learned_metrics_run_on_tiny_models(tiny_learned_models):
    from style_dreambooth.evaluation.learned import LearnedMetrics

    clip_dir, dino_dir = tiny_learned_models
    metrics = LearnedMetrics.load(clip=clip_dir, dino=str(dino_dir), device="cpu")
    assert metrics.clip_skipped is None and metrics.dino_skipped is None
    images = [draw(s, size=64) for s in range(3)]
    instances = [draw(s, COOL, hatched=False, size=48) for s in range(2)]

    t = metrics.clip_t(images, ["a painting of a cat", "a dog", "a house by the sea"])
    assert t.skipped is None and -1.0 <= t.value <= 1.0 and len(t.per_image) == 3
    assert metrics.clip_t(images, "one prompt for all").value is not None
    with pytest.raises(ValueError):
        metrics.clip_t(images, ["too", "few"])

    for fn in (metrics.clip_i, metrics.dino):
        r = fn(images, instances)
        assert r.skipped is None and -1.0 <= r.value <= 1.0
        same = fn([images[0]], [images[0]])
        assert same.value == pytest.approx(1.0, abs=1e-5)
        dup = fn(images[:2], [images[0], images[0]])
        assert dup.per_image[0] == pytest.approx(1.0, abs=1e-5)
        # Instance embeddings are cached between calls; results must not change.
        assert fn(images, instances).value == pytest.approx(r.value, abs=1e-6)
        assert fn(images, list(reversed(instances))).value == pytest.approx(r.value, abs=1e-5)


def test_learned_metrics_skip_missing_weights(tmp_path, monkeypatch):
    from style_dreambooth.evaluation.learned import LearnedMetrics, MetricResult

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metrics = LearnedMetrics.load(
        clip="no-such-org/no-such-clip-model", dino=str(tmp_path / "missing-folder")
    )
    expected = "CLIP weights 'no-such-org/no-such-clip-model' not available offline"
    assert expected in metrics.clip_skipped
    assert "missing-folder" in metrics.dino_skipped and "not found" in metrics.dino_skipped
    images = [draw(0, size=32)]
    for result in (
        metrics.clip_t(images, "a cat"),
        metrics.clip_i(images, images),
        metrics.dino(images, images),
    ):
        assert isinstance(result, MetricResult)
        assert result.value is None and result.skipped

    disabled = LearnedMetrics.load(clip=None, dino=None)
    assert disabled.clip_t(images, "a cat").skipped == "CLIP disabled (no weights given)"
    assert disabled.dino(images, images).value is None


def test_evaluate_rescores_stored_images_when_clip_or_dino_change(tmp_path, tiny_model, instance_dir, cache_env,
                                                                   tiny_learned_models, capsys):
    """The score cache knows which CLIP/DINO scored: switching them on re-scores, without re-sampling."""
    import json

    from clihelp import run_cli, train_args

    clip_dir, dino_dir = tiny_learned_models
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--max-train-steps", "1"))[0] == 0
    common = ["evaluate", run, "--seeds", "0", "--steps", "2"]
    assert run_cli(capsys, *common, "--clip", "none", "--dino", "none")[0] == 0
    summary = lambda: json.loads((run / "eval" / "metrics.json").read_text())  # noqa: E731
    assert all(p["metrics"]["clip_t"] is None for p in summary()["points"])
    images = sorted((run / "eval" / "final").glob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}

    code, _, err = run_cli(capsys, *common, "--clip", str(clip_dir), "--dino", str(dino_dir))
    assert code == 0, err
    for point in summary()["points"]:
        assert isinstance(point["metrics"]["clip_t"], float) and isinstance(point["metrics"]["dino"], float)
    assert {p: p.stat().st_mtime_ns for p in images} == stamps  # the same images, scored again

    assert run_cli(capsys, *common, "--clip", "none", "--dino", "none")[0] == 0
    assert all(p["metrics"]["clip_t"] is None for p in summary()["points"])
