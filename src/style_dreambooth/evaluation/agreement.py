"""Do the weight-free style distance and ground-truth judges agree on which checkpoint is best?

Where judges exist (the proof world), each evaluated model carries a judged style-hit rate
(``judge_style_hit``) next to its weight-free ``style_distance``. This module measures their
agreement: the Spearman rank correlation between -style_distance and the style-hit rate over the
evaluated models, and the checkpoint the judges rank best next to the one the selection rule
picked. Pure functions over :class:`~style_dreambooth.evaluation.selection.Point` lists.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .selection import Choice, Point

JUDGE_STYLE_KEY = "judge_style_hit"
JUDGE_FIDELITY_KEY = "judge_prompt_fidelity"


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order; tied values share the mean of their ranks."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end - 1) / 2.0 + 1.0
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks).

    Pairs where either value is NaN are dropped. NaN when fewer than 3 pairs remain or when
    either side is constant (the correlation is undefined then).
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / denom, -1.0, 1.0))


def style_rank_correlation(points: Sequence[Point]) -> tuple[float, int]:
    """Spearman of -style_distance vs judge_style_hit over the points that have both, and their number."""
    pairs = [(-p.get("style_distance"), p.get(JUDGE_STYLE_KEY)) for p in points
             if p.get("style_distance") is not None and p.get(JUDGE_STYLE_KEY) is not None]
    if not pairs:
        return float("nan"), 0
    xs, ys = zip(*pairs)
    return spearman(xs, ys), len(pairs)


def judges_best(points: Sequence[Point]) -> Point | None:
    """The trained checkpoint (step > 0) with the highest judged style-hit rate; ties go to the
    higher judged prompt fidelity, then to the earlier step. None when no checkpoint was judged."""
    judged = [p for p in points if p.step > 0 and p.get(JUDGE_STYLE_KEY) is not None]
    if not judged:
        return None
    return max(judged, key=lambda p: (p.get(JUDGE_STYLE_KEY), p.get(JUDGE_FIDELITY_KEY) or 0.0, -p.step))


@dataclass
class JudgeAgreement:
    """How the weight-free metrics and the judges agree on one run (or a pool of runs)."""

    spearman: float | None  # None when undefined (fewer than 3 points, or a constant side)
    n: int  # models in the correlation
    rule_pick: str | None  # the selection rule's checkpoint
    rule_pick_step: int | None
    judges_best: str | None  # the judges' best checkpoint
    judges_best_step: int | None
    judges_best_style_hit: float | None
    rule_pick_style_hit: float | None  # the judges' style-hit rate at the rule's pick

    @property
    def agree(self) -> bool:
        return self.rule_pick_step is not None and self.rule_pick_step == self.judges_best_step

    def to_dict(self) -> dict:
        return {**asdict(self), "agree": self.agree}

    @classmethod
    def from_dict(cls, data: dict) -> "JudgeAgreement":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def judge_agreement(points: Sequence[Point], choice: Choice | None) -> JudgeAgreement | None:
    """Rank correlation over all evaluated models of a run (the base included) and the rule's pick
    against the judges' best; None when no model carries a judged style-hit rate."""
    if not any(p.get(JUDGE_STYLE_KEY) is not None for p in points):
        return None
    rho, n = style_rank_correlation(points)
    best = judges_best(points)
    picked = next((p for p in points if choice is not None and p.step == choice.step), None)
    return JudgeAgreement(
        spearman=None if math.isnan(rho) else rho,
        n=n,
        rule_pick=choice.name if choice else None,
        rule_pick_step=choice.step if choice else None,
        judges_best=best.name if best else None,
        judges_best_step=best.step if best else None,
        judges_best_style_hit=best.get(JUDGE_STYLE_KEY) if best else None,
        rule_pick_style_hit=picked.get(JUDGE_STYLE_KEY) if picked else None,
    )


def pooled_rank_correlation(runs: Sequence[Sequence[Point]]) -> tuple[float, int]:
    """Spearman over every evaluated model of several runs (a sweep). Base models (step 0) with
    identical scores, i.e. the same base evaluated in each run, count once."""
    pooled: list[Point] = []
    seen_bases: set[tuple] = set()
    for points in runs:
        for p in points:
            if p.step == 0:
                key = (p.get("style_distance"), p.get(JUDGE_STYLE_KEY))
                if key in seen_bases:
                    continue
                seen_bases.add(key)
            pooled.append(p)
    return style_rank_correlation(pooled)


def format_rho(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.2f}"
