"""Schedulers by short name, PNG files carrying their generation parameters, and grids."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SCHEDULERS = {
    # short name: (diffusers class name, extra config, A1111 sampler name)
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    # flow-matching families (FLUX.1): Euler steps along the velocity, the schedule shifted as the model's config says
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
}


def make_scheduler(name: str, base_config: dict):
    """A diffusers scheduler of the given short name, configured like the model's own."""
    import diffusers

    cls_name, extra, _ = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config(base_config, **extra)


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    guidance: float
    seed: int
    width: int
    height: int
    model: str
    extra: dict[str, str] = field(default_factory=dict)  # more key: value pairs (a layout, ControlNets)

    def a1111_text(self) -> str:
        """The AUTOMATIC1111 'parameters' text: prompt, negative prompt, then key: value pairs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        sampler = SCHEDULERS.get(self.sampler, (None, None, self.sampler))[2]
        lines.append(
            f"Steps: {self.steps}, Sampler: {sampler}, CFG scale: {self.guidance:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: {self.model}"
            + "".join(f", {key}: {json.dumps(value)}" for key, value in self.extra.items())
        )
        return "\n".join(lines)


def save_png(image: Image.Image, path: Path, params: GenerationParams | None = None) -> None:
    """Save atomically, with the A1111-style 'parameters' text chunk when params are given."""
    info = PngInfo()
    if params is not None:
        info.add_text("parameters", params.a1111_text())
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile same-sized images into rows of `cols` (default: near-square)."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
