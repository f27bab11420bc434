"""Which parameters train and how they are saved: full fine-tuning or LoRA.

The training loop gets one of these and never asks which: it prepares `modules`, optimizes
`param_groups()`, and calls `save_weights` / `load_weights` / `save_final`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import TrainConfig
from ..errors import UserError
from ..models.backbones import Backbone
from ..run_layout import LORA_FILE
from .lora_file import load_lora_state_dict, lora_state_dict, read_lora_file, write_lora_file


class Trainables(Protocol):
    modules: dict[str, torch.nn.Module]

    def param_groups(self) -> list[dict[str, Any]]: ...

    def cast_frozen(self, dtype: torch.dtype) -> None: ...

    def save_weights(self, folder: Path, modules: dict[str, torch.nn.Module]) -> None: ...

    def load_weights(self, folder: Path) -> None: ...

    def save_final(self, folder: Path, base, modules: dict[str, torch.nn.Module]) -> None: ...

    def after_step(self) -> None: ...


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def trained_text_encoders(cfg: TrainConfig, backbone: type[Backbone]) -> list[str]:
    """The family's text encoders that train: with --train-text-encoder those the family trains by default;
    a second encoder (SDXL's) also by --train-text-encoder-2, which overrides that default."""
    if "text_encoder_2" not in backbone.text_encoder_names and (
            cfg.train_text_encoder_2 is not None or cfg.text_encoder_2_lr is not None):
        raise UserError(f"--train-text-encoder-2 and --text-encoder-2-lr are for a second text encoder; "
                        f"{backbone.title} models have one")
    why = backbone.frozen_text_encoders.get("text_encoder_2")
    if why and (cfg.train_text_encoder_2 or cfg.text_encoder_2_lr is not None):
        raise UserError(f"--train-text-encoder-2: {backbone.title}'s second text encoder is {why}; "
                        "--train-text-encoder trains its CLIP encoder")
    chosen = [n for n in backbone.text_encoder_names if cfg.train_text_encoder and n in backbone.default_trained_text_encoders]
    if cfg.train_text_encoder_2 is not None:
        chosen = [n for n in chosen if n != "text_encoder_2"] + (["text_encoder_2"] if cfg.train_text_encoder_2 else [])
    return chosen


def freeze_unused(backbone: type[Backbone], text_encoders: dict[str, torch.nn.Module]) -> None:
    """Keep the parts of the text encoders that the conditioning never reads out of training."""
    for name, encoder in text_encoders.items():
        for module in backbone.unused_modules(name, encoder):
            module.requires_grad_(False)


def learning_rate(cfg: TrainConfig, module: str, denoiser: str = "unet") -> float:
    """--learning-rate for the denoiser (UNet or transformer), --text-encoder-lr for a text encoder,
    --text-encoder-2-lr for SDXL's second."""
    text_lr = cfg.text_encoder_lr or cfg.learning_rate
    return {denoiser: cfg.learning_rate, "text_encoder_2": cfg.text_encoder_2_lr or text_lr}.get(module, text_lr)


def _param_groups(cfg: TrainConfig, backbone: type[Backbone], modules: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    """One group per trained module, at that module's learning rate."""
    return [{"params": _trainable(module), "lr": learning_rate(cfg, name, backbone.denoiser_name)}
            for name, module in modules.items()]


def apply_layer_filter(unet: torch.nn.Module, parts: list[str]) -> None:
    """--unet-layer-filter: the UNet weights named by a part train, those named by a '!part' stay frozen."""
    wanted = [p for p in parts if not p.startswith("!")]
    unwanted = [p[1:] for p in parts if p.startswith("!")]
    chosen = 0
    for name, param in unet.named_parameters():
        trains = (not wanted or any(p in name for p in wanted)) and not any(p in name for p in unwanted)
        param.requires_grad_(trains)
        chosen += trains
    if not chosen:
        raise UserError(f"--unet-layer-filter {','.join(parts)}: no UNet weight is left to train")


class FullTrainables:
    """Every UNet weight (and the weights of each trained text encoder) trains; with
    --text-encoder-scope identifier, of the text encoders only the identifier's embedding rows."""

    def __init__(self, cfg: TrainConfig, backbone: type[Backbone], unet, text_encoders: dict[str, torch.nn.Module],
                 identifier_ids: list[int] | None = None) -> None:
        self.cfg = cfg
        self.backbone = backbone
        trained = trained_text_encoders(cfg, backbone)
        apply_layer_filter(unet, cfg.unet_layer_filter)
        for name, encoder in text_encoders.items():
            encoder.requires_grad_(name in trained)
        freeze_unused(backbone, text_encoders)
        self.modules = {backbone.denoiser_name: unet, **{name: text_encoders[name] for name in trained}}
        self._embeddings = []
        if trained and cfg.text_encoder_scope == "identifier":
            assert identifier_ids, "the loop checks that the instance prompt has an identifier"
            rows = torch.tensor(sorted(set(identifier_ids)))
            for name in trained:
                text_encoders[name].requires_grad_(False)
                weight = text_encoders[name].get_input_embeddings().weight
                weight.requires_grad_(True)
                self._embeddings.append((weight, weight.detach().clone(), rows))

    def param_groups(self) -> list[dict[str, Any]]:
        return _param_groups(self.cfg, self.backbone, self.modules)

    def after_step(self) -> None:
        """Put back every embedding row but the identifier's, whatever the optimizer (weight decay,
        8-bit states) did to them: prompts without the identifier keep the base's encoding."""
        for i, (weight, base, rows) in enumerate(self._embeddings):
            if base.device != weight.device:
                base, rows = base.to(weight.device), rows.to(weight.device)
                self._embeddings[i] = weight, base, rows
            with torch.no_grad():
                trained = weight[rows].clone()
                weight.copy_(base)
                weight[rows] = trained

    def save_weights(self, folder: Path, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            module.save_pretrained(folder / name, safe_serialization=True)

    def load_weights(self, folder: Path) -> None:
        for name, module in self.modules.items():
            saved = type(module).from_pretrained(folder / name)
            module.load_state_dict(saved.state_dict())

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Nothing is frozen inside the trained modules."""

    def save_final(self, folder: Path, base, modules: dict[str, torch.nn.Module]) -> None:
        denoiser = self.backbone.denoiser_name
        encoders = {**self.backbone.text_encoders(base), **{k: m for k, m in modules.items() if k != denoiser}}
        pipe = self.backbone.assemble(base, modules[denoiser], encoders)
        pipe.vae.to(torch.float32)
        for encoder in encoders.values():
            encoder.to(torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)


def _matching_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def lora_targets(cfg: TrainConfig, backbone: type[Backbone], unet,
                 text_encoders: dict[str, torch.nn.Module]) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """The modules that get adapters and the --lora-targets names found in each; a UserError if a
    module has none (checked before any slow work, e.g. class images)."""
    models = {backbone.denoiser_name: unet,
              **{name: text_encoders[name] for name in trained_text_encoders(cfg, backbone)}}
    wanted = cfg.lora_targets or list(backbone.default_lora_targets)
    found = {}
    for role, model in models.items():
        targets = _matching_targets(model, wanted)
        if not targets:
            raise UserError(
                f"--lora-targets {','.join(wanted)} match no layer of the {role}; "
                "use names such as to_q,to_k,to_v,to_out.0 (UNet) and q_proj,k_proj,v_proj,out_proj (text encoder)"
            )
        found[role] = (model, targets)
    return found


class LoraTrainables:
    """Low-rank adapters on the UNet (and text encoder) attention layers; the base stays frozen."""

    def __init__(self, cfg: TrainConfig, backbone: type[Backbone], unet, text_encoders: dict[str, torch.nn.Module],
                 base_model_hash: str, prediction_type: str = "epsilon") -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.cfg = cfg
        self.prediction_type = prediction_type
        self.backbone = backbone
        self.alpha = cfg.lora_alpha or float(cfg.rank)
        self.base_model_hash = base_model_hash
        found = lora_targets(cfg, backbone, unet, text_encoders)
        unet.requires_grad_(False)
        for encoder in text_encoders.values():
            encoder.requires_grad_(False)
        for model, targets in found.values():
            config = LoraConfig(
                r=cfg.rank, lora_alpha=self.alpha, lora_dropout=cfg.lora_dropout,
                target_modules=targets, init_lora_weights="gaussian",
            )
            inject_adapter_in_model(config, model)
            for name, param in model.named_parameters():
                param.requires_grad_("lora_" in name)
        freeze_unused(backbone, text_encoders)  # their adapters too
        self.modules = {role: model for role, (model, _) in found.items()}

    def param_groups(self) -> list[dict[str, Any]]:
        return _param_groups(self.cfg, self.backbone, self.modules)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store the frozen base weights in the mixed-precision dtype; adapters stay fp32."""
        if dtype == torch.float32:
            return
        for model in self.modules.values():
            for param in model.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(dtype)

    def metadata(self) -> dict[str, object]:
        """kohya-style ss_* keys (read by A1111/ComfyUI UIs) plus our own provenance."""
        cfg = self.cfg
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": f"{self.alpha:g}",
            "ss_base_model_version": self.backbone.kohya_base_version,
            "ss_output_name": cfg.output_dir.name,
            "modelspec.architecture": f"{self.backbone.modelspec(self.prediction_type)}/lora",
            "style_dreambooth.backbone": self.backbone.family,
            "style_dreambooth.base_model": cfg.base_model,
            "style_dreambooth.base_model_hash": self.base_model_hash,
            "style_dreambooth.instance_prompt": cfg.instance_prompt,
            "style_dreambooth.identifier": cfg.instance_prompt.split()[0],
            "style_dreambooth.training_config": json.dumps(cfg.to_yaml_dict(), sort_keys=True),
        }

    def save_weights(self, folder: Path, modules: dict[str, torch.nn.Module]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_lora_file(folder / LORA_FILE, lora_state_dict(modules, self.backbone), self.metadata())

    def load_weights(self, folder: Path) -> None:
        load_lora_state_dict(self.modules, read_lora_file(folder / LORA_FILE), self.backbone)

    def save_final(self, folder: Path, base, modules: dict[str, torch.nn.Module]) -> None:
        self.save_weights(folder, modules)

    def after_step(self) -> None:
        """Nothing to put back: only the adapters train."""


def base_model_hash(identity: dict[str, Any]) -> str:
    """A short, stable hash of the base model's identity fingerprint (see models.loading.model_identity)."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def make_trainables(
    cfg: TrainConfig, backbone: type[Backbone], unet, text_encoders: dict[str, torch.nn.Module],
    identity: dict[str, Any], identifier_ids: list[int] | None = None, prediction_type: str = "epsilon",
) -> Trainables:
    if cfg.method == "lora":
        return LoraTrainables(cfg, backbone, unet, text_encoders, base_model_hash(identity), prediction_type)
    return FullTrainables(cfg, backbone, unet, text_encoders, identifier_ids)
