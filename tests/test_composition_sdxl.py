"""Composition on SD 2.x and SDXL, each on its tiny random model: what test_composition.py checks on
SD 1.x. SDXL adds a pooled prompt vector and size ids, two text encoders, transformers of depth 2 and
attention in only some blocks; its ControlNets carry the same added conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_bad_input import _assert_user_error
from test_composition import _generate, _layout, _pixels, _sketch, save_controlnet


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("sdxl-tiny", tmp_path_factory.mktemp("sdxl") / "sdxl-tiny", seed=0)


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory):
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("sd2-tiny", tmp_path_factory.mktemp("sd2") / "sd2-tiny", seed=0,
                             prediction_type="v_prediction")


@pytest.fixture(params=["sd2", "sdxl"])
def family_model(request):
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture(scope="module")
def sdxl_controlnet(tmp_path_factory, sdxl_model):
    return save_controlnet(sdxl_model, tmp_path_factory.mktemp("controlnet") / "sdxl-cn")


# --------------------------------------------------------------------------- regional prompts


@pytest.mark.parametrize("negative", ["", "blurry"])  # SDXL: zeros for no negative prompt, else its encoding
def test_one_full_canvas_region_is_the_plain_image(tmp_path, family_model, capsys, negative):
    layout = _layout(tmp_path / "full.yaml", prompt="a completely different scene", negative_prompt=negative,
                     regions=[{"box": [0, 0, 1, 1], "prompt": "a red star, yltcaxe artstyle"}])
    code, _, err = _generate(capsys, family_model, tmp_path / "plain", "--prompt", "a red star, yltcaxe artstyle",
                             "--negative-prompt", negative)
    assert code == 0, err
    code, _, err = _generate(capsys, family_model, tmp_path / "full", "--layout", layout)
    assert code == 0, err
    for seed in (0, 1):
        assert np.array_equal(_pixels(tmp_path / "plain", seed), _pixels(tmp_path / "full", seed))


def test_two_regions_change_the_image(tmp_path, family_model, capsys):
    layout = _layout(tmp_path / "two.yaml", prompt="a park", negative_prompt="blurry",
                     regions=[{"box": [0, 0, 0.5, 1], "prompt": "a girl"}, {"box": [0.5, 0, 1, 1], "prompt": "a boy"}])
    code, _, err = _generate(capsys, family_model, tmp_path / "two", "--layout", layout)
    assert code == 0, err
    code, _, err = _generate(capsys, family_model, tmp_path / "plain", "--prompt", "a park",
                             "--negative-prompt", "blurry")
    assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "two"), _pixels(tmp_path / "plain"))


def test_every_cross_attention_of_the_sdxl_unet_blends_and_is_put_back():
    from style_dreambooth.models.random_model import build_random_pipeline
    from style_dreambooth.sampling.regional_attention import RegionalAttnProcessor, regional_attention

    pipe = build_random_pipeline("sdxl-tiny", seed=0)
    before = pipe.unet.attn_processors
    cross = {name for name in before if ".attn2." in name}
    # sdxl-tiny: attention in the second down block, the mid block and the first up block, 2 deep.
    assert any(".transformer_blocks.1.attn2." in name for name in cross)
    assert {name.split(".")[0] for name in cross} == {"down_blocks", "mid_block", "up_blocks"}
    with regional_attention(pipe, torch.ones(1, 8, 8)):
        during = pipe.unet.attn_processors
        assert {name for name, proc in during.items() if isinstance(proc, RegionalAttnProcessor)} == cross
    after = pipe.unet.attn_processors
    assert all(after[name] is proc for name, proc in before.items())


def test_pooled_prompt_blends_by_canvas_share():
    from style_dreambooth.sampling.regional_attention import canvas_shares

    masks = torch.zeros(2, 8, 8)
    assert canvas_shares(torch.ones(1, 8, 8)) == [0.0, 1.0]  # a full-canvas region takes it all
    masks[0, :, :4] = 1
    assert canvas_shares(masks) == [0.5, 0.5, 0.0]
    masks[1, :, 2:6] = 1  # overlapping columns 2-3 are shared, columns 6-7 are the global prompt's
    assert canvas_shares(masks) == [0.25, 0.375, 0.375]
    assert canvas_shares(masks[:1], base_weight=0.5) == [0.75, 0.25]


# --------------------------------------------------------------------------- ControlNet


def test_sdxl_controlnet_folder_and_single_file_steer_alike_with_regions(tmp_path, sdxl_model, sdxl_controlnet,
                                                                         capsys):
    from safetensors.torch import load_file, save_file

    sketch = _sketch(tmp_path / "sketch.png")
    code, _, err = _generate(capsys, sdxl_model, tmp_path / "plain", "--prompt", "a boy")
    assert code == 0, err
    code, _, err = _generate(capsys, sdxl_model, tmp_path / "cn", "--prompt", "a boy", "--control", sketch,
                             "--controlnet", sdxl_controlnet, "--control-scale", "1.5")
    assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "cn"), _pixels(tmp_path / "plain"))
    single = tmp_path / "cn.safetensors"
    save_file(load_file(str(sdxl_controlnet / "diffusion_pytorch_model.safetensors")), str(single))
    code, _, err = _generate(capsys, sdxl_model, tmp_path / "file", "--prompt", "a boy", "--control", sketch,
                             "--controlnet", single, "--control-scale", "1.5")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "file"), _pixels(tmp_path / "cn"))

    layout = _layout(tmp_path / "l.yaml", prompt="a boy",
                     regions=[{"box": [0, 0, 0.5, 1], "prompt": "a girl"}, {"box": [0.5, 0, 1, 1], "prompt": "a boy"}],
                     control=[{"image": "sketch.png", "model": str(sdxl_controlnet), "scale": 1.5}])
    code, _, err = _generate(capsys, sdxl_model, tmp_path / "both", "--layout", layout)
    assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "both"), _pixels(tmp_path / "cn"))
    assert Image.open(tmp_path / "both" / "000000.png").size == (64, 64)


def test_controlnet_of_another_family_names_both(tmp_path, sdxl_model, sdxl_controlnet, tiny_model, capsys):
    sd1_controlnet = save_controlnet(tiny_model, tmp_path / "sd1-cn")
    sketch = _sketch(tmp_path / "s.png")
    xl, sd1 = "Stable Diffusion XL", "Stable Diffusion 1.x"
    cases = [(sdxl_model, sd1_controlnet, "sdxl-tiny", xl, sd1, "no added conditioning"),
             (tiny_model, sdxl_controlnet, "tiny", sd1, xl, "added conditioning 'text_time'")]
    for model, controlnet, label, family, theirs, added in cases:
        code, _, err = _generate(capsys, model, tmp_path / "out", "--prompt", "a boy", "--control", sketch,
                                 "--controlnet", controlnet)
        _assert_user_error(code, err, f"ControlNet '{controlnet}' ({theirs}: cross-attention ",
                           f"{added}) does not fit the model '{label}' ({family}: ",
                           f"pick a ControlNet trained for {family}")
        assert not (tmp_path / "out").exists()
