"""Model families, one module each, and how a model's files name its family.

A new family plugs in by adding a module with a :class:`~.base.Backbone` subclass and listing it in
``FAMILIES``; nothing else in the package names a family.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..hub import hub_offline
from .base import Backbone, ImageSize, PromptEmbeds, PromptEncoder, prediction_type, tokenize
from .sd1 import SD1
from .sd2 import SD2
from .flux import FLUX
from .sdxl import SDXL
from .sd3 import SD3

FAMILIES: dict[str, type[Backbone]] = {b.family: b for b in (SD1, SD2, SDXL, FLUX, SD3)}
CHOICES = ("auto", *FAMILIES)

__all__ = [
    "FLUX", "SD1", "SD2", "SDXL", "Backbone", "CHOICES", "agreeing_family", "FAMILIES", "ImageSize", "PromptEmbeds", "PromptEncoder", "backbone_of",
    "detect_family", "family_of_folder", "hub_config_folder", "native_resolution", "family_of_lora", "family_of_unet", "single_file_family", "single_file_keys", "family_of_single_file", "get", "prediction_type", "resolve_backbone", "shape_family",
    "tokenize",
]


def known() -> str:
    return ", ".join(f"{name} ({b.title})" for name, b in FAMILIES.items())


def get(family: str) -> type[Backbone]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise UserError(f"unknown backbone '{family}'; the families we know are: {known()}") from None


def _family_of_index(class_name: str, unet_config: dict[str, Any], where: str) -> type[Backbone]:
    for backbone in FAMILIES.values():
        if backbone.owns_pipeline_class(class_name, unet_config):
            return backbone
    raise UserError(f"{where} is a {class_name or 'model of no pipeline class'}, not a family we know: {known()}")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise UserError(f"'{file}' is not a readable JSON file ({type(exc).__name__}); the model folder is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"'{file}' holds no JSON object; the model folder is damaged")
    return data


DENOISER_FOLDERS = ("unet", "transformer")


def family_of_folder(folder: Path) -> type[Backbone]:
    """The family of a diffusers folder, from model_index.json's `_class_name` and the denoiser's config
    (its UNet's or transformer's)."""
    index = _read_json(folder / "model_index.json")
    found = [folder / name / "config.json" for name in DENOISER_FOLDERS if (folder / name / "config.json").is_file()]
    denoiser = _read_json(found[0]) if found else {}
    return _family_of_index(str(index.get("_class_name", "")), denoiser, f"model '{folder}'")


def native_resolution(base_model: str, revision: str | None = None) -> int | None:
    """The size a diffusers model's UNet was trained at (sample size x the VAE's downscale) when its
    configs can be read: a folder or a hub id's cached configs; None for a single file."""
    path = Path(str(base_model)).expanduser()
    folder = path if path.is_dir() else None if path.exists() else hub_config_folder(str(base_model), revision)
    if folder is None:
        return None
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def family_of_single_file(keys: set[str], where: str) -> type[Backbone]:
    """The family whose text-encoder keys (or, for SDXL, added-embedding keys) the file has; a file of
    a UNet alone without SDXL's keys is read as SD 1.x, as diffusers does."""
    owners = [b for b in FAMILIES.values() if b.owns_single_file(keys)]
    if len(owners) == 1:
        return owners[0]
    unet_only = not any(k.startswith(("cond_stage_model.", "conditioner.", "text_encoders.")) for k in keys)
    if not owners and unet_only and any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return FAMILIES["sd1"]
    raise UserError(f"{where} is not a checkpoint of a family we know ({known()})")


def family_of_lora(metadata: dict[str, str], keys: set[str]) -> type[Backbone] | None:
    """The family a LoRA file was trained for: our own metadata, kohya's `ss_base_model_version`, or
    SDXL's two text-encoder prefixes; None when the file does not say."""
    named = metadata.get("style_dreambooth.backbone")
    if named in FAMILIES:
        return FAMILIES[named]
    version = metadata.get("ss_base_model_version", "")
    for backbone in FAMILIES.values():
        if version and version == backbone.kohya_base_version:
            return backbone
    owners = [b for b in FAMILIES.values() if b.owns_lora(keys)]
    if len(owners) == 1:
        return owners[0]
    if version.startswith("sdxl") or any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return FAMILIES["sdxl"]
    return None


def single_file_keys(path: Path) -> set[str]:
    """The tensor names of a .safetensors file; a one-line error if it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        raise UserError(f"base model file '{path}' is not a readable .safetensors file (damaged or truncated?)") from None


_LORA_NAME = re.compile(r"(^|[._])lora", re.IGNORECASE)


def _is_lora(keys: set[str]) -> bool:
    """LoRA tensor names: kohya's (``lora_unet_``, ``.lora_down.``), peft's / diffusers' (``.lora_A.``), XLabs'
    (``.qkv_lora1.``) or a layout a family claims."""
    return any(_LORA_NAME.search(k) for k in keys) or any(b.owns_lora(keys) for b in FAMILIES.values())


def single_file_family(path: Path) -> type[Backbone]:
    """The family of a .safetensors checkpoint, from the family that claims its tensor names (an LDM
    UNet under ``model.diffusion_model.``, FLUX.1's transformer in BFL's layout); refused if it is
    unreadable or holds no model a family claims (a LoRA, an embedding, a VAE)."""
    keys = single_file_keys(path)
    claimed = any(b.owns_single_file(keys) for b in FAMILIES.values())
    if not claimed and (_is_lora(keys) or not any(k.startswith("model.diffusion_model.") for k in keys)):
        kind = "a LoRA (pass it to generate --lora)" if _is_lora(keys) else "not a full model"
        raise UserError(
            f"base model file '{path}' holds no model weights of a family we know ({known()}): it is {kind}; "
            "pass a full checkpoint, a diffusers folder or a Hub id"
        )
    return family_of_single_file(keys, f"base model file '{path}'")


def family_of_unet(config: dict[str, Any]) -> type[Backbone]:
    """The family a UNet-shaped config (a UNet's or a ControlNet's) belongs to."""
    for backbone in FAMILIES.values():
        if backbone.owns_unet_config(dict(config)):
            return backbone
    return FAMILIES["sd1"]


def backbone_of(pipe) -> type[Backbone]:
    """The family of a loaded pipeline."""
    denoiser = next((getattr(pipe, n) for n in DENOISER_FOLDERS if getattr(pipe, n, None) is not None), None)
    config = dict(denoiser.config) if denoiser is not None else {}
    return _family_of_index(type(pipe).__name__, config, f"pipeline {type(pipe).__name__}")


def shape_family(shape: str) -> type[Backbone]:
    """The family that declares a random-model shape."""
    for backbone in FAMILIES.values():
        if shape in backbone.shapes:
            return backbone
    names = [s for b in FAMILIES.values() for s in b.shapes]
    raise UserError(f"unknown random model shape {shape!r}; use one of: {', '.join(names)}")


def detect_family(base_model: str, revision: str | None = None) -> type[Backbone] | None:
    """The family named by a model's files without loading weights; None when they cannot be read
    (a Hub id not in the local cache)."""

    path = Path(str(base_model)).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return family_of_folder(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return single_file_family(path)
    if path.exists():
        return None
    folder = hub_config_folder(str(base_model), revision)
    return family_of_folder(folder) if folder is not None else None


def hub_config_folder(hub_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder holding a hub model's model_index.json (and UNet and VAE configs): from the
    local cache, or, when the Hub may be used, after downloading those few kilobytes; None if neither."""
    import huggingface_hub



    try:
        found = huggingface_hub.try_to_load_from_cache(hub_id, "model_index.json", revision=revision)
        if not isinstance(found, str) and not hub_offline():
            found = huggingface_hub.hf_hub_download(hub_id, "model_index.json", revision=revision)
            for config in ("unet/config.json", "transformer/config.json", "vae/config.json"):
                with contextlib.suppress(Exception):  # a family has a UNet or a transformer
                    huggingface_hub.hf_hub_download(hub_id, config, revision=revision)
    except Exception:  # noqa: BLE001 - an invalid id, no network, an unreadable cache: nothing to read
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_backbone(requested: str, base_model: str, revision: str | None = None) -> type[Backbone]:
    """`--backbone auto|sd1|sd2|sdxl|flux` checked against what the model's files say."""
    detected = detect_family(base_model, revision)
    if detected is not None:
        return agreeing_family(requested, detected, base_model)
    return FAMILIES["sd1"] if requested == "auto" else get(requested)


def agreeing_family(requested: str, found: type[Backbone], base_model: object) -> type[Backbone]:
    """The family a model's files name, refused when --backbone names another."""
    if requested not in ("auto", found.family):
        get(requested)  # an unknown name is its own error
        raise UserError(
            f"--backbone {requested} contradicts the base model '{base_model}', which is {found.family} "
            f"({found.title}); drop --backbone or pass --backbone {found.family}"
        )
    return found
