"""Caption shuffle and tag dropout (kohya's --shuffle_caption, --caption_tag_dropout_rate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from style_dreambooth.config import TrainConfig
from style_dreambooth.data.dataset import CaptionRules, Example, ImageBank, SampleOrder, make_batch


def test_shuffle_reorders_parts_and_keeps_every_word():
    rules = CaptionRules(shuffle=True)
    prompt = "a red circle, yltcaxe artstyle"
    seen = {rules.apply(prompt, np.random.default_rng(k)) for k in range(40)}
    assert seen == {"a red circle, yltcaxe artstyle", "yltcaxe artstyle, a red circle"}
    assert rules.apply("yltcaxe artstyle", np.random.default_rng(0)) == "yltcaxe artstyle"  # one part: as is
    assert not CaptionRules().active and CaptionRules().apply(prompt, np.random.default_rng(0)) == prompt


def test_tag_dropout_never_drops_the_instance_or_class_prompt():
    rules = CaptionRules(tag_dropout=0.5, keep=("yltcaxe artstyle", "artstyle"))
    outs = [rules.apply("a red circle, small, yltcaxe artstyle", np.random.default_rng(k)) for k in range(200)]
    assert all(o.endswith("yltcaxe artstyle") for o in outs)
    assert "yltcaxe artstyle" in outs and "a red circle, small, yltcaxe artstyle" in outs
    assert 0.15 < sum(o == "yltcaxe artstyle" for o in outs) / len(outs) < 0.35  # both others dropped: 1/4
    everything = CaptionRules(tag_dropout=0.99)
    assert everything.apply("a, b", np.random.default_rng(0)) in ("a, b", "a", "b")  # never empty


def test_make_batch_shuffles_instance_and_class_prompts_per_sample_deterministically(tmp_path: Path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(paths[-1])
    inst = ImageBank([Example(p, "a red circle, yltcaxe artstyle") for p in paths], 64, "instance")
    cls = ImageBank([Example(p, "a red circle, artstyle") for p in paths], 64, "class")
    rules = CaptionRules(shuffle=True, keep=("yltcaxe artstyle", "artstyle"))

    def prompts(rules):
        out = []
        for k in range(0, 40, 2):
            batch = make_batch([k, k + 1], inst, SampleOrder(2, 7, 0), cls, SampleOrder(2, 7, 1), True, rules)
            out += batch.prompts
        return out

    shuffled = prompts(rules)
    assert shuffled == prompts(rules)  # a pure function of (seed, sample number)
    assert {"yltcaxe artstyle, a red circle", "a red circle, yltcaxe artstyle",
            "artstyle, a red circle", "a red circle, artstyle"} == set(shuffled)
    assert set(prompts(None)) == {"a red circle, yltcaxe artstyle", "a red circle, artstyle"}


def test_config_takes_the_caption_options():
    cfg = TrainConfig(instance_dir=".", instance_prompt="yltcaxe artstyle", output_dir="out",
                      shuffle_caption=True, caption_tag_dropout_rate=0.1)
    assert cfg.shuffle_caption and cfg.caption_tag_dropout_rate == 0.1
    assert not TrainConfig(instance_dir=".", instance_prompt="x y", output_dir="o").shuffle_caption
    with pytest.raises(ValueError, match="caption_tag_dropout_rate"):
        TrainConfig(instance_dir=".", instance_prompt="x y", output_dir="o", caption_tag_dropout_rate=1.0)


def test_class_prompts_join_those_from_the_captions():
    from style_dreambooth.training.loop import generated_class_prompts

    base = dict(instance_dir=".", instance_prompt="yltcaxe artstyle", output_dir="o")
    instances = [Example(Path("a.png"), "a red circle, yltcaxe artstyle"), Example(Path("b.png"), "yltcaxe artstyle")]
    extra = ["a yellow circle, artstyle", "a red circle, artstyle"]
    cfg = TrainConfig(**base, class_prompts_from_captions=True, class_prompts=extra)
    assert generated_class_prompts(cfg, "artstyle", instances) == (
        "a red circle, artstyle", "artstyle", "a yellow circle, artstyle")
    cfg = TrainConfig(**base, class_prompts="a yellow circle, artstyle")  # one prompt, no list
    assert generated_class_prompts(cfg, "artstyle", instances) == ("a yellow circle, artstyle",)
    assert generated_class_prompts(TrainConfig(**base), "artstyle", instances) == ()
