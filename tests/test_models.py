"""Tokenizer, random-weight models and base-model loading. Fast, offline, CPU only.

``tiny_model`` is the session-scoped fixture from conftest.py: one tiny random model saved once.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from style_dreambooth.errors import UserError
from style_dreambooth.models.loading import load_pipeline, model_identity
from style_dreambooth.models.random_model import (
    build_random_components,
    build_random_pipeline,
    save_random_model,
)
from style_dreambooth.models.tokenizer import (
    IdentifierReport,
    analyze_identifier,
    build_clip_tokenizer,
    find_identifier,
    format_identifier_report,
)


@pytest.fixture(scope="session")
def tokenizer():
    return build_clip_tokenizer()


def assert_one_line_naming(exc_info, culprit: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    assert culprit in message, message
    return message


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_clip_ids(tokenizer):
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.unk_token == "<|endoftext|>"
    padded = tokenizer("a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(padded) == 77 and padded[-1] == 49407


def test_tokenizer_save_dir_is_a_tokenizer_folder(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer(tmp_path / "tok")
    names = {p.name for p in (tmp_path / "tok").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    merges = (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49408 - 512 - 2
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert again.model_max_length == 77


def test_rare_identifier_splits_and_suggestions_are_single_tokens(tokenizer):
    report = analyze_identifier(tokenizer, "yltcaxe")
    assert isinstance(report, IdentifierReport)
    assert [p.removesuffix("</w>") for p in report.pieces] == ["yl", "t", "ca", "xe"]
    assert len(report.ids) == 4 and not report.is_single_token
    assert len(report.suggestions) == 5
    for word in report.suggestions:
        assert 3 <= len(word) <= 5 and word.isascii() and word.isalpha() and word.islower()
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
        assert analyze_identifier(tokenizer, word).is_single_token
    assert analyze_identifier(build_clip_tokenizer(), "yltcaxe").suggestions == report.suggestions

    text = format_identifier_report(report)
    assert "'yltcaxe' -> 4 BPE pieces: yl | t | ca | xe" in text
    assert "one token" in text and report.suggestions[0] in text


def test_single_token_identifier_has_no_suggestions(tokenizer):
    report = analyze_identifier(tokenizer, "sks")
    assert report.is_single_token and report.suggestions == []
    assert "1 BPE token" in format_identifier_report(report)


def test_find_identifier():
    assert find_identifier("yltcaxe artstyle", "artstyle") == "yltcaxe"
    assert find_identifier("A painting in the style of Yltcaxe!", "a painting") == "yltcaxe"
    assert find_identifier("an illustration, yltcaxe style", None) == "illustration"
    assert find_identifier("artstyle", "artstyle") is None
    assert find_identifier("", "x") is None


# --------------------------------------------------------------------------- random models


FULL_SHAPES = {  # the published models' parameter counts
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "flux-dev": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
                 "text_encoder_2": 4_762_310_656},  # T5 v1.1 XXL's encoder
}


def test_random_model_command_offers_every_declared_shape(tmp_path, capsys):
    from clihelp import run_cli
    from style_dreambooth.models.random_model import SHAPES

    assert {"tiny", "sdxl", "flux-tiny", "flux-dev"} <= set(SHAPES)
    code, _, err = run_cli(capsys, "random-model", "--shape", "nope", tmp_path / "m")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(shape in lines[0] for shape in SHAPES), err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("shape", sorted(FULL_SHAPES))
def test_full_shapes_have_the_published_parameter_counts_on_meta_device(shape):
    with torch.device("meta"):
        parts = build_random_components(shape)
    networks = {name: m for name, m in parts.items() if isinstance(m, torch.nn.Module)}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in networks.items()}
    assert counts == FULL_SHAPES[shape]
    assert all(p.device.type == "meta" for m in networks.values() for p in m.parameters())


def test_random_pipeline_is_deterministic():
    a = build_random_pipeline("tiny", seed=3)
    b = build_random_pipeline("tiny", seed=3)
    c = build_random_pipeline("tiny", seed=4)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_random_pipeline("tiny", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_random_pipeline_config():
    pipe = build_random_pipeline("tiny", prediction_type="v_prediction")
    cfg = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.num_train_timesteps == 1000 and cfg.skip_prk_steps and cfg.steps_offset == 1
    assert cfg.set_alpha_to_one is False and cfg.clip_sample is False
    assert cfg.prediction_type == "v_prediction"
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 32
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    with pytest.raises(UserError):
        build_random_pipeline("huge")  # type: ignore[arg-type]


def test_tiny_train_step_runs():
    pipe = build_random_pipeline("tiny")
    ids = pipe.tokenizer(["yltcaxe"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
    assert latents.shape == (2, 4, 32, 32)
    start = time.perf_counter()
    noise = torch.randn_like(latents)
    pred = pipe.unet(latents + noise, torch.tensor([10, 500]), pipe.text_encoder(ids)[0]).sample
    torch.nn.functional.mse_loss(pred, noise).backward()
    assert pipe.unet.conv_in.weight.grad is not None
    assert time.perf_counter() - start < 30  # ~0.1 s on 2 CPU cores; generous for busy machines


def test_saved_tiny_model_reloads_and_generates(tiny_model):
    from diffusers import StableDiffusionPipeline

    assert (tiny_model / "model_index.json").is_file()
    assert (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model / "tokenizer" / "vocab.json").is_file()
    assert not list(tiny_model.parent.glob(".tiny.tmp-*"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert pipe.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_save_random_model_refuses_non_empty_and_overwrites(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError) as exc:
        save_random_model("tiny", out)
    assert_one_line_naming(exc, str(out))
    assert (out / "keep.txt").exists()

    save_random_model("tiny", out, overwrite=True)
    assert (out / "model_index.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind

    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_random_model("tiny", empty) == empty.resolve()


def test_save_random_model_unwritable_parent(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as exc:
        save_random_model("tiny", blocker / "sub" / "model")
    assert_one_line_naming(exc, "file.txt")


# --------------------------------------------------------------------------- loading


def test_load_pipeline_from_folder(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    assert pipe.safety_checker is None
    assert pipe.unet.config.cross_attention_dim == 32
    half = load_pipeline(str(tiny_model), torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_load_pipeline_missing_path(tmp_path):
    for missing in ("./no/such/model", str(tmp_path / "missing.safetensors"), "~/nope-model"):
        with pytest.raises(UserError) as exc:
            load_pipeline(missing)
        assert "not found" in assert_one_line_naming(exc, missing)


def test_load_pipeline_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError) as exc:
        load_pipeline(str(tmp_path))
    assert "model_index.json" in assert_one_line_naming(exc, str(tmp_path))


def test_load_pipeline_refuses_pickle(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(UserError) as exc:
        load_pipeline(str(ckpt))
    message = assert_one_line_naming(exc, str(ckpt))
    assert "pickle" in message and "--allow-pickle" in message


def test_load_pipeline_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable at import: make sure the env var alone is honoured.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(UserError) as exc:
        load_pipeline("no-such-org-xyz/no-such-model-xyz")
    assert time.perf_counter() - start < 10
    message = assert_one_line_naming(exc, "'no-such-org-xyz/no-such-model-xyz'")
    assert "local Hugging Face cache" in message
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored after the call


def test_load_pipeline_invalid_hub_id():
    with pytest.raises(UserError) as exc:
        load_pipeline("not a valid id!")
    assert_one_line_naming(exc, "'not a valid id!'")


def test_single_file_without_config_offline_asks_for_base_config(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    weights = tmp_path / "style.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(weights))
    with pytest.raises(UserError) as exc:
        load_pipeline(str(weights))
    assert "--base-config" in assert_one_line_naming(exc, str(weights))


def test_single_file_with_mismatched_config(tmp_path, tiny_model):
    from safetensors.torch import save_file

    weights = tmp_path / "junk.safetensors"
    save_file({"junk": torch.zeros(2)}, str(weights))
    with pytest.raises(UserError) as exc:
        load_pipeline(str(weights), single_file_config=str(tiny_model))
    assert_one_line_naming(exc, str(weights))
    with pytest.raises(UserError) as exc:
        load_pipeline(str(weights), single_file_config=str(tmp_path))
    assert_one_line_naming(exc, str(tmp_path))


# --------------------------------------------------------------------------- identity


def test_model_identity_stable_and_seed_sensitive(tiny_model, tmp_path):
    first = model_identity(str(tiny_model))
    assert first == model_identity(str(tiny_model))
    json.dumps(first)
    assert first["path"] == str(tiny_model.resolve())
    names = [w["name"] for w in first["weights"]]
    assert names == sorted(names) and "unet/diffusion_pytorch_model.safetensors" in names

    folder = tmp_path / "m"
    save_random_model("tiny", folder, seed=0)
    seed0 = model_identity(str(folder))
    assert seed0["weights"] == first["weights"]  # same seed, same bytes
    save_random_model("tiny", folder, seed=1, overwrite=True)
    seed1 = model_identity(str(folder))
    assert seed1 != seed0 and seed1["path"] == seed0["path"]

    single = folder / "unet" / "diffusion_pytorch_model.safetensors"
    ident = model_identity(str(single))
    assert ident["weights"][0]["size"] == single.stat().st_size


def test_model_identity_hub_id_uses_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--style-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    assert model_identity("someone/style-model") == {
        "hub_id": "someone/style-model",
        "revision": None,
        "commit": commit,
    }
    assert model_identity("someone/other-model", revision="v1") == {
        "hub_id": "someone/other-model",
        "revision": "v1",
    }
