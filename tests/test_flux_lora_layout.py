"""FLUX.1 LoRA files in the kohya sd-scripts layout: names and fused shapes at FLUX.1-dev's real sizes, the
deltas the fused modules carry, diffusers' own kohya reader, and a tiny real transformer with peft adapters."""

from __future__ import annotations

import pytest
import torch

from style_dreambooth.models.backbones import flux_lora as fl

FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
TINY_INNER, TINY_MLP = 32, 128
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
RANK, ALPHA = 2, 4.0  # scale 2
FOLDED = {"proj_out", "norm_out.linear"}  # written with the scale folded into up, alpha = rank

DOUBLE_NAMES = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"]
SINGLE_NAMES = ["linear1", "linear2", "modulation_lin"]
TOP_NAMES = ["img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer",
             "vector_in_out_layer", "guidance_in_in_layer", "guidance_in_out_layer", "final_layer_linear",
             "final_layer_adaLN_modulation_1"]


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_adapters(shapes: dict[str, tuple[int, int]], seed: int = 0, rank: int = RANK, alpha: float = ALPHA):
    g = torch.Generator().manual_seed(seed)
    return {path: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha)
            for path, (i, o) in shapes.items()}


def probe(down, up, alpha, x):
    """delta @ x without forming the delta: alpha / r * up @ (down @ x)."""
    return (alpha / down.shape[0]) * (up @ (down @ x))


def close(a, b, tol=1e-6) -> bool:
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-30)


@pytest.fixture(scope="module")
def real_adapters():
    """Rank-2 adapters on every Linear of FLUX.1-dev's transformer (built on the meta device for its sizes)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1_DEV)
    shapes = linear_shapes(model)
    assert len(shapes) == 19 * 14 + 38 * 6 + 10  # 14 Linears a double block, 6 a single block, 10 at the top
    return random_adapters(shapes)


@pytest.fixture(scope="module")
def real_kohya(real_adapters):
    return fl.to_kohya(real_adapters, 3072, 12288)


def _module_of(name: str) -> str:
    return name.rsplit(".", 2)[0] if name.endswith(".weight") else name.rsplit(".", 1)[0]


def test_real_names_are_the_kohya_ones_with_fused_shapes(real_kohya):
    expected = ({f"lora_unet_double_blocks_{i}_{n}" for i in range(19) for n in DOUBLE_NAMES}
                | {f"lora_unet_single_blocks_{i}_{n}" for i in range(38) for n in SINGLE_NAMES}
                | {f"lora_unet_{n}" for n in TOP_NAMES})
    assert {_module_of(k) for k in real_kohya} == expected
    assert set(real_kohya) == {f"{m}.{s}" for m in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}

    def shapes(name):
        return (tuple(real_kohya[f"{name}.lora_down.weight"].shape), tuple(real_kohya[f"{name}.lora_up.weight"].shape),
                real_kohya[f"{name}.alpha"].item())

    assert shapes("lora_unet_single_blocks_7_linear1") == (
        (4 * RANK, 3072), (3 * 3072 + 12288, 4 * RANK), 2.0 * 4 * RANK)  # alpha = scale * 4r
    assert shapes("lora_unet_double_blocks_18_img_attn_qkv") == ((3 * RANK, 3072), (3 * 3072, 3 * RANK), 2.0 * 3 * RANK)
    assert shapes("lora_unet_double_blocks_0_txt_attn_qkv") == ((3 * RANK, 3072), (3 * 3072, 3 * RANK), 2.0 * 3 * RANK)
    assert shapes("lora_unet_single_blocks_37_linear2") == ((RANK, 15360), (3072, RANK), ALPHA)
    assert shapes("lora_unet_double_blocks_3_img_mod_lin") == ((RANK, 3072), (6 * 3072, RANK), ALPHA)
    assert shapes("lora_unet_single_blocks_0_modulation_lin") == ((RANK, 3072), (3 * 3072, RANK), ALPHA)
    assert shapes("lora_unet_final_layer_linear") == ((RANK, 3072), (64, RANK), float(RANK))  # scale folded
    alpha = real_kohya["lora_unet_txt_in.alpha"]
    assert alpha.ndim == 0 and alpha.dtype == torch.float32


def test_real_fused_deltas_are_the_parts_stacked(real_adapters, real_kohya):
    g = torch.Generator().manual_seed(1)
    by_name: dict[str, list[str]] = {}
    for path in sorted(real_adapters, key=lambda p: fl.bfl_module(p)[1]):  # each part at its place in the rows
        by_name.setdefault(fl.kohya_name(path), []).append(path)
    assert by_name["lora_unet_single_blocks_2_linear1"] == [
        "single_transformer_blocks.2.attn.to_q", "single_transformer_blocks.2.attn.to_k",
        "single_transformer_blocks.2.attn.to_v", "single_transformer_blocks.2.proj_mlp"]
    assert set(by_name) == {_module_of(k) for k in real_kohya}
    for name, parts in by_name.items():
        down, up = real_kohya[f"{name}.lora_down.weight"], real_kohya[f"{name}.lora_up.weight"]
        x = torch.randn(down.shape[1], 3, generator=g)
        stacked = torch.cat([probe(*real_adapters[p], x) for p in parts])
        if name == "lora_unet_final_layer_adaLN_modulation_1":  # BFL orders (shift, scale), diffusers (scale, shift)
            stacked = torch.cat([stacked[3072:], stacked[:3072]])
        assert close(probe(down, up, real_kohya[f"{name}.alpha"].item(), x), stacked), name


def test_real_round_trip_is_exact(real_adapters, real_kohya):
    back = fl.from_kohya(real_kohya, 3072, 12288)
    assert set(back) == set(real_adapters)
    x = torch.randn(3072, 2, generator=torch.Generator().manual_seed(2))
    for path, (down, up, alpha) in real_adapters.items():
        d, u, a = back[path]
        if path in FOLDED:  # same delta, carried with alpha = rank
            assert a == RANK and torch.equal(d, down)
            assert close(probe(d, u, a, x), probe(down, up, alpha, x))
        else:
            assert torch.equal(d, down) and torch.equal(u, up) and a == alpha, path


def test_diffusers_kohya_reader_gives_our_deltas(real_adapters, real_kohya):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    theirs = _convert_kohya_flux_lora_to_diffusers(dict(real_kohya))  # it pops what it reads
    modules = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in theirs}
    assert modules == set(real_adapters)
    g = torch.Generator().manual_seed(3)
    for path, adapter in real_adapters.items():
        key = f"transformer.{path}" if f"transformer.{path}.lora_A.weight" in theirs else path
        a, b = theirs[f"{key}.lora_A.weight"], theirs[f"{key}.lora_B.weight"]
        x = torch.randn(a.shape[1], 2, generator=g)
        # diffusers folds alpha / rank into A and B (it loads them with alpha = rank)
        assert close(b @ (a @ x), probe(*adapter, x)), path


def test_kohya_trained_fused_module_reads_as_the_same_deltas():
    """kohya trains one fused matrix: its up is dense, not block diagonal, and its rank need not split."""
    g = torch.Generator().manual_seed(4)
    rows = {"lora_unet_single_blocks_1_linear1": 3 * TINY_INNER + TINY_MLP,
            "lora_unet_double_blocks_0_img_attn_qkv": 3 * TINY_INNER,
            "lora_unet_double_blocks_1_txt_attn_qkv": 3 * TINY_INNER}
    ranks = {"lora_unet_single_blocks_1_linear1": 4, "lora_unet_double_blocks_0_img_attn_qkv": 3,
             "lora_unet_double_blocks_1_txt_attn_qkv": 4}
    file = {}
    for name, out in rows.items():
        file[f"{name}.lora_down.weight"] = torch.randn(ranks[name], TINY_INNER, generator=g)
        file[f"{name}.lora_up.weight"] = torch.randn(out, ranks[name], generator=g)
        file[f"{name}.alpha"] = torch.tensor(8.0)
    parts = fl.from_kohya(file, TINY_INNER, TINY_MLP)
    assert set(parts) == {"single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
                          "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp",
                          "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                          "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_q_proj",
                          "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.1.attn.add_v_proj"}
    deltas = fl.delta_weights(parts)
    rewritten = fl.to_kohya(parts, TINY_INNER, TINY_MLP)
    for name in rows:
        fused = (8.0 / ranks[name]) * file[f"{name}.lora_up.weight"] @ file[f"{name}.lora_down.weight"]
        stacked = torch.cat([deltas[p] for p in parts if fl.kohya_name(p) == name])
        assert torch.allclose(stacked, fused, rtol=1e-6, atol=1e-6), name
        again = (rewritten[f"{name}.alpha"].item() / rewritten[f"{name}.lora_down.weight"].shape[0]
                 * rewritten[f"{name}.lora_up.weight"] @ rewritten[f"{name}.lora_down.weight"])
        assert torch.allclose(again, fused, rtol=1e-5, atol=1e-5), name


def test_parts_the_adapter_lacks_get_zero_rows_and_stay_absent():
    shapes = {"transformer_blocks.0.attn.to_q": (TINY_INNER, TINY_INNER),
              "transformer_blocks.0.attn.to_v": (TINY_INNER, TINY_INNER),
              "single_transformer_blocks.0.proj_mlp": (TINY_INNER, TINY_MLP)}
    adapters = random_adapters(shapes, seed=5)
    kohya = fl.to_kohya(adapters, TINY_INNER, TINY_MLP)
    up = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    down = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert up.shape == (3 * TINY_INNER, 3 * RANK)
    assert not up[TINY_INNER:2 * TINY_INNER].any() and not down[RANK:2 * RANK].any()  # to_k: nothing
    assert up[:TINY_INNER].any() and up[2 * TINY_INNER:].any()
    fused = kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() / (3 * RANK) * up @ down
    deltas = fl.delta_weights(adapters)
    parts = [deltas["transformer_blocks.0.attn.to_q"], torch.zeros(TINY_INNER, TINY_INNER),
             deltas["transformer_blocks.0.attn.to_v"]]
    assert torch.allclose(fused, torch.cat(parts), rtol=1e-6, atol=0)
    linear1 = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape == (3 * TINY_INNER + TINY_MLP, 4 * RANK) and not linear1[:3 * TINY_INNER].any()
    back = fl.from_kohya(kohya, TINY_INNER, TINY_MLP)
    assert set(back) == set(adapters)
    for path, (d, u, a) in adapters.items():
        assert torch.equal(back[path][0], d) and torch.equal(back[path][1], u) and back[path][2] == a


def test_parts_of_other_scales_keep_their_deltas():
    g = torch.Generator().manual_seed(6)
    adapters = {"transformer_blocks.0.attn.to_q": (torch.randn(2, TINY_INNER, generator=g),
                                                   torch.randn(TINY_INNER, 2, generator=g), 4.0),
                "transformer_blocks.0.attn.to_k": (torch.randn(2, TINY_INNER, generator=g),
                                                   torch.randn(TINY_INNER, 2, generator=g), 1.0)}
    back = fl.delta_weights(fl.from_kohya(fl.to_kohya(adapters, TINY_INNER, TINY_MLP), TINY_INNER, TINY_MLP))
    for path, delta in fl.delta_weights(adapters).items():
        assert torch.allclose(back[path], delta, rtol=1e-6, atol=1e-6)


def test_comfyui_and_diffusers_names_read_the_same():
    shapes = {"transformer_blocks.1.attn.to_q": (TINY_INNER, TINY_INNER),
              "transformer_blocks.1.attn.to_k": (TINY_INNER, TINY_INNER),
              "transformer_blocks.1.attn.to_v": (TINY_INNER, TINY_INNER),
              "transformer_blocks.1.ff_context.net.2": (TINY_MLP, TINY_INNER),
              "single_transformer_blocks.0.norm.linear": (TINY_INNER, 3 * TINY_INNER),
              "norm_out.linear": (TINY_INNER, 2 * TINY_INNER)}
    adapters = random_adapters(shapes, seed=7)
    kohya = fl.to_kohya(adapters, TINY_INNER, TINY_MLP)
    bfl = {"lora_unet_double_blocks_1_img_attn_qkv": "double_blocks.1.img_attn.qkv",
           "lora_unet_double_blocks_1_txt_mlp_2": "double_blocks.1.txt_mlp.2",
           "lora_unet_single_blocks_0_modulation_lin": "single_blocks.0.modulation.lin",
           "lora_unet_final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
    comfy = {}  # what ComfyUI's LoRA extractor writes: diffusion_model.<BFL path>, no alpha (scale 1)
    for k, v in kohya.items():
        name, suffix = k.split(".", 1)
        if suffix == "alpha":
            continue
        scale = kohya[f"{name}.alpha"].item() / kohya[f"{name}.lora_down.weight"].shape[0]
        comfy[f"diffusion_model.{bfl[name]}.{suffix}"] = v * scale if suffix == "lora_up.weight" else v
    ours, theirs = (fl.delta_weights(fl.from_kohya(t, TINY_INNER, TINY_MLP)) for t in (kohya, comfy))
    assert set(ours) == set(theirs) == set(adapters)
    for path in ours:
        assert torch.allclose(theirs[path], ours[path], rtol=1e-6, atol=1e-6), path

    peft_names = {f"transformer.{p}.lora_A.weight": d for p, (d, u, a) in adapters.items()}
    peft_names |= {f"transformer.{p}.lora_B.weight": u for p, (d, u, a) in adapters.items()}
    read = fl.from_kohya(peft_names, TINY_INNER, TINY_MLP)
    assert {p: a for p, (d, u, a) in read.items()} == dict.fromkeys(adapters, float(RANK))  # no alpha: alpha = rank
    assert all(torch.equal(read[p][1], adapters[p][1]) for p in adapters)


def test_names_no_flux_module_has_are_refused():
    down, up = torch.zeros(2, 8), torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.norm_q"):
        fl.to_kohya({"transformer_blocks.0.attn.norm_q": (down, up, 2.0)})
    with pytest.raises(ValueError, match="to_out.0"):
        fl.to_kohya({"single_transformer_blocks.0.attn.to_out.0": (down, up, 2.0)})  # single blocks have none
    with pytest.raises(ValueError, match="lora_te1_text_model"):
        fl.from_kohya({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down})
    with pytest.raises(ValueError, match="img_attn_qkvx"):
        fl.from_kohya({"lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight": down})
    with pytest.raises(ValueError, match="inner_dim"):
        fl.to_kohya({"transformer_blocks.0.attn.to_q": (down, up, 2.0)})  # 8 rows, not 3072


def test_flux_lora_names_are_told_apart():
    assert fl.is_flux_lora(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    assert fl.is_flux_lora(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
                            "lora_unet_single_blocks_3_linear1.lora_up.weight"])
    assert fl.is_flux_lora(["diffusion_model.single_blocks.0.linear2.lora_down.weight"])
    assert fl.is_flux_lora(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert not fl.is_flux_lora(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])  # SD / SDXL
    assert not fl.is_flux_lora(["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])  # SD3 names too
    assert not fl.is_flux_lora(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"])


def _tiny_inputs():
    g = torch.Generator().manual_seed(8)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]))


def _tiny_with_lora(base_state: dict | None = None):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(9)
    model = FluxTransformer2DModel(**TINY)
    if base_state is not None:
        model.load_state_dict(base_state)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), model)
    return model.eval(), base


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _peft_adapters(model) -> dict[str, fl.Adapter]:
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                float(m.lora_alpha["default"])) for n, m in _lora_layers(model).items()}


def _load_peft_adapters(model, adapters: dict[str, fl.Adapter]) -> None:
    """Copy adapters into the model's peft layers, up rescaled where the adapter's scale is not the layer's."""
    layers = _lora_layers(model)
    assert set(adapters) == set(layers)
    with torch.no_grad():
        for path, (down, up, alpha) in adapters.items():
            layer = layers[path]
            ratio = alpha / down.shape[0] / layer.scaling["default"]
            layer.lora_A["default"].weight.copy_(down)
            layer.lora_B["default"].weight.copy_(up if ratio == 1 else up * ratio)


def test_tiny_transformer_gives_the_same_output_after_kohya_and_back():
    model, base = _tiny_with_lora()
    with torch.no_grad():
        plain = model(**_tiny_inputs()).sample
        g = torch.Generator().manual_seed(10)
        for layer in _lora_layers(model).values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1)
        trained = model(**_tiny_inputs()).sample
    adapters = _peft_adapters(model)
    assert "proj_out" in adapters and "single_transformer_blocks.1.proj_out" in adapters  # peft's suffix match
    kohya = fl.to_kohya(adapters, TINY_INNER, TINY_MLP)
    assert "lora_unet_final_layer_linear.lora_up.weight" in kohya
    assert "lora_unet_single_blocks_1_linear2.lora_up.weight" in kohya

    fresh, fresh_base = _tiny_with_lora(base)
    assert all(torch.equal(fresh_base[k], v) for k, v in base.items())
    _load_peft_adapters(fresh, fl.from_kohya(kohya, TINY_INNER, TINY_MLP))
    with torch.no_grad():
        again = fresh(**_tiny_inputs()).sample
    assert (trained - plain).abs().max() > 1e-3  # the adapters do something
    assert torch.equal(again, trained)


def test_diffusers_pipeline_loads_our_file_into_a_tiny_transformer():
    """FluxPipeline.load_lora_weights on our kohya tensors renders what our own adapters do. Its reader
    hard-codes FLUX.1's sizes for single blocks' linear1 and (in diffusers 0.42.1) drops top-level modules,
    so this file holds the double blocks and the single blocks' linear2 and modulation."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(11)
    transformer = FluxTransformer2DModel(**TINY).eval()
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    shapes = {p: s for p, s in linear_shapes(transformer).items()
              if p.startswith("transformer_blocks.") or p.endswith((".proj_out", ".norm.linear"))}
    adapters = random_adapters(shapes, seed=12)
    for path in adapters:
        down, up, alpha = adapters[path]
        adapters[path] = (down, up * 0.05, alpha)
    kohya = fl.to_kohya(adapters, TINY_INNER, TINY_MLP)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    with torch.no_grad():
        plain = transformer(**_tiny_inputs()).sample
    pipe.load_lora_weights(dict(kohya))
    assert set(_lora_layers(transformer)) == set(adapters)
    with torch.no_grad():
        theirs = transformer(**_tiny_inputs()).sample

    from peft import LoraConfig, inject_adapter_in_model

    ours_model = FluxTransformer2DModel(**TINY).eval()
    ours_model.load_state_dict(base)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(adapters)), ours_model)
    _load_peft_adapters(ours_model, fl.from_kohya(kohya, TINY_INNER, TINY_MLP))
    with torch.no_grad():
        ours = ours_model(**_tiny_inputs()).sample
    assert (ours - plain).abs().max() > 1e-3
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5), (theirs - ours).abs().max()
