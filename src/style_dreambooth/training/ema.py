"""--ema-decay: an exponential moving average of the trained weights.

The average (diffusers' ``EMAModel``, with its warm-up) is what the run shows and keeps: validation
samples, each checkpoint's weights and the final model. The last step's own weights go on training
and sit in the checkpoint's training state, so a resumed run continues exactly.

The decay warms up as ``1 - (1 + step) ** -2/3`` to at most ``--ema-decay``, as OneTrainer and
SimpleTuner do: a DreamBooth run of a few hundred steps then averages its later steps instead of
staying near the base model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..config import TrainConfig

_WARMUP_POWER = 2 / 3


class WeightAverage:
    """The moving average of ``params`` (the optimizer's), stepped once per optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.params = params
        self.average = EMAModel(params, decay=decay, use_ema_warmup=True, power=_WARMUP_POWER)

    @classmethod
    def for_run(cls, cfg: TrainConfig, params: list[torch.nn.Parameter]) -> "WeightAverage | None":
        return cls(params, cfg.ema_decay) if cfg.ema_decay is not None else None

    def step(self) -> None:
        self.average.step(self.params)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the trained modules for the duration; the live ones back after."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the averaged weights: the step count and the live weights."""
        return {"optimization_step": self.average.optimization_step,
                "live": [p.detach().to("cpu", copy=True) for p in self.params]}

    def resume(self, state: dict[str, Any]) -> None:
        """After the checkpoint's (averaged) weights were loaded into the modules: they become the
        average again, and the live weights go back into the modules."""
        self.average.shadow_params = [p.detach().clone() for p in self.params]
        self.average.optimization_step = int(state["optimization_step"])
        with torch.no_grad():
            for param, live in zip(self.params, state["live"]):
                param.copy_(live.to(param.device, param.dtype))
