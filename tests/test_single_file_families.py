"""Single-file export of SD 2.x and SDXL (the SD 1.x cases are in test_single_file.py). Fast, offline, CPU.

Each round trip exports a random pipeline whose weights differ from its config folder's, reads the
file back with diffusers' own ``from_single_file`` (an original -> diffusers converter independent
of ours) with every socket connection refused, and compares every tensor of every component. The
full SD 2.1 and SDXL layouts are checked on meta tensors, so they cost no memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from style_dreambooth.errors import UserError
from style_dreambooth.models.backbones import SD2, SDXL, backbone_of
from style_dreambooth.models.loading import load_pipeline
from style_dreambooth.models.random_model import build_random_components, build_random_pipeline, save_random_model
from style_dreambooth.models.single_file import ConversionError, export_single_file, original_state_dict

from test_single_file import assert_one_line_naming


UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD2_CLIP = "cond_stage_model.model."
SDXL_CLIP_L, SDXL_CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
ARCHITECTURE = {
    ("sd2-tiny", "epsilon"): "stable-diffusion-v2-512",
    ("sd2-tiny", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl-tiny", "epsilon"): "stable-diffusion-xl-v1-base",
}


def components(backbone) -> tuple[str, ...]:
    return ("unet", "vae", *backbone.single_file_text_encoders)


def convert(backbone, parts) -> dict[str, torch.Tensor]:
    state_dicts = {name: parts[name].state_dict() for name in components(backbone)}
    return original_state_dict(backbone, state_dicts, parts["unet"].config, parts["vae"].config)


def assert_same_weights(loaded, source) -> None:
    """Every tensor of every component the file holds is identical (values, dtype, shape)."""
    for name in components(backbone_of(source)):
        want, got = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        for key, tensor in want.items():
            assert not got[key].is_meta, f"{name}.{key} was not loaded (left on the meta device)"
            assert got[key].dtype == tensor.dtype, (name, key)
            assert torch.equal(got[key], tensor), (name, key)


def file_contents(path: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return set(fh.keys()), fh.metadata()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd2(request, tmp_path_factory):
    """(config folder with seed-0 weights, source pipeline with seed-1 weights) of sd2-tiny."""
    prediction = request.param
    folder = save_random_model("sd2-tiny", tmp_path_factory.mktemp("sd2") / prediction, prediction_type=prediction)
    return folder, build_random_pipeline("sd2-tiny", seed=1, prediction_type=prediction)


@pytest.fixture(scope="module")
def sdxl_tiny(tmp_path_factory):
    folder = save_random_model("sdxl-tiny", tmp_path_factory.mktemp("sdxl") / "tiny")
    return folder, build_random_pipeline("sdxl-tiny", seed=1)


# --------------------------------------------------------------------------- SD 2.x round trips


def test_sd2_round_trip_through_diffusers_from_single_file(tmp_path, sd2, no_network):
    from diffusers import StableDiffusionPipeline

    folder, source = sd2
    prediction = source.scheduler.config.prediction_type
    out = export_single_file(source, tmp_path / "sd2.safetensors")
    keys, metadata = file_contents(out)
    assert metadata["architecture"] == ARCHITECTURE["sd2-tiny", prediction]
    assert metadata["prediction_type"] == prediction
    assert all(key.startswith((UNET, VAE, SD2_CLIP)) for key in keys)
    # q, k, v (weight and bias) of each of the 2 text layers become one in_proj pair: 4 keys fewer.
    assert len(keys) == sum(len(getattr(source, n).state_dict()) for n in components(SD2)) - 2 * 4

    stored = load_file(str(out))
    attention = source.text_encoder.encoder.layers[1].self_attn
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(stored[SD2_CLIP + "transformer.resblocks.1.attn.in_proj_weight"], fused)
    assert stored[UNET + "input_blocks.1.1.proj_in.weight"].ndim == 2  # linear, as SD 2.x stores it
    assert SD2_CLIP + "text_projection" not in keys  # diffusers' SD 2.x text encoder has none

    loaded = StableDiffusionPipeline.from_single_file(
        str(out), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    assert_same_weights(loaded, source)
    # The weights came from the file, not from the config folder (seed 0).
    config_pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert not torch.equal(loaded.unet.conv_in.weight, config_pipe.unet.conv_in.weight)


def test_sd2_round_trip_through_load_pipeline(tmp_path, sd2, no_network):
    from diffusers import StableDiffusionPipeline

    folder, source = sd2
    out = export_single_file(source, tmp_path / "sd2.safetensors")
    loaded = load_pipeline(str(out), single_file_config=str(folder))
    assert type(loaded) is StableDiffusionPipeline and backbone_of(loaded) is SD2
    assert loaded.scheduler.config.prediction_type == source.scheduler.config.prediction_type
    assert_same_weights(loaded, source)


# --------------------------------------------------------------------------- SDXL round trips


def test_sdxl_round_trip_through_diffusers_from_single_file(tmp_path, sdxl_tiny, no_network):
    from diffusers import StableDiffusionXLPipeline

    folder, source = sdxl_tiny
    out = export_single_file(source, tmp_path / "sdxl.safetensors")
    keys, metadata = file_contents(out)
    assert metadata["architecture"] == "stable-diffusion-xl-v1-base" and metadata["prediction_type"] == "epsilon"
    assert all(key.startswith((UNET, VAE, SDXL_CLIP_L, SDXL_CLIP_G)) for key in keys)
    # text_encoder_2 fuses q/k/v (4 keys fewer per layer); text_encoder gains the position_ids buffer.
    assert len(keys) == sum(len(getattr(source, n).state_dict()) for n in components(SDXL)) - 2 * 4 + 1

    stored = load_file(str(out))
    projection = source.text_encoder_2.text_projection.weight  # (projection_dim, width) in transformers
    assert torch.equal(stored[SDXL_CLIP_G + "text_projection"], projection.T)  # OpenCLIP's (width, embed)
    assert torch.equal(stored[UNET + "label_emb.0.0.weight"], source.unet.add_embedding.linear_1.weight)
    assert torch.equal(stored[UNET + "label_emb.0.2.bias"], source.unet.add_embedding.linear_2.bias)
    assert stored[SDXL_CLIP_L + "text_model.embeddings.position_ids"].dtype == torch.int64

    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    assert_same_weights(loaded, source)
    # The weights came from the file, not from the config folder (seed 0).
    config_pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    projections = (loaded.text_encoder_2.text_projection.weight, config_pipe.text_encoder_2.text_projection.weight)
    assert not torch.equal(*projections)


def test_sdxl_round_trip_through_load_pipeline(tmp_path, sdxl_tiny, no_network):
    from diffusers import StableDiffusionXLPipeline

    folder, source = sdxl_tiny
    out = export_single_file(source, tmp_path / "sdxl.safetensors")
    loaded = load_pipeline(str(out), single_file_config=str(folder))
    assert type(loaded) is StableDiffusionXLPipeline and backbone_of(loaded) is SDXL
    assert_same_weights(loaded, source)


def assert_exports_folder(tmp_path: Path, folder: Path, shape: str) -> None:
    """export_single_file(folder) stores exactly the folder's weights, cast to fp16."""
    out = export_single_file(folder, tmp_path / f"{shape}.safetensors", half=True)
    source = load_pipeline(str(folder))
    stored, full = load_file(str(out)), convert(backbone_of(source), source.components)
    assert stored.keys() == full.keys()
    for key, tensor in full.items():
        expected = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        assert torch.equal(stored[key], expected), key
    _, metadata = file_contents(out)
    prediction = source.scheduler.config.prediction_type
    assert metadata["architecture"] == ARCHITECTURE[shape, prediction] and metadata["dtype"] == "float16"
    assert metadata["source"] == str(folder.resolve())


def test_export_sd2_from_folder(tmp_path, sd2, no_network):
    assert_exports_folder(tmp_path, sd2[0], "sd2-tiny")


def test_export_sdxl_from_folder(tmp_path, sdxl_tiny, no_network):
    assert_exports_folder(tmp_path, sdxl_tiny[0], "sdxl-tiny")


def test_sdxl_tiny_layout_follows_config(sdxl_tiny):
    converted = convert(SDXL, sdxl_tiny[1].components)
    # sdxl-tiny: (DownBlock2D, CrossAttnDownBlock2D), one layer per block, transformer depth (1, 2).
    assert UNET + "input_blocks.1.0.in_layers.2.weight" in converted
    assert not any(k.startswith(UNET + "input_blocks.1.1.") for k in converted)  # DownBlock2D: no attention
    assert UNET + "input_blocks.2.0.op.weight" in converted
    assert UNET + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in converted
    assert UNET + "middle_block.1.transformer_blocks.1.ff.net.2.weight" in converted
    assert UNET + "output_blocks.1.1.transformer_blocks.1.norm3.weight" in converted
    assert UNET + "output_blocks.1.2.conv.weight" in converted  # upsampler after the transformer
    assert not any(k.startswith(UNET + "output_blocks.3.1.") for k in converted)  # UpBlock2D, last level
    assert not any(k.startswith(UNET + "output_blocks.4.") for k in converted)


# --------------------------------------------------------------------------- full layouts (meta tensors)


SDXL_KEYS = {
    # key: shape in SDXL base 1.0's sd_xl_base_1.0.safetensors
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
    "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.proj_out.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight": (1280, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight": (1280, 5120),
    "conditioner.embedders.1.model.ln_final.bias": (1280,),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
}


def block_indices(converted, where: str) -> set[int]:
    return {int(k.split(".")[3]) for k in converted if k.startswith(UNET + where + ".")}


def text_layers(converted) -> set[int]:
    return {int(m[1]) for k in converted if (m := re.search(r"\.resblocks\.(\d+)\.", k))}


def counts(converted, prefixes) -> list[int]:
    return [sum(k.startswith(prefix) for k in converted) for prefix in prefixes]


@pytest.fixture(scope="module")
def sdxl_meta():
    with torch.device("meta"):
        return build_random_components("sdxl")


def test_sdxl_key_layout(sdxl_meta):
    converted = convert(SDXL, sdxl_meta)
    for key, shape in SDXL_KEYS.items():
        assert key in converted, key
        assert tuple(converted[key].shape) == shape, key
    # 1680 UNet + 248 VAE + 197 CLIP-L (196 + position_ids) + 389 OpenCLIP-bigG (32 layers of 12 + 5).
    # SDXL base 1.0's file has these 2514 and conditioner.embedders.1.model.logit_scale (not a model weight).
    assert counts(converted, (UNET, VAE, SDXL_CLIP_L, SDXL_CLIP_G)) == [1680, 248, 197, 389]
    assert len(converted) == 2514
    assert block_indices(converted, "input_blocks") == set(range(9))
    assert block_indices(converted, "output_blocks") == set(range(9))
    assert block_indices(converted, "middle_block") == {0, 1, 2}
    assert not any(k.startswith(UNET + "input_blocks.1.1.") for k in converted)  # DownBlock2D first
    assert text_layers(converted) == set(range(32))


def test_sdxl_layout_is_what_diffusers_reads_back(sdxl_meta):
    """diffusers' own original -> diffusers converters invert ours on the full SDXL shape."""
    from diffusers.loaders import single_file_utils as sfu

    converted = convert(SDXL, sdxl_meta)
    assert sfu.infer_diffusers_model_type(converted) == "xl_base"
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(converted, dict(sdxl_meta["unet"].config)),
        "vae": sfu.convert_ldm_vae_checkpoint(converted, dict(sdxl_meta["vae"].config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(converted).items()
                         if not k.endswith("position_ids")},
        "text_encoder_2": sfu.convert_open_clip_checkpoint(sdxl_meta["text_encoder_2"], converted, prefix=SDXL_CLIP_G),
    }
    for name, state in back.items():
        original = sdxl_meta[name].state_dict()
        assert set(state) == set(original), name
        for key, tensor in original.items():
            assert state[key].shape == tensor.shape, (name, key)


def test_sd21_key_layout_is_what_diffusers_reads_back():
    from diffusers.loaders import single_file_utils as sfu

    with torch.device("meta"):
        sd21 = build_random_components("sd21")
    converted = convert(SD2, sd21)
    assert sfu.infer_diffusers_model_type(converted) == "v2"
    # SD 2.1's file has 686 UNet, 248 VAE and 294 OpenCLIP-H tensors; diffusers keeps 23 of the 24
    # text layers and no text_projection or logit_scale, so ours has 23 * 12 + 4 text tensors.
    assert counts(converted, (UNET, VAE, SD2_CLIP)) == [686, 248, 280]
    assert text_layers(converted) == set(range(23))
    assert tuple(converted[UNET + "input_blocks.1.1.proj_in.weight"].shape) == (320, 320)
    assert tuple(converted[UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (640, 1024)
    assert tuple(converted[SD2_CLIP + "transformer.resblocks.22.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(converted[SD2_CLIP + "positional_embedding"].shape) == (77, 1024)
    text = sfu.convert_open_clip_checkpoint(sd21["text_encoder"], converted, prefix=SD2_CLIP)
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    assert set(text) == set(sd21["text_encoder"].state_dict())


# --------------------------------------------------------------------------- errors


def test_openclip_tensors_are_each_used_once(sdxl_tiny):
    parts = sdxl_tiny[1].components
    state_dicts = {name: parts[name].state_dict() for name in components(SDXL)}
    configs = (parts["unet"].config, parts["vae"].config)
    text_2 = state_dicts["text_encoder_2"]

    def convert_with(text_encoder_2):
        return original_state_dict(SDXL, {**state_dicts, "text_encoder_2": text_encoder_2}, *configs)

    with pytest.raises(ConversionError, match="logit_scale"):
        convert_with(dict(text_2, logit_scale=torch.zeros(())))
    with pytest.raises(ConversionError, match="k_proj.bias"):
        convert_with({k: v for k, v in text_2.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.bias"})
    with pytest.raises(ConversionError, match="already produced"):
        convert_with(dict(text_2, **{"final_layer_norm.weight": text_2["text_model.final_layer_norm.weight"]}))
    with pytest.raises(ConversionError, match="repeats"):
        convert_with(dict(text_2, **{"encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)}))
    # A buffer older transformers saved, which OpenCLIP does not have, is left out.
    with_ids = dict(text_2, **{"text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0)})
    assert convert_with(with_ids).keys() == convert_with(text_2).keys()
    with pytest.raises(ConversionError, match="text_encoder_2"):
        original_state_dict(SDXL, {k: v for k, v in state_dicts.items() if k != "text_encoder_2"}, *configs)


def test_missing_second_text_encoder_is_a_user_error(tmp_path, sdxl_tiny):
    from diffusers import StableDiffusionXLPipeline

    partial = StableDiffusionXLPipeline(**{**sdxl_tiny[1].components, "text_encoder_2": None})
    with pytest.raises(UserError) as exc:
        export_single_file(partial, tmp_path / "sdxl.safetensors")
    assert "Stable Diffusion XL" in assert_one_line_naming(exc, "text_encoder_2")
    assert list(tmp_path.iterdir()) == []
