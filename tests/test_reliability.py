"""Issue #16: no run is ever lost or mixed, and each of these user errors is one line.

A finished run survives a re-run that diverges, hits a full disk or is killed; two processes never
write one run folder, sweep folder or class-image cache key at once; the identifier check tells the truth.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

from clihelp import run_cli, train_args
from conftest import write_style_images
from test_bad_input import _assert_user_error

WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def run_train(tmp_path, tiny_model, cache_env, capsys):
    def run(*extra, out=None, instance=None):
        out = out or tmp_path / "out"
        instance = instance or write_style_images(tmp_path / "instance", n=2)
        return run_cli(capsys, *train_args(tiny_model, instance, out, *extra))
    return run


@pytest.fixture
def finished_run(tmp_path, run_train):
    """A finished run with a checkpoint; returns (folder, a snapshot of what must survive)."""
    out = tmp_path / "out"
    code, _, err = run_train("--checkpointing-steps", "2", out=out)
    assert code == 0, err
    return out, _snapshot(out)


def _snapshot(out) -> dict:
    return {
        "weights": (out / WEIGHTS).read_bytes(),
        "config": (out / "config.yaml").read_text(),
        "metrics": (out / "metrics.jsonl").read_text(),
        "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir()),
    }


def _assert_intact(out, before: dict) -> None:
    assert _snapshot(out) == before
    assert not (out / ".previous-run").exists() and not (out / ".model.tmp").exists()


def _disk_full(filename: str = "") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", filename or None)


# ----------------------------------------------------------------- 1. --overwrite keeps the old run


def test_overwrite_that_diverges_keeps_the_finished_run(finished_run, run_train):
    out, before = finished_run
    code, _, err = run_train("--overwrite", "--learning-rate", "1e30", "--no-8bit-adam", "--logging-steps", "1",
                             out=out)
    _assert_user_error(code, err, "diverged")
    _assert_intact(out, before)


def test_overwrite_with_a_full_disk_at_the_final_save_keeps_the_finished_run(finished_run, run_train, monkeypatch):
    from style_dreambooth.training.trainables import FullTrainables

    out, before = finished_run

    def full(self, folder, base, modules):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "half.safetensors").write_bytes(b"x" * 100)
        raise _disk_full(str(folder / "unet" / "half.safetensors"))

    monkeypatch.setattr(FullTrainables, "save_final", full)
    code, _, err = run_train("--overwrite", "--seed", "5", out=out)
    _assert_user_error(code, err, "disk full", "half.safetensors", "needs about", "MiB", "previous run", "kept")
    _assert_intact(out, before)


@pytest.mark.slow
def test_overwrite_killed_during_the_final_save_keeps_the_finished_run(finished_run, tmp_path, tiny_model, capsys):
    """kill -9 mid-save: the old model never leaves model/, and the next command puts the rest back."""
    out, before = finished_run
    child = textwrap.dedent("""
        import os, signal, sys
        from style_dreambooth.training.trainables import FullTrainables

        def killed(self, folder, base, modules):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "partial").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)

        FullTrainables.save_final = killed
        from style_dreambooth.cli import main
        main(sys.argv[1:])
    """)
    args = train_args(tiny_model, tmp_path / "instance", out, "--overwrite", "--seed", "5")
    proc = subprocess.run([sys.executable, "-c", child, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / WEIGHTS).read_bytes() == before["weights"], "the old model stays loadable during the re-run"
    assert (out / ".previous-run").is_dir()
    # The next command into the folder is not blocked by the dead run's lock and restores the old run.
    code, _, err = run_cli(capsys, *train_args(tiny_model, tmp_path / "instance", out))
    _assert_user_error(code, err, "finished run", "--overwrite")
    _assert_intact(out, before)
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] != 5


def test_a_stopped_fresh_run_keeps_its_checkpoints_and_drops_worthless_leftovers(tmp_path, run_train, monkeypatch):
    """Only a run of value is set aside: leftovers of a run stopped before its first checkpoint are removed,
    and a fresh run stopped later keeps its own checkpoints (nothing older is put back over them)."""
    from style_dreambooth.training.trainables import FullTrainables

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')

    def stopped(self, folder, base, modules):
        raise KeyboardInterrupt

    monkeypatch.setattr(FullTrainables, "save_final", stopped)
    code, _, err = run_train("--checkpointing-steps", "2", out=out)
    assert code == 130, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert '"loss": 9.0' not in (out / "metrics.jsonl").read_text()
    assert not (out / ".previous-run").exists()


def test_an_installed_model_is_kept_when_killed_before_the_old_run_was_dropped(finished_run):
    """Killed between installing the new model and removing the set-aside: the new run is complete and wins."""
    from style_dreambooth.files import replace_folder
    from style_dreambooth.training.run_folder import RunFolder

    out, before = finished_run
    run = RunFolder(out)
    run.set_aside_previous()
    assert not (out / "checkpoints").exists() and (out / WEIGHTS).read_bytes() == before["weights"]
    staged = out / ".model.tmp"
    (staged / "unet").mkdir(parents=True)
    (staged / "model_index.json").write_text("{}")
    replace_folder(staged, run.model)  # the new model is in place; then the process dies
    run.tidy()
    assert not (out / ".previous-run").exists() and not (out / "checkpoints").exists()
    assert (out / "model" / "model_index.json").read_text() == "{}"


# ----------------------------------------------------------------- 2. one process per folder


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from style_dreambooth.locks import hold_folder

    with hold_folder(Path(sys.argv[1]), "test"):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def hold_lock():
    """Lock a folder from another process, as a running training would; yields a starter returning it."""
    procs = []

    def start(folder):
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_run_or_resume_into_a_running_folder_is_refused_and_a_dead_holder_does_not_block(
        tmp_path, run_train, hold_lock):
    out = tmp_path / "out"
    holder = hold_lock(out)
    code, _, err = run_train(out=out)
    _assert_user_error(code, err, str(out), f"pid {holder.pid}", "in use")
    code, _, err = run_train("--resume-from-checkpoint", "latest", out=out)
    _assert_user_error(code, err, f"pid {holder.pid}")
    assert not (out / "metrics.jsonl").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, _, err = run_train(out=out)
    assert code == 0, err


def test_a_running_sweep_folder_is_refused(tmp_path, tiny_model, cache_env, hold_lock):
    from style_dreambooth.errors import UserError
    from style_dreambooth.sweep import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"base_model": str(tiny_model), "instance_dir": str(tmp_path),
                                    "instance_prompt": "yltcaxe artstyle", "output_dir": str(tmp_path / "x")}))
    holder = hold_lock(tmp_path / "sweep")
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        run_sweep(base, {"seed": [1, 2]}, tmp_path / "sweep")


def test_two_runs_filling_one_class_image_cache_key_generate_each_image_once(tmp_path):
    from test_class_cache import FakeGenerator, spec

    from style_dreambooth.data.class_cache import ensure_class_images

    gen = FakeGenerator()
    slow = lambda prompt, seeds: time.sleep(0.05) or gen(prompt, seeds)  # noqa: E731
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_class_images(spec(), 6, tmp_path, lambda: slow,
                                                                                  batch_size=2)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for call in gen.calls for s in call) == [1337 + i for i in range(6)], "each image made once"
    assert results[0] == results[1] and all(p.is_file() for p in results[0])


# ----------------------------------------------------------------- 3. full disk


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one_also_on_resume(tmp_path, run_train, monkeypatch):
    from style_dreambooth.training.trainables import FullTrainables

    out = tmp_path / "out"
    real = FullTrainables.save_weights
    calls = []

    def second_fails(self, folder, modules):
        calls.append(folder)
        if len(calls) > 1:  # safetensors reports a full disk in its own error type, with the OS text
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                               'message: "No space left on device" })')
        real(self, folder, modules)

    monkeypatch.setattr(FullTrainables, "save_weights", second_fails)
    code, _, err = run_train("--checkpointing-steps", "2", "--max-train-steps", "6", out=out)
    _assert_user_error(code, err, "disk full", "step-000004", "needs about", "step-000002", "is kept",
                       "--resume-from-checkpoint latest")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"], "no half checkpoint left"
    # Resumed while the disk is still full: the same one line, the checkpoint still there.
    code, _, err = run_train("--checkpointing-steps", "2", "--max-train-steps", "6",
                             "--resume-from-checkpoint", "latest", out=out)
    _assert_user_error(code, err, "disk full", "step-000002", "is kept")
    monkeypatch.setattr(FullTrainables, "save_weights", real)
    code, _, err = run_train("--checkpointing-steps", "2", "--max-train-steps", "6",
                             "--resume-from-checkpoint", "latest", out=out)
    assert code == 0, err


def test_a_full_disk_when_writing_the_run_config_is_one_line(tmp_path, run_train, monkeypatch):
    from style_dreambooth.training.run_folder import RunFolder

    def full(self, data):
        raise _disk_full(str(self.config))

    monkeypatch.setattr(RunFolder, "write_config", full)
    code, _, err = run_train(out=tmp_path / "out")
    _assert_user_error(code, err, "disk full", "config.yaml", "free", "no checkpoint")


# ----------------------------------------------------------------- 4. a checkpoint of the other method


@pytest.mark.parametrize("method,other_files", [("full", ["lora.safetensors"]), ("lora", ["unet/config.json"])])
def test_a_checkpoint_of_the_other_method_is_refused(tmp_path, run_train, method, other_files):
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step-000002"
    for name in [*other_files, "training_state.pt"]:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(b"x")
    other = "lora" if method == "full" else "full"
    code, _, err = run_train("--method", method, "--resume-from-checkpoint", "latest", out=out)
    _assert_user_error(code, err, str(ckpt), f"method {other}", f"method {method}")


# ----------------------------------------------------------------- 5. file modes


def test_written_weights_get_the_usual_mode(tmp_path, run_train):
    import torch

    from style_dreambooth.training.lora_file import write_lora_file

    old = os.umask(0o022)
    try:
        path = write_lora_file(tmp_path / "lora.safetensors", {"a": torch.zeros(2)}, {"k": "v"})
        assert oct(path.stat().st_mode & 0o777) == oct(0o644)
        code, _, err = run_train(out=tmp_path / "out")
        assert code == 0, err
        for f in (tmp_path / "out" / "model").rglob("*"):
            assert f.stat().st_mode & 0o777 == (0o755 if f.is_dir() else 0o644), f
    finally:
        os.umask(old)


# ----------------------------------------------------------------- 6. class-image cache key


def test_the_sample_batch_size_is_part_of_the_cache_key(tmp_path):
    from test_class_cache import FakeGenerator, spec

    from style_dreambooth.data.class_cache import ensure_class_images

    assert spec(batch_size=2).key() != spec(batch_size=4).key()
    a = ensure_class_images(spec(batch_size=2), 3, tmp_path, FakeGenerator)
    b = ensure_class_images(spec(batch_size=3), 3, tmp_path, FakeGenerator)
    assert a[0].parent != b[0].parent


def test_training_keys_its_class_images_on_the_sample_batch_size(tmp_path, run_train, cache_env):
    for size in ("1", "2"):
        code, _, err = run_train("--sample-batch-size", size, "--max-train-steps", "1", out=tmp_path / f"o{size}")
        assert code == 0, err
    manifests = [yaml.safe_load(p.read_text()) for p in cache_env.rglob("manifest.json")]
    assert sorted(m["spec"]["batch_size"] for m in manifests) == [1, 2]


# ----------------------------------------------------------------- 7-9. one-line errors


def test_a_resolution_that_cannot_fit_is_refused_before_anything(tmp_path, run_train):
    from style_dreambooth.training.memory import min_bytes_per_image

    code, _, err = run_train("--resolution", "100000", out=tmp_path / "out")
    _assert_user_error(code, err, "--resolution 100000", "cannot fit", "TiB", "this machine has")
    assert not (tmp_path / "out").exists()
    assert min_bytes_per_image(1024) < 2**30, "real sizes must never be refused"


BAD = "a boy \udcff in yltcaxe artstyle"  # what Python makes of the byte 0xff in argv


@pytest.mark.parametrize("command", ["train", "generate", "token"])
def test_prompts_that_are_not_utf8_are_one_line(tmp_path, tiny_model, instance_dir, capsys, command):
    args = {
        "train": train_args(tiny_model, instance_dir, tmp_path / "out", "--validation-prompt", BAD),
        "generate": ["generate", "--model", tiny_model, "--prompt", BAD, "--out", tmp_path / "gen"],
        "token": ["token", BAD],
    }[command]
    code, _, err = run_cli(capsys, *args)
    _assert_user_error(code, err, "not UTF-8", "\\xff")
    assert not (tmp_path / "out").exists() and not (tmp_path / "gen").exists()


def test_a_path_that_is_not_utf8_but_exists_is_accepted(tmp_path):
    from style_dreambooth.cli import refuse_undecodable

    odd = tmp_path / os.fsdecode(b"photos-\xff")
    odd.mkdir()
    refuse_undecodable(["--instance-dir", str(odd)])
    with pytest.raises(Exception, match="not UTF-8"):
        refuse_undecodable([f"--prompt={BAD}"])


@pytest.mark.parametrize("word", ["", "  "])
def test_token_of_nothing_is_an_error(capsys, word):
    code, _, err = run_cli(capsys, "token", word)
    _assert_user_error(code, err, "WORD is empty")


# ----------------------------------------------------------------- 11-12. the identifier check


@pytest.fixture(scope="module")
def tokenizer():
    from style_dreambooth.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


LONG = "a boy with " + ", ".join(f"a {c} hat" for c in ["red", "green", "blue", "black", "white"] * 6)


def test_an_identifier_past_the_token_limit_is_refused(tokenizer):
    from style_dreambooth.errors import UserError
    from style_dreambooth.models.tokenizer import check_instance_prompt_fits, find_identifier

    prompt = f"{LONG} in yltcaxe artstyle"
    ident = find_identifier(prompt, "artstyle")
    assert ident == "boy", "the first new word is taken as identifier, so the check must look past it"
    with pytest.raises(UserError, match=r"'yltcaxe' ends at token \d+ and would never be trained"):
        check_instance_prompt_fits(tokenizer, "the instance prompt", prompt, "artstyle", ident)
    check_instance_prompt_fits(tokenizer, "the instance prompt", f"yltcaxe artstyle, {LONG}", "artstyle", "yltcaxe")


def test_train_refuses_a_cut_identifier_and_warns_of_cut_captions(tmp_path, run_train, caplog):
    code, _, err = run_train("--instance-prompt", f"{LONG} in yltcaxe artstyle", out=tmp_path / "a")
    _assert_user_error(code, err, "yltcaxe", "CLIP tokens", "never be trained")
    assert not (tmp_path / "a").exists()
    instance = write_style_images(tmp_path / "captioned", n=2)
    (instance / "img0.txt").write_text(LONG)
    with caplog.at_level(logging.WARNING, logger="style_dreambooth"):
        code, _, err = run_train("--max-train-steps", "1", "--no-prior-preservation", out=tmp_path / "b",
                                 instance=instance)
    assert code == 0, err
    cut = [r.getMessage() for r in caplog.records if "CLIP tokens" in r.getMessage()]
    assert len(cut) == 1 and "img0.png" in cut[0] and "reads only the first 75" in cut[0]


@pytest.mark.parametrize("word,good,common", [("painting", False, True), ("sks", True, False),
                                              ("ohwx", True, False), ("yltcaxe", False, False)])
def test_identifier_rarity_is_judged_by_token_id(tokenizer, word, good, common):
    from style_dreambooth.models.tokenizer import analyze_identifier, format_identifier_report

    report = analyze_identifier(tokenizer, word)
    assert (report.is_good, report.is_common) == (good, common)
    text = format_identifier_report(report)
    if common:
        assert "common word" in text and "good" not in text
        assert report.suggestions and report.suggestions[0] in text
    if good:
        assert "rare" in text and "good" in text


def test_train_warns_of_a_common_word_identifier(tmp_path, run_train, caplog):
    with caplog.at_level(logging.WARNING, logger="style_dreambooth"):
        code, _, err = run_train("--instance-prompt", "a painting", "--no-prior-preservation", "--max-train-steps",
                                 "1", out=tmp_path / "o")
    assert code == 0, err
    assert any("'painting'" in r.getMessage() and "common word" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


# ----------------------------------------------------------------- smaller


def test_a_symlink_loop_is_named_a_broken_link(tmp_path, run_train):
    instance = write_style_images(tmp_path / "inst", n=2)
    (instance / "a.png").symlink_to(instance / "b.png")
    (instance / "b.png").symlink_to(instance / "a.png")
    code, _, err = run_train(instance=instance)
    _assert_user_error(code, err, "a.png", "broken link")


def test_unreadable_photo_formats_are_skipped_with_a_warning(tmp_path, caplog):
    from style_dreambooth.data.images import list_images

    instance = write_style_images(tmp_path / "inst", n=1)
    (instance / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")
    with caplog.at_level(logging.INFO, logger="style_dreambooth"):
        assert [p.name for p in list_images(instance)] == ["img0.png"]
    skipped = [r for r in caplog.records if "phone.heic" in r.getMessage()]
    assert skipped and skipped[0].levelno == logging.WARNING and "HEIC" in skipped[0].getMessage()


def test_avif_trains_where_pillow_reads_it(tmp_path):
    from PIL import Image, features

    from style_dreambooth.data.images import list_images

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    instance = write_style_images(tmp_path / "inst", n=1)
    Image.open(instance / "img0.png").save(instance / "img1.avif")
    assert [p.name for p in list_images(instance)] == ["img0.png", "img1.avif"]
