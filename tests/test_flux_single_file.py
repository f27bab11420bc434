"""FLUX.1's single file: the transformer alone in Black Forest Labs' layout (``flux1-dev.safetensors``), written by
``export`` and read back with ``--base-model FILE --base-config FOLDER``.

The layout is checked against diffusers' own reader, ``convert_flux_transformer_checkpoint_to_diffusers`` (the
BFL -> diffusers direction, written independently of ours): on FLUX.1-dev's real names and shapes (meta tensors,
no memory), and value for value through ``FluxTransformer2DModel.from_single_file`` on a one-block transformer of
FLUX.1's real 3072 width. diffusers' reader hard-codes that width (it splits a single block's ``linear1`` at
3 x 3072 + 12288 rows), so the tiny 32-wide model goes through our loader, which reads the sizes from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clihelp import run_cli, train_args
from style_dreambooth.models.backbones import FLUX, flux_single_file
from style_dreambooth.models.loading import load_pipeline
from style_dreambooth.models.random_model import build_random_components, build_random_pipeline
from style_dreambooth.models.single_file import export_single_file


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


# --------------------------------------------------------------------------- the layout


def test_flux_dev_layout_is_what_diffusers_reads_back():
    """FLUX.1-dev's real transformer on the meta device: every tensor we write is one diffusers' reader takes, and
    it gives back every tensor of the model with its shape."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        transformer = build_random_components("flux-dev")["transformer"]
    state = transformer.state_dict()
    bfl = flux_single_file.to_bfl(state)
    assert len(bfl) == 780  # flux1-dev.safetensors' tensor count: 19 double blocks, 38 single, the embedders
    shapes = {
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
        "time_in.out_layer.weight": (3072, 3072), "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256), "guidance_in.out_layer.bias": (3072,),
        "double_blocks.18.img_attn.qkv.weight": (9216, 3072), "double_blocks.18.txt_attn.qkv.bias": (9216,),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.img_attn.proj.weight": (3072, 3072), "double_blocks.0.txt_mlp.0.weight": (12288, 3072),
        "double_blocks.0.img_mlp.2.weight": (3072, 12288), "double_blocks.0.img_mod.lin.weight": (18432, 3072),
        "double_blocks.0.txt_mod.lin.bias": (18432,), "single_blocks.37.linear1.weight": (21504, 3072),
        "single_blocks.37.linear1.bias": (21504,), "single_blocks.37.linear2.weight": (3072, 15360),
        "single_blocks.0.norm.query_norm.scale": (128,), "single_blocks.0.norm.key_norm.scale": (128,),
        "single_blocks.0.modulation.lin.weight": (9216, 3072), "final_layer.linear.weight": (64, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    for key, shape in shapes.items():
        assert tuple(bfl[key].shape) == shape, key
    assert not any(k.startswith("model.diffusion_model.") for k in bfl)  # BFL's bare names

    checkpoint = dict(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, f"tensors diffusers' reader does not take: {sorted(checkpoint)[:5]}"
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in state.items()}
    ours = flux_single_file.from_bfl(bfl)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert FLUX.owns_single_file(set(bfl)) and FLUX.owns_single_file({"model.diffusion_model." + k for k in bfl})


def test_diffusers_from_single_file_reads_our_file_to_identical_tensors(tmp_path, no_network):
    """One double and one single block at FLUX.1's real 3072 width (diffusers' reader takes no other), bf16 as
    BFL ships it: every tensor diffusers loads from our file equals the model's."""
    from diffusers import FluxTransformer2DModel

    config = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 32, "pooled_projection_dim": 32,
              "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(generator=generator)
    model.save_config(tmp_path / "model" / "transformer")
    file = tmp_path / "flux1-wide.safetensors"
    save_file({k: v.contiguous() for k, v in flux_single_file.to_bfl(model.state_dict()).items()}, str(file))
    loaded = FluxTransformer2DModel.from_single_file(str(file), config=str(tmp_path / "model"), subfolder="transformer",
                                                      dtype=torch.bfloat16, local_files_only=True)
    _assert_same(loaded.state_dict(), model.state_dict())


def test_tiny_conversion_is_exact_both_ways():
    state = build_random_components("flux-tiny")["transformer"].state_dict()
    bfl = flux_single_file.to_bfl(state)
    _assert_same(flux_single_file.from_bfl(bfl), state)
    q, k, v = (state[f"transformer_blocks.1.attn.{n}.weight"] for n in ("add_q_proj", "add_k_proj", "add_v_proj"))
    assert torch.equal(bfl["double_blocks.1.txt_attn.qkv.weight"], torch.cat([q, k, v]))
    mlp = state["single_transformer_blocks.0.proj_mlp.bias"]
    assert torch.equal(bfl["single_blocks.0.linear1.bias"][-mlp.shape[0]:], mlp)
    scale, shift = state["norm_out.linear.weight"].chunk(2)  # diffusers: (scale, shift); BFL: (shift, scale)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    with pytest.raises(ValueError, match="lora_A"):
        flux_single_file.to_bfl({**state, "x_embedder.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="concatenates 3"):
        flux_single_file.to_bfl({k: t for k, t in state.items() if k != "transformer_blocks.0.attn.to_k.weight"})
    with pytest.raises(ValueError, match="not part of a FLUX.1"):
        flux_single_file.from_bfl({**bfl, "double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- export and load


@pytest.mark.parametrize("shape, architecture", [("flux-tiny", "flux-1-dev"), ("flux-schnell-tiny", "flux-1-schnell")])
def test_export_and_load_back_through_our_loader(tmp_path, flux_model, flux_schnell_model, no_network, shape,
                                                 architecture):
    base = flux_model if shape == "flux-tiny" else flux_schnell_model
    source = build_random_pipeline(shape, seed=1)  # weights unlike the config folder's
    file = export_single_file(source, tmp_path / "flux1.safetensors")
    tensors, meta = _contents(file)
    assert meta["architecture"] == architecture and meta["dtype"] == "float32"
    assert meta["producer"] == "style-dreambooth" and meta["format"] == "pt"
    assert set(tensors) == set(flux_single_file.to_bfl(source.transformer.state_dict()))  # the transformer alone
    assert any(k.startswith("guidance_in.") for k in tensors) == (shape == "flux-tiny")
    loaded = load_pipeline(str(file), single_file_config=str(base))
    assert type(loaded).__name__ == "FluxPipeline"
    _assert_same(loaded.transformer.state_dict(), source.transformer.state_dict())
    assert loaded.vae.config.shift_factor == source.vae.config.shift_factor  # the rest from --base-config

    half = export_single_file(source, tmp_path / "flux1-bf16.safetensors", half=True)
    tensors, meta = _contents(half)
    assert meta["dtype"] == "bfloat16" and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    again = load_pipeline(str(half), single_file_config=str(base))
    assert again.transformer.dtype == again.text_encoder.dtype == torch.float32


def test_comfyui_checkpoint_names_load(tmp_path, flux_model, no_network, caplog):
    """ComfyUI's all-in-one files hold the transformer under model.diffusion_model., beside a VAE and text
    encoders that are not read (the other parts come from --base-config)."""
    source = build_random_pipeline("flux-tiny", seed=2)
    bfl = flux_single_file.to_bfl(source.transformer.state_dict())
    file = tmp_path / "comfy.safetensors"
    save_file({**{"model.diffusion_model." + k: v.contiguous() for k, v in bfl.items()},
               "vae.decoder.conv_in.weight": torch.zeros(2)}, str(file))
    loaded = load_pipeline(str(file), single_file_config=str(flux_model))
    _assert_same(loaded.transformer.state_dict(), source.transformer.state_dict())
    assert "vae.decoder.conv_in.weight" in caplog.text


def _pixels(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB"))


def test_exported_full_run_draws_what_the_run_draws(tmp_path, flux_model, instance_dir, cache_env, capsys):
    """A full run (CLIP-L kept frozen: the file holds the transformer alone) exported, then loaded back with its
    base model's folder as --base-config, paints the run's own images pixel for pixel; the file also trains."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(flux_model, instance_dir, run, "--method", "full", "--max-train-steps",
                                               "2", "--no-train-text-encoder"))
    assert code == 0, err
    file = tmp_path / "flux1-style.safetensors"
    code, out, err = run_cli(capsys, "export", run, file)
    assert code == 0, err
    tensors = load_file(str(file))
    trained = load_file(str(next((run / "model" / "transformer").glob("*.safetensors"))))
    _assert_same(flux_single_file.from_bfl(tensors), trained)
    base = load_file(str(next((flux_model / "transformer").glob("*.safetensors"))))
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # the run did train the transformer

    gen = ["--prompt", "a yltcaxe artstyle tree", "-n", "1", "--steps", "2", "--seed", "7", "--width", "64",
           "--height", "64"]
    code, _, err = run_cli(capsys, "generate", "--model", run, *gen, "--out", tmp_path / "from-run")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", file, "--base-config", flux_model, *gen,
                           "--out", tmp_path / "from-file")
    assert code == 0, err
    a, b = _pixels(tmp_path / "from-run" / "000007.png"), _pixels(tmp_path / "from-file" / "000007.png")
    assert np.array_equal(a, b), np.abs(a.astype(int) - b.astype(int)).max()
    code, _, err = run_cli(capsys, "generate", "--model", flux_model, *gen, "--out", tmp_path / "from-base")
    assert code == 0, err
    assert not np.array_equal(a, _pixels(tmp_path / "from-base" / "000007.png"))  # the file's transformer draws

    code, _, err = run_cli(capsys, *train_args(file, instance_dir, tmp_path / "again", "--base-config", flux_model,
                                               "--method", "lora", "--max-train-steps", "1"))
    assert code == 0, err
    assert "backbone: flux" in (tmp_path / "again" / "config.yaml").read_text()
    extras = [json.loads(m.read_text())["spec"]["extra"] for m in cache_env.rglob("manifest.json")]
    # the file's class images are drawn with --base-config's VAE and text encoders, which key the cache too
    assert {"family": "flux"} in extras and any(e.get("base_config", {}).get("path") == str(flux_model.resolve())
                                                for e in extras), extras


def test_single_file_errors_are_one_line(tmp_path, flux_model, flux_schnell_model, instance_dir, cache_env, capsys):
    source = build_random_pipeline("flux-tiny", seed=1)
    file = export_single_file(source, tmp_path / "flux1-dev-style.safetensors")
    gen = ["--prompt", "x", "-n", "1", "--steps", "2", "--width", "64", "--height", "64"]

    # a transformer-only file without --base-config, in generate and in train
    code, _, err = run_cli(capsys, "generate", "--model", file, *gen, "--out", tmp_path / "g")
    _one_line_error(code, err, str(file), "--base-config", "FLUX.1")
    assert not (tmp_path / "g").exists()
    code, _, err = run_cli(capsys, *train_args(file, instance_dir, tmp_path / "run"))
    _one_line_error(code, err, str(file), "--base-config")
    assert not (tmp_path / "run").exists()

    # dev's file with schnell's config (the guidance embedding has no place)
    code, _, err = run_cli(capsys, "generate", "--model", file, "--base-config", flux_schnell_model, *gen,
                           "--out", tmp_path / "g")
    _one_line_error(code, err, str(file), "guidance", "--base-config")

    # files whose family cannot be told: random names, LoRAs of three layouts (kohya, ComfyUI, XLabs' bare names)
    cases = {
        "random.safetensors": ({"some.tensor.weight": torch.zeros(2), "other": torch.ones(1)}, "not a full model"),
        "kohya_lora.safetensors": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4)},
                                   "LoRA"),
        "comfy_lora.safetensors": ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 4)},
                                   "LoRA"),
        "xlabs_lora.safetensors": ({"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(2, 4)}, "LoRA"),
    }
    for name, (tensors, needle) in cases.items():
        bad = tmp_path / name
        save_file(tensors, str(bad))
        code, _, err = run_cli(capsys, "generate", "--model", bad, "--base-config", flux_model, *gen,
                               "--out", tmp_path / "g")
        _one_line_error(code, err, str(bad), needle)
        code, _, err = run_cli(capsys, *train_args(bad, instance_dir, tmp_path / "run", "--base-config", flux_model))
        _one_line_error(code, err, str(bad), needle)
    assert not (tmp_path / "g").exists() and not (tmp_path / "run").exists()
