"""The proof world: a procedural renderer where the truth is known, a tiny SD 1.x base model
trained on it, judges that read style, subject and colour back from pixels, and the DreamBooth
experiment and demo built on them.

Everything here runs offline on a CPU. The base model and the judges ship in ``assets/``.

The proof world is a client of the library: importing it registers its judges as the ``evaluate``
scorer ``toyworld`` (``--judges toyworld``); the library never imports it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..evaluation.scorers import register_scorer


def assets_dir() -> Path:
    """The folder holding the shipped base model (``base/``) and judges (``judges.safetensors``)."""
    return Path(str(resources.files("style_dreambooth.toyworld").joinpath("assets")))


def base_model_dir() -> Path:
    """The shipped tiny SD 1.x pipeline folder (plain ``StableDiffusionPipeline.from_pretrained``)."""
    return assets_dir() / "base"


register_scorer("toyworld", "style_dreambooth.toyworld.scoring:JudgeScorer", "the proof world's judges")
