"""The check that a LoRA file we write is the LoRA we trained, shared by the tests of each family:
our adapters fused into the weights against diffusers' own ``load_lora_weights`` of our file."""

from __future__ import annotations

import numpy as np


def merge_adapters(lora) -> None:
    """Fuse W + (alpha/r) * up @ down into the base weights of every module ``lora`` trains."""
    from peft.tuners.lora import LoraLayer

    for module in lora.modules.values():
        for m in module.modules():
            if isinstance(m, LoraLayer):
                m.merge()


def assert_loads_like_fused(plain, file, image, fused: np.ndarray) -> None:
    """diffusers loading ``file`` into the base pipeline ``plain`` renders ``fused``, and not the base's image."""
    base = image(plain)
    plain.load_lora_weights(str(file))
    loaded = image(plain)
    assert np.abs(loaded - base).max() > 1e-2, "the LoRA must change the output"
    assert np.allclose(loaded, fused, atol=1e-4), np.abs(loaded - fused).max()
