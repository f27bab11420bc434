"""End to end on a tiny random model: train, checkpoints, resume, generate, plain-diffusers reload."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from clihelp import run_cli, train_args


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_then_generate_end_to_end(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    (instance_dir / "img0.txt").write_text("a red circle")
    code, out, err = run_cli(
        capsys, *train_args(tiny_model, instance_dir, run, "--checkpointing-steps", "2", "--validation-steps", "2",
                            "--validation-prompt", "a boy in yltcaxe artstyle", "--validation-prompt", "a tree"),
    )
    assert code == 0, err
    # Run folder layout.
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["max_train_steps"] == 4 and config["train_text_encoder"] is True
    assert config["with_prior_preservation"] is True and config["mixed_precision"] == "no"
    assert (run / "model" / "model_index.json").is_file()
    assert (run / "checkpoints" / "step-000002" / "unet").is_dir()
    assert (run / "checkpoints" / "step-000002" / "text_encoder").is_dir()
    assert not list((run / "checkpoints").glob(".*")), "no temporary checkpoint left behind"
    for step in (2, 4):
        grid = Image.open(run / "samples" / f"step-{step:06d}.png")
        assert grid.size == (2 * 64, 2 * 64)  # 2 prompts x 2 images
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m["loss"] == pytest.approx(m["instance_loss"] + m["prior_loss"], rel=1e-5)
        assert m["lr"] == pytest.approx(1e-3) and m["it_per_s"] > 0
    assert list((run / "logs").rglob("events.out.tfevents*")), "TensorBoard events written"
    # Class images were generated into the cache, with a manifest of seeds.
    manifests = list(cache_env.rglob("manifest.json"))
    assert len(manifests) == 1
    assert [e["seed"] for e in json.loads(manifests[0].read_text())["images"]] == [1337, 1338, 1339, 1340]

    # The saved model reloads with plain diffusers, and training changed UNet and text encoder.
    trained = StableDiffusionPipeline.from_pretrained(run / "model")
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    for name in ("unet", "text_encoder"):
        a, b = getattr(trained, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{name} unchanged by training"
    image = trained("yltcaxe artstyle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)

    # generate: from the run folder (final model) and from a checkpoint.
    gen = tmp_path / "gen"
    code, out, err = run_cli(capsys, "generate", "--model", run, "--prompt", "a boy in yltcaxe artstyle",
                             "-n", "3", "--steps", "2", "--seed", "7", "--scheduler", "euler-a", "--out", gen)
    assert code == 0, err
    pngs = sorted(gen.glob("0*.png"))
    assert [p.name for p in pngs] == ["000007.png", "000008.png", "000009.png"]
    params = Image.open(pngs[0]).text["parameters"]
    assert params.splitlines()[0] == "a boy in yltcaxe artstyle"
    assert "Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: run" in params
    assert Image.open(gen / "grid.png").size == (2 * 64, 2 * 64)
    code, out, err = run_cli(capsys, "generate", "--model", run, "--checkpoint", "step-2", "--prompt", "x",
                             "-n", "1", "--steps", "2", "--out", tmp_path / "gen2")
    assert code == 0, err
    assert "Model: run/step-000002" in Image.open(tmp_path / "gen2" / "000000.png").text["parameters"]


@contextlib.contextmanager
def dies_after_checkpoint(monkeypatch, step: int | None = None):
    """Within: the training process dies (KeyboardInterrupt) right after it writes checkpoint ``step``
    (any checkpoint if None)."""
    import style_dreambooth.training.loop as loop

    real_save = loop.save_checkpoint

    def crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if step is None or args[1] == step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash)
    try:
        yield
    finally:
        monkeypatch.setattr(loop, "save_checkpoint", real_save)


def _weights(folder: Path, modules: tuple[str, ...] = ("unet", "text_encoder")) -> dict:
    """The weights of ``modules`` saved in ``folder`` (a model or a checkpoint), keyed "module.name"."""
    from safetensors.torch import load_file

    return {f"{name}.{k}": v for name in modules
            for k, v in load_file(next((folder / name).glob("*.safetensors"))).items()}


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model, instance_dir, cache_env, capsys, monkeypatch):
    common = ["--max-train-steps", "5", "--checkpointing-steps", "2", "--lr-scheduler", "linear",
              "--lr-warmup-steps", "1", "--train-batch-size", "2", "--gradient-accumulation-steps", "2"]
    full = tmp_path / "full"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, full, *common))[0] == 0

    part = tmp_path / "part"
    with dies_after_checkpoint(monkeypatch, step=4):
        code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, part, *common))
    assert code == 130 and "resume" in err
    assert not (part / "model").exists()

    # Without --resume the unfinished run is protected.
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, part, *common))
    assert code == 2 and "--resume-from-checkpoint" in err
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, part, *common,
                                                 "--resume-from-checkpoint", "latest"))
    assert code == 0, err
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in ("loss", "instance_loss", "prior_loss", "lr"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa = _weights(full / "model", ("unet",))
    wb = _weights(part / "model", ("unet",))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_ema_keeps_the_average_of_the_live_weights_and_resumes_exactly(tmp_path, tiny_model, instance_dir, cache_env,
                                                                        capsys, monkeypatch):
    common = ["--max-train-steps", "4", "--lr-scheduler", "linear", "--lr-warmup-steps", "1"]
    live = tmp_path / "live"  # no average: each step's checkpoint holds the live weights
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, live, *common, "--checkpointing-steps", "1"))[0] == 0
    steps = [_weights(live / "checkpoints" / f"step-{k:06d}") for k in (1, 2, 3)] + [_weights(live / "model")]
    # The average after each step, written out: decay 0 at the first step, then 1 - (1 + n)^(-2/3) capped at
    # --ema-decay.
    cap, averages = 0.5, [steps[0]]
    for n, weights in enumerate(steps[1:], start=1):
        decay = min(cap, 1 - (1 + n) ** (-2 / 3))
        averages.append({k: decay * averages[-1][k] + (1 - decay) * weights[k] for k in weights})
    expected, after_two = averages[-1], averages[1]

    averaged = tmp_path / "ema"
    args = train_args(tiny_model, instance_dir, averaged, *common, "--checkpointing-steps", "2", "--ema-decay", str(cap))
    assert run_cli(capsys, *args)[0] == 0
    assert [m["loss"] for m in _metrics(averaged)] == pytest.approx([m["loss"] for m in _metrics(live)], rel=1e-6)
    final, at_two = _weights(averaged / "model"), _weights(averaged / "checkpoints" / "step-000002")
    moved = [k for k in expected if not torch.allclose(steps[-1][k], steps[-2][k])]
    assert moved, "training moved the weights"
    for k in moved:
        assert torch.allclose(final[k], expected[k], atol=1e-6), k
        assert torch.allclose(at_two[k], after_two[k], atol=1e-6), k
        assert not torch.allclose(final[k], steps[-1][k]), f"{k}: the final model is the average, not the live weights"

    part = tmp_path / "part"
    args = train_args(tiny_model, instance_dir, part, *common, "--checkpointing-steps", "2", "--ema-decay", str(cap))
    with dies_after_checkpoint(monkeypatch, step=2):
        assert run_cli(capsys, *args)[0] == 130
    code, _, err = run_cli(capsys, *args, "--resume-from-checkpoint", "latest")
    assert code == 0, err
    assert [m["loss"] for m in _metrics(part)] == pytest.approx([m["loss"] for m in _metrics(averaged)], rel=1e-6)
    resumed = _weights(part / "model")
    assert all(torch.allclose(resumed[k], final[k], atol=1e-6) for k in final)


def test_reference_command_line_is_accepted(tmp_path, tiny_model, instance_dir, capsys):
    class_dir, out = tmp_path / "class", tmp_path / "out"
    args = [
        "train",
        f"--pretrained_model_name_or_path={tiny_model}", "--instance_prompt=yltcaxe artstyle",
        "--class_prompt=artstyle", f"--class_data_dir={class_dir}", f"--instance_data_dir={instance_dir}",
        f"--output_dir={out}", "--with_prior_preservation", "--prior_loss_weight=1.0", "--seed=1337",
        "--resolution=512", "--train_batch_size=1", "--train_text_encoder", "--use_8bit_adam",
        "--gradient_accumulation_steps=1", "--learning_rate=1e-6", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", "--num_class_images=50", "--sample_batch_size=4", "--max_train_steps=800",
        # shortened for CPU: tiny model, 64 px, a few steps and class images
        "--resolution=64", "--max_train_steps=2", "--num_class_images=3", "--class_inference_steps=2",
        "--validation_steps=0",
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["learning_rate"] == 1e-6 and config["lr_scheduler"] == "constant"
    assert config["use_8bit_adam"] and config["train_text_encoder"] and config["prior_loss_weight"] == 1.0
    assert config["instance_dir"] == str(instance_dir) and config["class_dir"] == str(class_dir)
    # Generated class images are cached in a keyed subfolder of the class dir.
    (key_dir,) = [p for p in class_dir.iterdir() if p.is_dir()]
    assert len(list(key_dir.glob("*.png"))) == 3 and (key_dir / "manifest.json").is_file()


def test_defaults_are_the_reference_configuration():
    from style_dreambooth.config import TrainConfig

    cfg = TrainConfig(instance_dir="x", instance_prompt="yltcaxe artstyle", output_dir="o")
    assert cfg.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg.learning_rate, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps) == (1e-6, "constant", 0, 800)
    from style_dreambooth.training.inputs import resolve_family

    resolved = resolve_family(cfg)  # the SD 1.5 hub id, not cached here: the SD 1.x family
    assert (cfg.backbone, resolved.backbone, cfg.resolution) == ("auto", "sd1", None)
    assert (cfg.train_batch_size, resolved.resolution, cfg.num_class_images, cfg.sample_batch_size) == (1, 512, 50, 4)
    assert cfg.with_prior_preservation and cfg.prior_loss_weight == 1.0
    assert cfg.train_text_encoder and cfg.use_8bit_adam and cfg.seed == 1337


def test_config_file_with_flag_override(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "base-model": str(tiny_model), "instance_data_dir": str(instance_dir), "instance_prompt": "yltcaxe artstyle",
        "output_dir": str(tmp_path / "r"), "resolution": 64, "num_class_images": 2, "class_inference_steps": 1,
        "max_train_steps": 5, "validation_steps": 0, "use_8bit_adam": False, "with_prior_preservation": True,
    }))
    code, _, err = run_cli(capsys, "train", "--config", cfg_file, "--max-train-steps", "1", "--no-8bit-adam")
    assert code == 0, err
    resolved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert resolved["max_train_steps"] == 1 and resolved["class_prompt"] == "artstyle"
    # The resolved config.yaml re-runs as is.
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "r" / "config.yaml", "--overwrite")
    assert code == 0, err


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_saves_once(tmp_path, tiny_model, instance_dir, cache_env):
    out = tmp_path / "ddp"
    args = ["-v", *train_args(tiny_model, instance_dir, out, "--checkpointing-steps", "2", "--max-train-steps", "3")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "style_dreambooth", *map(str, args)]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("saved final model") == 1
    assert log.count("saved checkpoint") == 1
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    assert (out / "model" / "model_index.json").is_file()


def test_token_and_random_model_commands(tmp_path, capsys):
    code, out, err = run_cli(capsys, "token", "yltcaxe")
    assert code == 0, err
    assert "4 BPE pieces" in out and "yl | t | ca | xe" in out and "try:" in out
    code, out, _ = run_cli(capsys, "token", "sks")
    assert code == 0 and "1 BPE token" in out and "try:" not in out
    code, out, err = run_cli(capsys, "random-model", "--shape", "tiny", tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / "model_index.json").is_file() and (tmp_path / "m" / "tokenizer").is_dir()
    code, _, err = run_cli(capsys, "random-model", "--shape", "tiny", tmp_path / "m")
    assert code == 2 and str(tmp_path / "m") in err


def test_training_options_bf16_vpred_snr_offset_checkpointing(tmp_path, instance_dir, cache_env, capsys):
    """v-prediction + bf16 + min-SNR + offset and multi-resolution noise + input perturbation + gradient checkpointing run
    through the loop, and the frozen VAE and text encoder are saved bit-identical to the base (not rounded to bf16)."""
    from safetensors.torch import load_file

    from style_dreambooth.models.random_model import save_random_model

    model = save_random_model("tiny", tmp_path / "vpred", seed=3, prediction_type="v_prediction")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, "--mixed-precision", "bf16",
                                               "--snr-gamma", "5", "--offset-noise", "0.1", "--multires-noise-iterations", "3",
                                               "--ip-noise-gamma", "0.1",
                                               "--gradient-checkpointing", "--no-train-text-encoder",
                                               "--max-train-steps", "2"))
    assert code == 0, err
    assert all(m["loss"] > 0 for m in _metrics(run))
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        saved, base = load_file(run / "model" / part / name), load_file(model / part / name)
        assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base), part
    assert yaml.safe_load((run / "model" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_captions_are_added_to_the_instance_prompt(tmp_path):
    from style_dreambooth.data.dataset import instance_examples

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a red fox\n")
    (tmp_path / "b.txt").write_text("yltcaxe artstyle, a tower at dusk")
    examples = instance_examples(sorted(tmp_path.glob("*.png")), "yltcaxe artstyle")
    assert [e.prompt for e in examples] == [
        "yltcaxe artstyle, a red fox", "yltcaxe artstyle, a tower at dusk", "yltcaxe artstyle"]


def test_lora_resume_equals_uninterrupted_run(tmp_path, tiny_model, instance_dir, cache_env, capsys, monkeypatch):
    common = ["--method", "lora", "--rank", "2", "--lora-dropout", "0.1", "--max-train-steps", "4",
              "--checkpointing-steps", "2"]
    full = tmp_path / "full"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, full, *common))[0] == 0
    part = tmp_path / "part"
    with dies_after_checkpoint(monkeypatch):
        assert run_cli(capsys, *train_args(tiny_model, instance_dir, part, *common))[0] == 130
    # A contradicting flag is refused; the run's own config.yaml supplies everything else.
    code, _, err = run_cli(capsys, "train", "--output-dir", part, "--resume-from-checkpoint", "latest", "--rank", "8")
    assert code == 2 and "rank" in err
    code, _, err = run_cli(capsys, "train", "--output-dir", part, "--resume-from-checkpoint", "latest")
    assert code == 0, err
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]


def test_rerun_after_interruption_without_checkpoint_starts_clean(tmp_path, tiny_model, instance_dir, cache_env,
                                                                   capsys, monkeypatch):
    import style_dreambooth.training.loop as loop

    run = tmp_path / "run"
    real = loop.RunFolder.append_metrics
    calls = []

    def interrupt_after_two(self, record):
        real(self, record)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.RunFolder, "append_metrics", interrupt_after_two)
    # Read back every step, so the interruption comes after step 2's line, mid-run.
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--logging-steps", "1"))[0] == 130
    monkeypatch.setattr(loop.RunFolder, "append_metrics", real)
    assert [m["step"] for m in _metrics(run)] == [1, 2]
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run))[0] == 0
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]


def test_run_config_uses_absolute_paths(tmp_path, tiny_model, instance_dir, cache_env, capsys, monkeypatch):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, *train_args("m", instance_dir, "rel-run", "--method", "lora", "--max-train-steps", "1"))[0] == 0
    config = yaml.safe_load((tmp_path / "rel-run" / "config.yaml").read_text())
    assert config["base_model"] == str(tmp_path / "m") and config["output_dir"] == str(tmp_path / "rel-run")
    monkeypatch.chdir("/")
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "rel-run", "--prompt", "x", "-n", "1",
                           "--steps", "2", "--out", tmp_path / "g")
    assert code == 0, err


def test_losses_read_back_late_survive_a_crash(tmp_path, tiny_model, instance_dir, cache_env, capsys, monkeypatch):
    """Losses are read back every --logging-steps; a run that dies in between still writes the ones it had."""
    import style_dreambooth.training.loop as loop

    real, calls = loop.dreambooth_loss, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # Ctrl-C (or an out-of-memory error) in step 6
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "dreambooth_loss", failing)
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--max-train-steps", "8",
                                             "--logging-steps", "10"))
    assert code != 0 and len(calls) == 6
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 5]


def test_resume_keeps_the_fused_optimizer(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    """A checkpoint saved by a non-fused AdamW (as before the fused default) must not switch fusion off:
    with fp16 the grad scaler hands a fused optimizer its inf check, which a non-fused step rejects."""
    run = tmp_path / "run"
    common = ["--no-8bit-adam", "--checkpointing-steps", "2"]
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, *common, "--max-train-steps", "3"))[0] == 0
    state_file = run / "checkpoints" / "step-000002" / "training_state.pt"
    state = torch.load(state_file, weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        assert group["fused"] is True  # saved by the fused optimizer
        group["fused"] = None  # ... as an older checkpoint has it
    torch.save(state, state_file)

    seen = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g.get("fused") for g in opt.param_groups])
    )
    try:
        code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, *common, "--max-train-steps", "4",
                                                   "--resume-from-checkpoint", "latest", "--overwrite"))
    finally:
        handle.remove()
    assert code == 0, err
    assert seen and all(flag is True for flags in seen for flag in flags)


def test_truncate_metrics_survives_a_torn_last_line(tmp_path):
    from style_dreambooth.training.run_folder import RunFolder

    run = RunFolder(tmp_path)
    run.metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    run.truncate_metrics(2)
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_a_new_learning_rate(tmp_path, tiny_model, instance_dir):
    from style_dreambooth.config import TrainConfig
    from style_dreambooth.errors import UserError
    from style_dreambooth.training.loop import check_resume_config
    from style_dreambooth.training.run_folder import RunFolder

    cfg = TrainConfig(base_model=str(tiny_model), instance_dir=instance_dir, instance_prompt="zwx style",
                      with_prior_preservation=False, output_dir=tmp_path, learning_rate=1e-4)
    run = RunFolder(tmp_path)
    run.config.write_text(yaml.safe_dump(cfg.to_yaml_dict()), encoding="utf-8")
    check_resume_config(run, cfg.model_copy(update={"max_train_steps": 2000}))  # more steps: fine
    with pytest.raises(UserError, match="learning_rate is 0.0001 in its config.yaml but 0.01 now"):
        check_resume_config(run, cfg.model_copy(update={"learning_rate": 1e-2}))


def test_resume_protects_a_finished_model_and_refuses_foreign_checkpoints(tmp_path, tiny_model, instance_dir,
                                                                           cache_env, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    common = ["--no-8bit-adam", "--checkpointing-steps", "2", "--max-train-steps", "3"]
    for folder in (run, other):
        assert run_cli(capsys, *train_args(tiny_model, instance_dir, folder, *common))[0] == 0
    weights = run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()

    # Resuming a finished run would replace its model: refused unless --overwrite says so.
    more = ["--no-8bit-adam", "--checkpointing-steps", "2", "--max-train-steps", "4"]
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, *more, "--resume-from-checkpoint", "latest"))
    assert code == 2 and "finished model" in err and "--overwrite" in err
    assert weights.read_bytes() == before

    # Another run's checkpoint is not this run's history.
    foreign = other / "checkpoints" / "step-000002"
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, *more, "--overwrite",
                                               "--resume-from-checkpoint", foreign))
    assert code == 2 and "belongs to the run in" in err and str(other) in err
    assert weights.read_bytes() == before

    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, *more, "--overwrite",
                                               "--resume-from-checkpoint", run / "checkpoints" / "step-000002"))
    assert code == 0, err
    assert weights.read_bytes() != before and [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_replace_folder_keeps_a_whole_copy_when_the_rename_fails(tmp_path, monkeypatch):
    from style_dreambooth.files import replace_folder

    final, staged = tmp_path / "model", tmp_path / ".model.tmp"
    final.mkdir()
    (final / "w").write_text("old")
    staged.mkdir()
    (staged / "w").write_text("new")
    real_rename = Path.rename

    def failing(self, target):
        if self == staged:
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        replace_folder(staged, final)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert (tmp_path / ".model.old" / "w").read_text() == "old"  # the old model survives, aside
    replace_folder(staged, final)
    assert (final / "w").read_text() == "new" and not (tmp_path / ".model.old").exists()

    # A crash between the two renames: the next run puts the old model back and drops the staging copy.
    from style_dreambooth.training.run_folder import RunFolder

    final.rename(tmp_path / ".model.old")
    (tmp_path / ".model.tmp").mkdir()
    (tmp_path / "checkpoints" / ".step-000004.tmp").mkdir(parents=True)
    RunFolder(tmp_path).tidy()
    assert (final / "w").read_text() == "new"
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_class_prompts_follow_the_instance_captions(tmp_path):
    from style_dreambooth.data.dataset import class_examples, class_prompts_for, instance_examples

    for stem, caption in (("a", "a red circle"), ("b", "a blue house, YLTCAXE artstyle"), ("c", None), ("d", "a red circle")):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{stem}.png")
        if caption:
            (tmp_path / f"{stem}.txt").write_text(caption)
    paths = sorted(tmp_path.glob("*.png"))
    instances = instance_examples(paths, "yltcaxe artstyle")
    assert class_prompts_for(instances, "yltcaxe artstyle", "artstyle") == (
        "artstyle, a red circle", "a blue house, artstyle", "artstyle")
    assert [e.prompt for e in class_examples(paths, "painting")] == [
        "a red circle", "a blue house, YLTCAXE artstyle", "painting", "a red circle"], "given class images keep their captions"


def test_class_images_from_instance_captions(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    (instance_dir / "img0.txt").write_text("a red fox")
    (instance_dir / "img1.txt").write_text("a tower at dusk, yltcaxe artstyle")
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "out", "--max-train-steps", "1",
                                               "--num-class-images", "3", "--class-prompts-from-captions"))
    assert code == 0, err
    (manifest,) = cache_env.rglob("manifest.json")
    prompts = [e["prompt"] for e in json.loads(manifest.read_text())["images"]]
    assert prompts == ["artstyle, a red fox", "a tower at dusk, artstyle", "artstyle"]


def test_timestep_range_limits_the_noise_levels_trained(tmp_path, tiny_model, instance_dir, cache_env, capsys,
                                                         monkeypatch):
    from diffusers import DDPMScheduler

    seen: list[int] = []
    add_noise = DDPMScheduler.add_noise

    def recording(self, latents, noise, timesteps):
        seen.extend(timesteps.tolist())
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "a", "--max-train-steps", "6",
                                               "--min-timestep", "200", "--max-timestep", "260"))
    assert code == 0, err
    assert len(seen) == 6 * 2 and all(200 <= t < 260 for t in seen), seen
    for flags, needle in ((("--min-timestep", "300", "--max-timestep", "300"), "max_timestep (300) must be above"),
                          (("--max-timestep", "1001"), "--max-timestep 1001 is beyond")):
        code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "b", *flags))
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "b").exists()


def test_ip_noise_gamma_perturbs_the_input_noise_and_not_the_target(tmp_path, tiny_model, instance_dir, cache_env,
                                                                     capsys, monkeypatch):
    """Input perturbation: the noisy latents use noise + G x a fresh draw, the loss target the plain noise."""
    from style_dreambooth.models.backbones.objectives import DDPMObjective

    inputs, targets = [], []
    noisy, target = DDPMObjective.noisy, DDPMObjective.target

    def recording_noisy(self, latents, noise, timesteps):
        inputs.append(noise.detach().clone())
        return noisy(self, latents, noise, timesteps)

    def recording_target(self, latents, noise, timesteps):
        targets.append(noise.detach().clone())
        return target(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMObjective, "noisy", recording_noisy)
    monkeypatch.setattr(DDPMObjective, "target", recording_target)
    for name, flags in (("plain", ()), ("ip", ("--ip-noise-gamma", "0.1"))):
        inputs.clear()
        targets.clear()
        code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / name, "--max-train-steps", "3",
                                                   *flags))
        assert code == 0, err
        assert len(inputs) == len(targets) == 3
        extra = torch.cat([(i - t).flatten() for i, t in zip(inputs, targets)])
        if name == "plain":
            assert torch.equal(extra, torch.zeros_like(extra))
        else:
            assert 0.07 < extra.std().item() < 0.13, extra.std()


def test_text_encoder_scope_identifier_trains_only_its_embedding_rows(tmp_path, tiny_model, instance_dir, cache_env,
                                                                       capsys):
    from transformers import CLIPTextModel, CLIPTokenizer

    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "out", "--max-train-steps", "3",
                                               "--text-encoder-scope", "identifier", "--text-encoder-lr", "1e-1",
                                               "--adam-weight-decay", "0.5"))
    assert code == 0, err
    base = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    tuned = CLIPTextModel.from_pretrained(tmp_path / "out" / "model", subfolder="text_encoder")
    ids = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")("yltcaxe", add_special_tokens=False).input_ids
    changed = (base.get_input_embeddings().weight != tuned.get_input_embeddings().weight).any(dim=1)
    assert sorted(changed.nonzero().flatten().tolist()) == sorted(set(ids)), "only the identifier's rows moved"
    for name, value in base.state_dict().items():
        if "token_embedding" not in name:
            assert torch.equal(value, tuned.state_dict()[name]), name
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "b", "--text-encoder-scope",
                                               "identifier", "--method", "lora"))
    assert code == 2 and "text_encoder_scope" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "c", "--text-encoder-scope",
                                               "identifier", "--instance-prompt", "artstyle"))
    assert code == 2 and "no identifier word" in err and len(err.strip().splitlines()) == 1, err


def test_unet_layer_filter_trains_only_the_named_weights(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    from diffusers import UNet2DConditionModel

    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "out", "--max-train-steps", "3",
                                               "--learning-rate", "1e-2", "--unet-layer-filter", "!attn2"))
    assert code == 0, err
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "model", subfolder="unet").state_dict()
    moved = {name for name, value in base.items() if not torch.equal(value, tuned[name])}
    assert moved and not any(".attn2." in name for name in moved), sorted(moved)[:5]
    assert any(".attn1." in name for name in moved) and any("resnets" in name for name in moved)
    for flags, needle in ((("--unet-layer-filter", "no_such_layer"), "no UNet weight is left to train"),
                          (("--unet-layer-filter", "attn2", "--method", "lora"), "unet_layer_filter is for method")):
        code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "b", *flags))
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "b").exists()
