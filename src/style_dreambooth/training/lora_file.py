"""LoRA files in the kohya / AUTOMATIC1111 layout, read and written from peft adapters.

The layout is the family's (models/backbones: ``lora_tensors`` / ``lora_from_tensors``). For the UNet
families a layer ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` of the UNet becomes
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{lora_down,lora_up}.weight``
plus a scalar ``.alpha``; text-encoder layers use the family's prefix (``lora_te_`` for SD 1.x and
2.x, ``lora_te1_`` and ``lora_te2_`` for SDXL's two). kohya's trainers use diffusers' module names
there, so these are the names AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` expect.
FLUX.1's file uses BFL's module names with fused projections (models/backbones/flux.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import give_usual_mode
from ..models.backbones import SD1, Backbone
from ..models.backbones.base import Adapter

def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> peft LoRA layer, for every layer that has LoRA weights."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and m.lora_A}


def lora_adapters(models: dict[str, torch.nn.Module], adapter: str = "default") -> dict[str, dict[str, Adapter]]:
    """Role ('unet', 'transformer', 'text_encoder', ...) -> module path -> (down, up, alpha) of each peft layer."""
    return {
        role: {
            path: (layer.lora_A[adapter].weight.detach().float().cpu().contiguous(),
                   layer.lora_B[adapter].weight.detach().float().cpu().contiguous(),
                   float(layer.lora_alpha[adapter]))
            for path, layer in _lora_layers(model).items()
        }
        for role, model in models.items()
    }


def lora_state_dict(models: dict[str, torch.nn.Module], backbone: type[Backbone] = SD1,
                    adapter: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of the family's LoRA file layout for the adapters of each model."""
    return backbone.lora_tensors(lora_adapters(models, adapter), models)


def load_lora_state_dict(models: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor],
                         backbone: type[Backbone] = SD1, adapter: str = "default") -> None:
    """Copy a LoRA file's tensors into the models' existing peft adapters (every tensor must find its layer)."""
    layers = {role: _lora_layers(model) for role, model in models.items()}
    found, used = backbone.lora_from_tensors(tensors, {role: list(paths) for role, paths in layers.items()}, models)
    for role, by_path in found.items():
        for path, (down, up, _) in by_path.items():
            layer = layers[role][path]
            with torch.no_grad():
                layer.lora_A[adapter].weight.copy_(down)
                layer.lora_B[adapter].weight.copy_(up)
    unknown = set(tensors) - used
    if unknown:
        raise ValueError(f"LoRA file has {len(unknown)} tensors that match no layer, e.g. {sorted(unknown)[0]}")


def write_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Save atomically; metadata values are stored as strings (JSON for non-strings)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    give_usual_mode(tmp)  # safetensors creates its file 0600
    os.replace(tmp, path)
    return path


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
