"""LoRA: training through the same loop, kohya-layout files that diffusers loads, stacking in generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from clihelp import run_cli, train_args
from lorahelp import assert_loads_like_fused, merge_adapters
from style_dreambooth.models.backbones import SD1


def _np_image(pipe, prompt="a yltcaxe artstyle house", seed=3):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="np").images[0]


def test_file_loaded_by_diffusers_matches_fused_lora(tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline

    from style_dreambooth.config import TrainConfig
    from style_dreambooth.training.lora_file import lora_state_dict, write_lora_file
    from style_dreambooth.training.trainables import LoraTrainables

    ours = StableDiffusionPipeline.from_pretrained(tiny_model)
    cfg = TrainConfig(instance_dir=tmp_path, instance_prompt="yltcaxe artstyle", output_dir=tmp_path / "o",
                      method="lora", rank=4, lora_alpha=2.0)
    lora = LoraTrainables(cfg, SD1, ours.unet, {"text_encoder": ours.text_encoder}, "hash")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: both factors non-zero
        for model in lora.modules.values():
            for p in (p for n, p in model.named_parameters() if "lora_" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    file = write_lora_file(tmp_path / "style.safetensors", lora_state_dict(lora.modules), lora.metadata())

    keys = set(safe_open(str(file), "pt").keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)

    with_adapters = _np_image(ours)
    merge_adapters(lora)
    fused = _np_image(ours)
    assert np.allclose(with_adapters, fused, atol=1e-4)
    assert_loads_like_fused(StableDiffusionPipeline.from_pretrained(tiny_model), file, _np_image, fused)


def test_train_lora_end_to_end(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--method", "lora", "--rank", "2",
                                               "--max-train-steps", "3", "--checkpointing-steps", "2",
                                               "--text-encoder-lr", "5e-5"))
    assert code == 0, err
    lora_file = run / "model" / "lora.safetensors"
    assert lora_file.is_file() and (run / "checkpoints" / "step-000002" / "lora.safetensors").is_file()
    assert not (run / "model" / "model_index.json").exists()
    with safe_open(str(lora_file), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor(next(k for k in keys if k.endswith(".alpha"))).item() == 2.0
        down = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
        assert down.shape[0] == 2
    assert any(k.startswith("lora_te_") for k in keys)
    assert meta["style_dreambooth.base_model"] == str(tiny_model)
    assert meta["style_dreambooth.identifier"] == "yltcaxe"
    assert meta["style_dreambooth.instance_prompt"] == "yltcaxe artstyle"
    assert len(meta["style_dreambooth.base_model_hash"]) == 16
    assert json.loads(meta["style_dreambooth.training_config"])["method"] == "lora"
    assert meta["ss_network_dim"] == "2"
    config_lr = json.loads(meta["style_dreambooth.training_config"])["learning_rate"]
    assert config_lr == 1e-3  # train_args passes 1e-3; the LoRA default is 1e-4 (test_config below)

    # generate from the run (base + its LoRA), and stack a LoRA file on a plain model.
    code, _, err = run_cli(capsys, "generate", "--model", run, "--prompt", "a yltcaxe artstyle tree", "-n", "1",
                           "--steps", "2", "--out", tmp_path / "g1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "x", "-n", "1", "--steps", "2",
                           "--lora", f"{lora_file}:0.5", "--lora", str(lora_file), "--out", tmp_path / "g2")
    assert code == 0, err
    from PIL import Image

    params = Image.open(tmp_path / "g2" / "000000.png").text["parameters"]
    assert "lora:0.5 + lora:1" in params
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--prompt", "x", "--lora",
                           tmp_path / "missing.safetensors:0.7", "--out", tmp_path / "g3")
    assert code == 2 and "missing.safetensors" in err

    # resume a LoRA run from its checkpoint
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--method", "lora", "--rank", "2",
                                               "--max-train-steps", "4", "--resume-from-checkpoint", "latest",
                                                   "--overwrite"))
    assert code == 0, err


def test_lora_config_defaults_and_groups(tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline

    from style_dreambooth.config import TrainConfig
    from style_dreambooth.errors import UserError
    from style_dreambooth.training.trainables import FullTrainables, LoraTrainables

    cfg = TrainConfig(instance_dir=tmp_path, instance_prompt="a b", output_dir=tmp_path, method="lora")
    assert cfg.learning_rate == 1e-4 and cfg.rank == 4
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    cfg = cfg.model_copy(update={"text_encoder_lr": 3e-5})
    groups = LoraTrainables(cfg, SD1, pipe.unet, {"text_encoder": pipe.text_encoder}, "h").param_groups()
    assert [g["lr"] for g in groups] == [1e-4, 3e-5]
    assert all("lora_" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)
    n_lora = sum(p.numel() for g in groups for p in g["params"])
    assert 0 < n_lora < 0.2 * sum(p.numel() for p in pipe.unet.parameters())

    full = TrainConfig(instance_dir=tmp_path, instance_prompt="a b", output_dir=tmp_path, text_encoder_lr=2e-6)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert [g["lr"] for g in FullTrainables(full, SD1, pipe.unet, {"text_encoder": pipe.text_encoder}).param_groups()] == [1e-6, 2e-6]

    bad = TrainConfig(instance_dir=tmp_path, instance_prompt="a b", output_dir=tmp_path, method="lora",
                      lora_targets=["nothing_here"])
    with pytest.raises(UserError, match="nothing_here"):
        LoraTrainables(bad, SD1, pipe.unet, {"text_encoder": pipe.text_encoder}, "h")
