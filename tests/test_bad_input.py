"""Every user mistake: a one-line error naming the culprit, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations


import numpy as np
import pytest
import yaml
from PIL import Image

from clihelp import run_cli, train_args
from conftest import write_style_images


def _assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def run_train(tmp_path, tiny_model, cache_env, capsys):
    def run(instance_dir, *extra, out=None):
        out = out or tmp_path / "out"
        return run_cli(capsys, *train_args(tiny_model, instance_dir, out, "--max-train-steps", "1", *extra))
    return run


def test_missing_instance_dir(tmp_path, run_train):
    code, _, err = run_train(tmp_path / "nope")
    _assert_user_error(code, err, str(tmp_path / "nope"))
    assert not (tmp_path / "out").exists()


def test_empty_instance_dir(tmp_path, run_train):
    (tmp_path / "empty").mkdir()
    code, _, err = run_train(tmp_path / "empty")
    _assert_user_error(code, err, "empty", "no usable images")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_image(tmp_path, run_train, kind):
    folder = write_style_images(tmp_path / "inst")
    bad = folder / "bad.png"
    if kind == "truncated":
        data = (folder / "img0.png").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(500))
    code, _, err = run_train(folder)
    _assert_user_error(code, err, "bad.png")
    assert not (tmp_path / "out").exists()


def test_non_image_files_are_ignored_unless_nothing_is_left(tmp_path, run_train, caplog):
    folder = write_style_images(tmp_path / "inst", n=2)
    (folder / "notes.md").write_text("hello")
    code, _, err = run_train(folder)
    assert code == 0, err
    assert "notes.md" in caplog.text
    only = tmp_path / "only"
    only.mkdir()
    (only / "notes.md").write_text("hello")
    code, _, err = run_train(only, out=tmp_path / "out2")
    _assert_user_error(code, err, str(only))


def test_small_image(tmp_path, run_train):
    folder = write_style_images(tmp_path / "inst", n=2)
    Image.new("RGB", (48, 200), "red").save(folder / "small.png")
    code, _, err = run_train(folder)
    _assert_user_error(code, err, "small.png", "48x200")


def test_unknown_config_key_and_bad_values(tmp_path, instance_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"instance_dir": str(instance_dir), "instance_prompt": "x y",
                                   "output_dir": str(tmp_path / "o"), "learning_rat": 1e-6}))
    code, _, err = run_cli(capsys, "train", "--config", cfg)
    _assert_user_error(code, err, "learning_rat", "learning_rate")
    cfg.write_text("instance_dir: [unclosed\n")
    code, _, err = run_cli(capsys, "train", "--config", cfg)
    _assert_user_error(code, err, str(cfg), "YAML")
    base = ["train", "--instance-dir", instance_dir, "--instance-prompt", "x y", "--output-dir", tmp_path / "o"]
    code, _, err = run_cli(capsys, *base, "--learning-rate", "fast")
    _assert_user_error(code, err, "learning_rate", "fast")
    code, _, err = run_cli(capsys, *base, "--learning-rate", "-1")
    _assert_user_error(code, err, "learning_rate")
    code, _, err = run_cli(capsys, *base, "--mixed-precision", "fp8")
    _assert_user_error(code, err, "mixed_precision", "fp8")
    code, _, err = run_cli(capsys, *base, "--no-such-flag", "1")
    _assert_user_error(code, err, "--no-such-flag")
    code, _, err = run_cli(capsys, "train", "--instance-dir", instance_dir, "--output-dir", tmp_path / "o")
    _assert_user_error(code, err, "--instance-prompt")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(tmp_path, run_train, instance_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_train(instance_dir, out=blocker / "run")
    _assert_user_error(code, err, str(blocker / "run"))
    code, _, err = run_train(instance_dir, out=blocker)
    _assert_user_error(code, err, str(blocker))
    assert blocker.read_text() == "x"


def test_finished_run_is_protected(tmp_path, run_train, instance_dir):
    out = tmp_path / "out"
    assert run_train(instance_dir, out=out)[0] == 0
    before = (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    code, _, err = run_train(instance_dir, out=out)
    _assert_user_error(code, err, str(out), "--overwrite")
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    (out / "my-notes.txt").write_text("keep me")
    code, _, err = run_train(instance_dir, "--overwrite", "--seed", "5", out=out)
    assert code == 0, err
    assert (out / "my-notes.txt").read_text() == "keep me", "--overwrite removes only run artefacts"
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5


def test_base_model_not_found_offline(tmp_path, instance_dir, cache_env, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for missing in ("nobody-here/no-such-model", str(tmp_path / "no_model_dir")):
        code, _, err = run_cli(capsys, *train_args(missing, instance_dir, tmp_path / "out"))
        _assert_user_error(code, err, missing)
        assert not (tmp_path / "out").exists()


def test_resume_latest_without_checkpoint(tmp_path, run_train, instance_dir):
    code, _, err = run_train(instance_dir, "--resume-from-checkpoint", "latest")
    _assert_user_error(code, err, "latest", "checkpoint")
    assert not (tmp_path / "out").exists()


def test_fp16_on_cpu_is_refused(tmp_path, run_train, instance_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_train(instance_dir, "--mixed-precision", "fp16")
    _assert_user_error(code, err, "fp16")


def test_generate_bad_inputs(tmp_path, tiny_model, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "g")
    _assert_user_error(code, err, str(tmp_path / "none"))
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "x", "--checkpoint", "latest",
                           "--out", tmp_path / "g")
    _assert_user_error(code, err, "--checkpoint")
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "x", "--width", "70",
                           "--out", tmp_path / "g")
    _assert_user_error(code, err, "--width", "70")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    for extra, needles in (
        (["--guidance", "nan"], ["--guidance", "nan"]),
        (["--seed", str(2**64)], ["--seed", str(2**64)]),
        (["--width", "100000"], ["--width", "100000"]),
        (["--lora", junk], [str(junk), "not a readable"]),
        (["--lora", f"{junk}:strong"], ["strong", "not a number"]),
        (["--lora", f"{junk}:nan"], ["finite"]),
    ):
        code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "x", "-n", "1", "--steps", "1",
                               "--out", tmp_path / "g", *[str(e) for e in extra])
        _assert_user_error(code, err, *needles)
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "x", "-n", "1", "--steps", "1",
                           "--out", tmp_path / "g2")
    assert code == 0, err
    first = (tmp_path / "g2" / "000000.png").read_bytes()
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "y", "-n", "1", "--steps", "1",
                           "--out", tmp_path / "g2")
    _assert_user_error(code, err, "000000.png", "--overwrite")
    assert (tmp_path / "g2" / "000000.png").read_bytes() == first
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "y", "-n", "1", "--steps", "1",
                           "--out", tmp_path / "g2", "--overwrite")
    assert code == 0 and (tmp_path / "g2" / "000000.png").read_bytes() != first
    code, _, err = run_cli(capsys, "random-model", "--seed", str(2**64), tmp_path / "m")
    _assert_user_error(code, err, "--seed")
    assert not (tmp_path / "m").exists()


def test_empty_instance_prompt_is_named(tmp_path, run_train, instance_dir, capsys):
    code, _, err = run_cli(capsys, "train", "--instance-dir", instance_dir, "--instance-prompt", " ",
                           "--output-dir", tmp_path / "out")
    _assert_user_error(code, err, "'instance_prompt'", "must not be empty")
    assert len(err) < 200 and "Value error" not in err


@pytest.mark.parametrize("flag,value", [("--learning-rate", "inf"), ("--prior-loss-weight", "nan"),
                                        ("--text-encoder-lr", "-inf"), ("--seed", str(2**64))])
def test_non_finite_and_out_of_range_numbers_are_refused(tmp_path, run_train, instance_dir, flag, value):
    code, _, err = run_train(instance_dir, flag, value)
    _assert_user_error(code, err, flag.lstrip("-").replace("-", "_"), value)
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_stops_without_saving_a_model(tmp_path, run_train, instance_dir):
    code, _, err = run_train(instance_dir, "--learning-rate", "1e30", "--max-train-steps", "3", "--no-8bit-adam",
                             "--logging-steps", "1")
    _assert_user_error(code, err, "diverged at step", "--learning-rate")
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("mode", ["CMYK", "P", "I;16", "RGBA", "EXIF"])
def test_unusual_image_modes_train(tmp_path, run_train, mode):
    from PIL import Image as PILImage

    folder = write_style_images(tmp_path / "inst", n=1)
    rgb = PILImage.open(folder / "img0.png").convert("RGB")
    if mode == "CMYK":
        rgb.convert("CMYK").save(folder / "x.jpg")
    elif mode == "P":
        rgb.convert("P").save(folder / "x.png")
    elif mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        PILImage.fromarray(arr).save(folder / "x.png")
    elif mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(0)
        rgba.save(folder / "x.png")
    else:
        exif = PILImage.Exif()
        exif[0x0112] = 6
        rgb.save(folder / "x.jpg", exif=exif)
    code, _, err = run_train(folder, "--no-prior-preservation")
    assert code == 0, err


def test_overwrite_with_bad_input_keeps_the_finished_run(tmp_path, run_train, instance_dir, capsys):
    out = tmp_path / "out"
    assert run_train(instance_dir, out=out)[0] == 0
    weights = out / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    code, _, err = run_cli(capsys, *train_args(tmp_path / "no-model", instance_dir, out, "--overwrite"))
    _assert_user_error(code, err, "no-model")
    assert weights.read_bytes() == before and (out / "config.yaml").is_file()


@pytest.mark.parametrize("value", ["100", "65"])
def test_resolution_must_be_a_multiple_of_8(tmp_path, run_train, instance_dir, value):
    code, _, err = run_train(instance_dir, "--resolution", value)
    _assert_user_error(code, err, "resolution", "multiple of 8")
    assert not (tmp_path / "out").exists()


def test_mixed_precision_no_in_yaml(tmp_path, instance_dir):
    from style_dreambooth.config import build_config, read_yaml

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"instance_dir: {instance_dir}\ninstance_prompt: a b\noutput_dir: o\nmixed_precision: no\n")
    assert build_config(read_yaml(cfg_file), {}).mixed_precision == "no"
    cfg_file.write_text(f"instance_dir: {instance_dir}\ninstance_prompt: a b\noutput_dir: o\nvalidation_prompt: a tree\n")
    assert build_config(read_yaml(cfg_file), {}).validation_prompt == ["a tree"]


def test_config_that_is_a_folder(tmp_path, instance_dir, capsys):
    code, _, err = run_cli(capsys, "train", "--config", tmp_path, "--instance-dir", instance_dir,
                           "--instance-prompt", "a b", "--output-dir", tmp_path / "o")
    _assert_user_error(code, err, str(tmp_path), "is a folder")


def test_train_help_names_types_and_defaults(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "PydanticUndefined" not in out
    flat = " ".join(out.split())
    assert "--seed INTEGER" in flat and "--learning-rate FLOAT" in flat and "--mixed-precision [no|fp16|bf16]" in flat
    assert "default: the family's attention projections, to_q,to_k" in flat


def test_bad_prompt_files_and_output_folders(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"instance_prompt": "zwx style", "class_prompt": "style"}))
    bad = {
        "broken.yaml": ("token: [unclosed\n".encode(), "not valid YAML"),
        "latin1.yaml": ("token: ['caf\xe9']\n".encode("latin-1"), "not valid YAML"),
        "latin1.txt": ("caf\xe9\n".encode("latin-1"), "not UTF-8"),
        "scalar.yaml": (b"token: {a: 1}\n", "'token' must be a list"),
    }
    for name, (content, needle) in bad.items():
        (tmp_path / name).write_bytes(content)
        code, _, err = run_cli(capsys, "evaluate", run, "--prompts", tmp_path / name, "--clip", "none", "--dino", "none")
        _assert_user_error(code, err, name, needle)
    code, _, err = run_cli(capsys, "evaluate", run, "--seeds", "-1", "--clip", "none", "--dino", "none")
    _assert_user_error(code, err, "--seeds", "between 0 and")

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--out", a_file)
    _assert_user_error(code, err, "--out", str(a_file), "is a file")
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump({"instance_dir": str(tmp_path), "instance_prompt": "zwx style"}))
    code, _, err = run_cli(capsys, "sweep", "--config", cfg, "--grid", "seed=1,2", "--out", a_file)
    _assert_user_error(code, err, "--out", str(a_file))
    assert a_file.read_text() == "mine"
    code, _, err = run_cli(capsys, "demo", "--out", a_file / "inside")
    _assert_user_error(code, err, "--out", "not writable")


def test_base_model_file_that_is_not_a_checkpoint(tmp_path, run_train, instance_dir, capsys, tiny_model):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    for file, needle in ((lora, "LoRA"), (junk, "not a readable")):
        code, _, err = run_cli(capsys, *train_args(file, instance_dir, tmp_path / "out", "--base-config", tiny_model))
        _assert_user_error(code, err, str(file), needle)


def test_bad_lora_targets_are_refused_before_class_images(tmp_path, run_train, instance_dir, cache_env):
    code, _, err = run_train(instance_dir, "--method", "lora", "--lora-targets", "nothing_here")
    _assert_user_error(code, err, "nothing_here", "--lora-targets")
    assert not list(cache_env.rglob("*.png")), "no class image was generated for a run that cannot start"


def test_class_prompts_from_captions_needs_captions(tmp_path, run_train, instance_dir, cache_env):
    code, _, err = run_train(instance_dir, "--class-prompts-from-captions")
    _assert_user_error(code, err, "--class-prompts-from-captions", str(instance_dir))
    assert not (tmp_path / "out").exists() and not cache_env.exists()
