"""Export a diffusers pipeline of any known family as one original-layout ``.safetensors`` file.

The file uses the single-checkpoint key layout of the original releases (CompVis/LDM for SD 1.x
and 2.x, Stability's sgm for SDXL) that AUTOMATIC1111's web UI, ComfyUI and diffusers'
``from_single_file`` load:

* ``model.diffusion_model.*``: the UNet (``time_embed``, SDXL's ``label_emb``, ``input_blocks``,
  ``middle_block``, ``output_blocks``, ``out``); the transformers' ``proj_in``/``proj_out`` keep
  their shape, 1x1 convolutions in SD 1.x and linear layers where ``use_linear_projection`` is set
  (SD 2.x, SDXL), as the original checkpoints store them;
* ``first_stage_model.*``: the KL VAE (``encoder``/``decoder`` with ``down``/``mid``/``up``,
  ``quant_conv``, ``post_quant_conv``); the mid-block attention projections are 1x1 convolutions;
* each text encoder under the prefix its family declares (``Backbone.single_file_text_encoders``),
  in one of two layouts: "openai" keeps Hugging Face's CLIP names under ``<prefix>text_model.``
  (SD 1.x, SDXL's first encoder); "openclip" is OpenCLIP's own (``transformer.resblocks.N`` with
  q/k/v fused into ``attn.in_proj_*``, ``positional_embedding``, ``ln_final`` and
  ``text_projection`` as a (width, embed) matrix: SD 2.x, SDXL's second encoder).

FLUX.1's file is the transformer alone, in Black Forest Labs' layout (``flux1-dev.safetensors``: see
backbones/flux_single_file.py); the family writes it (``Backbone.single_file_state_dict``), this module
writes the file (atomically, with the same metadata).

Block indices come from the UNet and VAE configs (number of blocks, layers per block, which
blocks have attention, transformer depth), so any model of a family's structure converts, not
only the released shapes. Every source tensor is used exactly once; a tensor the converter does
not know is a bug and raises :class:`ConversionError` rather than being dropped silently.

What the file holds is the model, which is not always every key of an original release: SD 2.x
text encoders are stored with the layers diffusers keeps (23 of OpenCLIP-H's 24, and no
``text_projection``), and no OpenCLIP ``logit_scale`` (a training-only temperature) is invented.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import give_usual_mode
from .backbones import FAMILIES, SD1, Backbone, backbone_of

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# SD 1.x's text encoder, the one an SD 1.x file has.
TEXT_ENCODER_PREFIX = SD1.single_file_text_encoders["text_encoder"][0] + "text_model."
POSITION_IDS_KEY = TEXT_ENCODER_PREFIX + "embeddings.position_ids"
PRODUCER = "style-dreambooth"


class ConversionError(RuntimeError):
    """The diffusers -> original key mapping could not account for every tensor (a bug, not user input)."""


# --------------------------------------------------------------------------- key renaming rules
#
# A rule maps what follows a module prefix (for example "norm1.weight" after
# "down_blocks.0.resnets.0.") to what follows the original prefix, or returns None when the
# suffix is not a parameter this kind of module has.

_WEIGHT_OR_BIAS = re.compile(r"(weight|bias)")


def _plain(suffix: str) -> str | None:
    """A single convolution, linear or norm layer: ``weight``/``bias`` keep their names."""
    return suffix if _WEIGHT_OR_BIAS.fullmatch(suffix) else None


def _renamer(names: Mapping[str, str]) -> Callable[[str], str | None]:
    """A rule renaming the layer in front of ``.weight``/``.bias`` with ``names``."""

    def rename(suffix: str) -> str | None:
        layer, _, param = suffix.rpartition(".")
        if layer in names and _WEIGHT_OR_BIAS.fullmatch(param):
            return f"{names[layer]}.{param}"
        return None

    return rename


# diffusers ResnetBlock2D (UNet) -> LDM ResBlock
_unet_resnet = _renamer(
    {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
)

# diffusers Transformer2DModel -> LDM SpatialTransformer: the same parameter names.
_TRANSFORMER_PARAM = re.compile(
    r"(norm|proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"\.(weight|bias)"
)


def _unet_transformer(suffix: str) -> str | None:
    return suffix if _TRANSFORMER_PARAM.fullmatch(suffix) else None


# diffusers ResnetBlock2D (VAE, no time embedding) -> LDM ResnetBlock
_vae_resnet = _renamer(
    {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
)

# diffusers Attention (VAE mid block) -> LDM AttnBlock; older diffusers used query/key/value/proj_attn.
_vae_attention = _renamer(
    {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
        "query": "q",
        "key": "k",
        "value": "v",
        "proj_attn": "proj_out",
    }
)
_VAE_ATTENTION_CONVS = frozenset({"q", "k", "v", "proj_out"})

# Hugging Face CLIPTextModel (without its optional "text_model." wrapper) -> itself.
_CLIP_PARAM = re.compile(
    r"embeddings\.(token_embedding|position_embedding)\.weight"
    r"|embeddings\.position_ids"
    r"|encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)"
    r"\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)"
)

# Hugging Face CLIP text tower -> OpenCLIP's (see _openclip_text_encoder for q/k/v and text_projection).
_OPENCLIP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OPENCLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # in OpenCLIP's fused order


Rule = Callable[[str], "str | None"]
PrefixMap = dict[str, tuple[str, Rule]]


def _add(prefixes: PrefixMap, source: str, target: str, rule: Rule) -> None:
    if source in prefixes:  # pragma: no cover - would be a bug in the tables below
        raise ConversionError(f"diffusers prefix {source!r} mapped twice")
    prefixes[source] = (target, rule)


# --------------------------------------------------------------------------- configs


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        raise UserError("a UNet or VAE config is missing; pass the model's config dicts to the converter")
    return dict(config)


def _per_block(value: Any, n_blocks: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n_blocks
    values = [int(v) for v in value]
    if len(values) != n_blocks:
        raise UserError(f"the UNet config's {name} has {len(values)} entries for {n_blocks} blocks; fix the config")
    return values


_UNET_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UNET_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# None: SD 1.x/2.x; "text_time": SDXL's pooled-text + size embedding, LDM's label_emb.0 (Linear, SiLU, Linear).
_ADDED_EMBEDDINGS = (None, "text_time")


def _cannot_hold(model: str, what: str) -> UserError:
    titles = ", ".join(b.title for b in FAMILIES.values())
    return UserError(
        f"the {model} config has {what}, which the original single-file layout cannot hold; "
        f"export a model of one of these families: {titles}"
    )


def _check_unet_config(config: dict[str, Any]) -> None:
    """Refuse what the LDM/sgm UNetModel has no place for; the rest follows from the config."""
    down, up = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    for block in down:
        if block not in _UNET_DOWN:
            raise _cannot_hold("UNet", f"down block type {block!r}")
    for block in up:
        if block not in _UNET_UP:
            raise _cannot_hold("UNet", f"up block type {block!r}")
    if not down or len(down) != len(up):
        raise _cannot_hold("UNet", f"{len(down)} down blocks and {len(up)} up blocks")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise _cannot_hold("UNet", f"mid block type {mid!r}")
    for key in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if config.get(key) is not None:
            raise _cannot_hold("UNet", f"{key}={config[key]!r}")
    if config.get("addition_embed_type") not in _ADDED_EMBEDDINGS:
        raise _cannot_hold("UNet", f"addition_embed_type={config['addition_embed_type']!r}")
    if config.get("time_embedding_type", "positional") != "positional":
        raise _cannot_hold("UNet", f"time_embedding_type={config['time_embedding_type']!r}")


def _unet_prefixes(config: dict[str, Any]) -> PrefixMap:
    """diffusers UNet2DConditionModel module prefixes -> LDM UNetModel prefixes, from the config."""
    _check_unet_config(config)
    down = [_UNET_DOWN[b] for b in config["down_block_types"]]
    up = [_UNET_UP[b] for b in config["up_block_types"]]
    n = len(down)
    layers = _per_block(config.get("layers_per_block", 2), n, "layers_per_block")
    up_layers = list(reversed(layers))  # diffusers: up block i has reversed_layers_per_block[i] + 1 resnets

    p: PrefixMap = {}
    _add(p, "conv_in.", "input_blocks.0.0.", _plain)
    _add(p, "time_embedding.linear_1.", "time_embed.0.", _plain)
    _add(p, "time_embedding.linear_2.", "time_embed.2.", _plain)
    if config.get("addition_embed_type") == "text_time":
        _add(p, "add_embedding.linear_1.", "label_emb.0.0.", _plain)
        _add(p, "add_embedding.linear_2.", "label_emb.0.2.", _plain)
    _add(p, "conv_norm_out.", "out.0.", _plain)
    _add(p, "conv_out.", "out.2.", _plain)

    # input_blocks: 0 is conv_in, then per level its resnets (each with an optional transformer)
    # and, except on the last level, one downsampler.
    index = 1
    for i, has_attention in enumerate(down):
        for j in range(layers[i]):
            _add(p, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _unet_resnet)
            if has_attention:
                _add(p, f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", _unet_transformer)
            index += 1
        if i < n - 1:
            _add(p, f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", _plain)
            index += 1

    # middle_block: resnet, transformer, resnet
    _add(p, "mid_block.resnets.0.", "middle_block.0.", _unet_resnet)
    _add(p, "mid_block.attentions.0.", "middle_block.1.", _unet_transformer)
    _add(p, "mid_block.resnets.1.", "middle_block.2.", _unet_resnet)

    # output_blocks: per level (deepest first) its resnets (+ transformers); the last resnet of
    # every level but the final one also holds the upsampler, after the transformer if any.
    index = 0
    for i, has_attention in enumerate(up):
        for j in range(up_layers[i] + 1):
            _add(p, f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _unet_resnet)
            if has_attention:
                _add(p, f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", _unet_transformer)
            if j == up_layers[i] and i < n - 1:
                slot = 2 if has_attention else 1
                _add(p, f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv.", _plain)
            index += 1
    return p


def _check_vae_config(config: dict[str, Any]) -> None:
    down, up = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    for block in down:
        if block != "DownEncoderBlock2D":
            raise _cannot_hold("VAE", f"down block type {block!r}")
    for block in up:
        if block != "UpDecoderBlock2D":
            raise _cannot_hold("VAE", f"up block type {block!r}")
    if not down or len(down) != len(up):
        raise _cannot_hold("VAE", f"{len(down)} down blocks and {len(up)} up blocks")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if config.get(key, True) is not True:
            raise _cannot_hold("VAE", f"{key}={config[key]!r}")


def _vae_prefixes(config: dict[str, Any]) -> PrefixMap:
    """diffusers AutoencoderKL module prefixes -> LDM AutoencoderKL prefixes, from the config."""
    _check_vae_config(config)
    n = len(config["down_block_types"])
    layers = int(config.get("layers_per_block", 2))

    p: PrefixMap = {}
    for side in ("encoder", "decoder"):
        _add(p, f"{side}.conv_in.", f"{side}.conv_in.", _plain)
        _add(p, f"{side}.conv_out.", f"{side}.conv_out.", _plain)
        _add(p, f"{side}.conv_norm_out.", f"{side}.norm_out.", _plain)
        _add(p, f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _vae_resnet)
        _add(p, f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _vae_attention)
        _add(p, f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _vae_resnet)
    for i in range(n):
        for j in range(layers):
            _add(p, f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _vae_resnet)
        if i < n - 1:
            _add(p, f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", _plain)
    # The LDM decoder numbers its levels from the highest resolution: diffusers up_blocks[i] is up[n-1-i].
    for i in range(n):
        level = n - 1 - i
        for j in range(layers + 1):
            _add(p, f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", _vae_resnet)
        if i < n - 1:
            _add(p, f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv.", _plain)
    _add(p, "quant_conv.", "quant_conv.", _plain)
    _add(p, "post_quant_conv.", "post_quant_conv.", _plain)
    return p


# --------------------------------------------------------------------------- conversion


def _convert_with_prefixes(
    state_dict: Mapping[str, torch.Tensor],
    prefixes: PrefixMap,
    out_prefix: str,
    out: dict[str, torch.Tensor],
    what: str,
) -> list[str]:
    """Rename every key of ``state_dict`` into ``out``; returns the keys no rule accepted."""
    leftover: list[str] = []
    used: set[str] = set()
    for key, tensor in state_dict.items():
        parts = key.split(".")
        new_key = None
        for cut in range(len(parts) - 1, 0, -1):
            source = ".".join(parts[:cut]) + "."
            if source in prefixes:
                target, rule = prefixes[source]
                suffix = rule(".".join(parts[cut:]))
                if suffix is not None:
                    new_key = out_prefix + target + suffix
                    used.add(source)
                break
        if new_key is None:
            leftover.append(key)
            continue
        _put(out, new_key, tensor, key, what)
    unused = [source for source in prefixes if source not in used]
    if unused:
        raise ConversionError(
            f"the {what} state dict has no tensors for {len(unused)} module(s) its config describes "
            f"(first: {', '.join(unused[:3])}); the state dict and config do not belong together"
        )
    return leftover


def _put(out: dict[str, torch.Tensor], new_key: str, tensor: torch.Tensor, key: str, what: str) -> None:
    if new_key in out:
        raise ConversionError(f"{what} key {key!r} maps to {new_key!r}, which another key already produced")
    out[new_key] = tensor


def _vae_tensor(new_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The LDM VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    layer = new_key.rsplit(".", 2)[-2]
    if ".mid.attn_1." in new_key and new_key.endswith(".weight") and layer in _VAE_ATTENTION_CONVS:
        if tensor.ndim == 2:
            return tensor.reshape(*tensor.shape, 1, 1)
        if tensor.ndim == 3:  # very old diffusers stored proj_attn as a conv1d weight
            return tensor.unsqueeze(-1)
    return tensor


def _raise_leftover(leftover: list[str], what: str) -> None:
    if leftover:
        shown = ", ".join(repr(k) for k in leftover[:5])
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise ConversionError(f"{len(leftover)} {what} tensor(s) have no single-file key: {shown}{more}")


def _openai_text_encoder(
    state_dict: Mapping[str, torch.Tensor], prefix: str, out: dict[str, torch.Tensor], what: str, add_position_ids: bool
) -> None:
    """A Hugging Face CLIP text tower under ``prefix + "text_model."``, with its names unchanged.

    ``add_position_ids`` adds the ``embeddings.position_ids`` buffer (``arange(77)``, int64) that
    transformers >= 4.31 no longer saves, so the file has the keys of the original checkpoints."""
    base = prefix + "text_model."
    leftover = []
    for key, tensor in state_dict.items():
        name = key.removeprefix("text_model.")  # CLIPTextModel before transformers 5.6 wrapped it
        if _CLIP_PARAM.fullmatch(name):
            _put(out, base + name, tensor, key, what)
        else:
            leftover.append(key)
    _raise_leftover(leftover, what)

    position_embedding = out.get(base + "embeddings.position_embedding.weight")
    if position_embedding is None:
        raise ConversionError(f"the {what} state dict has no embeddings.position_embedding.weight")
    if add_position_ids and base + "embeddings.position_ids" not in out:
        out[base + "embeddings.position_ids"] = torch.arange(
            position_embedding.shape[0], dtype=torch.int64, device=position_embedding.device
        ).unsqueeze(0)


def _openclip_text_encoder(
    state_dict: Mapping[str, torch.Tensor], prefix: str, out: dict[str, torch.Tensor], what: str
) -> None:
    """A Hugging Face CLIP text tower (with or without projection) in OpenCLIP's layout under ``prefix``.

    OpenCLIP's attention keeps q, k and v as one ``in_proj`` matrix (rows q, then k, then v), and
    its ``text_projection`` is a (width, embed) matrix that multiplies from the right: the transpose
    of transformers' ``text_projection.weight``. OpenCLIP has no ``position_ids`` buffer, so one
    saved by an older transformers is left out."""
    leftover = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> q/k/v
    for key, tensor in state_dict.items():
        name = key.removeprefix("text_model.")
        layer = _OPENCLIP_LAYER.fullmatch(name)
        if name in _OPENCLIP_NAMES:
            _put(out, prefix + _OPENCLIP_NAMES[name], tensor, key, what)
        elif name == "text_projection.weight":
            _put(out, prefix + "text_projection", tensor.T, key, what)
        elif name == "embeddings.position_ids":
            continue
        elif layer and layer[2] in _OPENCLIP_LAYER_NAMES:
            index, module, param = layer.groups()
            new_key = f"{prefix}transformer.resblocks.{index}.{_OPENCLIP_LAYER_NAMES[module]}.{param}"
            _put(out, new_key, tensor, key, what)
        elif layer and layer[2] in _QKV:
            index, module, param = layer.groups()
            parts = qkv.setdefault((index, param), {})
            if module in parts:
                raise ConversionError(f"{what} key {key!r} repeats the layer's {module}.{param}")
            parts[module] = tensor
        else:
            leftover.append(key)
    _raise_leftover(leftover, what)

    for (index, param), parts in qkv.items():
        missing = [module for module in _QKV if module not in parts]
        if missing:
            raise ConversionError(f"the {what} layer {index} has no {missing[0]}.{param} to fuse with the others")
        fused = torch.cat([parts[module] for module in _QKV])
        source = f"encoder.layers.{index}.self_attn.q/k/v_proj.{param}"
        _put(out, f"{prefix}transformer.resblocks.{index}.attn.in_proj_{param}", fused, source, what)
    if prefix + "positional_embedding" not in out:
        raise ConversionError(f"the {what} state dict has no embeddings.position_embedding.weight")


def original_state_dict(
    backbone: type[Backbone],
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    add_position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """Convert a pipeline's diffusers state dicts to the original single-file layout of its family.

    ``state_dicts`` maps component names to state dicts: ``unet``, ``vae`` and each text encoder
    the family's ``single_file_text_encoders`` names. ``unet_config``/``vae_config`` are the
    models' configs (``unet.config``); they give the block structure. No tensor is copied except
    OpenCLIP's fused q/k/v (the VAE attention weights become 4-D views, a text projection a
    transposed view). ``add_position_ids``: see :func:`_openai_text_encoder`.

    Raises :class:`UserError` for a config the layout cannot hold, and :class:`ConversionError`
    when a tensor has no mapping or a configured module has no tensors.
    """
    wanted = {"unet", "vae", *backbone.single_file_text_encoders}
    if set(state_dicts) != wanted:
        raise ConversionError(
            f"a {backbone.title} single file holds {', '.join(sorted(wanted))}; "
            f"got state dicts for {', '.join(sorted(state_dicts))}"
        )
    unet_cfg, vae_cfg = _config_dict(unet_config), _config_dict(vae_config)
    out: dict[str, torch.Tensor] = {}

    unet_sd, vae_sd = state_dicts["unet"], state_dicts["vae"]
    _raise_leftover(_convert_with_prefixes(unet_sd, _unet_prefixes(unet_cfg), UNET_PREFIX, out, "UNet"), "UNet")

    vae_out: dict[str, torch.Tensor] = {}
    _raise_leftover(_convert_with_prefixes(vae_sd, _vae_prefixes(vae_cfg), VAE_PREFIX, vae_out, "VAE"), "VAE")
    for key, tensor in vae_out.items():
        _put(out, key, _vae_tensor(key, tensor), key, "VAE")

    for name, (prefix, layout) in backbone.single_file_text_encoders.items():
        what = name.replace("_", " ")
        if layout == "openai":
            _openai_text_encoder(state_dicts[name], prefix, out, what, add_position_ids)
        elif layout == "openclip":
            _openclip_text_encoder(state_dicts[name], prefix, out, what)
        else:  # pragma: no cover - a family declaring a layout this module does not write
            raise ConversionError(f"{backbone.title} declares text encoder layout {layout!r}, which is not written")
    return out


def diffusers_to_original_state_dict(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    backbone: type[Backbone] = SD1,
    add_position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`original_state_dict` for a family with one text encoder (SD 1.x by default, or SD 2.x)."""
    state_dicts = {"unet": unet_sd, "vae": vae_sd, "text_encoder": text_encoder_sd}
    return original_state_dict(backbone, state_dicts, unet_config, vae_config, add_position_ids=add_position_ids)


# --------------------------------------------------------------------------- export


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile`` wrapper."""
    return getattr(module, "_orig_mod", module)


def _check_out_file(out_file: Path, overwrite: bool) -> Path:
    out_file = Path(out_file).expanduser()
    if out_file.suffix.lower() != ".safetensors":
        raise UserError(f"export path '{out_file}' does not end in .safetensors; choose a .safetensors file name")
    out_file = out_file.resolve()
    if out_file.is_dir():
        raise UserError(f"export path '{out_file}' is a folder; choose a .safetensors file name")
    if out_file.exists() and not overwrite:
        raise UserError(f"export file '{out_file}' already exists; choose another path or pass --overwrite")
    return out_file


def _pipeline_source(pipeline: Any) -> str:
    name = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    return str(name) if name else "in-memory pipeline"


def _exporting_family(pipeline: Any) -> type[Backbone]:
    """The pipeline's family, refused when it has no single-file layout to write."""
    backbone = backbone_of(pipeline)
    if not backbone.has_single_file_export:
        raise UserError(f"export --to single-file is not available for {backbone.family} ({backbone.title}) yet; "
                        "the run's model/ folder is a diffusers folder that diffusers and ComfyUI load as it is")
    return backbone


def _modules_to_export(pipeline: Any) -> tuple[type[Backbone], dict[str, torch.nn.Module]]:
    """The pipeline's family and the modules its single file holds (unwrapped from torch.compile)."""
    backbone = _exporting_family(pipeline)
    if getattr(pipeline, "unet", None) is None:
        raise UserError("the pipeline to export has no unet; export a complete Stable Diffusion pipeline")
    modules = {}
    for name in ("unet", "vae", *backbone.single_file_text_encoders):
        module = getattr(pipeline, name, None)
        if module is None:
            raise UserError(f"the pipeline to export has no {name}; export a complete {backbone.title} pipeline")
        modules[name] = _unwrap(module)
    return backbone, modules


def ldm_state_dict(backbone: type[Backbone], pipeline: Any) -> dict[str, torch.Tensor]:
    """An SD-family pipeline in the LDM / sgm single-file layout: UNet, VAE and text encoders
    (:meth:`Backbone.single_file_state_dict` of the SD families)."""
    _, modules = _modules_to_export(pipeline)
    state_dicts = {name: module.state_dict() for name, module in modules.items()}
    return original_state_dict(backbone, state_dicts, modules["unet"].config, modules["vae"].config)


def export_single_file(
    pipeline_or_folder: Any,
    out_file: Path,
    half: bool = False,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a pipeline (or a diffusers folder) of any known family as one original-layout ``.safetensors``.

    The family gives the layout (:meth:`Backbone.single_file_state_dict`): the SD families' LDM / sgm
    checkpoint of UNet, VAE and text encoders, FLUX.1's transformer alone in BFL's layout.
    ``half`` stores floating-point tensors in the family's half precision
    (:attr:`Backbone.single_file_half_dtype`): fp16 for the SD families (about 2 GB for SD 1.5 instead
    of 4 GB), bf16 for FLUX.1, as BFL ships it.
    The file is written under a temporary name next to ``out_file`` and renamed into place, so
    a crash never leaves a truncated checkpoint. An existing file is replaced only with
    ``overwrite``. Returns the resolved path.
    """
    from safetensors.torch import save_file

    out_file = _check_out_file(out_file, overwrite)

    if isinstance(pipeline_or_folder, (str, os.PathLike)):
        from .loading import load_pipeline

        folder = Path(pipeline_or_folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"model folder '{pipeline_or_folder}' not found; pass a diffusers model folder to export")
        pipeline = load_pipeline(str(folder))
        source = str(folder.resolve())
    else:
        pipeline = pipeline_or_folder
        source = _pipeline_source(pipeline)
    backbone = _exporting_family(pipeline)
    state = backbone.single_file_state_dict(pipeline)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            raise UserError(f"the pipeline to export has no weights for {key!r} (it is on the meta device)")
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.to(backbone.single_file_half_dtype)
        tensors[key] = tensor.contiguous()

    scheduler_config = getattr(getattr(pipeline, "scheduler", None), "config", None) or {}
    prediction_type = scheduler_config.get("prediction_type")
    float_dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    metadata = {
        "format": "pt",
        "source": source,
        "producer": PRODUCER,
        "architecture": backbone.single_file_architecture(pipeline),
        # What was stored: half=False keeps the pipeline's own dtype (fp32 normally).
        "dtype": ",".join(sorted(float_dtypes)),
    }
    if prediction_type:
        metadata["prediction_type"] = str(prediction_type)
    if prediction_type == "v_prediction":
        logger.warning(
            "%s holds a v-prediction model, which the single-file format cannot flag: AUTOMATIC1111 needs a "
            ".yaml config with 'parameterization: \"v\"' next to it, and ComfyUI a ModelSamplingDiscrete node "
            "set to v_prediction",
            out_file.name,
        )

    _write_atomically(tensors, metadata, out_file, save_file)
    logger.info("exported %d tensors (%s) to %s", len(tensors), metadata["dtype"], out_file)
    return out_file


def _write_atomically(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], out_file: Path, save_file: Callable[..., None]
) -> None:
    """``save_file`` to a temporary name in the target folder, then rename it over ``out_file``."""
    parent = out_file.parent
    tmp = parent / f".{out_file.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb"):  # fails early, before any work, in a read-only place
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write to '{parent}' ({exc.strerror or exc}); choose a writable export location"
        ) from exc
    try:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            # safetensors creates its files 0600, which would hide the checkpoint from a web UI
            # running as another user: give it the usual permissions of a new file.
            give_usual_mode(tmp)
            os.replace(tmp, out_file)
        except OSError as exc:
            raise UserError(
                f"could not write export file '{out_file}' ({exc.strerror or exc}); free some space or choose "
                "another location"
            ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

