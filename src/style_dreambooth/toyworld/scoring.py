"""The proof world's judges as an ``evaluate`` scorer, the proof world's held-out prompt file, and
the proof-world check of ``evaluate``'s copy threshold.

``JudgeScorer`` plugs into :func:`style_dreambooth.evaluation.evaluate.evaluate_run` (``scorers=``,
or ``--judges toyworld`` on the command line). For each prompt kind it judges the generated images
and reads the asked subject and colour from the prompt (``"a yellow star, yltcaxe artstyle"``):

* token prompts: ``judge_style_hit``, ``judge_subject_acc_token``, ``judge_colour_acc_token``,
  ``judge_prompt_fidelity`` (subject and colour both right);
* plain prompts: ``judge_leak_plain``, ``judge_subject_acc_plain``, ``judge_colour_acc_plain``;
* class prompts: ``judge_leak_class``, and subject/colour accuracy over the class prompts that name
  a subject (``"a yellow star, artstyle"``; the bare ``"artstyle"`` names none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import yaml
from PIL import Image

from .data import to_array, to_images
from .evaluate import subject_prompt
from ..evaluation.memorisation import COPY_THRESHOLD, nearest_instance
from .experiment import HELDOUT_COLOURS, HELDOUT_SUBJECTS, fresh_renders, instance_scenes
from .judges import Judges
from .render import COLOUR_NAMES, SUBJECTS
from .styles import ARTIST_STYLE, apply_style

_SUBJECT_RE = re.compile(
    r"^\s*an?\s+(?P<colour>" + "|".join(COLOUR_NAMES) + r")\s+(?P<subject>" + "|".join(SUBJECTS) + r")\s*$",
    re.IGNORECASE,
)


def parse_subject(prompt: str) -> tuple[str, str] | None:
    """``"a yellow star, yltcaxe artstyle"`` -> ``("star", "yellow")``; None if the prompt does not
    name exactly one proof-world subject in a colour before its first comma."""
    match = _SUBJECT_RE.match(prompt.split(",", 1)[0])
    if match is None:
        return None
    return match["subject"].lower(), match["colour"].lower()


class JudgeScorer:
    """``(images, prompts, kind) -> metrics`` with the shipped ground-truth judges."""

    name = "toyworld-judges"

    def __init__(self, judges: Judges | None = None, style: str = ARTIST_STYLE) -> None:
        self.judges = judges or Judges.load()
        self.style = style

    def __call__(self, images: list[Image.Image], prompts: list[str], kind: str) -> dict[str, float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if kind not in ("token", "plain", "class"):
            raise ValueError(f"unknown prompt kind {kind!r}")
        if not images:
            return {}
        verdicts = self.judges.judge(images)
        styled = sum(v.style == self.style for v in verdicts) / len(verdicts)
        out: dict[str, float] = {}
        if kind == "token":
            out["judge_style_hit"] = styled
        else:
            out[f"judge_leak_{kind}"] = styled
        asked = [(v, parse_subject(p)) for v, p in zip(verdicts, prompts)]
        asked = [(v, truth) for v, truth in asked if truth is not None]
        if asked:
            subject_ok = [v.subject == truth[0] for v, truth in asked]
            colour_ok = [v.colour == truth[1] for v, truth in asked]
            out[f"judge_subject_acc_{kind}"] = sum(subject_ok) / len(asked)
            out[f"judge_colour_acc_{kind}"] = sum(colour_ok) / len(asked)
            if kind == "token":
                out["judge_prompt_fidelity"] = sum(s and c for s, c in zip(subject_ok, colour_ok)) / len(asked)
        return out


def proof_world_prompts(
    instance_prompt: str = "yltcaxe artstyle",
    class_prompt: str = "artstyle",
    subjects: tuple[str, ...] = HELDOUT_SUBJECTS,
    colours: tuple[str, ...] = HELDOUT_COLOURS,
) -> dict[str, list[str]]:
    """The held-out cells (subjects absent from the instance images, in colours absent from them) as
    token / plain / class prompt lists; the class list also holds the bare class prompt."""
    cells = [subject_prompt(subject, colour) for subject in subjects for colour in colours]
    return {
        "token": [f"{c}, {instance_prompt}" for c in cells],
        "plain": cells,
        "class": [class_prompt] + [f"{c}, {class_prompt}" for c in cells],
    }


def write_prompt_file(path: Path, **kwargs) -> Path:
    """Write :func:`proof_world_prompts` as a YAML prompt file for ``evaluate --prompts``."""
    header = ("# Proof-world evaluation prompts: held-out subjects x held-out colours\n"
              "# (style_dreambooth.toyworld.scoring.proof_world_prompts). Use with\n"
              "# `style-dreambooth evaluate RUN --prompts THIS_FILE --judges toyworld`.\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(proof_world_prompts(**kwargs), sort_keys=False), encoding="utf-8")
    return path


@dataclass
class CopyCalibration:
    """Nearest-instance similarities (``evaluation.memorisation``) of pictures that are not copies
    (fresh drawings of the instance subjects in the style) and of near-copies of the instances."""

    threshold: float
    fresh: list[float]
    copies: dict[str, list[float]] = field(default_factory=dict)

    def false_positive_rate(self) -> float:
        return float(np.mean([s >= self.threshold for s in self.fresh]))

    def flagged(self, kind: str) -> float:
        return float(np.mean([s >= self.threshold for s in self.copies[kind]]))

    def summary(self) -> dict:
        return {
            "threshold": self.threshold, "n_fresh": len(self.fresh),
            "fresh_max": max(self.fresh), "fresh_p99": float(np.percentile(self.fresh, 99)),
            "fresh_false_positive_rate": self.false_positive_rate(),
            "copies": {k: {"min": min(v), "flagged": self.flagged(k)} for k, v in self.copies.items()},
        }


@torch.no_grad()
def calibrate_copy_threshold(n_fresh: int = 200, seed: int = 0, threshold: float = COPY_THRESHOLD) -> CopyCalibration:
    """Where ``evaluate``'s copy threshold falls on proof-world pictures: the 5 instance images
    against ``n_fresh`` fresh drawings (not copies), and against the instance images after the
    shipped base's VAE round trip (the closest a model can reproduce one), mirrored, with noise
    (sigma 4/255) or shifted by 1 px (1/64 of the width)."""
    from diffusers import AutoencoderKL

    from . import base_model_dir

    instances = [apply_style(s) for s in instance_scenes(5, seed)]
    fresh = [sim for _, sim in nearest_instance(fresh_renders(n_fresh, seed), instances)]
    vae = AutoencoderKL.from_pretrained(base_model_dir() / "vae", dtype=torch.float32).eval()
    x = torch.from_numpy(to_array(instances))
    round_trip = to_images(vae.decode(vae.encode(x).latent_dist.mean).sample)
    rng = np.random.default_rng(seed)

    def noisy(im: Image.Image) -> Image.Image:
        arr = np.asarray(im, np.float32) + rng.normal(0, 4, (64, 64, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    variants = {
        "VAE round trip": round_trip,
        "round trip, mirrored": [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in round_trip],
        "round trip + noise": [noisy(im) for im in round_trip],
        "round trip, shifted 1 px": [Image.fromarray(np.roll(np.asarray(im), 1, axis=1)) for im in round_trip],
    }
    copies = {k: [sim for _, sim in nearest_instance(v, instances)] for k, v in variants.items()}
    return CopyCalibration(threshold, fresh, copies)
