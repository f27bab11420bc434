"""The latent cache: each crop through the VAE once, and the same distribution as encoding it directly."""

from __future__ import annotations

import pytest
import torch

from conftest import write_style_images
from style_dreambooth.data.dataset import ImageBank, SampleOrder, instance_examples, make_batch
from style_dreambooth.data.images import list_images
from style_dreambooth.data.latent_cache import LatentEncoder


@pytest.fixture(scope="module")
def vae(tiny_model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model / "vae").eval()


def _bank(tmp_path, name, size, n=3):
    folder = write_style_images(tmp_path / name, n=n, size=size)
    return ImageBank(instance_examples(list_images(folder), "yltcaxe artstyle"), 64, name=name)


def test_square_images_are_encoded_up_front_and_reused(tmp_path, vae):
    square, wide = _bank(tmp_path, "square", (64, 64)), _bank(tmp_path, "wide", (96, 64))
    enc = LatentEncoder(vae, torch.device("cpu"), torch.float32, cache=True)
    assert enc.precompute(enc.fixed_crops([square, wide], center_crop=False)) == 3  # the wide ones' crops vary
    assert enc.encoded == 3
    order = SampleOrder(len(square), seed=0, stream=0)
    for step in range(6):  # two epochs over the square bank: nothing new to encode
        enc.latent_dist(make_batch([step], square, order, None, None, center_crop=False))
    assert enc.encoded == 3
    # With --center-crop every crop is fixed, so the wide bank is encoded up front too.
    assert enc.precompute(enc.fixed_crops([square, wide], center_crop=True)) == 3
    assert enc.encoded == 6


def test_cached_distribution_equals_direct_encoding(tmp_path, vae):
    wide = _bank(tmp_path, "wide", (96, 64))
    order = SampleOrder(len(wide), seed=0, stream=0)
    enc = LatentEncoder(vae, torch.device("cpu"), torch.float32, cache=True)
    batch = make_batch([0, 1], wide, order, None, None, center_crop=False)
    assert {c.left for c in batch.crops} != {0}, "random crops expected"
    cached = enc.latent_dist(batch)
    direct = vae.encode(batch.pixels()).latent_dist
    assert torch.allclose(cached.mean, direct.mean, atol=1e-5)
    assert torch.allclose(cached.std, direct.std, atol=1e-5)
    # The same generator gives the same latent sample: the cache stores the distribution, not a draw.
    a = cached.sample(generator=torch.Generator().manual_seed(3))
    b = direct.sample(generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-5)
    enc.latent_dist(batch)
    assert enc.encoded == 2  # the second call hit the cache


def test_cache_is_bounded_and_off_means_every_step(tmp_path, vae):
    wide = _bank(tmp_path, "wide", (200, 64))  # 137 possible crops each
    order = SampleOrder(len(wide), seed=0, stream=0)
    enc = LatentEncoder(vae, torch.device("cpu"), torch.float32, cache=True, max_entries=2)
    batches = [make_batch([k], wide, order, None, None, center_crop=False) for k in range(4)]
    assert len({b.crops[0].key for b in batches}) == 4
    for b in batches:
        dist = enc.latent_dist(b)
        assert torch.allclose(dist.mean, vae.encode(b.pixels()).latent_dist.mean, atol=1e-5)
    assert len(enc) == 2 and enc.encoded == 4
    off = LatentEncoder(vae, torch.device("cpu"), torch.float32, cache=False)
    assert off.fixed_crops([wide], center_crop=True) == []
    for _ in range(3):
        off.latent_dist(batches[0])
    assert len(off) == 0
    assert off.encoded == 3
    with torch.no_grad():
        direct = vae.encode(batches[0].pixels()).latent_dist.mean
    assert torch.allclose(off.latent_dist(batches[0]).mean, direct, atol=1e-5)
