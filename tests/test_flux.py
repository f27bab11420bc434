"""FLUX.1 through the whole toolkit on its tiny random model: full and LoRA training with prior preservation and
CLIP-L training, resume after a kill, the kohya LoRA layout loaded back and rendered like the live fused weights,
generate (run folder, checkpoints, stacked LoRAs, the flow-matching sampler, distilled guidance), the conditioning
kept per prompt, and the bad inputs (one line each). The losses against the equations are in
test_reference_losses_flux.py; the LoRA layout's names at FLUX.1's real sizes in test_flux_lora_layout.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clihelp import run_cli, train_args
from lorahelp import merge_adapters


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def test_full_run_trains_clip_not_t5_and_generates(tmp_path, flux_model, instance_dir, cache_env, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(flux_model, instance_dir, run, "--checkpointing-steps", "2"))
    assert code == 0, err
    assert "backbone: flux" in (run / "config.yaml").read_text()
    assert json.loads((run / "model" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    clip, t5 = (_tensors(run / "model" / n) for n in ("text_encoder", "text_encoder_2"))
    base_clip, base_t5 = (_tensors(flux_model / n) for n in ("text_encoder", "text_encoder_2"))
    assert any(not torch.equal(v, base_clip[k]) for k, v in clip.items())  # CLIP-L trains by default
    assert t5.keys() == base_t5.keys() and all(torch.equal(v, base_t5[k]) for k, v in t5.items())  # T5 never
    manifest = json.loads(next(cache_env.rglob("manifest.json")).read_text())
    assert manifest["spec"]["extra"] == {"family": "flux"} and manifest["spec"]["sampler"] == "flow-euler"
    for extra in ([], ["--checkpoint", "latest"]):
        out = tmp_path / f"gen{len(extra)}"
        code, _, err = run_cli(capsys, "generate", "--model", run, *extra, "--prompt", "a yltcaxe artstyle tree",
                               "-n", "1", "--steps", "2", "--out", out)
        assert code == 0, err
        text = Image_text(out / "000000.png")
        assert "Sampler: Euler" in text and "CFG scale: 3.5" in text  # dev's distilled guidance by default
    code, _, err = run_cli(capsys, "export", run, tmp_path / "style.safetensors")  # BFL's layout: test_flux_single_file
    assert code == 0, err
    with safe_open(str(tmp_path / "style.safetensors"), "pt") as f:
        assert "double_blocks.0.img_attn.qkv.weight" in set(f.keys())


def Image_text(png: Path) -> str:
    from PIL import Image

    return Image.open(png).text["parameters"]


def test_lora_run_writes_kohya_layout_and_generates_stacked(tmp_path, flux_model, tiny_model, instance_dir,
                                                          cache_env, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(flux_model, instance_dir, run, "--method", "lora", "--rank", "2"))
    assert code == 0, err
    file = run / "model" / "lora.safetensors"
    with safe_open(str(file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert not any("to_q" in k for k in keys)  # q, k and v are fused, as BFL's modules
    assert meta["style_dreambooth.backbone"] == "flux" and meta["ss_base_model_version"] == "flux1"
    code, _, err = run_cli(capsys, "generate", "--model", run, "--prompt", "a yltcaxe artstyle tree", "-n", "1",
                           "--steps", "2", "--out", tmp_path / "gen")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", flux_model, "--lora", f"{file}:0.5", "--lora", file,
                           "--prompt", "a tree", "-n", "1", "--steps", "2", "--width", "64", "--height", "64",
                           "--out", tmp_path / "stacked")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--lora", file, "--prompt", "x", "-n", "1",
                           "--steps", "2", "--out", tmp_path / "wrong")
    _one_line_error(code, err, "lora.safetensors", "flux", "sd1")


def test_lora_file_reloaded_renders_the_live_fused_weights(tmp_path, flux_model):
    from diffusers import FluxPipeline

    from style_dreambooth.config import TrainConfig
    from style_dreambooth.models.backbones import FLUX
    from style_dreambooth.training.lora_file import load_lora_state_dict, lora_state_dict, write_lora_file
    from style_dreambooth.training.trainables import LoraTrainables

    cfg = TrainConfig(instance_dir=tmp_path, instance_prompt="yltcaxe artstyle", output_dir=tmp_path / "o",
                      method="lora", rank=4, lora_alpha=2.0, lora_targets=list(FLUX.default_lora_targets))

    def trainables(pipe):
        return LoraTrainables(cfg, FLUX, pipe.transformer, FLUX.text_encoders(pipe), "hash")

    ours = FluxPipeline.from_pretrained(flux_model)
    lora = trainables(ours)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: both factors non-zero
        for module in lora.modules.values():
            for p in (p for n, p in module.named_parameters() if "lora_" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    file = write_lora_file(tmp_path / "style.safetensors", lora_state_dict(lora.modules, FLUX), lora.metadata())

    again = trainables(FluxPipeline.from_pretrained(flux_model))  # the file loads back to the same weights
    load_lora_state_dict(again.modules, load_file(str(file)), FLUX)
    for role, module in lora.modules.items():
        theirs = dict(again.modules[role].named_parameters())
        for name, p in module.named_parameters():
            if "lora_" in name:
                assert torch.equal(p, theirs[name]), name

    def image(pipe):
        return pipe("a yltcaxe artstyle house", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                    width=64, height=64, output_type="np", max_sequence_length=32).images[0]

    merge_adapters(lora)
    fused = image(ours)
    plain = FluxPipeline.from_pretrained(flux_model)
    base = image(plain)
    FLUX.load_lora(plain, file, "style")
    loaded = image(plain)
    assert np.abs(loaded - base).max() > 1e-2, "the LoRA must change the output"
    assert np.allclose(loaded, fused, atol=1e-4), np.abs(loaded - fused).max()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_a_kill_gives_identical_weights(tmp_path, flux_model, instance_dir, cache_env, capsys,
                                                     monkeypatch, method):
    import style_dreambooth.training.loop as loop

    common = ["--method", method, "--max-train-steps", "4", "--checkpointing-steps", "2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli(capsys, *train_args(flux_model, instance_dir, whole, *common))[0] == 0
    real_save = loop.save_checkpoint

    def die_after_first(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies right after step 2's checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", die_after_first)
    assert run_cli(capsys, *train_args(flux_model, instance_dir, part, *common))[0] == 130
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    code, _, err = run_cli(capsys, *train_args(flux_model, instance_dir, part, *common,
                                               "--resume-from-checkpoint", "latest"))
    assert code == 0, err
    a, b = _tensors(whole / "model"), _tensors(part / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_text_encoders_keep_each_prompts_own_conditioning(flux_model):
    """Cached by prompt, not by step: a batch drawn in another order gets its own prompts' rows (diffusers #14430
    cached by dataloader step while the loader shuffled, so captions met other images' latents)."""
    from diffusers import FluxPipeline

    from style_dreambooth.models.backbones import FLUX, PromptEncoder

    pipe = FluxPipeline.from_pretrained(flux_model)
    encoders = FLUX.text_encoders(pipe)
    plain = PromptEncoder(FLUX, FLUX.tokenizers(pipe), torch.device("cpu"))
    cached = PromptEncoder(FLUX, FLUX.tokenizers(pipe), torch.device("cpu"), frozen=True)
    prompts = ["a red star, yltcaxe artstyle", "a blue moon, yltcaxe artstyle", "artstyle"]
    with torch.no_grad():
        cached.precompute(encoders, prompts)
        for batch in (prompts[:2], prompts[1::-1], [prompts[2], prompts[0]], [prompts[1], prompts[1]]):
            want, got = plain(encoders, batch), cached(encoders, batch)
            assert torch.allclose(got.hidden, want.hidden, atol=1e-6)
            assert torch.allclose(got.pooled, want.pooled, atol=1e-6)
    assert not torch.allclose(want.hidden[0], plain(encoders, [prompts[0]]).hidden[0])  # the prompts differ


def test_flux_bad_inputs_are_one_line(tmp_path, flux_model, flux_schnell_model, tiny_model, instance_dir,
                                      cache_env, capsys):
    cases = [
        (tiny_model, ["--backbone", "flux"], ["--backbone flux", "sd1"]),
        (flux_model, ["--train-text-encoder-2"], ["T5", "--train-text-encoder"]),
        (flux_model, ["--resolution", "72"], ["--resolution 72", "16", "FLUX.1"]),
        (flux_model, ["--snr-gamma", "5"], ["--snr-gamma", "flow matching"]),
        (flux_model, ["--max-timestep", "500"], ["--max-timestep", "flow matching"]),
        (tiny_model, ["--timestep-sampling", "logit_normal"], ["--timestep-sampling", "flow-matching"]),
        (flux_schnell_model, ["--train-guidance", "3"], ["--train-guidance", "schnell"]),
    ]
    for model, flags, needles in cases:
        run = tmp_path / "run"
        code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, *flags))
        _one_line_error(code, err, *needles)
        assert not run.exists(), flags
    gen = ["--prompt", "x", "-n", "1", "--steps", "2", "--width", "64", "--height", "64"]
    for model, flags, needles in [
        (flux_schnell_model, ["--guidance", "3.5"], ["--guidance", "schnell"]),
        (flux_model, ["--scheduler", "dpm++"], ["--scheduler dpm++", "flux", "flow-euler"]),
        (tiny_model, ["--scheduler", "flow-euler"], ["--scheduler flow-euler", "sd1"]),
    ]:
        code, _, err = run_cli(capsys, "generate", "--model", model, *gen, *flags, "--out", tmp_path / "g")
        _one_line_error(code, err, *needles)
        assert not (tmp_path / "g").exists()
    layout = tmp_path / "layout.yaml"
    layout.write_text("prompt: two things\nregions:\n  - box: [0, 0, 0.5, 1]\n    prompt: a star\n")
    code, _, err = run_cli(capsys, "generate", "--model", flux_model, "--layout", layout, *gen, "--out", tmp_path / "g")
    _one_line_error(code, err, "--layout", "flux")
    # schnell trains and samples without a guidance value
    code, _, err = run_cli(capsys, *train_args(flux_schnell_model, instance_dir, tmp_path / "s", "--method", "lora"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "s", "--prompt", "x", "-n", "1", "--steps", "2",
                           "--out", tmp_path / "gs")
    assert code == 0, err
