"""The UI's logic without a browser: workspace confinement, uploads, captions, the generated train form,
and device jobs (queue, stop, re-attach) with real processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_style_images
from style_dreambooth.config import TrainConfig, build_config
from style_dreambooth.errors import UserError
from style_dreambooth.ui import jobs
from style_dreambooth.ui.dataset import inspect_folder, save_uploads, write_caption
from style_dreambooth.ui.form import config_from_form, form_fields, form_values_from_run, write_request
from style_dreambooth.ui.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


# --------------------------------------------------------------------------- workspace


def test_paths_resolve_inside_the_workspace_only(ws, tmp_path):
    assert ws.resolve("datasets/a") == ws.root / "datasets" / "a"
    assert ws.resolve(ws.root / "runs") == ws.root / "runs"
    assert ws.resolve("datasets/../runs/x") == ws.root / "runs" / "x"  # '..' that stays inside is fine
    (ws.root / "datasets" / "link").symlink_to(tmp_path)
    for outside in ("..", "../elsewhere", "/etc/passwd", str(tmp_path), "datasets/link", "datasets/link/x", " "):
        with pytest.raises(UserError, match="outside the workspace|empty"):
            ws.resolve(outside)
    assert ws.folders("datasets") == []  # the symlink out is not offered either


def test_new_folder_names_cannot_carry_paths(ws):
    assert ws.new_folder("runs", "my-style_1.2", "run") == ws.root / "runs" / "my-style_1.2"
    for bad in ("../x", "a/b", "", ".hidden", "x" * 101):
        with pytest.raises(UserError, match="run name"):
            ws.new_folder("runs", bad, "run")


def test_model_field_takes_a_workspace_path_or_a_hub_id(ws):
    (ws.root / "models" / "tiny").mkdir()
    assert ws.model_or_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert ws.model_or_hub_id("models/tiny") == str(ws.root / "models" / "tiny")
    for bad in ("/etc", "../models", "./../x/y"):
        with pytest.raises(UserError, match="outside the workspace"):
            ws.model_or_hub_id(bad)


# --------------------------------------------------------------------------- dataset


def test_inspect_names_unreadable_small_and_duplicate_images(tmp_path):
    folder = write_style_images(tmp_path / "d", n=2)
    (folder / "img9-copy.png").write_bytes((folder / "img0.png").read_bytes())
    Image.new("RGB", (30, 90)).save(folder / "small.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "img1.txt").write_text("a red blob\n")
    infos = {i.path.name: i for i in inspect_folder(folder)}
    assert infos["img0.png"].problems == [] and infos["img1.png"].caption == "a red blob"
    assert infos["img9-copy.png"].problems == ["duplicate of img0.png"]
    assert "smaller than the minimum of 64 pixels" in infos["small.png"].problems[0]
    assert "not a readable image" in infos["broken.jpg"].problems[0] and not infos["broken.jpg"].usable


def test_uploads_are_checked_like_train_and_size_limited(tmp_path):
    src = write_style_images(tmp_path / "src", n=2)
    Image.new("RGB", (20, 20)).save(src / "tiny.png")
    (src / "notes.txt").write_text("hello")
    big = src / "big.png"
    Image.effect_noise((700, 700), 50).convert("RGB").save(big)  # incompressible: > 0.3 MB
    files = [(p, "../../" + p.name) for p in sorted(src.iterdir())]  # a hostile name stays a bare name
    saved, refused = save_uploads(files, tmp_path / "ds", max_mb=0.3)
    assert sorted(p.name for p in saved) == ["img0.png", "img1.png"]
    assert all(p.parent == tmp_path / "ds" for p in saved)
    assert len(refused) == 3
    assert any("larger than the upload limit of 0.3 MB" in r for r in refused)
    assert any("smaller than the minimum" in r for r in refused)
    assert any("'notes.txt' is not an image file" in r for r in refused)
    again, _ = save_uploads(files[1:2], tmp_path / "ds")  # same name again: kept beside, not overwritten
    assert [p.name for p in again] == ["img0-1.png"]


def test_captions_are_written_and_removed(tmp_path):
    image = write_style_images(tmp_path / "d", n=1) / "img0.png"
    write_caption(image, "  a blob  ")
    assert (tmp_path / "d" / "img0.txt").read_text() == "a blob\n"
    write_caption(image, "")
    assert not (tmp_path / "d" / "img0.txt").exists()


# --------------------------------------------------------------------------- train form


def test_form_has_every_config_field_with_its_default_and_help():
    fields = {f.name: f for f in form_fields()}
    assert set(fields) == set(TrainConfig.model_fields) - {"output_dir", "resume_from_checkpoint"}
    assert fields["max_train_steps"].default == "800" and fields["use_8bit_adam"].default is True
    assert fields["learning_rate"].help == TrainConfig.model_fields["learning_rate"].description
    assert fields["method"].choices == ("full", "lora")
    assert fields["mixed_precision"].choices == ("", "no", "fp16", "bf16")
    assert fields["lora_targets"].kind == "list" and fields["lora_targets"].default == ""  # blank: the family's
    assert "to_q" in fields["lora_targets"].help
    assert fields["instance_prompt"].required


def test_form_values_validate_like_the_cli(ws):
    (ws.root / "datasets" / "a").mkdir()
    values = {"instance_dir": "datasets/a", "instance_prompt": "yltcaxe artstyle", "max_train_steps": "12",
              "validation_prompt": "a boy in yltcaxe artstyle\na cat in yltcaxe artstyle", "mixed_precision": "",
              "use_8bit_adam": False, "lora_targets": "to_q,to_k"}
    cfg = config_from_form(ws, "r1", values)
    assert cfg.output_dir == ws.root / "runs" / "r1" and cfg.instance_dir == ws.root / "datasets" / "a"
    assert cfg.max_train_steps == 12 and cfg.mixed_precision is None and cfg.lora_targets == ["to_q", "to_k"]
    assert cfg.validation_prompt == ["a boy in yltcaxe artstyle", "a cat in yltcaxe artstyle"]
    assert cfg.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # The same one-line message as the CLI for the same bad value.
    with pytest.raises(UserError) as from_cli:
        build_config({}, {"instance_dir": "x", "instance_prompt": "p", "output_dir": "o", "resolution": "100"})
    with pytest.raises(UserError) as from_form:
        config_from_form(ws, "r1", {**values, "resolution": "100"})
    assert str(from_form.value) == str(from_cli.value) and "multiple of 8" in str(from_form.value)
    with pytest.raises(UserError, match="outside the workspace"):
        config_from_form(ws, "r1", {**values, "instance_dir": "../a"})
    with pytest.raises(UserError, match="missing required option '--instance-prompt'"):
        config_from_form(ws, "r1", {**values, "instance_prompt": ""})


def test_request_round_trips_into_the_form(ws):
    (ws.root / "datasets" / "a").mkdir()
    cfg = config_from_form(ws, "r1", {"instance_dir": "datasets/a", "instance_prompt": "yltcaxe artstyle",
                                      "seed": "7", "with_prior_preservation": False})
    path = write_request(cfg)
    values = form_values_from_run(path.parent)
    assert values["seed"] == "7" and values["with_prior_preservation"] is False
    assert config_from_form(ws, "r1", values) == cfg


# --------------------------------------------------------------------------- jobs


def _sleeper(seconds: float) -> list[str]:
    """Arguments for the stub below: sleep that long (0: fail at once with exit code 3)."""
    return ["__sleep__", str(seconds)]


@pytest.fixture
def fake_cli(monkeypatch, tmp_path):
    """Workers run `python -m style_dreambooth ARGS`; point them at a stub package that sleeps or fails."""
    stub = tmp_path / "stub" / "style_dreambooth"
    stub.mkdir(parents=True)
    real = Path(jobs.__file__).resolve().parents[1]
    (stub / "__init__.py").write_text(f"__path__.append({str(real)!r})\n")
    (stub / "__main__.py").write_text(
        "import signal, sys, time\n"
        "seconds = float(sys.argv[2])\n"
        "print('stub started', flush=True)\n"
        "try:\n"
        "    time.sleep(seconds)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True); sys.exit(130)\n"
        "sys.exit(3 if seconds == 0 else 0)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(stub.parent))


def _wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_jobs_queue_one_at_a_time_and_stop_cleanly(ws, fake_cli):
    a, b, c = (ws.root / "runs" / n for n in "abc")
    jobs.submit(ws.root, "train", a, _sleeper(60))
    _wait(lambda: jobs.read_job(a, "train").state == "running")
    jobs.submit(ws.root, "train", b, _sleeper(0.5))
    time.sleep(0.05)
    jobs.submit(ws.root, "evaluate", c, _sleeper(0))  # exits 3: failed
    time.sleep(2)
    assert [(j.folder, j.state) for j in jobs.active_jobs(ws.root)] == [(str(a), "running"), (str(b), "queued"),
                                                                        (str(c), "queued")]
    with pytest.raises(UserError, match="already running"):
        jobs.submit(ws.root, "train", a, _sleeper(1))
    jobs.stop(a, "train")  # SIGINT reaches the command: it exits 130
    assert jobs.wait_for(a, "train", 30).state == "stopped"
    assert "interrupted" in jobs.log_tail(jobs.read_job(a, "train"))
    assert jobs.wait_for(b, "train", 30).state == "finished"  # then the queue moves on, in order
    done_c = jobs.wait_for(c, "evaluate", 30)
    assert (done_c.state, done_c.returncode) == ("failed", 3)
    assert jobs.read_job(b, "train").started_at < done_c.started_at
    assert jobs.active_jobs(ws.root) == []


def test_a_queued_job_can_be_stopped_before_it_starts(ws, fake_cli):
    a, b = ws.root / "runs" / "a", ws.root / "runs" / "b"
    jobs.submit(ws.root, "train", a, _sleeper(60))
    jobs.submit(ws.root, "train", b, _sleeper(60))
    _wait(lambda: jobs.read_job(b, "train").worker_pid is not None)
    jobs.stop(b, "train")
    done = jobs.wait_for(b, "train", 30)
    assert (done.state, done.started_at) == ("stopped", None)
    jobs.stop(a, "train")
    assert jobs.wait_for(a, "train", 30).state == "stopped"


def test_a_job_whose_worker_died_shows_as_interrupted(ws):
    folder = ws.root / "runs" / "gone"
    folder.mkdir()
    job = jobs.Job(kind="train", folder=str(folder), argv=["train"], state="running", worker_pid=2**22 + 7,
                   queued_at=time.time() - 3600)
    job.save()
    assert jobs.read_job(folder, "train").shown_state == "interrupted"
    assert jobs.active_jobs(ws.root) == []
    (folder / "ui-train.json").write_text("{torn")
    assert jobs.read_job(folder, "train") is None


def test_sweep_form_builds_a_sweep_command_the_cli_parses(ws):
    from style_dreambooth.sweep import parse_grid
    from style_dreambooth.ui.context import UIContext
    from style_dreambooth.ui.commands import sweep_argv

    ctx = UIContext(ws, 1.0)
    (ws.root / "runs" / "r1").mkdir()
    with pytest.raises(UserError, match="no config.yaml"):
        sweep_argv(ctx, "runs/r1", "s1", [("max_train_steps", "4,8")], [])
    (ws.root / "runs" / "r1" / "config.yaml").write_text("max_train_steps: 4\n")
    argv, out = sweep_argv(ctx, "runs/r1", "s1", [("max_train_steps", " 4,8 "), (None, "1"), ("seed", "")],
                           ["--seeds", "0"])
    assert out == ws.root / "sweeps" / "s1"
    assert argv == ["sweep", "--config", str(ws.root / "runs" / "r1" / "config.yaml"), "--out", str(out),
                    "--seeds", "0", "--grid", "max_train_steps=4,8"]
    assert parse_grid([argv[-1]]) == {"max_train_steps": [4, 8]}
    with pytest.raises(UserError, match="at least one key"):
        sweep_argv(ctx, "runs/r1", "s1", [("seed", " ")], [])
    with pytest.raises(UserError, match="outside the workspace"):
        sweep_argv(ctx, "../r1", "s1", [("seed", "1")], [])
    with pytest.raises(UserError, match="sweep name"):
        sweep_argv(ctx, "runs/r1", "../s1", [("seed", "1")], [])


def test_a_command_that_outlives_its_worker_still_counts_and_stops(ws, fake_cli):
    import os
    import signal

    folder = ws.root / "runs" / "orphan"
    jobs.submit(ws.root, "train", folder, _sleeper(60))
    _wait(lambda: jobs.read_job(folder, "train").child_pid is not None)
    job = jobs.read_job(folder, "train")
    os.kill(job.worker_pid, signal.SIGKILL)  # the worker dies; `train` runs on
    time.sleep(0.5)
    assert jobs.read_job(folder, "train").is_alive()  # so no second training can start in the folder
    with pytest.raises(UserError, match="already running"):
        jobs.submit(ws.root, "train", folder, _sleeper(1))
    jobs.stop(folder, "train")
    _wait(lambda: not jobs.read_job(folder, "train").is_alive())
    assert "interrupted" in jobs.log_tail(jobs.read_job(folder, "train"))


def test_generate_form_stacks_loras_with_scales_inside_the_workspace(ws):
    from style_dreambooth.sampling.generate import parse_lora_spec
    from style_dreambooth.ui.commands import generate_argv
    from style_dreambooth.ui.context import UIContext

    ctx = UIContext(ws, 1.0)
    for rel in ("runs/a/model/lora.safetensors", "loras/b.safetensors"):
        (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / rel).write_bytes(b"")
    argv, out = generate_argv(ctx, "runs/a", "best", [("runs/a/model/lora.safetensors", 0.8), ("loras/b.safetensors", -0.5)],
                              "a boy in yltcaxe artstyle", "", 2, 7, 20, 6.0, "ddim")
    assert out.parent == ws.root / "generated" and out.name.startswith("a-")
    assert argv[argv.index("--checkpoint") + 1] == "best" and argv[argv.index("--scheduler") + 1] == "ddim"
    specs = [argv[i + 1] for i, a in enumerate(argv) if a == "--lora"]
    assert [parse_lora_spec(s) for s in specs] == [(ws.root / "runs/a/model/lora.safetensors", 0.8),
                                                  (ws.root / "loras/b.safetensors", -0.5)]
    plain, _ = generate_argv(ctx, "runs/a", "final", [], "p", "", 1, 0, 1, 1.0, "dpm++")
    assert "--checkpoint" not in plain and "--lora" not in plain
    auto, _ = generate_argv(ctx, "runs/a", "final", [], "p", "", 1, 0, 1, None, "auto")  # the family's defaults
    assert "--guidance" not in auto and "--scheduler" not in auto
    with pytest.raises(UserError, match="outside the workspace"):
        generate_argv(ctx, "runs/a", None, [("../b.safetensors", 1.0)], "p", "", 1, 0, 1, 1.0, "dpm++")
    with pytest.raises(UserError, match="prompt is empty"):
        generate_argv(ctx, "runs/a", None, [], "  ", "", 1, 0, 1, 1.0, "dpm++")
