"""FLUX.1 LoRA tensors in the kohya sd-scripts layout, converted to and from diffusers module paths.

We train peft LoRA adapters on diffusers' ``FluxTransformer2DModel``, whose attention has separate q, k and v
projections. kohya's sd-scripts (``networks/lora_flux.py``) trains on Black Forest Labs' own model instead and
names each LoRA after BFL's module, ``lora_unet_<BFL path with . -> _>``; ComfyUI and Forge load that layout
(ComfyUI's ``model_lora_keys_unet`` in ``comfy/lora.py`` names every ``diffusion_model.`` weight so), and so
does diffusers' ``FluxPipeline.load_lora_weights`` (``_convert_kohya_flux_lora_to_diffusers``).

BFL fuses some of diffusers' projections into one Linear, the parts stacked along the output rows in this
order: a double block's ``img_attn.qkv`` is ``attn.to_q``, ``attn.to_k``, ``attn.to_v``; ``txt_attn.qkv`` is
``attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``; a single block's ``linear1`` is ``attn.to_q``, ``to_k``,
``to_v`` and ``proj_mlp``. The other modules map one to one (``_DOUBLE``, ``_SINGLE``, ``_TOP`` below).

An adapter here is ``(down, up, alpha)``: down ``(r, in)``, up ``(out, r)``, and its weight delta is
``alpha / r * up @ down`` (peft's ``lora_alpha`` and kohya's ``.alpha`` both mean this). Parts are fused into
one kohya module by stacking the downs ``(n*r, in)``, putting the ups on a block diagonal ``(sum out, n*r)``
and giving the fused module ``alpha = scale * n*r``: its delta is then exactly the parts' deltas stacked.
Parts the adapter lacks get zero rows (and a zero down chunk).

Two top-level modules are written with their scale folded into ``up`` and ``alpha`` equal to the rank:
diffusers' reader ignores the ``.alpha`` of ``final_layer`` modules while ComfyUI applies it, and with
``alpha == rank`` both read the same delta. ``norm_out.linear`` also swaps the halves of its rows, since
diffusers orders that modulation (scale, shift) and BFL (shift, scale).

Text-encoder (CLIP-L) LoRAs of FLUX.1 use the kohya prefix ``lora_te1_`` (sd-scripts'
``LORA_PREFIX_TEXT_ENCODER_CLIP``), named as for SDXL's first text encoder; T5-XXL uses ``lora_te3_``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

Adapter = tuple[Tensor, Tensor, float]
"""(down (r, in), up (out, r), alpha): the delta is alpha / r * up @ down."""

KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = "lora_te1_"  # CLIP-L, as sd-scripts and ComfyUI name it for FLUX.1
T5_PREFIX = "lora_te3_"  # T5-XXL in sd-scripts (ComfyUI also reads lora_te2_ for FLUX.1, OneTrainer's name)

FLUX1_INNER_DIM = 3072
FLUX1_MLP_HIDDEN = 12288

# BFL module in a double block -> the diffusers modules of transformer_blocks.{i} it holds, in row order.
_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
# BFL module in a single block -> the diffusers modules of single_transformer_blocks.{i}.
_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
# BFL top-level module -> diffusers module.
_TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_FOLDED = {"final_layer.linear", "final_layer.adaLN_modulation.1"}  # written with alpha == rank
_SWAPPED = "final_layer.adaLN_modulation.1"  # row halves swapped against diffusers' norm_out.linear

_TOP_BY_DIFFUSERS = {v: k for k, v in _TOP.items()}
_BLOCK_PATH = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_BFL_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
_KOHYA_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(.+)")
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
             ".lora_A.weight": "down", ".lora_B.weight": "up"}
_FLUX_NAMES = re.compile(
    r"lora_unet_(double|single)_blocks_\d+_|diffusion_model\.(double|single)_blocks\.\d+\."
    r"|transformer\.single_transformer_blocks\.\d+\."
)


def bfl_module(path: str) -> tuple[str, int]:
    """The BFL module path that holds diffusers module `path` (relative to the transformer, e.g.
    ``transformer_blocks.0.attn.to_k``) and the part's index in its fused rows (``double_blocks.0.img_attn.qkv``,
    1). ValueError if FLUX.1's BFL model has no such module."""
    if path in _TOP_BY_DIFFUSERS:
        return _TOP_BY_DIFFUSERS[path], 0
    m = _BLOCK_PATH.fullmatch(path)
    if m:
        kind, index, rest = m.groups()
        table, block = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        for name, parts in table.items():
            if rest in parts:
                return f"{block}.{index}.{name}", parts.index(rest)
    raise ValueError(f"LoRA module {path!r} has no FLUX.1 kohya name (not a FLUX.1 Linear we know)")


def kohya_name(path: str) -> str:
    """The kohya name (``lora_unet_double_blocks_0_img_attn_qkv``) of the module that holds diffusers module
    `path`; fused parts share their module's name."""
    return KOHYA_PREFIX + bfl_module(path)[0].replace(".", "_")


def _parts(bfl: str) -> tuple[str, ...]:
    """The diffusers module paths a BFL module holds, in row order."""
    if bfl in _TOP:
        return (_TOP[bfl],)
    m = _BFL_BLOCK.fullmatch(bfl)
    if m:
        kind, index, rest = m.groups()
        table, block = (_DOUBLE, "transformer_blocks") if kind == "double" else (_SINGLE, "single_transformer_blocks")
        if rest in table:
            return tuple(f"{block}.{index}.{p}" for p in table[rest])
    raise ValueError(f"{bfl!r} is not a FLUX.1 module we know")


def _part_rows(bfl: str, inner_dim: int, mlp_hidden: int) -> list[int]:
    """Output rows of each part of a fused BFL module."""
    n = len(_parts(bfl))
    return [inner_dim] * 3 + [mlp_hidden] if n == 4 else [inner_dim] * n


def _swap_halves(up: Tensor) -> Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def _check(path: str, down: Tensor, up: Tensor) -> None:
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"LoRA module {path!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                         "(r, in) and (out, r)")


def _fuse(bfl: str, parts: dict[int, tuple[str, Adapter]], rows: list[int]) -> tuple[Tensor, Tensor, float]:
    """One fused module from the parts present (index -> (path, adapter)); absent parts get zero rows."""
    first = min(parts)
    down0, _, alpha0 = parts[first][1]
    r0 = down0.shape[0]
    scale = alpha0 / r0
    downs, ups = [], []
    for j, out in enumerate(rows):
        if j not in parts:
            downs.append(down0.new_zeros(r0, down0.shape[1]))
            ups.append(down0.new_zeros(out, r0))
            continue
        path, (down, up, alpha) = parts[j]
        if up.shape[0] != out or down.shape[1] != down0.shape[1]:
            raise ValueError(f"LoRA module {path!r}: up {tuple(up.shape)}, down {tuple(down.shape)} do not fit "
                             f"{bfl!r}'s part of {out} rows (check inner_dim and mlp_hidden)")
        part_scale = alpha / down.shape[0]
        downs.append(down)
        ups.append(up if part_scale == scale else up * (part_scale / scale))
    down = torch.cat(downs)
    return down, torch.block_diag(*ups), alpha0 * down.shape[0] / r0


def to_kohya(adapters: dict[str, Adapter], inner_dim: int = FLUX1_INNER_DIM,
             mlp_hidden: int = FLUX1_MLP_HIDDEN) -> dict[str, Tensor]:
    """kohya-layout tensors (``{name}.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` as a 0-dim float32)
    from adapters keyed by diffusers module path relative to the transformer. Fused parts go on a block
    diagonal (see the module docstring); parts of a fused module with another rank or scale than its first
    part keep their delta, their up scaled to the first part's scale. ValueError names a module path with no
    kohya name or with shapes that do not fit."""
    grouped: dict[str, dict[int, tuple[str, Adapter]]] = {}
    for path, adapter in adapters.items():
        _check(path, adapter[0], adapter[1])
        bfl, j = bfl_module(path)
        grouped.setdefault(bfl, {})[j] = (path, adapter)
    out: dict[str, Tensor] = {}
    for bfl, parts in grouped.items():
        if len(_parts(bfl)) > 1:
            down, up, alpha = _fuse(bfl, parts, _part_rows(bfl, inner_dim, mlp_hidden))
        else:
            down, up, alpha = parts[0][1]
            if bfl in _FOLDED:
                up, alpha = up * (alpha / down.shape[0]), float(down.shape[0])
            if bfl == _SWAPPED:
                up = _swap_halves(up)
        name = KOHYA_PREFIX + bfl.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


_KOHYA_TAILS = {
    "double": {k.replace(".", "_"): k for k in _DOUBLE},
    "single": {k.replace(".", "_"): k for k in _SINGLE},
}
_KOHYA_TOP = {k.replace(".", "_"): k for k in _TOP}


def _parse(key: str) -> tuple[str, str, str]:
    """(style, module, kind) of a tensor name: style 'bfl' with a BFL module path (kohya or ComfyUI names) or
    'diffusers' with a diffusers module path; kind 'down', 'up' or 'alpha'."""
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        raise ValueError(f"{key!r} is not a LoRA tensor name (.lora_down.weight, .lora_up.weight, .alpha, "
                         ".lora_A.weight, .lora_B.weight)")
    if stem.startswith(KOHYA_PREFIX):
        rest = stem[len(KOHYA_PREFIX):]
        m = _KOHYA_BLOCK.fullmatch(rest)
        if m and m.group(3) in _KOHYA_TAILS[m.group(1)]:
            return "bfl", f"{m.group(1)}_blocks.{m.group(2)}.{_KOHYA_TAILS[m.group(1)][m.group(3)]}", kind
        if rest in _KOHYA_TOP:
            return "bfl", _KOHYA_TOP[rest], kind
    elif stem.startswith(COMFY_PREFIX):
        bfl = stem[len(COMFY_PREFIX):]
        _parts(bfl)  # raises if unknown
        return "bfl", bfl, kind
    elif stem.startswith(DIFFUSERS_PREFIX):
        path = stem[len(DIFFUSERS_PREFIX):]
        bfl_module(path)  # raises if unknown
        return "diffusers", path, kind
    raise ValueError(f"{key!r} is not a FLUX.1 transformer LoRA tensor (kohya lora_unet_, ComfyUI "
                     "diffusion_model. or diffusers transformer. names; text-encoder tensors go elsewhere)")


def _split(bfl: str, down: Tensor, up: Tensor, alpha: float, rows: list[int]) -> dict[str, Adapter]:
    """The parts of a fused module: per-part rank chunks if its up is block diagonal in equal chunks, else the
    shared down with each part's rows of up. Parts with nothing in them are dropped."""
    paths = _parts(bfl)
    if up.shape[0] != sum(rows):
        raise ValueError(f"{bfl!r}: up has {up.shape[0]} rows, not {sum(rows)} (check inner_dim and mlp_hidden)")
    n, rank = len(paths), down.shape[0]
    starts = [sum(rows[:j]) for j in range(n)]
    r = rank // n
    diagonal = rank % n == 0 and all(
        not up[starts[j]: starts[j] + rows[j], k * r:(k + 1) * r].any()
        for j in range(n) for k in range(n) if j != k
    )
    out: dict[str, Adapter] = {}
    for j, path in enumerate(paths):
        block = up[starts[j]: starts[j] + rows[j]]
        if diagonal:
            part_down, part_up = down[j * r:(j + 1) * r], block[:, j * r:(j + 1) * r]
            if part_down.any() or part_up.any():
                out[path] = (part_down, part_up, alpha / n)
        elif block.any():
            out[path] = (down, block, alpha)
    return out


def from_kohya(tensors: dict[str, Tensor], inner_dim: int = FLUX1_INNER_DIM,
               mlp_hidden: int = FLUX1_MLP_HIDDEN) -> dict[str, Adapter]:
    """Adapters keyed by diffusers module path from FLUX.1 LoRA tensors named the kohya way
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), the ComfyUI way
    (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``) or the diffusers way
    (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``). A missing ``.alpha`` means alpha = rank,
    as ComfyUI and diffusers read it. Fused modules are split (see `_split`): files `to_kohya` wrote give back
    each part's own adapter exactly; a fused module kohya trained gives each part the shared down, its rows of
    up and the module's alpha, which has the same delta. ValueError names a tensor that is not a FLUX.1
    transformer LoRA tensor or a module missing its down or up."""
    modules: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        style, module, kind = _parse(key)
        modules.setdefault((style, module), {})[kind] = value
    out: dict[str, Adapter] = {}
    for (style, module), parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"LoRA module {module!r} lacks its down or up tensor")
        down, up = parts["down"], parts["up"]
        _check(module, down, up)
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        if style == "diffusers":
            found = {module: (down, up, alpha)}
        elif len(_parts(module)) > 1:
            found = _split(module, down, up, alpha, _part_rows(module, inner_dim, mlp_hidden))
        else:
            found = {_parts(module)[0]: (down, _swap_halves(up) if module == _SWAPPED else up, alpha)}
        for path, adapter in found.items():
            if path in out:
                raise ValueError(f"LoRA module {path!r} is given twice (under two naming styles)")
            out[path] = adapter
    return out


def delta_weights(adapters: dict[str, Adapter]) -> dict[str, Tensor]:
    """Each module's weight delta, alpha / r * up @ down."""
    return {path: (alpha / down.shape[0]) * (up @ down) for path, (down, up, alpha) in adapters.items()}


def is_flux_lora(names: Iterable[str]) -> bool:
    """Whether tensor names are a FLUX.1 transformer LoRA's: kohya ``lora_unet_double_blocks_N_`` /
    ``single_blocks_N_`` names, ComfyUI ``diffusion_model.double_blocks.N.`` names, or diffusers
    ``transformer.single_transformer_blocks.N.`` names. Names alone cannot tell a diffusers file with only
    ``transformer.transformer_blocks.`` modules from an SD3 LoRA (same names), so such a file is not claimed;
    nor do they tell FLUX.1 from other models with BFL-style double/single blocks (HunyuanVideo, FLUX.2)."""
    return any(_FLUX_NAMES.match(name) for name in names)
