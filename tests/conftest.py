"""Shared fixtures: a tiny random SD 1.x model and procedural style images. No network."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


def write_style_images(folder: Path, n: int = 4, size=(80, 72), seed: int = 0) -> Path:
    """Striped, outlined blobs: a stand-in for an artist's images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size
        arr = np.zeros((h, w, 3), np.uint8) + rng.integers(150, 255, 3, dtype=np.uint8)
        arr[::4] = (20, 20, 60)
        cy, cx, r = h // 2, w // 2, 18 + 3 * i
        yy, xx = np.mgrid[:h, :w]
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return write_style_images(tmp_path / "instance")


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    """Keep the class-image cache inside the test's tmp dir."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STYLE_DREAMBOOTH_CACHE", str(root))
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a))


@pytest.fixture(scope="session")
def flux_model(tmp_path_factory) -> Path:
    """A tiny random FLUX.1-dev (guidance embedding, CLIP-L + T5 with the offline T5 tokenizer)."""
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("flux-tiny", tmp_path_factory.mktemp("models") / "flux-tiny", seed=0)


@pytest.fixture(scope="session")
def flux_schnell_model(tmp_path_factory) -> Path:
    from style_dreambooth.models.random_model import save_random_model

    return save_random_model("flux-schnell-tiny", tmp_path_factory.mktemp("models") / "flux-schnell-tiny", seed=0)
