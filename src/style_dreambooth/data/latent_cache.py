"""VAE latents of the training images: each crop is encoded once, then reused.

A DreamBooth set is a few instance and class images seen hundreds of times, so encoding them
every step wastes most of a step's work (at 512 px the VAE encoder costs about half as much
as the UNet's forward and backward). What is cached is the encoder's output distribution
(mean and log-variance), not a sample of it: every step still draws a fresh latent from it with
the step's generator, so training sees exactly what it would see without the cache.

Crops that never vary (square images, or --center-crop) are encoded up front; random crops of
other shapes are encoded when first drawn and kept, up to `max_entries` (least recently used go
first; 1024 entries are 64 MiB at 512 px in fp16).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .dataset import Batch, Crop, ImageBank


class LatentEncoder:
    """Image crops -> the VAE's latent distribution, from the cache when `cache` is on."""

    def __init__(
        self, vae, device: torch.device, dtype: torch.dtype, *, cache: bool, max_entries: int = 1024,
        encode_batch: int = 8,
    ) -> None:
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.cache = cache
        self.max_entries = max_entries
        self.encode_batch = encode_batch
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.encoded = 0  # crops run through the VAE so far

    def _encode(self, crops: list[Crop]) -> torch.Tensor:
        pixels = torch.stack([c.pixels() for c in crops]).to(self.device, dtype=self.dtype)
        self.encoded += len(crops)
        return self.vae.encode(pixels).latent_dist.parameters

    def _remember(self, crops: list[Crop], report: Callable[[int], None] | None = None) -> dict[tuple, torch.Tensor]:
        """Encode `crops` in chunks and keep them; `report(done)` after each chunk."""
        fresh = {}
        for start in range(0, len(crops), self.encode_batch):
            chunk = crops[start : start + self.encode_batch]
            for crop, params in zip(chunk, self._encode(chunk)):
                fresh[crop.key] = self._store[crop.key] = params.unsqueeze(0)
                while len(self._store) > self.max_entries:
                    self._store.popitem(last=False)
            if report is not None:
                report(start + len(chunk))
        return fresh

    def fixed_crops(self, banks: Iterable[ImageBank], center_crop: bool) -> list[Crop]:
        """The crops that never vary and are not cached yet (none when caching is off)."""
        if not self.cache:
            return []
        crops = (Crop(bank, i, *box) for bank in banks for i in range(len(bank))
                 if (box := bank.fixed_crop(i, center_crop)) is not None)
        return [c for c in crops if c.key not in self._store]

    @torch.no_grad()
    def precompute(self, crops: list[Crop], report: Callable[[int], None] | None = None) -> int:
        """Encode and keep `crops` (see `fixed_crops`); returns how many were encoded."""
        self._remember(crops, report)
        return len(crops)

    @torch.no_grad()
    def latent_dist(self, batch: Batch) -> DiagonalGaussianDistribution:
        if not self.cache:
            return DiagonalGaussianDistribution(self._encode(batch.crops))
        missing = list({c.key: c for c in batch.crops if c.key not in self._store}.values())
        fresh = self._remember(missing) if missing else {}
        params = []
        for c in batch.crops:
            if c.key in self._store:
                self._store.move_to_end(c.key)
                params.append(self._store[c.key])
            else:  # evicted again at once: more distinct crops in one batch than max_entries
                params.append(fresh[c.key])
        return DiagonalGaussianDistribution(torch.cat(params))

    def __len__(self) -> int:
        return len(self._store)
