"""Sampling a toy-world model at fixed seeds and scoring the images with the judges."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..progress import progress_bar
from ..sampling.generate import sample
from ..sampling.images import make_scheduler
from .judges import Judges, half_view
from .render import COLOUR_NAMES, SUBJECTS
from .styles import ARTIST_STYLE, style_phrase

log = logging.getLogger(__name__)

STEPS = 25
GUIDANCE = 7.5


def load_pipe(model: str | Path):
    """A toy-world pipeline in fp32 on the CPU with the DPM++ 2M sampler."""
    from diffusers import StableDiffusionPipeline

    return for_sampling(StableDiffusionPipeline.from_pretrained(str(model), dtype=torch.float32))


def for_sampling(pipe):
    """``pipe`` on the CPU with the DPM++ 2M sampler and no progress bar."""
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


@dataclass(frozen=True)
class Job:
    """One prompt at fixed seeds, with the subject(s) and colour(s) it asks for."""

    prompt: str
    seeds: tuple[int, ...]
    subjects: tuple[tuple[str, str], ...]  # ((kind, colour), ...): one, or two (left, right)
    style: str | None = None  # the style the prompt names, if any


def subject_prompt(kind: str, colour: str, style: str | None = None) -> str:
    phrase = style_phrase(style) if style and style != "plain" else None
    text = f"a {colour} {kind}"
    return f"{text}, {phrase}" if phrase else text


def generate_jobs(pipe, jobs: list[Job], steps: int = STEPS, guidance: float = GUIDANCE,
                  label: str = "sampling") -> list[list[Image.Image]]:
    total = sum(len(j.seeds) for j in jobs)
    out: list[list[Image.Image]] = []
    with progress_bar(label, total) as bar, torch.no_grad():
        for job in jobs:
            out.append(sample(pipe, job.prompt, list(job.seeds), steps=steps, guidance=guidance,
                              width=64, height=64, batch_size=16))
            if bar:
                bar.advance(0, len(job.seeds))
    return out


@dataclass
class Scores:
    n: int
    subject_acc: float
    colour_acc: float
    style_counts: dict[str, int]

    def style_rate(self, style: str) -> float:
        return self.style_counts.get(style, 0) / max(1, self.n)


def score_single(judges: Judges, jobs: list[Job], images: list[list[Image.Image]]) -> Scores:
    flat = [im for ims in images for im in ims]
    truth = [j.subjects[0] for j, ims in zip(jobs, images) for _ in ims]
    verdicts = judges.judge(flat)
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.style] = counts.get(v.style, 0) + 1
    n = len(flat)
    return Scores(
        n=n,
        subject_acc=sum(v.subject == t[0] for v, t in zip(verdicts, truth)) / max(1, n),
        colour_acc=sum(v.colour == t[1] for v, t in zip(verdicts, truth)) / max(1, n),
        style_counts=counts,
    )


def score_pairs(judges: Judges, jobs: list[Job], images: list[list[Image.Image]]) -> float:
    """Fraction of two-subject images where both halves show the asked subject in the asked colour."""
    ok = n = 0
    for job, ims in zip(jobs, images):
        (k1, c1), (k2, c2) = job.subjects
        left = judges.judge([half_view(im, "left") for im in ims])
        right = judges.judge([half_view(im, "right") for im in ims])
        for l, r in zip(left, right):
            ok += (l.subject, l.colour, r.subject, r.colour) == (k1, c1, k2, c2)
            n += 1
    return ok / max(1, n)


def grid_jobs(kinds, colours, seeds, style: str | None = None, stride: int = 1) -> list[Job]:
    """One job per (kind, colour) cell; with stride > 1 only every stride-th cell (a balanced subset)."""
    cells = list(itertools.product(kinds, colours))[::stride]
    return [Job(subject_prompt(k, c, style), tuple(seeds), ((k, c),), style) for k, c in cells]


PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("star", "red"), ("house", "blue")),
    (("circle", "yellow"), ("fish", "purple")),
    (("tree", "green"), ("heart", "orange")),
    (("square", "blue"), ("triangle", "red")),
)


def pair_jobs(seeds, style: str | None = None) -> list[Job]:
    jobs = []
    for (k1, c1), (k2, c2) in PAIRS:
        text = f"a {c1} {k1} and a {c2} {k2}"
        phrase = style_phrase(style) if style and style != "plain" else None
        jobs.append(Job(f"{text}, {phrase}" if phrase else text, tuple(seeds), ((k1, c1), (k2, c2)), style))
    return jobs


def evaluate_base(model: str, judges: Judges, n_per_cell: int = 4, steps: int = STEPS) -> dict:
    """Subject/colour accuracy of plain prompts over all 48 cells, style accuracy of the
    pretraining styles, and two-subject success, at seeds 0..n-1."""
    pipe = load_pipe(model)
    seeds = list(range(n_per_cell))
    result: dict = {"model": str(model), "steps": steps, "guidance": GUIDANCE, "seeds": seeds}
    jobs = grid_jobs(SUBJECTS, COLOUR_NAMES, seeds)
    s = score_single(judges, jobs, generate_jobs(pipe, jobs, steps, label="plain prompts"))
    result["plain"] = {"n": s.n, "subject_acc": s.subject_acc, "colour_acc": s.colour_acc,
                       "style_counts": s.style_counts}
    for style in (s for s in judges.styles if s not in ("plain", ARTIST_STYLE)):
        jobs = grid_jobs(SUBJECTS, COLOUR_NAMES, seeds[:2], style=style, stride=3)
        s = score_single(judges, jobs, generate_jobs(pipe, jobs, steps, label=f"{style} prompts"))
        result[style] = {"n": s.n, "subject_acc": s.subject_acc, "colour_acc": s.colour_acc,
                         "style_acc": s.style_rate(style)}
    jobs = pair_jobs(seeds)
    result["two_subject_success"] = score_pairs(judges, jobs, generate_jobs(pipe, jobs, steps, label="pairs"))
    return result
