"""Instance and class examples, and a deterministic, resumable order over them.

The sample used at any point of training is a pure function of (seed, sample number), so a
resumed run sees exactly the data an uninterrupted run would have seen, with no loader state
to save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..models.backbones.base import ImageSize
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
    """Given class images with their prompts: a same-stem .txt caption, else the class prompt."""
    return [Example(p, read_caption(p) or class_prompt) for p in paths]


def class_prompts_for(examples: list[Example], instance_prompt: str, class_prompt: str) -> tuple[str, ...]:
    """One class prompt per distinct instance prompt, the instance prompt swapped for the class prompt:
    'a red circle, yltcaxe artstyle' -> 'a red circle, artstyle'."""
    pattern = re.compile(re.escape(instance_prompt), re.IGNORECASE)
    return tuple(dict.fromkeys(pattern.sub(class_prompt, e.prompt, count=1) for e in examples))


def _stream_rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, *words])


class ImageBank:
    """Decoded, resized images held in memory (a DreamBooth set is a few dozen images)."""

    def __init__(self, examples: list[Example], resolution: int, name: str = "images") -> None:
        self.examples = examples
        self.resolution = resolution
        self.name = name
        loaded = [load_image(e.path) for e in examples]
        self.original_sizes = [(image.height, image.width) for image in loaded]
        self._images = [self._resize(image) for image in loaded]

    def _resize(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        scale = self.resolution / min(w, h)
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        return np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.examples)

    def fixed_crop(self, index: int, center_crop: bool) -> tuple[int, int] | None:
        """(top, left) when the crop of this image never varies: center crop, or already R x R."""
        h, w = self._images[index].shape[:2]
        r = self.resolution
        if center_crop or (h == r and w == r):
            return (h - r) // 2, (w - r) // 2
        return None

    def crop(self, index: int, center_crop: bool, rng: np.random.Generator) -> "Crop":
        """The crop of one sample: fixed, or drawn with `rng`."""
        box = self.fixed_crop(index, center_crop)
        if box is None:
            h, w = self._images[index].shape[:2]
            box = int(rng.integers(0, h - self.resolution + 1)), int(rng.integers(0, w - self.resolution + 1))
        return Crop(self, index, *box)

    def pixels(self, crop: "Crop") -> torch.Tensor:
        """A (3, R, R) tensor in [-1, 1]."""
        r = self.resolution
        arr = self._images[crop.index][crop.top : crop.top + r, crop.left : crop.left + r]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class Crop:
    """One training image as the model sees it: which image of which bank, cut where."""

    bank: ImageBank
    index: int
    top: int
    left: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        return self.bank.name, self.index, self.top, self.left

    def pixels(self) -> torch.Tensor:
        return self.bank.pixels(self)

    def size(self) -> ImageSize:
        """The image's size before resizing and where the crop lies (SDXL's micro-conditioning)."""
        r = self.bank.resolution
        return ImageSize(self.bank.original_sizes[self.index], (self.top, self.left), (r, r))


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

    def caption_rng(self, k: int) -> np.random.Generator:
        return _stream_rng(self.seed, self.stream, 2_000_003, k)


@dataclass(frozen=True)
class CaptionRules:
    """Per-sample changes to a training prompt's comma-separated parts, as kohya's ``--shuffle_caption``
    and ``--caption_tag_dropout_rate``: ``"a red circle, yltcaxe artstyle"`` may train as
    ``"yltcaxe artstyle, a red circle"``. Parts equal to one of ``keep`` (the instance and class
    prompts) are never dropped, so the identifier is always in an instance prompt."""

    shuffle: bool = False
    tag_dropout: float = 0.0
    keep: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.shuffle or self.tag_dropout > 0

    def apply(self, prompt: str, rng: np.random.Generator) -> str:
        parts = [p.strip() for p in prompt.split(",") if p.strip()]
        if len(parts) < 2:
            return prompt
        kept = {k.strip().lower() for k in self.keep}
        if self.tag_dropout > 0:
            drop = rng.random(len(parts)) < self.tag_dropout
            left = [p for p, d in zip(parts, drop) if not d or p.lower() in kept]
            parts = left or parts
        if self.shuffle:
            parts = [parts[i] for i in rng.permutation(len(parts))]
        return ", ".join(parts)


def sample_numbers(step: int, micro: int, accum: int, world: int, rank: int, batch: int) -> list[int]:
    """Global sample numbers used by one process for one micro-batch of one optimizer step."""
    first = ((step * accum + micro) * world + rank) * batch
    return list(range(first, first + batch))


@dataclass
class Batch:
    crops: list[Crop]
    prompts: list[str]
    n_instance: int

    def pixels(self) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1]; built on demand, since cached latents make it unneeded."""
        return torch.stack([c.pixels() for c in self.crops])

    def sizes(self) -> list[ImageSize]:
        return [c.size() for c in self.crops]


def make_batch(
    numbers: list[int],
    instances: ImageBank,
    instance_order: SampleOrder,
    classes: ImageBank | None,
    class_order: SampleOrder | None,
    center_crop: bool,
    captions: CaptionRules | None = None,
) -> Batch:
    """Instance samples first, then (with prior preservation) as many class samples; ``captions``
    shuffles or drops prompt parts per sample (deterministically, from the sample number)."""
    crops, prompts = [], []
    rules = captions if captions is not None and captions.active else None
    for k in numbers:
        i = instance_order.index(k)
        crops.append(instances.crop(i, center_crop, instance_order.crop_rng(k)))
        prompt = instances.examples[i].prompt
        prompts.append(rules.apply(prompt, instance_order.caption_rng(k)) if rules else prompt)
    if classes is not None and class_order is not None:
        for k in numbers:
            i = class_order.index(k)
            crops.append(classes.crop(i, center_crop, class_order.crop_rng(k)))
            prompt = classes.examples[i].prompt
            prompts.append(rules.apply(prompt, class_order.caption_rng(k)) if rules else prompt)
    return Batch(crops, prompts, len(numbers))
