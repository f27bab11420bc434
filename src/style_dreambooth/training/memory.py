"""Will a training size fit at all? A lower bound on memory, checked before anything is loaded."""

from __future__ import annotations

import os

import torch

from ..config import TrainConfig
from ..errors import UserError
from ..files import format_bytes

# The VAE encoder's first blocks run at full image resolution with 128 channels; a ResNet block
# holds at least its input and its output there. 2 bytes per value (half precision) keeps it a floor.
_VAE_CHANNELS = 128
_TENSORS_HELD = 2
_BYTES_PER_VALUE = 2


def min_bytes_per_image(resolution: int) -> int:
    """A floor on the memory one `resolution`² image takes going through the SD VAE encoder."""
    return _TENSORS_HELD * _VAE_CHANNELS * resolution * resolution * _BYTES_PER_VALUE


def memory_available() -> tuple[int, str]:
    """(bytes, what) of the memory training would run in: the GPU's, else the machine's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def check_fits_in_memory(cfg: TrainConfig) -> None:
    """Refuse a --resolution whose floor alone exceeds the memory there is."""
    needed = min_bytes_per_image(cfg.resolution)
    have, what = memory_available()
    if needed > have:
        raise UserError(
            f"--resolution {cfg.resolution} cannot fit: one image through the VAE alone needs at least "
            f"{format_bytes(needed)}, and this machine has {format_bytes(have)} of {what}; "
            "SD 1.x trains at 512, SD 2.x at 768, SDXL at 1024"
        )
