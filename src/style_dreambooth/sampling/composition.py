"""Layouts: where each subject goes. A layout file is data, validated once, like the config.

```yaml
prompt: "a park, yltcaxe artstyle"          # the rest of the canvas follows this
negative_prompt: ""
width: 512                                   # optional; else --width/--height, else the model's size
height: 512
regions:
  - box: [0.0, 0.1, 0.5, 0.9]               # x0, y0, x1, y1: fractions of the canvas (all <= 1) or pixels
    prompt: "a girl, yltcaxe artstyle"
  - mask: right.png                          # white = the region; relative to the layout file
    prompt: "a boy, yltcaxe artstyle"
    colour: "#2050d0"                        # optional: its fill in a `layout-sketch --style colours`
control:                                     # optional ControlNet conditioning, see control.py
  - image: sketch.png
    model: lllyasviel/control_v11p_sd15_scribble
    scale: 1.0
```
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageColor, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError
from ..models.backbones import backbone_of
from .regional_attention import canvas_shares, latent_masks, regional_attention

log = logging.getLogger(__name__)


class Region(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What this region shows.")
    box: tuple[float, float, float, float] | None = Field(
        None, description="x0, y0, x1, y1 as fractions of the canvas (all <= 1) or in pixels.")
    mask: Path | None = Field(None, description="A mask image (white = region), relative to the layout file.")
    colour: str | None = Field(
        None, description="The region's fill in a `layout-sketch --style colours` sketch: a colour name or #rrggbb.")

    @field_validator("colour")
    @classmethod
    def _known_colour(cls, colour: str | None) -> str | None:
        if colour is not None:
            try:
                ImageColor.getrgb(colour)
            except ValueError:
                raise ValueError(f"colour {colour!r} is neither a colour name nor #rrggbb") from None
        return colour

    @model_validator(mode="after")
    def _one_shape(self) -> "Region":
        if (self.box is None) == (self.mask is None):
            raise ValueError("give exactly one of 'box' or 'mask'")
        return self


class Control(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: Path = Field(description="The condition image (a drawing, a sketch), relative to the layout file.")
    model: str = Field(min_length=1, description="ControlNet: hub id, local folder or .safetensors file.")
    scale: float = Field(1.0, ge=0, le=10, description="ControlNet conditioning scale.")


class Layout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    base_weight: float = Field(0.0, ge=0, le=1, description="The global prompt's share inside regions (0: none).")
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    regions: list[Region] = Field(default_factory=list)
    control: list[Control] = Field(default_factory=list)

    @field_validator("regions")
    @classmethod
    def _some_region(cls, regions: list[Region]) -> list[Region]:
        if len(regions) > 16:
            raise ValueError(f"{len(regions)} regions; at most 16 are supported")
        return regions

    def resolve_paths(self, folder: Path) -> "Layout":
        """Mask and control image paths relative to ``folder`` (the layout file's)."""
        regions = [r.model_copy(update={"mask": _under(folder, r.mask)}) if r.mask else r for r in self.regions]
        control = [c.model_copy(update={"image": _under(folder, c.image)}) for c in self.control]
        return self.model_copy(update={"regions": regions, "control": control})

    def to_text(self) -> str:
        """One-line JSON of the layout, for the PNG's parameters (reproducible with --layout)."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), separators=(",", ":"))


def _under(folder: Path, path: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else folder / path


def load_layout(path: Path) -> Layout:
    """Read and validate a YAML or JSON layout file; every problem is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"layout file '{path}' not found; pass --layout FILE.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"layout file '{path}' is not valid YAML or JSON{where}; fix it") from None
    if not isinstance(data, dict):
        raise UserError(f"layout file '{path}' must hold a mapping (prompt, regions, ...), not {type(data).__name__}")
    try:
        layout = Layout.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "layout"
        if err["loc"][:1] == ("regions",) and len(err["loc"]) > 1:
            where = f"region {err['loc'][1]}" + "".join(f".{p}" for p in err["loc"][2:])
        raise UserError(f"layout file '{path}': {where}: {err['msg']}") from None
    return layout.resolve_paths(path.parent)


def box_pixels(box: tuple[float, float, float, float], width: int, height: int, name: str) -> tuple[int, int, int, int]:
    """A box as pixel bounds on a ``width`` x ``height`` canvas; fractions when every value is <= 1."""
    x0, y0, x1, y1 = box
    if all(0 <= v <= 1 for v in box):
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    elif not all(float(v).is_integer() for v in box):
        raise UserError(f"{name}: box {list(box)} lies outside the canvas as fractions (each must be 0..1) "
                        "and is not whole pixels either; give four fractions or four pixel numbers")
    if min(x0, y0) < 0 or x1 > width or y1 > height:
        raise UserError(f"{name}: box {list(box)} lies outside the {width}x{height} canvas; "
                        "give fractions (0..1) or pixels inside it")
    px = (round(x0), round(y0), round(x1), round(y1))
    if px[2] <= px[0] or px[3] <= px[1]:
        raise UserError(f"{name}: box {list(box)} has zero area on the {width}x{height} canvas (x1 > x0, y1 > y0 needed)")
    return px


def _read_mask(path: Path, width: int, height: int, name: str) -> np.ndarray:
    """A mask image as floats in [0, 1]. One of another size with the canvas's aspect ratio is
    resized (with a note); another aspect ratio is refused, since stretching would move the subject."""
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except FileNotFoundError:
        raise UserError(f"{name}: mask image '{path}' not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{name}: mask image '{path}' is not a readable image ({exc.__class__.__name__})") from None
    if mask.size != (width, height):
        if abs(mask.width * height - mask.height * width) > max(mask.width, mask.height):
            raise UserError(f"{name}: mask image '{path}' is {mask.width}x{mask.height} but the canvas is "
                            f"{width}x{height}, another aspect ratio; draw it at the canvas size")
        log.info("%s: mask '%s' is %dx%d; resized to the %dx%d canvas", name, path, mask.width, mask.height,
                 width, height)
        mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(mask, np.float32) / 255.0
    if not (arr > 0.5).any():
        raise UserError(f"{name}: mask image '{path}' is empty (no white pixels), a region of zero area")
    return arr


def region_masks(layout: Layout, width: int, height: int) -> torch.Tensor:
    """(regions, height, width) float masks in [0, 1] at pixel resolution."""
    masks = []
    for i, region in enumerate(layout.regions):
        name = f"region {i} ('{region.prompt[:40]}')"
        if region.box is not None:
            x0, y0, x1, y1 = box_pixels(region.box, width, height, name)
            arr = np.zeros((height, width), np.float32)
            arr[y0:y1, x0:x1] = 1.0
        else:
            arr = _read_mask(region.mask, width, height, name)
        masks.append(torch.from_numpy(arr))
    return torch.stack(masks) if masks else torch.zeros((0, height, width))


@dataclass
class Conditioning:
    """What a layout and control images add to each pipeline call: region prompts with their
    pixel masks (blended in cross-attention), and ControlNet images with their scales."""

    region_prompts: list[str] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (regions, height, width) at pixel resolution
    base_weight: float = 0.0
    control_images: list[Image.Image] = field(default_factory=list)
    control_scales: list[float] = field(default_factory=list)

    def pipe_kwargs(self, pipe, prompt: str, negative_prompt: str, n: int, guidance: float) -> dict:
        kwargs: dict = {}
        if self.region_prompts:
            shares = canvas_shares(self.masks, self.base_weight)
            kwargs.update(_regional_embeds(pipe, [prompt, *self.region_prompts], shares, negative_prompt, n, guidance))
        else:
            kwargs.update(prompt=[prompt] * n, negative_prompt=[negative_prompt] * n if negative_prompt else None)
        if self.control_images:
            single = len(self.control_images) == 1
            kwargs["image"] = self.control_images[0] if single else self.control_images
            kwargs["controlnet_conditioning_scale"] = self.control_scales[0] if single else self.control_scales
        return kwargs

    def active(self, pipe):
        if not self.region_prompts:
            return nullcontext()
        return regional_attention(pipe, latent_masks(self.masks, pipe.vae_scale_factor), self.base_weight)


# What a pipeline's encode_prompt returns, in order, under the names its __call__ takes them by:
# per-token states for each half of guidance, then (SDXL) a pooled vector for each.
EMBEDDING_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def _encode(pipe, prompts: list[str], negative_prompts: list[str] | None, cfg: bool) -> dict[str, torch.Tensor | None]:
    """The pipeline's own prompt encoding, as the keyword arguments its __call__ takes."""
    out = pipe.encode_prompt(prompt=prompts, device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=cfg, negative_prompt=negative_prompts)
    if len(out) not in (2, 4):
        raise TypeError(f"{type(pipe).__name__}.encode_prompt returned {len(out)} values; expected 2 or 4")
    return dict(zip(EMBEDDING_NAMES, out))


def _regional_embeds(pipe, prompts: list[str], shares: list[float], negative_prompt: str, n: int,
                     guidance: float) -> dict:
    """The prompts' per-token embeddings side by side on the token axis (global first); the negative
    prompt's repeated as often, so both halves of guidance have the same shape. A pooled vector
    (SDXL) conditions the whole image: the prompts' blend by ``shares`` of the canvas."""
    cfg = guidance > 1
    negatives = [negative_prompt] * n if negative_prompt else None
    # The negative prompt is encoded once, with the global prompt.
    encoded = [_encode(pipe, [text] * n, negatives, cfg and i == 0) for i, text in enumerate(prompts)]
    kwargs = {"prompt_embeds": torch.cat([e["prompt_embeds"] for e in encoded], dim=1)}
    if cfg:
        kwargs["negative_prompt_embeds"] = torch.cat([encoded[0]["negative_prompt_embeds"]] * len(prompts), dim=1)
    if "pooled_prompt_embeds" in encoded[0]:
        kwargs["pooled_prompt_embeds"] = _blend([e["pooled_prompt_embeds"] for e in encoded], shares)
        if cfg:
            kwargs["negative_pooled_prompt_embeds"] = encoded[0]["negative_pooled_prompt_embeds"]
    return kwargs


def _blend(vectors: list[torch.Tensor], shares: list[float]) -> torch.Tensor:
    """sum(share * vector), term by term, so that shares of exactly 0 and 1 give one vector bit for bit."""
    out = vectors[0] * shares[0]
    for vector, share in zip(vectors[1:], shares[1:]):
        out = out + vector * share
    return out


@dataclass
class CompositionPlan:
    """A generate request's prompt, layout and control images, checked before any model loads."""

    prompt: str
    negative_prompt: str = ""
    layout: Layout | None = None
    controls: list[tuple[Path, str, float]] = field(default_factory=list)  # (image, ControlNet, scale)
    images: list[Image.Image] = field(default_factory=list)

    @property
    def width(self) -> int | None:
        return self.layout.width if self.layout else None

    @property
    def height(self) -> int | None:
        return self.layout.height if self.layout else None

    def prepare(self, pipe, width: int, height: int, model_label: str, dtype=None):
        """(pipeline, Conditioning): the ControlNet pipeline over ``pipe``'s parts when there are control
        images, and the region masks on the ``width`` x ``height`` canvas."""
        from .control import controlnet_pipeline, load_controlnet

        conditioning = Conditioning()
        family = backbone_of(pipe)
        if self.layout and self.layout.regions and not family.has_regional_prompts:
            raise UserError(f"--layout regions are not available for {family.family} ({family.title}) yet; "
                            "use a layout without regions, or an SD 1.x, 2.x or SDXL model")
        if self.controls and family.controlnet_pipeline_class_name is None:
            raise UserError(f"--control is not available for {family.family} ({family.title}) yet; "
                            "use an SD 1.x, 2.x or SDXL model for ControlNets")
        if self.layout and self.layout.regions:
            conditioning.region_prompts = [r.prompt for r in self.layout.regions]
            conditioning.masks = region_masks(self.layout, width, height)
            conditioning.base_weight = self.layout.base_weight
        if self.controls:
            nets = [load_controlnet(model, pipe.unet, model_label, dtype, family) for _, model, _ in self.controls]
            pipe = controlnet_pipeline(pipe, nets)
            conditioning.control_images = self.images
            conditioning.control_scales = [scale for _, _, scale in self.controls]
        return pipe, conditioning

    def record(self) -> dict[str, str]:
        """What the PNG's parameters add: the whole layout as JSON (the prompts used, the regions, every
        control image with its ControlNet and scale, paths made absolute), so that
        ``generate --layout`` of that JSON makes the image again."""
        if not (self.layout and self.layout.regions) and not self.controls:
            return {}
        layout = self.layout or Layout()
        regions = [r.model_copy(update={"mask": r.mask.resolve()}) if r.mask else r for r in layout.regions]
        control = [Control(image=Path(image).resolve(), model=_absolute_if_local(model), scale=scale)
                   for image, model, scale in self.controls]
        used = layout.model_copy(update={"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                                         "regions": regions, "control": control})
        return {"Layout": used.to_text()}


def _absolute_if_local(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def plan_composition(layout_file: Path | None, prompt: str | None, negative_prompt: str, control: list[Path],
                     controlnet: list[str], control_scale: list[float]) -> CompositionPlan:
    """Read the layout and control images and pair each image with its ControlNet; flags come after
    the layout's own entries, and --prompt/--negative-prompt override the layout's."""
    from .control import read_control_image

    layout = load_layout(layout_file) if layout_file else None
    prompt = prompt if prompt else (layout.prompt if layout else "")
    if not prompt.strip():
        where = f"the layout file '{layout_file}' has no 'prompt' and " if layout else ""
        raise UserError(f"{where}--prompt is empty; say what to paint")
    negative = negative_prompt or (layout.negative_prompt if layout else "")
    if len(control) != len(controlnet):
        raise UserError(f"{len(control)} --control image(s) but {len(controlnet)} --controlnet model(s); "
                        "give one ControlNet per control image, in the same order")
    if control_scale and len(control_scale) not in (1, len(control)):
        raise UserError(f"{len(control_scale)} --control-scale values for {len(control)} control images; "
                        "give one for all or one per image")
    scales = list(control_scale) * len(control) if len(control_scale) == 1 else list(control_scale) or [1.0] * len(control)
    controls = [(c.image, c.model, c.scale) for c in (layout.control if layout else [])]
    controls += [(Path(image), model, scale) for image, model, scale in zip(control, controlnet, scales)]
    return CompositionPlan(prompt, negative, layout, controls, [read_control_image(image) for image, _, _ in controls])
