"""Instance and class examples, and a deterministic, resumable order over them.

The sample used at any point of training is a pure function of (seed, sample number), so a
resumed run sees exactly the data an uninterrupted run would have seen, with no loader state
to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import load_image, read_caption


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str


def instance_examples(paths: list[Path], instance_prompt: str) -> list[Example]:
    """Instance images with their prompts; a same-stem .txt caption is appended to the prompt."""
    out = []
    for path in paths:
        caption = read_caption(path)
        if caption is None:
            prompt = instance_prompt
        elif instance_prompt.lower() in caption.lower():
            prompt = caption
        else:
            prompt = f"{instance_prompt}, {caption}"
        out.append(Example(path, prompt))
    return out


def class_examples(paths: list[Path], class_prompt: str) -> list[Example]:
    return [Example(p, class_prompt) for p in paths]


def _stream_rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, *words])


class ImageBank:
    """Decoded, resized images held in memory (a DreamBooth set is a few dozen images)."""

    def __init__(self, examples: list[Example], resolution: int) -> None:
        self.examples = examples
        self.resolution = resolution
        self._images = [self._resize(load_image(e.path)) for e in examples]

    def _resize(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        scale = self.resolution / min(w, h)
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        return np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, index: int, center_crop: bool, rng: np.random.Generator) -> torch.Tensor:
        """A (3, R, R) tensor in [-1, 1], center-cropped or randomly cropped with `rng`."""
        arr = self._images[index]
        h, w = arr.shape[:2]
        r = self.resolution
        if center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top, left = int(rng.integers(0, h - r + 1)), int(rng.integers(0, w - r + 1))
        crop = arr[top : top + r, left : left + r]
        return torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class SampleOrder:
    """Epoch-wise shuffled order over a bank; sample number k -> (index, crop rng)."""

    def __init__(self, size: int, seed: int, stream: int) -> None:
        self.size = size
        self.seed = seed
        self.stream = stream
        self._perms: dict[int, np.ndarray] = {}

    def index(self, k: int) -> int:
        epoch, pos = divmod(k, self.size)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = _stream_rng(self.seed, self.stream, epoch).permutation(self.size)
            self._perms = {epoch: perm}
        return int(perm[pos])

    def crop_rng(self, k: int) -> np.random.Generator:
        return _stream_rng(self.seed, self.stream, 1_000_003, k)


def sample_numbers(step: int, micro: int, accum: int, world: int, rank: int, batch: int) -> list[int]:
    """Global sample numbers used by one process for one micro-batch of one optimizer step."""
    first = ((step * accum + micro) * world + rank) * batch
    return list(range(first, first + batch))


@dataclass
class Batch:
    pixels: torch.Tensor
    prompts: list[str]
    n_instance: int


def make_batch(
    numbers: list[int],
    instances: ImageBank,
    instance_order: SampleOrder,
    classes: ImageBank | None,
    class_order: SampleOrder | None,
    center_crop: bool,
) -> Batch:
    """Instance samples first, then (with prior preservation) as many class samples."""
    pixels, prompts = [], []
    for k in numbers:
        i = instance_order.index(k)
        pixels.append(instances.pixels(i, center_crop, instance_order.crop_rng(k)))
        prompts.append(instances.examples[i].prompt)
    if classes is not None and class_order is not None:
        for k in numbers:
            i = class_order.index(k)
            pixels.append(classes.pixels(i, center_crop, class_order.crop_rng(k)))
            prompts.append(classes.examples[i].prompt)
    return Batch(torch.stack(pixels), prompts, len(numbers))
