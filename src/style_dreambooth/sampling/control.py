"""ControlNet conditioning: load a ControlNet (hub id, folder or single file), check it fits the
model, read condition images, and build diffusers' ControlNet pipeline from the loaded parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..models.backbones import Backbone, backbone_of, family_of_unet

# The public SD 1.5 ControlNets a user would pick for a sketch or a layout (named in the README).
SKETCH_CONTROLNETS = {
    "scribble": "lllyasviel/control_v11p_sd15_scribble",
    "lineart": "lllyasviel/control_v11p_sd15_lineart",
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "seg": "lllyasviel/control_v11p_sd15_seg",
}


@dataclass
class ControlInput:
    image: Image.Image
    model: str
    scale: float = 1.0


def read_control_image(path: Path) -> Image.Image:
    """A user's drawing as it is (RGB); the pipeline resizes it to the canvas."""
    path = Path(path).expanduser()
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"control image '{path}' not found") from None
    except IsADirectoryError:
        raise UserError(f"control image '{path}' is a folder; pass an image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"control image '{path}' is not a readable image ({exc.__class__.__name__})") from None


def _shape(config) -> str:
    added = config.get("addition_embed_type")
    return (f"cross-attention {config.cross_attention_dim}, blocks {list(config.block_out_channels)}, "
            f"{config.in_channels} latent channels, "
            + (f"added conditioning '{added}'" if added else "no added conditioning"))


def _fits(a, b) -> bool:
    return (a.cross_attention_dim == b.cross_attention_dim and list(a.block_out_channels) == list(b.block_out_channels)
            and a.in_channels == b.in_channels and a.get("addition_embed_type") == b.get("addition_embed_type")
            and a.get("projection_class_embeddings_input_dim") == b.get("projection_class_embeddings_input_dim"))


def check_fits(controlnet, unet, name: str, model_label: str, family: type[Backbone] | None = None) -> None:
    """A ControlNet is a copy of its family's UNet encoder and steers the UNet through residuals added
    block by block: the widths and the added conditioning (SDXL's pooled prompt and size ids) must
    match. ``family`` names the model's family in the message."""
    a, b = controlnet.config, unet.config
    if not _fits(a, b):
        model = f"{family.title}: {_shape(b)}" if family else _shape(b)
        wanted = family.title if family else "this model's family"
        theirs = family_of_unet(a).title
        raise UserError(f"ControlNet '{name}' ({theirs}: {_shape(a)}) does not fit the model '{model_label}' ({model}); "
                        f"pick a ControlNet trained for {wanted}")


def _cond_channels(state: dict) -> tuple[int, ...]:
    """The conditioning embedding's widths, read from its weights (conv_in, then every second block)."""
    widths = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    i = 1
    while f"controlnet_cond_embedding.blocks.{i}.weight" in state:
        widths.append(state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0])
        i += 2
    return tuple(widths)


def _from_single_file(path: Path, unet, dtype):
    """A single .safetensors ControlNet, in diffusers' or the original (LDM) key layout, built on the
    model's own UNet config so that no config needs to be fetched."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception:  # safetensors raises its own error types for a damaged header
        raise UserError(f"ControlNet file '{path}' is not a readable .safetensors file") from None
    state = convert_controlnet_checkpoint(state, dict(unet.config))  # the LDM layout's blocks follow the UNet's
    if "controlnet_cond_embedding.conv_in.weight" not in state:
        raise UserError(f"ControlNet file '{path}' holds no ControlNet weights (no conditioning embedding)")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_cond_channels(state))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip()[:160] if len(str(exc).splitlines()) > 1 else "shapes differ"
        raise UserError(f"ControlNet file '{path}' does not fit the model's UNet ({first})") from None
    return net.to(dtype=dtype or torch.float32)


def load_controlnet(spec: str, unet, model_label: str, dtype=None, family: type[Backbone] | None = None):
    """A ControlNetModel from a hub id (or the local HF cache offline), a folder or a .safetensors file,
    checked against ``unet`` (``family`` names the model's family when it does not fit)."""
    from diffusers import ControlNetModel

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"ControlNet file '{path}' is not a .safetensors file; convert it first")
        net = _from_single_file(path, unet, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"'{path}' is not a ControlNet folder (no config.json); pass a diffusers ControlNet "
                            "folder, a .safetensors file or a hub id")
        try:
            net = ControlNetModel.from_pretrained(str(path), torch_dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"'{path}' is not a loadable ControlNet folder ({str(exc).splitlines()[0][:120]})") from None
    else:
        try:
            net = ControlNetModel.from_pretrained(spec, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"ControlNet '{spec}' is neither a local folder or file nor in the local Hugging Face "
                            f"cache ({str(exc).splitlines()[0][:100]}); download it once with network, or pass a "
                            "folder") from None
    check_fits(net, unet, spec, model_label, family)
    return net


def controlnet_pipeline(pipe, controlnets: list):
    """The model family's ControlNet text-to-image pipeline (diffusers') over the loaded model's own components."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    backbone = backbone_of(pipe)
    pipeline_class = backbone.controlnet_pipeline_class()
    if pipeline_class is None:
        raise UserError(f"ControlNet is not available for {backbone.title} models; drop --control/--controlnet")
    net = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    return pipeline_class.from_pipe(pipe, controlnet=net).to(pipe.device)
