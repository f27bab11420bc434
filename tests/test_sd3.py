"""Stable Diffusion 3.5 through the whole toolkit on its tiny random model: full and LoRA training with prior
preservation and CLIP training (T5 never), resume after a kill, the LoRA file (diffusers' names, the scale folded)
loaded back and rendered like the live fused weights, generate (run folder, checkpoints, stacked LoRAs, the
flow-matching sampler, classifier-free guidance), the conditioning kept per prompt, telling SD3 files from FLUX.1
ones, the published parameter counts, and the bad inputs (one line each). The losses against the equations are in
test_reference_losses_sd3.py."""

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


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> Path:
    """A tiny random SD 3.5 (CLIP-L, CLIP-G and T5 with the offline T5 tokenizer; Medium's attn2 in block 0)."""
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("sd3-tiny", tmp_path_factory.mktemp("models") / "sd3-tiny", seed=0)


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def _parameters(png: Path) -> str:
    from PIL import Image

    return Image.open(png).text["parameters"]


def _config(tmp_path: Path, **kwargs):
    from style_dreambooth.config import TrainConfig

    return TrainConfig(instance_dir=tmp_path, instance_prompt="yltcaxe artstyle", output_dir=tmp_path / "o", **kwargs)


def _lora(cfg, pipe, randomise: bool = True):
    """Our LoRA trainables on a pipeline, with trained-looking adapters (both factors non-zero)."""
    from style_dreambooth.models.backbones import backbone_of
    from style_dreambooth.training.trainables import LoraTrainables

    family = backbone_of(pipe)
    lora = LoraTrainables(cfg, family, family.denoiser(pipe), family.text_encoders(pipe), "hash")
    if randomise:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in lora.modules.values():
                for p in (p for n, p in module.named_parameters() if "lora_" in n):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return lora


# --------------------------------------------------------------------------- train and generate

# Each method's run, trained once for the module: the end-to-end checks read it, and the resume test trains the
# same run again with a kill in the middle. LoRA at rank 2 with alpha 3, a scale of 3/2 that is not a power of two,
# so its up weights are stored in float64 and must unfold exactly on resume; the full run trains CLIP-G too.
RUNS = {
    "full": ["--method", "full", "--train-text-encoder-2"],
    "lora": ["--method", "lora", "--rank", "2", "--lora-alpha", "3"],
}
COMMON = ["--max-train-steps", "4", "--checkpointing-steps", "2"]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Instance images and a class-image cache shared by the module's runs (the cache is keyed by everything that
    shapes its images, so the runs after the first reuse its class images)."""
    from conftest import write_style_images

    root = tmp_path_factory.mktemp("sd3-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLE_DREAMBOOTH_CACHE", str(root / "cache"))
        yield root, write_style_images(root / "instance")


@pytest.fixture(scope="module")
def runs(sd3_model, place):
    """``runs(method)``: the folder of that method's run (RUNS), trained the first time it is asked for."""
    root, instance_dir = place
    done: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in done:
            folder = root / f"whole-{method}"
            code, err = _train_quietly(sd3_model, instance_dir, folder, *RUNS[method], *COMMON)
            assert code == 0, err
            done[method] = folder
        return done[method]

    return run


def _train_quietly(model, instance_dir, out, *extra) -> tuple[int, str]:
    """Run `train` in-process outside a test's capsys (for a module fixture)."""
    import contextlib
    import io

    from style_dreambooth.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in train_args(model, instance_dir, out, *extra)])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def test_full_run_trains_the_clips_not_t5_and_generates(tmp_path, sd3_model, runs, place, capsys):
    run = runs("full")
    assert "backbone: sd3" in (run / "config.yaml").read_text()
    assert json.loads((run / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    for name, trains in (("text_encoder", True), ("text_encoder_2", True), ("text_encoder_3", False)):
        ours, base = _tensors(run / "model" / name), _tensors(sd3_model / name)
        assert ours.keys() == base.keys()
        assert any(not torch.equal(v, base[k]) for k, v in ours.items()) == trains, name  # CLIP-L, CLIP-G; T5 never
    manifest = json.loads(next((place[0] / "cache").rglob("manifest.json")).read_text())
    assert manifest["spec"]["extra"] == {"family": "sd3"} and manifest["spec"]["sampler"] == "flow-euler"
    for extra in ([], ["--checkpoint", "latest"]):
        out = tmp_path / f"gen{len(extra)}"
        code, _, err = run_cli(capsys, "generate", "--model", run, *extra, "--prompt", "a yltcaxe artstyle tree",
                               "-n", "1", "--steps", "2", "--out", out)
        assert code == 0, err
        text = _parameters(out / "000000.png")
        assert "Sampler: Euler" in text and "CFG scale: 3.5" in text and "Size: 64x64" in text
    code, _, err = run_cli(capsys, "export", run, tmp_path / "style.safetensors")
    _one_line_error(code, err, "sd3", "not available")


def test_lora_run_writes_diffusers_names_and_generates_stacked(tmp_path, sd3_model, runs, capsys):
    from diffusers import StableDiffusion3Pipeline

    run = runs("lora")
    file = run / "model" / "lora.safetensors"
    with safe_open(str(file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    for key in ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight",
                "transformer.transformer_blocks.0.attn2.to_v.lora_A.weight",  # Medium's second self-attention
                "transformer.transformer_blocks.0.attn.to_add_out.lora_B.weight",
                "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight"):
        assert key in keys, key
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # no .alpha: diffusers refuses it
    assert not any(k.startswith(("text_encoder_2.", "text_encoder_3.")) for k in keys)  # CLIP-G is opt-in, T5 never
    # A scale of 3/2 folded in exactly: float64 up weights, but for the last block's add_q_proj, whose context
    # queries are discarded (context_pre_only), so it gets no gradient and its zeros fold exactly in float32.
    assert {k for k, v in tensors.items() if v.dtype == torch.float32 and "lora_B" in k} == {
        "transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"}
    assert {v.dtype for k, v in tensors.items() if "lora_A" in k} == {torch.float32}
    assert meta["style_dreambooth.backbone"] == "sd3" and meta["ss_base_model_version"] == "3-5-large"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-3-5-large/lora"
    state = StableDiffusion3Pipeline.lora_state_dict(str(file))  # diffusers' own reader takes it as it is
    assert set(state) == keys
    for extra in ([], ["--checkpoint", "latest"]):
        code, _, err = run_cli(capsys, "generate", "--model", run, *extra, "--prompt", "a yltcaxe artstyle tree",
                               "-n", "1", "--steps", "2", "--out", tmp_path / f"gen{len(extra)}")
        assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", sd3_model, "--lora", f"{file}:0.5", "--lora", file,
                           "--prompt", "a tree", "-n", "1", "--steps", "2", "--out", tmp_path / "stacked")
    assert code == 0, err


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_a_kill_gives_identical_weights(tmp_path, sd3_model, runs, place, capsys, monkeypatch, method):
    import style_dreambooth.training.loop as loop

    whole, part = runs(method), tmp_path / "part"
    common = [*RUNS[method], *COMMON]
    instance_dir = place[1]
    real_save = loop.save_checkpoint

    def die_after_first(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies right after step 2's checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", die_after_first)
    assert run_cli(capsys, *train_args(sd3_model, instance_dir, part, *common))[0] == 130
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    code, _, err = run_cli(capsys, *train_args(sd3_model, instance_dir, part, *common,
                                               "--resume-from-checkpoint", "latest"))
    assert code == 0, err
    a, b = _tensors(whole / "model"), _tensors(part / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_file_reloaded_renders_the_live_fused_weights(tmp_path, sd3_model):
    """A scale of 3/4 (rank 4, alpha 3) is not a power of two, so the folded up weights are kept in float64;
    resuming gets the adapters back bit for bit, and diffusers renders the file as our fused weights."""
    from diffusers import StableDiffusion3Pipeline

    from style_dreambooth.models.backbones import SD3
    from style_dreambooth.training.lora_file import load_lora_state_dict, lora_state_dict, write_lora_file

    cfg = _config(tmp_path, method="lora", rank=4, lora_alpha=3.0, train_text_encoder_2=True)
    ours = StableDiffusion3Pipeline.from_pretrained(sd3_model)
    lora = _lora(cfg, ours)
    assert set(lora.modules) == {"transformer", "text_encoder", "text_encoder_2"}
    tensors = lora_state_dict(lora.modules, SD3)
    assert {str(v.dtype) for k, v in tensors.items() if k.endswith("lora_B.weight")} == {"torch.float64"}
    assert {str(v.dtype) for k, v in tensors.items() if k.endswith("lora_A.weight")} == {"torch.float32"}
    file = write_lora_file(tmp_path / "style.safetensors", tensors, lora.metadata())

    again = _lora(cfg, StableDiffusion3Pipeline.from_pretrained(sd3_model), randomise=False)
    load_lora_state_dict(again.modules, load_file(str(file)), SD3)
    for role, module in lora.modules.items():
        theirs = dict(again.modules[role].named_parameters())
        for name, p in module.named_parameters():
            if "lora_" in name:
                assert torch.equal(p, theirs[name]), name

    def image(pipe):
        return pipe("a yltcaxe artstyle house", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                    width=64, height=64, output_type="np", **SD3.pipe_call_kwargs(pipe)).images[0]

    merge_adapters(lora)
    fused = image(ours)
    plain = StableDiffusion3Pipeline.from_pretrained(sd3_model)
    base = image(plain)
    SD3.load_lora(plain, file, "style")
    loaded = image(plain)
    assert np.abs(loaded - base).max() > 1e-2, "the LoRA must change the output"
    assert np.allclose(loaded, fused, atol=1e-4), np.abs(loaded - fused).max()


def test_folded_up_weights_stay_float32_when_the_fold_is_exact():
    from style_dreambooth.models.backbones import SD3

    down, up = torch.randn(4, 8), torch.randn(6, 4)
    for alpha, dtype in ((4.0, torch.float32), (2.0, torch.float32), (16.0, torch.float32), (3.0, torch.float64)):
        out = SD3.lora_tensors({"transformer": {"proj_out": (down, up, alpha)}}, {})
        assert out["transformer.proj_out.lora_B.weight"].dtype == dtype, alpha
        assert torch.allclose(out["transformer.proj_out.lora_B.weight"].float(), up * alpha / 4)


# --------------------------------------------------------------------------- conditioning


def test_frozen_text_encoders_keep_each_prompts_own_conditioning(sd3_model):
    """Cached by prompt, not by step: a batch drawn in another order gets its own prompts' rows (diffusers #14430,
    the SD3 script, cached by dataloader step while the loader shuffled); and the conditioning is the pipeline's."""
    from diffusers import StableDiffusion3Pipeline

    from style_dreambooth.models.backbones import SD3, PromptEncoder

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model)
    encoders = SD3.text_encoders(pipe)
    plain = PromptEncoder(SD3, SD3.tokenizers(pipe), torch.device("cpu"))
    cached = PromptEncoder(SD3, SD3.tokenizers(pipe), torch.device("cpu"), frozen=True)
    prompts = ["a red star, yltcaxe artstyle", "a blue moon, yltcaxe artstyle", "artstyle"]
    with torch.no_grad():
        cached.precompute(encoders, prompts)
        for batch in (prompts[:2], prompts[1::-1], [prompts[2], prompts[0]], [prompts[1], prompts[1]]):
            want, got = plain(encoders, batch), cached(encoders, batch)
            assert torch.allclose(got.hidden, want.hidden, atol=1e-6)
            assert torch.allclose(got.pooled, want.pooled, atol=1e-6)
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  **SD3.pipe_call_kwargs(pipe))
        ours = plain(encoders, prompts)
    assert torch.equal(ours.hidden, hidden) and torch.equal(ours.pooled, pooled)
    assert ours.hidden.shape == (3, 77 + 32, 96) and ours.pooled.shape == (3, 32 + 48)
    assert not torch.allclose(want.hidden[0], plain(encoders, [prompts[0]]).hidden[0])  # the prompts differ


def test_t5_reads_the_tokens_the_pipeline_samples_with():
    """A tokenizer longer than the pipeline's 256 T5 tokens (SD 3.5's own is): training cuts its ids to what the
    tokenizer gives at 256, for a short prompt and for one over 256 tokens."""
    from style_dreambooth.models.backbones.sd3 import t5_ids
    from style_dreambooth.models.t5_tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(512)
    prompts = ["a red star", " ".join(["tree"] * 300)]
    long = tokenizer(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
    want = tokenizer(prompts, padding="max_length", max_length=256, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(t5_ids(long), want)
    assert torch.equal(t5_ids(want), want)


# --------------------------------------------------------------------------- files and shapes


def test_sd3_and_flux_files_are_told_apart(tmp_path, sd3_model, flux_model):
    from style_dreambooth.models.backbones import FAMILIES, FLUX, SD3, family_of_folder, family_of_lora

    assert family_of_folder(sd3_model) is SD3 and family_of_folder(flux_model) is FLUX
    sd3_config = json.loads((sd3_model / "transformer" / "config.json").read_text())
    flux_config = json.loads((flux_model / "transformer" / "config.json").read_text())
    assert [f for f in FAMILIES.values() if f.owns_unet_config(sd3_config)] == [SD3]
    assert [f for f in FAMILIES.values() if f.owns_unet_config(flux_config)] == [FLUX]
    ours = {"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"}
    flux_diffusers = ours | {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"}
    assert family_of_lora({}, ours) is SD3 and family_of_lora({}, flux_diffusers) is FLUX
    assert family_of_lora({}, {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"}) is SD3  # sd-scripts
    assert family_of_lora({"ss_base_model_version": "3-5-large"}, {"x.lora_down.weight"}) is SD3
    assert [f for f in FAMILIES.values() if f.owns_single_file({"model.diffusion_model.joint_blocks.0.x_block."
                                                                 "attn.qkv.weight"})] == [SD3]


def test_real_shapes_have_the_published_parameter_counts():
    """SD 3.5 Large 8.1B and Medium 2.5B (the transformer's weights and its fixed position table, which the
    checkpoints hold), CLIP-L 123.65M and CLIP-G 694.66M with projections, the T5-XXL encoder 4.76B."""
    from style_dreambooth.models.random_model import build_random_components

    def count(module, buffers=False):
        return sum(p.numel() for p in module.parameters()) + (sum(b.numel() for b in module.buffers()) if buffers
                                                             else 0)

    with torch.device("meta"):
        large, medium = build_random_components("sd35-large"), build_random_components("sd35-medium")
    assert count(large["transformer"]) == 8_056_627_520 and count(large["transformer"], True) == 8_146_280_768
    assert count(medium["transformer"]) == 2_243_171_520 and count(medium["transformer"], True) == 2_469_663_936
    for parts in (large, medium):
        assert count(parts["text_encoder"]) == 123_650_304 and count(parts["text_encoder_2"]) == 694_659_840
        assert count(parts["text_encoder_3"]) == 4_762_310_656 and count(parts["vae"]) == 83_819_683
    assert len(medium["transformer"].transformer_blocks[12].attn2.to_q.weight.shape) == 2
    assert medium["transformer"].transformer_blocks[13].attn2 is None


# --------------------------------------------------------------------------- bad inputs


def test_sd3_bad_inputs_are_one_line(tmp_path, sd3_model, flux_model, tiny_model, instance_dir, cache_env, capsys):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from style_dreambooth.models.backbones import FLUX, SD3
    from style_dreambooth.training.lora_file import lora_state_dict, write_lora_file

    cases = [
        (tiny_model, ["--backbone", "sd3"], ["--backbone sd3", "sd1"]),
        (sd3_model, ["--flow-shift", "resolution"], ["--flow-shift resolution", "FLUX.1", "static shift (its scheduler's, 3)"]),
        (sd3_model, ["--snr-gamma", "5"], ["--snr-gamma", "flow matching"]),
        (sd3_model, ["--min-timestep", "100"], ["--min-timestep", "flow matching"]),
        (sd3_model, ["--train-guidance", "3"], ["--train-guidance 3", "classifier-free"]),
        (sd3_model, ["--resolution", "72"], ["--resolution 72", "16", "Stable Diffusion 3.5"]),
    ]
    for model, flags, needles in cases:
        run = tmp_path / "run"
        code, _, err = run_cli(capsys, *train_args(model, instance_dir, run, *flags))
        _one_line_error(code, err, *needles)
        assert not run.exists(), flags

    # A FLUX.1 LoRA file to an SD3 model and an SD3 one to a FLUX.1 model, with their metadata and without.
    cfg = _config(tmp_path, method="lora", rank=2)
    files = {}
    for name, family, pipe in (("flux", FLUX, FluxPipeline.from_pretrained(flux_model)),
                               ("sd3", SD3, StableDiffusion3Pipeline.from_pretrained(sd3_model))):
        lora = _lora(cfg, pipe, randomise=False)
        tensors = lora_state_dict(lora.modules, family)
        files[name] = write_lora_file(tmp_path / f"{name}.safetensors", tensors, lora.metadata())
        files[f"{name}-bare"] = write_lora_file(tmp_path / f"{name}-bare.safetensors", tensors, {})
    gen = ["--prompt", "x", "-n", "1", "--steps", "2", "--width", "64", "--height", "64"]
    for model, flags, needles in [
        (sd3_model, ["--lora", files["flux"]], ["flux.safetensors", "flux (FLUX.1)", "sd3 (Stable Diffusion 3.5)"]),
        (sd3_model, ["--lora", files["flux-bare"]], ["flux-bare.safetensors", "flux", "sd3"]),
        (flux_model, ["--lora", files["sd3"]], ["sd3.safetensors", "sd3 (Stable Diffusion 3.5)", "flux (FLUX.1)"]),
        (flux_model, ["--lora", files["sd3-bare"]], ["sd3-bare.safetensors", "sd3", "flux"]),
        (tiny_model, ["--lora", files["sd3"]], ["sd3.safetensors", "sd3", "sd1"]),
        (sd3_model, ["--scheduler", "dpm++"], ["--scheduler dpm++", "sd3", "flow-euler"]),
    ]:
        code, _, err = run_cli(capsys, "generate", "--model", model, *gen, *flags, "--out", tmp_path / "g")
        _one_line_error(code, err, *needles)
        assert not (tmp_path / "g").exists()
    layout = tmp_path / "layout.yaml"
    layout.write_text("prompt: two things\nregions:\n  - box: [0, 0, 0.5, 1]\n    prompt: a star\n")
    code, _, err = run_cli(capsys, "generate", "--model", sd3_model, "--layout", layout, *gen, "--out", tmp_path / "g")
    _one_line_error(code, err, "--layout", "sd3")


def test_no_option_trains_t5(tmp_path):
    """T5 is no text encoder any option trains: --train-text-encoder trains CLIP-L, --train-text-encoder-2 CLIP-G."""
    from style_dreambooth.models.backbones import SD3
    from style_dreambooth.training.trainables import trained_text_encoders

    for te in (True, False):
        for te2 in (None, True, False):
            chosen = trained_text_encoders(_config(tmp_path, train_text_encoder=te, train_text_encoder_2=te2), SD3)
            assert chosen == [n for n, on in (("text_encoder", te), ("text_encoder_2", bool(te2))) if on]
    assert "text_encoder_3" in SD3.frozen_text_encoders
