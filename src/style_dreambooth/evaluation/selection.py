"""Which checkpoint is best, and whether a run overfits. Pure functions over per-checkpoint metrics.

The rule (documented in docs/metrics.md):
1. Candidates are the trained checkpoints (step > 0); those that produced a copy of an instance
   image (copy_rate > 0) are dropped unless every checkpoint did.
2. Style is "saturated" at a checkpoint whose style distance is within 10% of the largest style
   gain of the run: d <= d_best + 0.1 * (d_base - d_best), with d_base the base model's distance.
3. The choice is the earliest saturated candidate: past that point more steps buy no style, only
   risk (lost prompt fidelity and diversity, memorisation).

The overfitting alarm fires at the first later checkpoint (past saturation, more steps bought no
style) whose diversity fell by more than 20%, whose prompt fidelity fell by more than 0.02, or whose
copy rate rose, relative to the chosen checkpoint. A later checkpoint whose style drifted away again
counts too: a too-high learning rate can overshoot the style while diversity collapses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SATURATION_BAND = 0.10
DIVERSITY_DROP = 0.20
FIDELITY_DROP = 0.02


@dataclass
class Point:
    """One evaluated model: step 0 is the base model."""

    step: int
    name: str
    metrics: dict[str, Any]

    def get(self, key: str) -> float | None:
        value = self.metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return float(value)


@dataclass
class Choice:
    step: int
    name: str
    reason: str


@dataclass
class Alarm:
    fired: bool
    step: int | None = None
    reasons: list[str] = field(default_factory=list)


def _saturation_limit(points: list[Point]) -> float:
    trained = [p.get("style_distance") for p in points if p.step > 0 and p.get("style_distance") is not None]
    best = min(trained)
    base = next((p.get("style_distance") for p in points if p.step == 0), None)
    if base is None or base <= best:
        return best + SATURATION_BAND * abs(best)
    return best + SATURATION_BAND * (base - best)


def choose_checkpoint(points: list[Point]) -> Choice:
    """Apply the rule above; raises ValueError when no trained checkpoint has a style distance."""
    trained = sorted((p for p in points if p.step > 0 and p.get("style_distance") is not None), key=lambda p: p.step)
    if not trained:
        raise ValueError("no trained checkpoint with a style distance to choose from")
    clean = [p for p in trained if not (p.get("copy_rate") or 0.0) > 0.0] or trained
    limit = _saturation_limit(points)
    saturated = [p for p in clean if p.get("style_distance") <= limit]
    if saturated:
        pick = saturated[0]
        reason = (
            f"earliest checkpoint whose style distance {pick.get('style_distance'):.3f} is within "
            f"{SATURATION_BAND:.0%} of the run's largest style gain (limit {limit:.3f})"
        )
    else:
        pick = min(clean, key=lambda p: (p.get("style_distance"), p.step))
        reason = "lowest style distance among checkpoints without copies"
    base = next((p.get("style_distance") for p in points if p.step == 0), None)
    if base is not None and min(p.get("style_distance") for p in trained) >= base:
        reason += "; warning: no checkpoint is closer to the instance style than the base model (too few steps or too low a learning rate?)"
    if len(clean) < len(trained):
        reason += f"; {len(trained) - len(clean)} checkpoint(s) skipped for copying instance images"
    return Choice(pick.step, pick.name, reason)


def overfitting_alarm(points: list[Point], choice: Choice) -> Alarm:
    """Check the checkpoints after the chosen one for lost diversity or fidelity, or new copies."""
    chosen = next(p for p in points if p.step == choice.step)
    for p in sorted((p for p in points if p.step > choice.step), key=lambda p: p.step):
        reasons = []
        d0, d1 = chosen.get("diversity"), p.get("diversity")
        if d0 is not None and d1 is not None and d0 > 0 and d1 < (1 - DIVERSITY_DROP) * d0:
            reasons.append(f"diversity fell from {d0:.3f} to {d1:.3f}")
        f0, f1 = chosen.get("prompt_fidelity"), p.get("prompt_fidelity")
        if f0 is not None and f1 is not None and f1 < f0 - FIDELITY_DROP:
            reasons.append(f"prompt fidelity fell from {f0:.3f} to {f1:.3f}")
        c0, c1 = chosen.get("copy_rate") or 0.0, p.get("copy_rate") or 0.0
        if c1 > c0:
            reasons.append(f"copy rate rose from {c0:.2f} to {c1:.2f}")
        if reasons:
            return Alarm(True, p.step, reasons)
    return Alarm(False)
