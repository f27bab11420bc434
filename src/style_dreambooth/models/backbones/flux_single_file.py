"""FLUX.1's transformer in Black Forest Labs' original single-file layout, and back: pure tensor functions.

BFL ships FLUX.1 as ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors``: the transformer alone (no VAE,
no text encoders), its tensors named after BFL's own modules (the reference ``flux`` package): ``img_in``,
``txt_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev only), ``double_blocks.N``, ``single_blocks.N``
and ``final_layer``. ComfyUI's all-in-one checkpoints hold the same names under ``model.diffusion_model.``.

The module names are the ones the LoRA layout uses (``flux_lora._DOUBLE``, ``_SINGLE``, ``_TOP``); a full
checkpoint adds the RMS norms of the attention (``…norm.query_norm.scale`` / ``key_norm.scale``, diffusers'
``attn.norm_q`` / ``norm_k``, the text stream's ``norm_added_q`` / ``norm_added_k``). Where one BFL module
holds several diffusers modules their weights and biases are concatenated along the output rows in the
tables' order: a double block's ``img_attn.qkv`` is q, k, v; ``txt_attn.qkv`` the text stream's q, k, v; a
single block's ``linear1`` is q, k, v and the MLP's input projection. ``final_layer.adaLN_modulation.1`` is
diffusers' ``norm_out.linear`` with its two halves swapped: BFL orders that modulation (shift, scale),
diffusers (scale, shift).

:func:`to_bfl` and :func:`from_bfl` are inverses; every tensor is used exactly once, and a tensor neither
knows is a ``ValueError`` rather than being dropped. :func:`from_bfl` reads the block sizes from the tensors
(the hidden size is ``img_in``'s rows), so it converts any FLUX.1-shaped transformer, not only the released
3072-wide one (diffusers' own reader hard-codes that width).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .flux_lora import _SWAPPED, _parts, bfl_module

COMFY_PREFIX = "model.diffusion_model."
PREFIXES = ("", COMFY_PREFIX)
# Tensors every FLUX.1 transformer file has and its relatives lack: FLUX.2 has no per-block img_mod and no
# vector_in (no pooled CLIP), Chroma no img_mod, HunyuanVideo names its blocks img_attn_qkv, and a LoRA
# (XLabs' uses bare double_blocks. names too) has no img_in weight.
MARKERS = ("img_in.weight", "vector_in.in_layer.weight", "double_blocks.0.img_mod.lin.weight")

# The attention's RMS norms, which have no LoRA and so are not in flux_lora's tables: BFL -> diffusers.
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_NORMS = {"transformer_blocks": ("double_blocks", _DOUBLE_NORMS),
          "single_transformer_blocks": ("single_blocks", _SINGLE_NORMS)}
_NORMS_BY_DIFFUSERS = {block: (bfl_block, {v: k for k, v in table.items()})
                       for block, (bfl_block, table) in _NORMS.items()}
_BLOCK_KEY = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_BFL_BLOCK_KEY = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
_PARAM = re.compile(r"(.+)\.(weight|bias)")


def is_bfl_transformer(keys: Iterable[str]) -> bool:
    """Whether tensor names are a FLUX.1 transformer's in BFL's layout, bare or under ComfyUI's prefix."""
    keys = set(keys)
    return any(all(prefix + marker in keys for marker in MARKERS) for prefix in PREFIXES)


def transformer_tensors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The transformer's tensors of a BFL or ComfyUI file with bare BFL names, and the names of the tensors
    left out: in a ComfyUI file (``model.diffusion_model.`` names) the VAE and text encoders beside it."""
    if any(key.startswith(COMFY_PREFIX + "double_blocks.") for key in state):
        kept = {key[len(COMFY_PREFIX):]: value for key, value in state.items() if key.startswith(COMFY_PREFIX)}
        return kept, sorted(key for key in state if not key.startswith(COMFY_PREFIX))
    return dict(state), []


def _bfl_name(key: str) -> tuple[str, int]:
    """The BFL tensor that holds diffusers tensor ``key`` and the part's index in its concatenated rows."""
    block = _BLOCK_KEY.fullmatch(key)
    if block and block.group(1) in _NORMS_BY_DIFFUSERS:
        bfl_block, norms = _NORMS_BY_DIFFUSERS[block.group(1)]
        if block.group(3) in norms:
            return f"{bfl_block}.{block.group(2)}.{norms[block.group(3)]}", 0
    param = _PARAM.fullmatch(key)
    if param is None:
        raise ValueError(f"transformer tensor {key!r} is not a weight or bias FLUX.1's BFL layout has")
    try:
        module, index = bfl_module(param.group(1))
    except ValueError:
        raise ValueError(f"transformer tensor {key!r} has no name in FLUX.1's BFL layout") from None
    return f"{module}.{param.group(2)}", index


def _parts_of(bfl: str) -> int:
    """How many diffusers tensors BFL tensor ``bfl`` concatenates (an attention norm's scale: one)."""
    param = _PARAM.fullmatch(bfl)
    return len(_parts(param.group(1))) if param else 1


def _swap_halves(tensor: Tensor) -> Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def to_bfl(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL-layout tensors (``flux1-dev.safetensors``' names, no prefix) from a ``FluxTransformer2DModel``
    state dict. Tensors kept one to one are the same tensor objects; fused and swapped ones are new.
    ValueError names a tensor with no BFL name or a fused tensor missing one of its parts."""
    grouped: dict[str, dict[int, Tensor]] = {}
    for key, tensor in state.items():
        bfl, index = _bfl_name(key)
        parts = grouped.setdefault(bfl, {})
        if index in parts:
            raise ValueError(f"transformer tensor {key!r} maps to part {index} of {bfl!r}, which is already taken")
        parts[index] = tensor
    out: dict[str, Tensor] = {}
    for bfl, parts in grouped.items():
        n = _parts_of(bfl)
        if sorted(parts) != list(range(n)):
            raise ValueError(f"{bfl!r} concatenates {n} tensors, but the state dict has parts {sorted(parts)}")
        tensor = parts[0] if n == 1 else torch.cat([parts[i] for i in range(n)])
        out[bfl] = _swap_halves(tensor) if bfl.startswith(_SWAPPED + ".") else tensor
    return out


def _diffusers_names(bfl: str) -> list[str]:
    """The diffusers tensors BFL tensor ``bfl`` holds, in row order; ValueError if FLUX.1 has no such tensor."""
    block = _BFL_BLOCK_KEY.fullmatch(bfl)
    if block:
        kind, index, rest = block.groups()
        diffusers_block, norms = ("transformer_blocks", _DOUBLE_NORMS) if kind == "double" else (
            "single_transformer_blocks", _SINGLE_NORMS)
        if rest in norms:
            return [f"{diffusers_block}.{index}.{norms[rest]}"]
    param = _PARAM.fullmatch(bfl)
    try:
        parts = _parts(param.group(1)) if param else ()
    except ValueError:
        parts = ()
    if not parts:
        raise ValueError(f"tensor {bfl!r} is not part of a FLUX.1 transformer in BFL's layout")
    return [f"{part}.{param.group(2)}" for part in parts]


def from_bfl(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``FluxTransformer2DModel`` state dict from BFL-layout tensors (bare names; see
    :func:`transformer_tensors` for ComfyUI's). q, k and v are split in equal thirds, a single block's
    ``linear1`` after three hidden sizes (``img_in``'s rows), the MLP taking the rest; the parts are views of
    the file's tensors. ValueError names a tensor FLUX.1 has no place for or one of the wrong size."""
    if "img_in.weight" not in state:
        raise ValueError("the tensors have no img_in.weight; they are not a FLUX.1 transformer in BFL's layout")
    hidden = state["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for bfl, tensor in state.items():
        names = _diffusers_names(bfl)
        if len(names) == 1:
            parts = [_swap_halves(tensor) if bfl.startswith(_SWAPPED + ".") else tensor]
        else:
            rows = [hidden] * 3 + [tensor.shape[0] - 3 * hidden] if len(names) == 4 else [hidden] * len(names)
            if rows[-1] <= 0 or sum(rows) != tensor.shape[0]:
                raise ValueError(f"{bfl!r} has {tensor.shape[0]} rows, which do not split into {len(names)} parts "
                                 f"of a transformer {hidden} wide")
            parts = list(torch.split(tensor, rows))
        out.update(zip(names, parts))
    return out
