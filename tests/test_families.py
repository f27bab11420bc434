"""What the SD 1.x path has, for SD 2.x and SDXL, each on its tiny random model (the SD 1.x cases are in
test_train.py, test_lora.py and test_reference_losses.py): training full and LoRA with prior preservation
and text-encoder training, resume, the first 20 losses against a plain fp32 reference written out here,
generate, export and the kohya LoRA layout; and the family errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clihelp import run_cli, train_args
from lorahelp import assert_loads_like_fused, merge_adapters
from conftest import write_style_images
from test_reference_losses import reference_losses

# family -> (random shape, prediction type): SD 2.x as the 768-v release, SDXL as base 1.0.
FAMILIES = {"sd2": ("sd2-tiny", "v_prediction"), "sdxl": ("sdxl-tiny", "epsilon")}
TEXT_ENCODERS = {"sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}
LORA_PREFIXES = {"sd2": {"lora_unet_", "lora_te_"}, "sdxl": {"lora_unet_", "lora_te1_", "lora_te2_"}}
PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
SECOND_ENCODER = {"sd2": [], "sdxl": ["--train-text-encoder-2"]}  # SDXL's second text encoder is opt-in


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    from style_dreambooth.models.random_model import save_random_model

    shape, prediction = FAMILIES[request.param]
    return request.param, save_random_model(shape, tmp_path_factory.mktemp(shape) / "model", prediction_type=prediction)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


# --------------------------------------------------------------------------- train, generate, export


def test_full_training_trains_every_text_encoder_and_generates_and_exports(
        tmp_path, family_model, instance_dir, cache_env, capsys):
    family, model = family_model
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, "--checkpointing-steps", "2",
                                               *SECOND_ENCODER[family]))
    assert code == 0, err
    config = (run / "config.yaml").read_text()
    assert f"backbone: {family}" in config  # auto-detected from model_index.json and the UNet config
    assert json.loads((run / "model" / "model_index.json").read_text())["_class_name"] == PIPELINES[family]
    assert all(m["prior_loss"] is not None for m in _metrics(run))
    for name in TEXT_ENCODERS[family]:  # each text encoder trained (and was saved)
        trained, base = _weights(run / "model" / name), _weights(model / name)
        assert any(not torch.equal(trained[k], base[k]) for k in base), name
        unused = [k for k in base if "final_layer_norm" in k or "layers.1." in k]  # tiny encoders: 2 layers
        same = all(torch.equal(trained[k], base[k]) for k in unused)
        # SDXL reads its first encoder at the penultimate layer: the last layer and final norm stay frozen
        # (multi-GPU training refuses parameters without gradients).
        assert same == (family == "sdxl" and name == "text_encoder"), name
    # The class images were drawn by this family's pipeline and cached under a key that names it.
    manifests = list(cache_env.rglob("manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["spec"]["extra"] == {"family": family}

    for extra in ([], ["--checkpoint", "latest"]):
        code, _, err = run_cli(capsys, "generate", "--model", run, *extra, "--prompt", "a yltcaxe artstyle tree",
                               "-n", "1", "--steps", "2", "--out", tmp_path / f"gen{len(extra)}")
        assert code == 0, err
    code, _, err = run_cli(capsys, "evaluate", run, "--steps", "2", "--seeds", "0", "--dino", "none", "--clip", "none")
    assert code == 0, err
    assert (run / "report.html").is_file() and (run / "eval" / "step-000002" / "scores.json").is_file()
    single = tmp_path / "style.safetensors"
    code, _, err = run_cli(capsys, "export", run, single)
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", single, "--base-config", model, "--prompt", "a tree",
                           "-n", "1", "--steps", "2", "--width", "64", "--height", "64", "--out", tmp_path / "gen-file")
    assert code == 0, err


def test_lora_training_writes_the_family_kohya_layout(tmp_path, family_model, instance_dir, cache_env, capsys):
    family, model = family_model
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, "--method", "lora", "--rank", "2",
                                               *SECOND_ENCODER[family]))
    assert code == 0, err
    with safe_open(str(run / "model" / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split("_")[0] + "_" + k.split("_")[1] + "_" for k in keys} == LORA_PREFIXES[family]
    assert meta["style_dreambooth.backbone"] == family
    assert meta["ss_base_model_version"] == {"sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    code, _, err = run_cli(capsys, "generate", "--model", run, "--prompt", "a yltcaxe artstyle tree", "-n", "1",
                           "--steps", "2", "--out", tmp_path / "gen")
    assert code == 0, err


def test_resume_equals_uninterrupted_run(tmp_path, family_model, instance_dir, cache_env, capsys, monkeypatch):
    import style_dreambooth.training.loop as loop

    _, model = family_model
    common = ["--max-train-steps", "4", "--checkpointing-steps", "2", "--train-batch-size", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(capsys, *train_args(model, instance_dir, full, *common))[0] == 0

    real_save = loop.save_checkpoint

    def crash_after_first(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies right after step 2's checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first)
    assert run_cli(capsys, *train_args(model, instance_dir, part, *common))[0] == 130
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, part, *common, "--resume-from-checkpoint", "latest"))
    assert code == 0, err
    a, b = _metrics(full), _metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_sdxl_keeps_its_vae_in_fp32_under_mixed_precision(tmp_path, instance_dir, cache_env, capsys, monkeypatch):
    import style_dreambooth.training.loop as loop
    from style_dreambooth.models.random_model import save_random_model

    model = save_random_model("sdxl-tiny", tmp_path / "model")
    seen = []
    real = loop.LatentEncoder.__init__

    def record(self, vae, device, dtype, *args, **kwargs):
        seen.append((dtype, next(vae.parameters()).dtype))
        real(self, vae, device, dtype, *args, **kwargs)

    monkeypatch.setattr(loop.LatentEncoder, "__init__", record)
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, tmp_path / "run", "--max-train-steps", "2",
                                               "--mixed-precision", "bf16", "--validation-steps", "2"))
    assert code == 0, err
    assert seen == [(torch.float32, torch.float32)]
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()  # validation decoded in fp32


def test_sdxl_trains_with_a_replacement_vae_and_refuses_a_bad_one(tmp_path, instance_dir, cache_env, capsys):
    from style_dreambooth.models.random_model import save_random_model

    model = save_random_model("sdxl-tiny", tmp_path / "model")
    fixed = save_random_model("sdxl-tiny", tmp_path / "other", seed=7) / "vae"  # stands in for the fp16-fixed VAE
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, "--vae", fixed, "--max-train-steps", "2",
                                               "--mixed-precision", "bf16"))
    assert code == 0, err
    assert f"vae: {fixed}" in (run / "config.yaml").read_text()
    saved, replacement = _weights(run / "model" / "vae"), _weights(fixed)
    assert all(torch.equal(saved[k], replacement[k]) for k in replacement)  # the run's model carries that VAE
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, tmp_path / "bad", "--vae", tmp_path / "nowhere"))
    _one_line_error(code, err, "--vae", "nowhere")


# --------------------------------------------------------------------------- the maths, written out plainly

STEPS, LR = 20, 1e-4  # as test_reference_losses.py, whose plain reference spells out each family's conditioning


def test_first_20_losses_match_the_plain_reference(tmp_path, family_model, capsys):
    family, model = family_model
    instance_dir = write_style_images(tmp_path / "instance")  # 80x72: random crops, SDXL's crop ids vary
    class_dir = write_style_images(tmp_path / "class", n=6, size=(64, 64), seed=5)
    reference = reference_losses(model, instance_dir, class_dir, STEPS, family=family)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(
        model, instance_dir, run, "--class-dir", class_dir, "--max-train-steps", STEPS, "--learning-rate", LR,
        "--no-8bit-adam", *SECOND_ENCODER[family],
    ))
    assert code == 0, err
    ours = [m["loss"] for m in _metrics(run)]
    assert reference[-1] != pytest.approx(reference[0], rel=1e-3), "the reference did not move; the comparison is empty"
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------- SDXL LoRA in other tools


def test_sdxl_lora_file_loaded_by_diffusers_matches_the_fused_adapters(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from style_dreambooth.config import TrainConfig
    from style_dreambooth.models.backbones import SDXL
    from style_dreambooth.models.random_model import save_random_model
    from style_dreambooth.training.lora_file import lora_state_dict, write_lora_file
    from style_dreambooth.training.trainables import LoraTrainables

    model = save_random_model("sdxl-tiny", tmp_path / "model")
    ours = StableDiffusionXLPipeline.from_pretrained(model)
    cfg = TrainConfig(instance_dir=tmp_path, instance_prompt="yltcaxe artstyle", output_dir=tmp_path / "o",
                      method="lora", rank=4, lora_alpha=2.0, train_text_encoder_2=True)
    lora = LoraTrainables(cfg, SDXL, ours.unet, SDXL.text_encoders(ours), "hash")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: both factors non-zero
        for module in lora.modules.values():
            for p in (p for n, p in module.named_parameters() if "lora_" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    file = write_lora_file(tmp_path / "style.safetensors", lora_state_dict(lora.modules, SDXL),
                           lora.metadata())
    keys = set(safe_open(str(file), "pt").keys())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.alpha" in keys

    def image(pipe):
        generator = torch.Generator().manual_seed(3)
        return pipe("a yltcaxe artstyle house", num_inference_steps=3, generator=generator, width=64, height=64,
                    output_type="np").images[0]

    merge_adapters(lora)
    assert_loads_like_fused(StableDiffusionXLPipeline.from_pretrained(model), file, image, image(ours))


# --------------------------------------------------------------------------- the families' errors


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_damaged_model_index_is_one_line(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model_index.json").write_text("{not json")
    code, _, err = run_cli(capsys, *train_args(broken, instance_dir, tmp_path / "run"))
    _one_line_error(code, err, "model_index.json", "damaged")
    code, _, err = run_cli(capsys, "generate", "--model", broken, "--prompt", "x", "--out", tmp_path / "g")
    _one_line_error(code, err, "model_index.json")


def test_a_model_of_an_unknown_family_lists_the_families_we_know(tmp_path, tiny_model, instance_dir, cache_env, capsys):
    import shutil

    flux = tmp_path / "flux"
    shutil.copytree(tiny_model, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "HunyuanDiTPipeline"}))
    code, _, err = run_cli(capsys, *train_args(flux, instance_dir, tmp_path / "run"))
    _one_line_error(code, err, "HunyuanDiTPipeline", "sd1", "sd2", "sdxl", "flux")
    assert not (tmp_path / "run").exists()


def test_backbone_that_contradicts_the_model_is_refused(tmp_path, family_model, instance_dir, cache_env, capsys):
    family, model = family_model
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, tmp_path / "run", "--backbone", "sd1"))
    _one_line_error(code, err, "--backbone sd1", family)
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "x", "--out", tmp_path / "g")
    assert code == 0, err  # generate reads the family from the files


def test_lora_or_resume_of_another_family_names_both(tmp_path, family_model, tiny_model, instance_dir, cache_env,
                                                     capsys):
    family, model = family_model
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, "--method", "lora", "--rank", "2",
                                               "--max-train-steps", "3", "--checkpointing-steps", "2"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model, "--lora", run / "model" / "lora.safetensors",
                           "--prompt", "x", "-n", "1", "--steps", "2", "--out", tmp_path / "g")
    _one_line_error(code, err, "lora.safetensors", family, "sd1")
    assert not (tmp_path / "g").exists()
    code, _, err = run_cli(capsys, *train_args(tiny_model, instance_dir, run, "--method", "lora", "--rank", "2",
                                               "--max-train-steps", "4", "--resume-from-checkpoint", "latest",
                                               "--overwrite"))
    _one_line_error(code, err, family, "sd1", "cannot resume")
    assert (run / "model" / "lora.safetensors").is_file()  # the finished model is kept


def test_a_cached_hub_id_loads_offline_as_its_family(tmp_path, family_model, monkeypatch):
    import shutil

    import huggingface_hub.constants

    from style_dreambooth.models.backbones import backbone_of
    from style_dreambooth.models.loading import load_pipeline

    family, model = family_model
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--style-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("diffusers.utils.constants.HF_HUB_CACHE", str(tmp_path), raising=False)
    pipe = load_pipeline("someone/style-model")
    assert type(pipe).__name__ == PIPELINES[family] and backbone_of(pipe).family == family
