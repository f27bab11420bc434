"""evaluate, checkpoint choice in generate, sweep and the HTML report on tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from clihelp import run_cli, train_args

EVAL = ["--seeds", "0,1", "--steps", "2", "--clip", "none", "--dino", "none"]


def referenced_files(report: Path) -> list[Path]:
    text = report.read_text()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', text)
    return [report.parent / r for r in refs]


def test_evaluate_run_then_generate_best(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--checkpointing-steps", "2"))[0] == 0
    prompts = tmp_path / "subjects.txt"
    prompts.write_text("a star\n# comment\na fish\n")
    code, out, err = run_cli(capsys, "evaluate", run, "--prompts", prompts, *EVAL)
    assert code == 0, err
    assert "best checkpoint:" in out and "report:" in out
    summary = json.loads((run / "eval" / "metrics.json").read_text())
    assert [p["name"] for p in summary["points"]] == ["base", "step-000002", "final"]
    assert [p["step"] for p in summary["points"]] == [0, 2, 4]
    for point in summary["points"]:
        m = point["metrics"]
        for key in ("style_distance", "palette", "texture", "edges", "style_distance_no_token", "diversity",
                    "copy_rate", "max_instance_similarity"):
            assert isinstance(m[key], float), key
        assert m["clip_t"] is None and m["dino"] is None  # disabled: reported, never faked
    assert "prior_drift" in summary["points"][1]["metrics"]
    assert summary["points"][0]["metrics"].get("prior_drift") == 0.0
    assert summary["choice"]["name"] in ("step-000002", "final")
    assert summary["settings"]["prompts"]["token"] == ["a star, yltcaxe artstyle", "a fish, yltcaxe artstyle"]
    images = sorted((run / "eval" / "step-000002").glob("*.png"))
    assert len(images) == (2 + 2 + 1) * 2
    report = run / "report.html"
    refs = referenced_files(report)
    assert refs and all(p.is_file() for p in refs), [p for p in refs if not p.is_file()]
    assert "chosen" in report.read_text()

    # A second evaluate reuses the stored images and scores.
    before = {p: p.stat().st_mtime_ns for p in images}
    assert run_cli(capsys, "evaluate", run, "--prompts", prompts, *EVAL)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in images} == before
    # ... and still says why CLIP and DINO are missing
    again = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(summary["skipped"]) >= {"clip_t", "clip_i", "dino"}
    assert again["skipped"] == summary["skipped"]

    code, _, err = run_cli(capsys, "generate", "--model", run, "--checkpoint", "best", "--prompt", "x", "-n", "1",
                           "--steps", "2", "--out", tmp_path / "g")
    assert code == 0, err


def test_generate_best_needs_evaluation(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--max-train-steps", "1"))[0] == 0
    code, _, err = run_cli(capsys, "generate", "--model", run, "--checkpoint", "best", "--prompt", "x",
                           "--out", tmp_path / "g")
    assert code == 2 and "evaluate" in err


def sweep_base(tmp_path, tiny_model, instance_dir, **overrides) -> Path:
    """A sweep's base config for the tiny model."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "instance_dir": str(instance_dir), "instance_prompt": "yltcaxe artstyle",
        "class_prompt": "artstyle", "output_dir": str(tmp_path / "ignored"), "resolution": 64,
        "num_class_images": 2, "class_inference_steps": 2, "validation_steps": 0, "checkpointing_steps": 1,
        "learning_rate": 1e-3, **overrides,
    }))
    return base


def test_sweep_runs_grid_resumes_and_reports(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    base = sweep_base(tmp_path, tiny_model, instance_dir)
    out = tmp_path / "sweep"
    args = ["sweep", "--config", base, "--grid", "max_train_steps=2,3", "--grid", "learning_rate=1e-3",
            "--out", out, "--seeds", "0", "--steps", "2", "--clip", "none", "--dino", "none"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["max_train_steps=2__learning_rate=0.001", "max_train_steps=3__learning_rate=0.001"]
    manifests = list(cache_env.rglob("manifest.json"))
    assert len(manifests) == 1, "runs with the same class settings share one class-image cache"
    report = out / "report.html"
    refs = referenced_files(report)
    assert all(p.is_file() for p in refs)
    text = report.read_text()
    assert text.count("<h2>Run ") == 2 and "style_distance.png" in text

    # Interrupt one run (its final model lost, checkpoints kept) and re-run the sweep: it resumes
    # that run from its latest checkpoint and skips the finished one.
    import shutil

    long_run = out / "runs" / runs[1]
    shutil.rmtree(long_run / "model")
    finished_mtime = (out / "runs" / runs[0] / "model" / "model_index.json").stat().st_mtime_ns
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert (long_run / "model" / "model_index.json").is_file()
    steps = [json.loads(l)["step"] for l in (long_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "runs" / runs[0] / "model" / "model_index.json").stat().st_mtime_ns == finished_mtime

    code, _, err = run_cli(capsys, "sweep", "--config", base, "--grid", "learning_rat=1", "--out", out)
    assert code == 2 and "learning_rat" in err


def test_sweep_runs_file_names_variants_and_combines_with_grid(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    base = sweep_base(tmp_path, tiny_model, instance_dir, checkpointing_steps=0, max_train_steps=1)
    variants = tmp_path / "ablation.yaml"
    variants.write_text("default:\nfrozen te: {train_text_encoder: false}\nlonger: {max-train-steps: 2}\n")
    out = tmp_path / "sweep"
    code, _, err = run_cli(capsys, "sweep", "--config", base, "--runs", variants, "--out", out,
                           "--seeds", "0", "--steps", "2", "--clip", "none", "--dino", "none")
    assert code == 0, err
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["default", "frozen-te", "longer"]
    saved = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
             for name in ("default", "frozen-te", "longer")}
    assert [saved[n]["train_text_encoder"] for n in ("default", "frozen-te")] == [True, False]
    assert [saved[n]["max_train_steps"] for n in ("default", "longer")] == [1, 2]
    text = (out / "report.html").read_text()
    assert text.count("<h2>Run ") == 3 and "frozen-te" in text
    # The base model is evaluated once for the whole sweep; each run's report gets a copy.
    (shared,) = (out / "base-eval").iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in shared.glob("*.png")}
    assert stamps
    for name in ("default", "frozen-te", "longer"):
        copies = {p.name: p.stat().st_mtime_ns for p in (out / "runs" / name / "eval" / "base").glob("*.png")}
        assert copies == stamps, name

    from style_dreambooth.sweep import read_runs_file, sweep_plan

    plan = sweep_plan({"learning_rate": [1e-3, 2e-3]}, read_runs_file(variants))
    assert [name for name, _ in plan][:2] == ["default__learning_rate=0.001", "default__learning_rate=0.002"]
    assert plan[3][1] == {"train_text_encoder": False, "learning_rate": 2e-3}

    # A stored image lost from a run's evaluation (e.g. an interrupted copy) is generated again, not a crash.
    lost = sorted((out / "runs" / "frozen-te" / "eval" / "base").glob("*.png"))[0]
    lost.unlink()
    code, _, err = run_cli(capsys, "sweep", "--config", base, "--runs", variants, "--out", out,
                           "--seeds", "0", "--steps", "2", "--clip", "none", "--dino", "none")
    assert code == 0, err
    assert lost.is_file()
    code, _, err = run_cli(capsys, "sweep", "--config", base, "--runs", variants, "--grid", "train_text_encoder=true",
                           "--out", out)
    assert code == 2 and "frozen-te" in err and "train_text_encoder" in err

    for text, needle in (("- just a list\n", "must map run names"), ("a: {learning_rat: 1}\n", "learning_rat"),
                         ("a: 3\n", "run 'a'"), ("a: [\n", "not valid YAML"), ("a: {output_dir: x}\n", "output_dir"),
                         ("a: {}\nb: {}\na: {learning_rate: 1}\n", "'a' appears twice"),
                         ("'..': {}\n", "not a usable folder name"), ("A: {}\na: {}\n", "clashes")):
        variants.write_text(text)
        code, _, err = run_cli(capsys, "sweep", "--config", base, "--runs", variants, "--out", out)
        assert code == 2 and needle in err, (text, err)
    code, _, err = run_cli(capsys, "sweep", "--config", base, "--out", out)
    assert code == 2 and "--grid" in err
