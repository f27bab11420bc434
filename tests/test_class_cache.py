"""Class-image cache: reused when the key matches, regenerated when it differs, resumed after a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from style_dreambooth.data.class_cache import ClassImageSpec, ensure_class_images


class FakeGenerator:
    """Deterministic 'model': each image's pixels come from its seed and the prompt."""

    def __init__(self, fail_after_batches: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_after = fail_after_batches

    def __call__(self, prompt, seeds):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(list(seeds))
        out = []
        for s in seeds:
            rng = np.random.default_rng([s, len(prompt)])
            out.append(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
        return out


def spec(**kw):
    base = dict(model={"path": "/m", "files": [["unet.safetensors", 10, "abc"]]}, prompt="artstyle",
                resolution=512, inference_steps=25, guidance_scale=7.5, sampler="dpm++", seed=1337)
    return ClassImageSpec(**{**base, **kw})


def test_reused_when_key_matches(tmp_path):
    gen = FakeGenerator()
    first = ensure_class_images(spec(), 5, tmp_path, lambda: gen, batch_size=2)
    assert gen.calls == [[1337, 1338], [1339, 1340], [1341]]
    factory_calls = []
    again = ensure_class_images(spec(), 5, tmp_path, lambda: factory_calls.append(1) or gen, batch_size=2)
    assert again == first and factory_calls == [], "no pipeline is even built when the cache is complete"
    fewer = ensure_class_images(spec(), 3, tmp_path, lambda: factory_calls.append(1) or gen)
    assert fewer == first[:3] and factory_calls == []
    manifest = json.loads((first[0].parent / "manifest.json").read_text())
    assert [e["seed"] for e in manifest["images"]] == [1337, 1338, 1339, 1340, 1341]
    assert manifest["spec"]["prompt"] == "artstyle"


@pytest.mark.parametrize(
    "change",
    [{"prompt": "painting"}, {"resolution": 768}, {"seed": 1},
     {"model": {"path": "/m", "files": [["unet.safetensors", 10, "xyz"]]}},
     {"inference_steps": 50}, {"guidance_scale": 5.0}],
)
def test_regenerated_when_key_differs(tmp_path, change):
    a = ensure_class_images(spec(), 2, tmp_path, FakeGenerator)
    gen = FakeGenerator()
    b = ensure_class_images(spec(**change), 2, tmp_path, lambda: gen)
    assert gen.calls, "a different key must not reuse the cache"
    assert a[0].parent != b[0].parent
    assert all(p.exists() for p in a), "the other cache is left intact"


def test_more_images_only_adds_the_missing_ones(tmp_path):
    ensure_class_images(spec(), 3, tmp_path, FakeGenerator)
    gen = FakeGenerator()
    paths = ensure_class_images(spec(), 5, tmp_path, lambda: gen, batch_size=4)
    assert gen.calls == [[1340, 1341]] and len(paths) == 5


def test_interrupted_generation_resumes_where_it_stopped(tmp_path):
    crashing = FakeGenerator(fail_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(spec(), 7, tmp_path / "a", lambda: crashing, batch_size=2)
    folder = tmp_path / "a" / spec().key()
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert not list(folder.glob(".*tmp")), "no half-written files"
    gen = FakeGenerator()
    resumed = ensure_class_images(spec(), 7, tmp_path / "a", lambda: gen, batch_size=2)
    assert gen.calls == [[1341, 1342], [1343]]
    clean = ensure_class_images(spec(), 7, tmp_path / "b", FakeGenerator, batch_size=3)
    for x, y in zip(resumed, clean):
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))


def test_missing_file_listed_in_manifest_is_regenerated(tmp_path):
    paths = ensure_class_images(spec(), 3, tmp_path, FakeGenerator)
    paths[1].unlink()
    gen = FakeGenerator()
    ensure_class_images(spec(), 3, tmp_path, lambda: gen)
    assert gen.calls == [[1338]]


def test_real_model_change_invalidates_cache(tmp_path, tiny_model):
    """The cache key follows the model's weights: a re-initialised model in the same folder is a new key."""
    import shutil

    from style_dreambooth.models.loading import model_identity
    from style_dreambooth.models.random_model import save_random_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    key_a = spec(model=model_identity(str(folder))).key()
    assert spec(model=model_identity(str(folder))).key() == key_a
    save_random_model("tiny", folder, seed=1, overwrite=True)
    assert spec(model=model_identity(str(folder))).key() != key_a


class RecordingGenerator(FakeGenerator):
    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    def __call__(self, prompt, seeds):
        self.prompts += [prompt] * len(seeds)
        return super().__call__(prompt, seeds)


def test_one_prompt_per_image_cycles_and_is_recorded(tmp_path):
    prompts = ("a red circle, artstyle", "a blue house, artstyle")
    gen = RecordingGenerator()
    paths = ensure_class_images(spec(prompts=prompts), 5, tmp_path, lambda: gen, batch_size=4)
    by_seed = dict(zip(sum(gen.calls, []), gen.prompts))
    assert by_seed == {1337 + i: prompts[i % 2] for i in range(5)}, "image i uses prompts[i % 2] and seed + i"
    manifest = json.loads((paths[0].parent / "manifest.json").read_text())
    assert [e["prompt"] for e in manifest["images"]] == [prompts[i % 2] for i in range(5)]
    assert [spec(prompts=prompts).prompt_for(i) for i in range(3)] == [prompts[0], prompts[1], prompts[0]]
    assert paths[0].parent != ensure_class_images(spec(), 1, tmp_path, FakeGenerator)[0].parent
    assert "prompts" not in spec().as_json(), "a single-prompt cache keeps the key it had before prompts existed"
