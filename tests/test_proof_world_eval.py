"""Proof-world evaluation: rank correlation, the judge scorer, the --judges flag and the report line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import numpy as np
import yaml

from clihelp import run_cli, train_args
from style_dreambooth.evaluation.agreement import (
    average_ranks,
    judge_agreement,
    judges_best,
    pooled_rank_correlation,
    spearman,
)
from style_dreambooth.evaluation.selection import Choice, Point

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- Spearman


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3.0, 1.0, 2.0]).tolist() == [3.0, 1.0, 2.0]
    assert average_ranks([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_computed_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); d = (1, -1, 1, -1, 0) -> 1 - 24/120 = 0.8.
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # Ties in y: ranks (1, 2.5, 2.5, 4); centred x ranks (-1.5, -.5, .5, 1.5), y ranks (-1.5, 0, 0, 1.5):
    # covariance 4.5, sums of squares 5 and 4.5 -> 4.5 / sqrt(22.5) = sqrt(0.9).
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(math.sqrt(0.9))
    # Only the order matters, not the values.
    assert spearman([0.1, 5, 2], [1, 1000, 3]) == pytest.approx(1.0)


def test_spearman_undefined_cases_are_nan():
    assert math.isnan(spearman([1, 2], [2, 1]))  # fewer than 3 points
    assert math.isnan(spearman([1, 2, 3], [0.5, 0.5, 0.5]))  # constant side
    assert math.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))  # NaN pair dropped -> 2 points
    assert spearman([1, 2, 3, float("nan")], [1, 2, 3, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def _pt(step, style, hit, fidelity=None, name=None):
    metrics = {"style_distance": style, "judge_style_hit": hit}
    if fidelity is not None:
        metrics["judge_prompt_fidelity"] = fidelity
    return Point(step, name or ("base" if step == 0 else f"step-{step:06d}"), metrics)


def test_judge_agreement_and_judges_best():
    points = [_pt(0, 3.0, 0.0), _pt(10, 2.0, 0.25, 0.1), _pt(20, 1.5, 0.5, 0.1), _pt(30, 1.6, 0.5, 0.3)]
    best = judges_best(points)
    assert best.step == 30  # tie on style hit broken by prompt fidelity
    assert judges_best([_pt(10, 2.0, 0.5, 0.2), _pt(20, 1.0, 0.5, 0.2)]).step == 10  # then the earlier step
    a = judge_agreement(points, Choice(20, "step-000020", "rule"))
    # -style: (-3, -2, -1.5, -1.6) -> ranks (1, 2, 4, 3); hits (0, .25, .5, .5) -> ranks (1, 2, 3.5, 3.5)
    assert a.spearman == pytest.approx(spearman([1, 2, 4, 3], [1, 2, 3.5, 3.5]))
    assert a.n == 4 and a.rule_pick == "step-000020" and a.judges_best == "step-000030" and not a.agree
    assert a.rule_pick_style_hit == 0.5 and a.judges_best_style_hit == 0.5
    assert judge_agreement([Point(0, "base", {"style_distance": 1.0})], None) is None
    short = judge_agreement(points[:2], Choice(10, "step-000010", "rule"))
    assert short.spearman is None and short.agree  # 2 points: undefined, shown as n/a
    # Pooled over runs: the identical base counts once.
    other = [_pt(0, 3.0, 0.0), _pt(10, 2.5, 0.1)]
    rho, n = pooled_rank_correlation([points, other])
    assert n == 5 and rho == pytest.approx(spearman([-3, -2, -1.5, -1.6, -2.5], [0, .25, .5, .5, .1]))


# --------------------------------------------------------------------------- judge scorer


def test_parse_subject():
    from style_dreambooth.toyworld.scoring import parse_subject

    assert parse_subject("a yellow star, yltcaxe artstyle") == ("star", "yellow")
    assert parse_subject("an Orange fish") == ("fish", "orange")
    assert parse_subject("artstyle") is None
    assert parse_subject("a red star and a blue house") is None
    assert parse_subject("a golden star") is None


@pytest.fixture(scope="module")
def scorer():
    from style_dreambooth.toyworld.scoring import JudgeScorer

    return JudgeScorer()


CELLS = [("star", "yellow"), ("heart", "purple"), ("fish", "orange"), ("triangle", "yellow")]


def _renders(style: str) -> list:
    from style_dreambooth.toyworld.render import random_scene
    from style_dreambooth.toyworld.styles import apply_style

    # Ground truth from the renderer; seeds < 1e8 were never used to train the judges.
    return [apply_style(random_scene(100 + i, style, kind=k, colour=c)) for i, (k, c) in enumerate(CELLS)]


def test_judge_scorer_on_rendered_ground_truth(scorer):
    yltcaxe, plain = _renders("yltcaxe"), _renders("plain")
    token_prompts = [f"a {c} {k}, yltcaxe artstyle" for k, c in CELLS]
    assert scorer(yltcaxe, token_prompts, "token") == {
        "judge_style_hit": 1.0, "judge_subject_acc_token": 1.0, "judge_colour_acc_token": 1.0,
        "judge_prompt_fidelity": 1.0,
    }
    assert scorer(plain, token_prompts, "token")["judge_style_hit"] == 0.0
    assert scorer(plain, [f"a {c} {k}" for k, c in CELLS], "plain") == {
        "judge_leak_plain": 0.0, "judge_subject_acc_plain": 1.0, "judge_colour_acc_plain": 1.0,
    }
    # Half of the images in the artist's style leak; the bare class prompt names no subject.
    mixed = yltcaxe[:2] + plain[2:]
    assert scorer(mixed, ["artstyle"] * 4, "class") == {"judge_leak_class": 0.5}
    # Wrong subject for one image, wrong colour for another: fidelity counts both right only.
    wrong = ["a yellow heart, yltcaxe artstyle", "a orange heart, yltcaxe artstyle"] + token_prompts[2:]
    m = scorer(yltcaxe, wrong, "token")
    assert (m["judge_subject_acc_token"], m["judge_colour_acc_token"], m["judge_prompt_fidelity"]) == (0.75, 0.75, 0.5)


def test_prompt_file_matches_the_generator_and_reads_back(tmp_path):
    from style_dreambooth.evaluation.evaluate import read_prompt_file
    from style_dreambooth.toyworld.scoring import proof_world_prompts, write_prompt_file

    shipped = REPO / "examples" / "proof-world-prompts.yaml"
    assert shipped.read_text() == write_prompt_file(tmp_path / "p.yaml").read_text()
    prompts = read_prompt_file(shipped, "ignored", "ignored")
    expected = proof_world_prompts()
    assert (prompts.token, prompts.plain, prompts.klass) == (expected["token"], expected["plain"], expected["class"])
    assert len(prompts.token) == 12 and prompts.token[0] == "a yellow star, yltcaxe artstyle"
    assert prompts.klass[:2] == ["artstyle", "a yellow star, artstyle"]


# --------------------------------------------------------------------------- CLI and report


def test_unknown_judges_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "run", "--judges", "oracle", "--clip", "none", "--dino", "none")
    assert code == 2 and "unknown judges 'oracle'" in err and "toyworld" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "sweep", "--config", tmp_path / "base.yaml", "--grid", "learning_rate=1e-4",
                           "--out", tmp_path / "sw", "--judges", "oracle")
    assert code == 2 and "unknown judges" in err and not (tmp_path / "sw").exists()


def test_evaluate_with_judges_records_and_reports_agreement(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--checkpointing-steps", "2"))[0] == 0
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"token": ["a yellow star, yltcaxe artstyle"], "plain": ["a yellow star"],
                                       "class": ["artstyle", "a yellow star, artstyle"]}))
    eval_args = ["evaluate", run, "--prompts", prompts, "--seeds", "0,1", "--steps", "2", "--clip", "none",
                 "--dino", "none"]
    assert run_cli(capsys, *eval_args)[0] == 0
    summary = json.loads((run / "eval" / "metrics.json").read_text())
    assert summary["judge_agreement"] is None and "judge_style_hit" not in summary["points"][0]["metrics"]
    images = sorted((run / "eval").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in images}

    # Switching the judges on re-scores the stored images without generating them again.
    code, out, err = run_cli(capsys, *eval_args, "--judges", "toyworld")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in images} == before
    summary = json.loads((run / "eval" / "metrics.json").read_text())
    for point in summary["points"]:
        m = point["metrics"]
        for key in ("judge_style_hit", "judge_leak_plain", "judge_leak_class", "judge_prompt_fidelity",
                    "judge_subject_acc_token", "judge_colour_acc_class"):
            assert 0.0 <= m[key] <= 1.0, key
        assert m["prompt_fidelity"] == m["judge_prompt_fidelity"]  # no CLIP: the judges' fidelity stands in
    agreement = summary["judge_agreement"]
    assert agreement["n"] == 3 and agreement["rule_pick"] == summary["choice"]["name"]
    assert agreement["judges_best"] in ("step-000002", "final")
    assert "judges: rank correlation" in out
    text = (run / "report.html").read_text()
    assert "judge-agreement" in text and "Spearman rank correlation" in text and "judge_style_hit" in text
    rho = agreement["spearman"]
    assert (f"{rho:+.2f}" if rho is not None else "n/a") in text

    from style_dreambooth.evaluation.evaluate import RunEvaluation

    back = RunEvaluation.from_summary(run)  # what scripts/proof_world_sweep.py re-reports from
    assert back.agreement.to_dict() == agreement and back.choice.name == summary["choice"]["name"]
    assert back.settings.prompts.klass == ["artstyle", "a yellow star, artstyle"]
    assert [p.metrics for p in back.points] == [p["metrics"] for p in summary["points"]]


def test_report_shows_correlation_and_na(tmp_path):
    from style_dreambooth.evaluation.evaluate import EvalSettings, PromptSet, RunEvaluation
    from style_dreambooth.evaluation.selection import Alarm
    from style_dreambooth.reports.html import write_report

    settings = EvalSettings(PromptSet(["a yellow star, yltcaxe artstyle"], ["a yellow star"], ["artstyle"]), seeds=[0])
    pts = [_pt(0, 3.0, 0.0), _pt(10, 2.0, 0.25), _pt(20, 1.0, 0.5), _pt(30, 1.2, 0.75)]
    choice = Choice(20, "step-000020", "earliest saturated")
    good = RunEvaluation(tmp_path / "runs" / "a", pts, choice, Alarm(False), {}, settings, judge_agreement(pts, choice))
    flat = [_pt(0, 3.0, 0.0), _pt(10, 2.0, 0.0), _pt(20, 1.0, 0.0)]  # judges see no style: constant
    none = RunEvaluation(tmp_path / "runs" / "b", flat, choice, Alarm(False), {}, settings, judge_agreement(flat, choice))
    text = write_report([good, none], tmp_path, "t").read_text()
    expected = f"{spearman([-3, -2, -1, -1.2], [0, .25, .5, .75]):+.2f}"
    assert expected == "+0.80"
    assert f"over 4 models: <b>{expected}</b>" in text
    assert "over 3 models: <b>n/a</b>" in text
    assert "Rule picked step-000020 (step 20); judges rank step-000030 (step 30) best" in text
    assert "All runs pooled" in text and "judge_style_hit.png" in text


def test_self_contained_report_inlines_every_image(tmp_path):
    """The committed proof-world reports are one file each: the same page, its images as data URIs."""
    import base64
    import io
    import re

    from PIL import Image

    from style_dreambooth.evaluation.evaluate import EvalSettings, PromptSet, RunEvaluation
    from style_dreambooth.evaluation.selection import Alarm
    from style_dreambooth.reports.html import write_report

    settings = EvalSettings(PromptSet(["a yellow star, yltcaxe artstyle"], ["a yellow star"], ["artstyle"]), seeds=[0])
    pts = [_pt(0, 3.0, 0.0), _pt(10, 2.0, 0.5)]
    ev = RunEvaluation(tmp_path / "work" / "a", pts, Choice(10, "step-000010", "r"), Alarm(False), {}, settings,
                       judge_agreement(pts, Choice(10, "step-000010", "r")))
    for point in pts:
        for kind in ("token", "class"):
            path = ev.image_path(point.name, kind, 0, 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    linked = write_report([ev], tmp_path / "work", "t").read_text()
    text = write_report([ev], tmp_path / "docs", "t", self_contained=True).read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == len(re.findall(r'src="([^"]*)"', linked)) == 4 + 2  # 4 tiles, 2 plots
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert sorted((tmp_path / "docs").iterdir()) == [tmp_path / "docs" / "report.html"]  # no report_files/
    assert re.sub(r'src="[^"]*"', "", linked) == re.sub(r'src="[^"]*"', "", text)
    tile = Image.open(io.BytesIO(base64.b64decode(sources[-1].split(",", 1)[1])))
    assert tile.size == (8, 8) and tile.getpixel((0, 0)) == (200, 10, 10)


def test_copy_threshold_holds_on_proof_world_pictures():
    """evaluate's copy threshold, checked on real proof-world pictures: the closest a model can come
    to an instance image (its VAE round trip, also mirrored or noisy) is a copy; fresh drawings of the
    same subjects in the same style almost never are (measured: 1 of 200, fresh max 0.83)."""
    from style_dreambooth.toyworld.scoring import calibrate_copy_threshold

    cal = calibrate_copy_threshold(n_fresh=200)
    for kind in ("VAE round trip", "round trip, mirrored", "round trip + noise"):
        assert cal.flagged(kind) == 1.0, (kind, cal.copies[kind])
    assert cal.false_positive_rate() <= 0.02, cal.summary()
    assert np.median(cal.fresh) < cal.threshold - 0.2  # typical fresh drawings are far below it


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proof_world_sweep_tables_and_wall_time():
    from types import SimpleNamespace

    script = _load_script("proof_world_sweep")
    # Two invocations side by side (one per core), then a short re-read: wall time is their union.
    history = [{"date": "2026-11-26T15:54:28", "seconds": 1647.1}, {"date": "2026-11-26T15:54:34", "seconds": 1592.3},
               {"date": "2026-11-26T16:00:56", "seconds": 6.6}]
    # first starts at 15:27:00.9 and the second ends 6 s after it: 1653.1 s, then 6.6 s more
    assert script.wall_seconds(history) == pytest.approx(1647.1 + 6 + 6.6, abs=0.2)
    assert script.wall_seconds(history[:1] + history[2:]) == pytest.approx(1647.1 + 6.6, abs=0.2)

    def run(name, steps):
        points = [Point(s, "base" if s == 0 else f"step-{s:06d}", {"judge_style_hit": s / 1000}) for s in steps]
        return SimpleNamespace(run=Path(name), points=points)

    lines = script.ablation_tables([run("default", [0, 250, 500, 1000]), run("lr-low", [0, 250, 500]),
                                    run("short", [0, 250])], step=500)
    text = "\n".join(lines)
    assert "### Every run at step 500" in text and "| base model (step 0) |" in text
    assert "| default | - | 0.500 |" in text and "| lr-low | - | 0.500 |" in text
    assert "| short | no model at step 500 |" in text
    assert text.count("### Steps: every checkpoint of") == 1 and "| step 1000 | - | 1.000 |" in text


def test_proof_world_seeds_reuse_key_names_the_base():
    """A kept run is reused for the same settings on the same base, from any checkout of the shipped
    base, and never for another base."""
    script = _load_script("proof_world_seeds")
    shipped_here = {"base_model": str(script.base_model_dir()), "learning_rate": 5e-5, "seed": 1}
    shipped_elsewhere = shipped_here | {"base_model": "/tmp/clone/src/style_dreambooth/toyworld/assets/base",
                                        "seed": 2, "eval_seed0": 1500, "judges": "other.safetensors"}
    other_base = shipped_here | {"base_model": "/work/s6/bases"}
    assert script._comparable(shipped_here) == script._comparable(shipped_elsewhere)
    assert script._comparable(shipped_here)["base_model"] == "shipped"
    assert script._comparable(other_base) != script._comparable(shipped_here)
    assert script._comparable(shipped_here | {"learning_rate": 1e-4}) != script._comparable(shipped_here)
