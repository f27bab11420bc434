"""Single-file (original CompVis/LDM layout) export. Fast, offline, CPU only.

The round trips load the exported file back with diffusers' own ``from_single_file`` (its
original -> diffusers converter is independent of ours), with every socket connection refused.
The SD 1.5 layout checks run on meta tensors, so they cost no memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from style_dreambooth.errors import UserError
from style_dreambooth.models.loading import load_pipeline
from style_dreambooth.models.random_model import build_random_components, build_random_pipeline
from style_dreambooth.models.single_file import (
    POSITION_IDS_KEY,
    ConversionError,
    diffusers_to_original_state_dict,
    export_single_file,
)

COMPONENTS = ("unet", "vae", "text_encoder")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


def assert_one_line_naming(exc_info, culprit: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    assert culprit in message, message
    return message


@pytest.fixture(scope="module")
def source_pipe():
    """A tiny pipeline whose weights differ from ``tiny_model``'s (seed 0), used as the export source.

    Loading back with ``config=tiny_model`` must then give these weights, not the config folder's.
    """
    return build_random_pipeline("tiny", seed=1)


@pytest.fixture(scope="module")
def sd15_meta():
    with torch.device("meta"):
        return build_random_components("sd15")


def convert(components) -> dict[str, torch.Tensor]:
    return diffusers_to_original_state_dict(
        components["unet"].state_dict(),
        components["vae"].state_dict(),
        components["text_encoder"].state_dict(),
        components["unet"].config,
        components["vae"].config,
    )


def source_key_count(components) -> int:
    return sum(len(components[name].state_dict()) for name in COMPONENTS)


def assert_same_weights(loaded, source, cast=None) -> None:
    for name in COMPONENTS:
        want, got = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert len(got) == len(want), name
        assert set(got) == set(want), name
        for key, tensor in want.items():
            expected = tensor if cast is None else tensor.to(cast)
            assert got[key].dtype == expected.dtype, (name, key)
            assert torch.equal(got[key], expected), (name, key)


# --------------------------------------------------------------------------- round trips


def test_round_trip_through_diffusers_from_single_file(tmp_path, tiny_model, source_pipe, no_network):
    from diffusers import StableDiffusionPipeline

    out = export_single_file(source_pipe, tmp_path / "style.safetensors")
    assert out == (tmp_path / "style.safetensors").resolve()
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]  # no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    with safe_open(str(out), "pt") as fh:
        keys = set(fh.keys())
        metadata = fh.metadata()
    assert all(key.startswith(PREFIXES) for key in keys)
    # Every source tensor once, plus the text encoder's position_ids buffer of the original layout.
    assert len(keys) == source_key_count(source_pipe.components) + 1 and POSITION_IDS_KEY in keys
    assert metadata["format"] == "pt" and metadata["dtype"] == "float32"
    assert metadata["prediction_type"] == "epsilon"

    loaded = StableDiffusionPipeline.from_single_file(
        str(out), config=str(tiny_model), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    assert_same_weights(loaded, source_pipe)
    # The weights came from the file, not from the config folder (seed 0).
    config_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    assert not torch.equal(loaded.unet.conv_in.weight, config_pipe.unet.conv_in.weight)

    # Also without local_files_only: a local config folder alone keeps diffusers off the network.
    again = StableDiffusionPipeline.from_single_file(
        str(out), config=str(tiny_model), safety_checker=None, requires_safety_checker=False
    )
    assert_same_weights(again, source_pipe)


def test_round_trip_through_load_pipeline(tmp_path, tiny_model, source_pipe, no_network):
    out = export_single_file(source_pipe, tmp_path / "style.safetensors")
    loaded = load_pipeline(str(out), single_file_config=str(tiny_model))
    assert loaded.safety_checker is None
    assert_same_weights(loaded, source_pipe)


def test_export_from_folder_and_half(tmp_path, tiny_model, no_network):
    out = export_single_file(tiny_model, tmp_path / "sub" / "half.safetensors", half=True)
    source = load_pipeline(str(tiny_model))
    with safe_open(str(out), "pt") as fh:
        metadata = fh.metadata()
        dtypes = {key: fh.get_slice(key).get_dtype() for key in fh.keys()}
    assert metadata["dtype"] == "float16" and metadata["source"] == str(tiny_model.resolve())
    assert dtypes.pop(POSITION_IDS_KEY) == "I64"  # integer buffers are not cast
    assert set(dtypes.values()) == {"F16"}

    # The stored tensors are exactly the fp32 source cast to fp16 ...
    from safetensors.torch import load_file

    stored, full = load_file(str(out)), convert(source.components)
    assert stored.keys() == full.keys()
    for key, tensor in full.items():
        expected = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        assert torch.equal(stored[key], expected), key
    # ... and load back as such.
    loaded = load_pipeline(str(out), single_file_config=str(tiny_model), torch_dtype=torch.float16)
    assert_same_weights(loaded, source, cast=torch.float16)


def test_overwrite(tmp_path, source_pipe):
    target = tmp_path / "style.safetensors"
    export_single_file(source_pipe, target)
    with pytest.raises(UserError) as exc:
        export_single_file(source_pipe, target)
    assert "already exists" in assert_one_line_naming(exc, str(target))
    before = target.stat().st_size
    export_single_file(source_pipe, target, half=True, overwrite=True)
    assert target.stat().st_size < before
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]


# --------------------------------------------------------------------------- SD 1.5 key layout


SD15_KEYS = {
    # key: shape in the original v1-5 checkpoint
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 768),
    "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.middle_block.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.in_layers.0.weight": (1280,),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.norm.weight": (512,),
    "first_stage_model.encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}


def test_sd15_key_layout(sd15_meta):
    converted = convert(sd15_meta)
    for key, shape in SD15_KEYS.items():
        assert key in converted, key
        assert tuple(converted[key].shape) == shape, key
    # SD 1.5's checkpoint has 1131 tensors under these prefixes: 686 UNet, 248 VAE, 197 CLIP
    # (196 parameters + the position_ids buffer that transformers >= 4.31 no longer saves).
    assert source_key_count(sd15_meta) == 686 + 248 + 196
    assert len(converted) == source_key_count(sd15_meta) + 1 == 1131
    counts = {prefix: sum(k.startswith(prefix) for k in converted) for prefix in PREFIXES}
    assert list(counts.values()) == [686, 248, 197]
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in converted)
    assert {k.split(".")[3] for k in converted if ".input_blocks." in k} == {str(i) for i in range(12)}
    assert {k.split(".")[3] for k in converted if ".output_blocks." in k} == {str(i) for i in range(12)}
    assert {k.split(".")[3] for k in converted if ".decoder.up." in k} == {"0", "1", "2", "3"}
    assert not any("upsample" in k for k in converted if ".decoder.up.0." in k)  # highest resolution
    assert not any("downsample" in k for k in converted if ".encoder.down.3." in k)


def test_sd15_layout_is_what_diffusers_reads_back(sd15_meta):
    """diffusers' own original -> diffusers converters invert ours on the SD 1.5 shape."""
    from diffusers.loaders import single_file_utils as sfu

    converted = convert(sd15_meta)
    assert sfu.infer_diffusers_model_type(converted) == "v1"
    unet = sfu.convert_ldm_unet_checkpoint(converted, dict(sd15_meta["unet"].config))
    vae = sfu.convert_ldm_vae_checkpoint(converted, dict(sd15_meta["vae"].config))
    clip = sfu.convert_ldm_clip_checkpoint(converted)
    clip = {k.removeprefix("text_model."): v for k, v in clip.items() if not k.endswith("position_ids")}
    for name, back in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        original = sd15_meta[name].state_dict()
        assert set(back) == set(original), name
        for key, tensor in original.items():
            assert back[key].shape == tensor.shape, (name, key)


def test_tiny_layout_follows_config(source_pipe):
    converted = convert(source_pipe.components)
    unet = "model.diffusion_model."
    # tiny: layers_per_block=1, (CrossAttnDown, Down) / (Up, CrossAttnUp)
    assert unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in converted
    assert unet + "input_blocks.2.0.op.weight" in converted
    assert not any(k.startswith(unet + "input_blocks.3.1.") for k in converted)  # DownBlock2D: no attention
    assert unet + "output_blocks.1.1.conv.weight" in converted  # UpBlock2D upsampler after 2 resnets
    assert unet + "output_blocks.3.1.proj_out.weight" in converted
    assert not any(k.startswith(unet + "output_blocks.4.") for k in converted)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in converted
    assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in converted
    # The VAE attention projections become 1x1 convolution views of the same data.
    q = converted["first_stage_model.decoder.mid.attn_1.q.weight"]
    linear = source_pipe.vae.decoder.mid_block.attentions[0].to_q.weight
    assert q.shape == (*linear.shape, 1, 1) and torch.equal(q[:, :, 0, 0], linear)


# --------------------------------------------------------------------------- errors


def test_unknown_or_missing_tensor_is_a_conversion_error(source_pipe):
    unet, vae, text = (getattr(source_pipe, n).state_dict() for n in COMPONENTS)
    configs = (source_pipe.unet.config, source_pipe.vae.config)

    with pytest.raises(ConversionError, match="lora_A"):
        bad = dict(unet, **{"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1)})
        diffusers_to_original_state_dict(bad, vae, text, *configs)
    with pytest.raises(ConversionError, match="text_projection"):
        diffusers_to_original_state_dict(unet, vae, dict(text, **{"text_projection.weight": torch.zeros(1)}), *configs)
    with pytest.raises(ConversionError, match="extra"):
        diffusers_to_original_state_dict(unet, dict(vae, extra=torch.zeros(1)), text, *configs)
    with pytest.raises(ConversionError, match="mid_block.attentions.0"):
        missing = {k: v for k, v in unet.items() if not k.startswith("mid_block.attentions.")}
        diffusers_to_original_state_dict(missing, vae, text, *configs)
    with pytest.raises(ConversionError, match="already produced"):
        doubled = dict(text, **{"text_model.final_layer_norm.weight": text["final_layer_norm.weight"]})
        diffusers_to_original_state_dict(unet, vae, doubled, *configs)


def test_old_transformers_clip_names_are_accepted(source_pipe):
    unet, vae, text = (getattr(source_pipe, n).state_dict() for n in COMPONENTS)
    wrapped = {f"text_model.{k}": v for k, v in text.items()}
    wrapped["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    converted = diffusers_to_original_state_dict(unet, vae, wrapped, source_pipe.unet.config, source_pipe.vae.config)
    assert converted.keys() == convert(source_pipe.components).keys()


def test_config_the_layout_cannot_hold_is_a_user_error(source_pipe):
    unet, vae, text = (getattr(source_pipe, n).state_dict() for n in COMPONENTS)
    image_conditioned = dict(source_pipe.unet.config, addition_embed_type="text_image")
    with pytest.raises(UserError) as exc:
        diffusers_to_original_state_dict(unet, vae, text, image_conditioned, source_pipe.vae.config)
    assert_one_line_naming(exc, "addition_embed_type")
    # SDXL's added embedding has a place (label_emb), so an SD 1.x state dict under an SDXL-like
    # config is a mismatch of state dict and config, not a config the layout cannot hold.
    sdxl_like = dict(source_pipe.unet.config, addition_embed_type="text_time")
    with pytest.raises(ConversionError, match="add_embedding.linear_1"):
        diffusers_to_original_state_dict(unet, vae, text, sdxl_like, source_pipe.vae.config)
    weird_vae = dict(source_pipe.vae.config, up_block_types=("UpDecoderBlock3D",) * 2)
    with pytest.raises(UserError) as exc:
        diffusers_to_original_state_dict(unet, vae, text, source_pipe.unet.config, weird_vae)
    assert_one_line_naming(exc, "UpDecoderBlock3D")


@pytest.mark.parametrize("name", ["style.ckpt", "style", "style.safetensors.tmp", "style.bin"])
def test_refuses_non_safetensors_path(tmp_path, source_pipe, name):
    with pytest.raises(UserError) as exc:
        export_single_file(source_pipe, tmp_path / name)
    assert ".safetensors" in assert_one_line_naming(exc, name)
    assert list(tmp_path.iterdir()) == []


def test_refuses_unwritable_locations(tmp_path, source_pipe, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as exc:
        export_single_file(source_pipe, blocker / "sub" / "style.safetensors")
    assert_one_line_naming(exc, str(blocker / "sub"))

    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    with pytest.raises(UserError) as exc:
        export_single_file(source_pipe, folder)
    assert "folder" in assert_one_line_naming(exc, str(folder))

    # A read-only folder (simulated: the tests may run as root, which ignores permissions).
    from style_dreambooth.models import single_file

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(single_file, "open", read_only, raising=False)
    with pytest.raises(UserError) as exc:
        export_single_file(source_pipe, tmp_path / "ro" / "style.safetensors")
    assert "Permission denied" in assert_one_line_naming(exc, str(tmp_path / "ro"))


def test_failed_write_leaves_nothing_behind(tmp_path, source_pipe, monkeypatch):
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    target = tmp_path / "style.safetensors"
    target.write_bytes(b"previous export")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(UserError) as exc:
        export_single_file(source_pipe, target, overwrite=True)
    assert "No space left" in assert_one_line_naming(exc, str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]
    assert target.read_bytes() == b"previous export"  # the old file is untouched


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as exc:
        export_single_file(tmp_path / "nope", tmp_path / "style.safetensors")
    assert_one_line_naming(exc, str(tmp_path / "nope"))


def test_metadata_reports_the_stored_dtype(tmp_path):
    pipe = build_random_pipeline("tiny", seed=2).to(torch.float16)
    out = export_single_file(pipe, tmp_path / "fp16-source.safetensors")  # half=False keeps fp16
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["dtype"] == "float16"
        assert fh.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"


def test_export_cli_and_train_from_single_file(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    """export RUN --to single-file, then --base-model FILE.safetensors trains from it."""
    import torch
    from diffusers import StableDiffusionPipeline

    from clihelp import run_cli, train_args

    run = tmp_path / "run"
    assert run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--max-train-steps", "2"))[0] == 0
    out = tmp_path / "style.safetensors"
    code, stdout, err = run_cli(capsys, "export", run, "--to", "single-file", out)
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", run, out)
    assert code == 2 and str(out) in err, "an existing file is not overwritten silently"
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model), local_files_only=True)
    trained = StableDiffusionPipeline.from_pretrained(run / "model")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(trained, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name
    code, _, err = run_cli(capsys, "export", run, "--half", "--overwrite", out)
    assert code == 0, err

    run2 = tmp_path / "run2"
    code, _, err = run_cli(capsys, *train_args(out, instance_dir, run2, "--max-train-steps", "1",
                                               "--base-config", tiny_model, "--no-prior-preservation"))
    assert code == 0, err
    # generate reads the same file, taking its configs from --base-config (offline)
    code, _, err = run_cli(capsys, "generate", "--model", out, "--base-config", tiny_model, "--prompt", "x",
                           "-n", "1", "--steps", "1", "--out", tmp_path / "gen")
    assert code == 0, err
    assert "Model: style" in Image.open(tmp_path / "gen" / "000000.png").text["parameters"]
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    code, _, err = run_cli(capsys, *train_args(ckpt, instance_dir, tmp_path / "run3"))
    assert code == 2 and "--allow-pickle" in err and "model.ckpt" in err
