"""Composition control: regional prompts (layout files), ControlNet conditioning, layout sketches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clihelp import run_cli, train_args
from test_bad_input import _assert_user_error

GEN = ["-n", "2", "--steps", "3", "--width", "64", "--height", "64"]


def _pixels(folder, seed=0) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{seed:06d}.png"), np.int16)


def _layout(path, **data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _recorded_layout(folder) -> dict:
    text = Image.open(folder / "000000.png").info["parameters"]
    return json.loads(json.loads(text.split("Layout: ", 1)[1]))


def _generate(capsys, model, out, *extra):
    return run_cli(capsys, "generate", "--model", model, "--out", out, *GEN, *extra)


# --------------------------------------------------------------------------- regional prompts


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler-a", "pndm"])
def test_one_full_canvas_region_is_the_plain_image(tmp_path, tiny_model, capsys, scheduler):
    layout = _layout(tmp_path / "full.yaml", prompt="a completely different scene",
                     regions=[{"box": [0, 0, 1, 1], "prompt": "a red star, yltcaxe artstyle"}])
    code, _, err = _generate(capsys, tiny_model, tmp_path / "plain", "--prompt", "a red star, yltcaxe artstyle",
                             "--scheduler", scheduler)
    assert code == 0, err
    code, _, err = _generate(capsys, tiny_model, tmp_path / "full", "--layout", layout, "--scheduler", scheduler)
    assert code == 0, err
    for seed in (0, 1):
        assert np.array_equal(_pixels(tmp_path / "plain", seed), _pixels(tmp_path / "full", seed))


def test_each_region_follows_its_own_prompt_at_every_resolution():
    """The processor's output over the left half is exactly the layer's own attention to the left
    prompt, over the right half to the right prompt, at every UNet resolution of a 16x16 latent."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from style_dreambooth.sampling.regional_attention import RegionalAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    inner = AttnProcessor2_0()
    masks = torch.zeros(2, 16, 16)
    masks[0, :, :8] = 1
    masks[1, :, 8:] = 1
    proc = RegionalAttnProcessor(inner, masks)
    prompts = [torch.randn(1, 7, 16) for _ in range(3)]  # global, left, right
    for side in (16, 8, 4):
        hidden = torch.randn(1, side * side, 32)
        with torch.no_grad():
            out = proc(attn, hidden, torch.cat(prompts, dim=1)).view(side, side, 32)
            own = [inner(attn, hidden, p).view(side, side, 32) for p in prompts]
        half = side // 2
        assert torch.equal(out[:, :half], own[1][:, :half])
        assert torch.equal(out[:, half:], own[2][:, half:])
    # Self-attention (no text) passes through untouched.
    hidden = torch.randn(1, 64, 32)
    self_attn = Attention(query_dim=32, heads=2, dim_head=16)
    assert torch.equal(proc(self_attn, hidden), inner(self_attn, hidden))


def test_uncovered_canvas_follows_the_global_prompt_and_overlaps_average():
    from style_dreambooth.sampling.regional_attention import RegionalAttnProcessor

    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, 1:3] = 1  # overlaps region 0 in column 1; column 3 is uncovered
    w = RegionalAttnProcessor(None, masks).weights(16).view(3, 4, 4)
    assert torch.equal(w[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(w[:, 0, 1], torch.tensor([0.0, 0.5, 0.5]))
    assert torch.equal(w[:, 0, 3], torch.tensor([1.0, 0.0, 0.0]))
    based = RegionalAttnProcessor(None, masks, base_weight=0.25).weights(16).view(3, 4, 4)
    assert torch.allclose(based[:, 0, 0], torch.tensor([0.25, 0.75, 0.0]))


def test_two_regions_change_the_image_and_the_png_reproduces_it(tmp_path, tiny_model, capsys):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "right.png")
    layout = _layout(tmp_path / "two.yaml", prompt="a park", negative_prompt="blurry",
                     regions=[{"box": [0, 0, 32, 64], "prompt": "a girl"}, {"mask": "right.png", "prompt": "a boy"}])
    code, _, err = _generate(capsys, tiny_model, tmp_path / "two", "--layout", layout)
    assert code == 0, err
    code, _, err = _generate(capsys, tiny_model, tmp_path / "plain", "--prompt", "a park", "--negative-prompt", "blurry")
    assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "two"), _pixels(tmp_path / "plain"))

    text = Image.open(tmp_path / "two" / "000000.png").info["parameters"]
    assert text.startswith("a park\nNegative prompt: blurry\n")
    recorded = _recorded_layout(tmp_path / "two")
    assert [r["prompt"] for r in recorded["regions"]] == ["a girl", "a boy"]
    (tmp_path / "again.json").write_text(json.dumps(recorded), encoding="utf-8")
    code, _, err = _generate(capsys, tiny_model, tmp_path / "again", "--layout", tmp_path / "again.json")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "again"), _pixels(tmp_path / "two"))


def test_layout_works_with_a_lora_run_checkpoint_and_stacked_lora(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--method", "lora",
                                               "--checkpointing-steps", "2"))
    assert code == 0, err
    layout = _layout(tmp_path / "l.yaml", prompt="a park", regions=[{"box": [0, 0, 0.5, 1], "prompt": "a yltcaxe girl"}])
    lora = f"{run / 'model' / 'lora.safetensors'}:0.5"
    code, _, err = _generate(capsys, run, tmp_path / "a", "--layout", layout, "--checkpoint", "latest", "--lora", lora)
    assert code == 0, err
    code, _, err = _generate(capsys, run, tmp_path / "b", "--layout", layout, "--checkpoint", "latest")
    assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "a"), _pixels(tmp_path / "b"))  # the stacked LoRA acts
    assert "lora" in Image.open(tmp_path / "a" / "000000.png").info["parameters"]


# --------------------------------------------------------------------------- ControlNet


def save_controlnet(model, folder):
    """A ControlNet built on ``model``'s UNet (any family), with non-zero output convolutions so that
    it acts, saved as a diffusers folder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory, tiny_model):
    """A ControlNet for the tiny random model."""
    return save_controlnet(tiny_model, tmp_path_factory.mktemp("controlnet") / "cn")


def _sketch(path, size=64):
    img = Image.new("RGB", (size, size), "white")
    img.paste((0, 0, 0), (8, 8, 30, 56))
    img.save(path)
    return path


def test_controlnet_folder_and_single_file_steer_alike(tmp_path, tiny_model, tiny_controlnet, capsys):
    from safetensors.torch import load_file, save_file

    sketch = _sketch(tmp_path / "sketch.png")
    code, _, err = _generate(capsys, tiny_model, tmp_path / "plain", "--prompt", "a boy")
    assert code == 0, err
    code, _, err = _generate(capsys, tiny_model, tmp_path / "cn", "--prompt", "a boy", "--control", sketch,
                             "--controlnet", tiny_controlnet, "--control-scale", "1.5")
    assert code == 0, err
    assert not np.array_equal(_pixels(tmp_path / "cn"), _pixels(tmp_path / "plain"))
    recorded = _recorded_layout(tmp_path / "cn")
    assert recorded["control"][0]["scale"] == 1.5 and recorded["control"][0]["model"] == str(tiny_controlnet)

    single = tmp_path / "cn.safetensors"
    save_file(load_file(str(tiny_controlnet / "diffusion_pytorch_model.safetensors")), str(single))
    code, _, err = _generate(capsys, tiny_model, tmp_path / "file", "--prompt", "a boy", "--control", sketch,
                             "--controlnet", single, "--control-scale", "1.5")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "file"), _pixels(tmp_path / "cn"))

    # Two stacked pairs, the second at scale 0, give the one-ControlNet image.
    code, _, err = _generate(capsys, tiny_model, tmp_path / "two", "--prompt", "a boy", "--control", sketch,
                             "--controlnet", tiny_controlnet, "--control", sketch, "--controlnet", single,
                             "--control-scale", "1.5", "--control-scale", "0")
    assert code == 0, err
    assert np.abs(_pixels(tmp_path / "two") - _pixels(tmp_path / "cn")).max() <= 1


def test_controlnet_and_regions_together_from_the_layout_file(tmp_path, tiny_model, tiny_controlnet, capsys):
    _sketch(tmp_path / "sketch.png")
    layout = _layout(tmp_path / "l.yaml", prompt="a park",
                     regions=[{"box": [0, 0, 0.5, 1], "prompt": "a girl"}, {"box": [0.5, 0, 1, 1], "prompt": "a boy"}],
                     control=[{"image": "sketch.png", "model": str(tiny_controlnet), "scale": 1.0}])
    code, _, err = _generate(capsys, tiny_model, tmp_path / "both", "--layout", layout)
    assert code == 0, err
    recorded = _recorded_layout(tmp_path / "both")
    assert len(recorded["regions"]) == 2 and recorded["control"][0]["image"] == str((tmp_path / "sketch.png").resolve())
    (tmp_path / "again.json").write_text(json.dumps(recorded), encoding="utf-8")
    code, _, err = _generate(capsys, tiny_model, tmp_path / "again", "--layout", tmp_path / "again.json")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "again"), _pixels(tmp_path / "both"))


# --------------------------------------------------------------------------- layout-sketch


def test_layout_sketch_draws_the_regions(tmp_path, capsys):
    mask = np.zeros((64, 64), np.uint8)
    mask[40:60, 40:60] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    layout = _layout(tmp_path / "l.yaml", width=64, height=64,
                     regions=[{"box": [0.125, 0.25, 0.5, 0.75], "prompt": "a girl"}, {"mask": "m.png", "prompt": "a boy"}])
    code, out, err = run_cli(capsys, "layout-sketch", layout, "--out", tmp_path / "s.png")
    assert code == 0, err
    arr = np.asarray(Image.open(tmp_path / "s.png").convert("L"))
    assert arr.shape == (64, 64)
    assert arr[16, 8] == 0 and arr[47, 31] == 0  # box corners are inked
    assert arr[32, 20] == 255 and arr[0, 0] == 255  # inside and outside stay paper
    assert arr[40, 50] == 0 and arr[50, 50] == 255  # the mask's outline, not its inside

    code, _, err = run_cli(capsys, "layout-sketch", layout, "--out", tmp_path / "solid.png", "--style", "solid")
    assert code == 0, err
    solid = np.asarray(Image.open(tmp_path / "solid.png").convert("L"))
    assert solid[32, 20] == 0 and solid[50, 50] == 0 and solid[0, 0] == 255  # regions filled with ink
    code, _, err = run_cli(capsys, "layout-sketch", layout, "--out", tmp_path / "f.png", "--style", "segments",
                           "--white-on-black", "--width", "128", "--height", "128")
    assert code == 0, err
    filled = np.asarray(Image.open(tmp_path / "f.png"))
    assert filled.shape == (128, 128, 3)
    assert tuple(filled[64, 40]) != tuple(filled[100, 100]) and tuple(filled[0, 0]) == (0, 0, 0)
    code, _, err = run_cli(capsys, "layout-sketch", layout, "--out", tmp_path / "s.png")
    _assert_user_error(code, err, "already exists")


def test_colour_sketch_fills_each_region_with_its_own_colour(tmp_path, capsys):
    mask = np.zeros((64, 64), np.uint8)
    mask[40:60, 40:60] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    layout = _layout(tmp_path / "l.yaml", width=64, height=64,
                     regions=[{"box": [0.125, 0.25, 0.5, 0.75], "prompt": "a yellow star", "colour": "#f0cd19"},
                              {"mask": "m.png", "prompt": "a purple heart", "colour": "purple"},
                              {"box": [0, 0, 0.1, 0.1], "prompt": "a bird"}])
    code, _, err = run_cli(capsys, "layout-sketch", layout, "--out", tmp_path / "c.png", "--style", "colours")
    assert code == 0, err
    arr = np.asarray(Image.open(tmp_path / "c.png"))
    assert tuple(arr[32, 20]) == (240, 205, 25) and tuple(arr[50, 50]) == (128, 0, 128)
    assert tuple(arr[2, 2]) == (0, 0, 0) and tuple(arr[32, 60]) == (255, 255, 255)  # no colour: ink; paper
    bad = _layout(tmp_path / "bad.yaml", width=64, height=64,
                  regions=[{"box": [0, 0, 1, 1], "prompt": "a star", "colour": "yelow"}])
    code, _, err = run_cli(capsys, "layout-sketch", bad, "--out", tmp_path / "b.png", "--style", "colours")
    _assert_user_error(code, err, "'yelow' is neither a colour name nor #rrggbb")
    assert not (tmp_path / "b.png").exists()


# --------------------------------------------------------------------------- bad input


BAD_LAYOUTS = {
    "broken": ("prompt: [unclosed\n", "not valid YAML"),
    "outside": ({"prompt": "p", "regions": [{"box": [0.5, 0, 1.5, 1], "prompt": "a boy"}]}, "outside"),
    "outside_px": ({"prompt": "p", "regions": [{"box": [0, 0, 100, 64], "prompt": "a boy"}]}, "outside the 64x64"),
    "zero": ({"prompt": "p", "regions": [{"box": [0.5, 0, 0.5, 1], "prompt": "a boy"}]}, "zero area"),
    "both": ({"prompt": "p", "regions": [{"box": [0, 0, 1, 1], "mask": "m.png", "prompt": "a"}]}, "region 0"),
    "noprompt": ({"regions": [{"box": [0, 0, 1, 1], "prompt": "a"}]}, "no 'prompt'"),
    "badmask": ({"prompt": "p", "regions": [{"mask": "wide.png", "prompt": "a boy"}]}, "aspect ratio"),
    "nomask": ({"prompt": "p", "regions": [{"mask": "missing.png", "prompt": "a boy"}]}, "missing.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_bad_layouts_are_one_line_errors_and_write_nothing(tmp_path, tiny_model, capsys, case):
    Image.new("L", (128, 64), 255).save(tmp_path / "wide.png")
    data, needle = BAD_LAYOUTS[case]
    path = tmp_path / "layout.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    code, _, err = _generate(capsys, tiny_model, tmp_path / "out", "--layout", path)
    _assert_user_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_mask_of_another_size_and_same_aspect_is_resized_with_a_note(tmp_path, tiny_model, capsys, caplog):
    mask = np.zeros((128, 128), np.uint8)
    mask[:, :64] = 255
    Image.fromarray(mask).save(tmp_path / "big.png")
    layout = _layout(tmp_path / "l.yaml", prompt="p", regions=[{"mask": "big.png", "prompt": "a girl"}])
    with caplog.at_level("INFO", logger="style_dreambooth"):
        code, _, err = _generate(capsys, tiny_model, tmp_path / "out", "--layout", layout)
    assert code == 0, err
    assert "resized to the 64x64 canvas" in caplog.text


def test_bad_control_inputs_are_one_line_errors(tmp_path, tiny_model, tiny_controlnet, capsys):
    sketch = _sketch(tmp_path / "s.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "notcn").mkdir()
    cases = [
        (["--control", tmp_path / "none.png", "--controlnet", tiny_controlnet], "none.png"),
        (["--control", tmp_path / "junk.png", "--controlnet", tiny_controlnet], "junk.png"),
        (["--control", sketch, "--control", sketch, "--controlnet", tiny_controlnet], "2 --control image(s) but 1"),
        (["--control", sketch, "--controlnet", tmp_path / "notcn"], "not a ControlNet folder"),
        (["--control", sketch, "--controlnet", "someone/not-cached-controlnet"], "not-cached-controlnet"),
    ]
    for extra, needle in cases:
        code, _, err = _generate(capsys, tiny_model, tmp_path / "out", "--prompt", "a boy", *extra)
        _assert_user_error(code, err, needle)
        assert not (tmp_path / "out").exists()


def test_controlnet_of_another_architecture_names_both(tmp_path, tiny_model, capsys):
    from style_dreambooth.toyworld.controlnet import controlnet_dir

    sketch = _sketch(tmp_path / "s.png")
    code, _, err = _generate(capsys, tiny_model, tmp_path / "out", "--prompt", "a boy", "--control", sketch,
                             "--controlnet", controlnet_dir())
    _assert_user_error(code, err, str(controlnet_dir()), "does not fit the model", "tiny", "cross-attention 64",
                       "cross-attention 32")
    assert not (tmp_path / "out").exists()
