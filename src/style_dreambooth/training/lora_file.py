"""LoRA files in the kohya / AUTOMATIC1111 layout, read and written from peft adapters.

A layer ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` of the UNet becomes
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{lora_down,lora_up}.weight``
plus a scalar ``.alpha``; text-encoder layers use the family's prefix (``lora_te_`` for SD 1.x and
2.x, ``lora_te1_`` and ``lora_te2_`` for SDXL's two; see models/backbones). kohya's trainers use
diffusers' module names, so these are the names AUTOMATIC1111, ComfyUI and diffusers'
``load_lora_weights`` expect.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import give_usual_mode

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}  # SD 1.x and 2.x


def kohya_name(prefix: str, module_path: str) -> str:
    """The kohya layer name. Text-encoder paths are spelled from `text_model.` as in the SD
    checkpoint layout, whether or not this transformers version nests CLIP under `text_model`."""
    if prefix != PREFIXES["unet"] and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return prefix + module_path.replace(".", "_")


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> peft LoRA layer, for every layer that has LoRA weights."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and m.lora_A}


def lora_state_dict(models: dict[str, torch.nn.Module], prefixes: dict[str, str] = PREFIXES,
                    adapter: str = "default") -> dict[str, torch.Tensor]:
    """kohya-layout tensors (down, up, alpha) for the adapters of each model ('unet', 'text_encoder', ...)."""
    out: dict[str, torch.Tensor] = {}
    for role, model in models.items():
        for path, layer in _lora_layers(model).items():
            name = kohya_name(prefixes[role], path)
            down = layer.lora_A[adapter].weight.detach()
            up = layer.lora_B[adapter].weight.detach()
            out[f"{name}.lora_down.weight"] = down.float().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = up.float().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]))
    return out


def load_lora_state_dict(
    models: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], prefixes: dict[str, str] = PREFIXES,
    adapter: str = "default",
) -> None:
    """Copy kohya-layout tensors into the models' existing peft adapters (all must match)."""
    seen = set()
    for role, model in models.items():
        for path, layer in _lora_layers(model).items():
            name = kohya_name(prefixes[role], path)
            with torch.no_grad():
                layer.lora_A[adapter].weight.copy_(tensors[f"{name}.lora_down.weight"])
                layer.lora_B[adapter].weight.copy_(tensors[f"{name}.lora_up.weight"])
            seen.update(f"{name}.{k}" for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    unknown = set(tensors) - seen
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
