"""Learned-feature metrics (CLIP-T, CLIP-I, DINO), used only when their weights are available.

Weights come from a Hugging Face hub id or a local folder, through transformers.  Nothing is
ever downloaded when ``HF_HUB_OFFLINE`` is set (then ``local_files_only=True``), and nothing is
ever faked: a metric whose weights cannot be loaded is returned as
``MetricResult(value=None, skipped="<reason>")``.

* **CLIP-T**: mean over images of the cosine similarity between the CLIP image embedding of an
  image and the CLIP text embedding of its prompt.
* **CLIP-I**: mean over generated images of the mean cosine similarity between its CLIP image
  embedding and those of the instance images.
* **DINO**: the same as CLIP-I with the CLS token of a DINO / DINOv2 model
  (``last_hidden_state[:, 0]``).

All three are raw cosines in [-1, 1] (not multiplied by 100 or CLIP's logit scale).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.hub import hub_offline
from ._images import ImageLike, as_rgb

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dinov2-small"


@dataclass
class MetricResult:
    """A metric's value, or why it was not computed.

    Exactly one of ``value`` / ``skipped`` is set.  ``per_image`` holds the per-image scores
    (whose mean is ``value``) when the metric was computed.
    """

    value: float | None
    skipped: str | None = None
    per_image: list[float] | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "\\")) or (len(spec) > 1 and spec[1] == ":")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning chatter (e.g. the PIL image-processor fallback)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _load(kind: str, spec: str | None, loader) -> tuple[Any, str | None]:
    """Run ``loader(source, local_files_only)``; return (loaded, None) or (None, skip reason)."""
    if spec is None:
        return None, f"{kind} disabled (no weights given)"
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        source, local_only = str(path), True
    elif _looks_like_path(spec):
        return None, f"{kind} weights {spec!r} not found: no such folder"
    else:
        source, local_only = spec, hub_offline()
    try:
        with _quiet_transformers():
            return loader(source, local_only), None
    except Exception as err:  # noqa: BLE001 - any failure to load means "skip", with the reason
        where = "not available offline" if local_only else "could not be loaded"
        reason = f"{kind} weights {spec!r} {where}: {_short(err)}"
        logger.info("skipping %s metrics: %s", kind, reason)
        return None, reason


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _features_tensor(out: Any) -> torch.Tensor:
    """CLIP get_*_features return a tensor (transformers 4) or an output with pooler_output (5)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _mean_cosine_to_set(emb: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per row of ``emb``: mean cosine similarity to the rows of ``ref`` (both normalised)."""
    return (emb @ ref.T).clamp(-1.0, 1.0).mean(dim=1).tolist()


class LearnedMetrics:
    """CLIP-T, CLIP-I and DINO; each is skipped (with a reason) when its weights are absent."""

    def __init__(
        self,
        clip: tuple[Any, Any, Any] | None = None,
        dino: tuple[Any, Any] | None = None,
        clip_skipped: str | None = None,
        dino_skipped: str | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 32,
    ):
        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = batch_size
        self._clip = clip  # (model, tokenizer, image_processor)
        self._dino = dino  # (model, image_processor)
        self.clip_skipped = clip_skipped if clip is None else None
        self.dino_skipped = dino_skipped if dino is None else None
        if clip is None and self.clip_skipped is None:
            self.clip_skipped = "CLIP not loaded"
        if dino is None and self.dino_skipped is None:
            self.dino_skipped = "DINO not loaded"
        # Instance-image embeddings, reused across calls (one entry per model): the instance
        # list is scored against every checkpoint.  The images are kept alive with the entry so
        # their ids cannot be reused by other objects.
        self._instance_cache: dict[str, tuple[list[Any], tuple[int, ...], torch.Tensor]] = {}

    def identity(self) -> dict[str, str | None]:
        """Which CLIP and DINO weights score (None: skipped), for the evaluation's score cache."""
        def name(parts) -> str | None:
            return None if parts is None else str(getattr(parts[0].config, "_name_or_path", "") or type(parts[0]).__name__)

        return {"clip": name(self._clip), "dino": name(self._dino)}

    def _instance_embeddings(self, kind: str, instances: list[ImageLike], embed) -> torch.Tensor:
        key = tuple(id(im) for im in instances)
        cached = self._instance_cache.get(kind)
        if cached is not None and cached[1] == key:
            return cached[2]
        emb = embed(instances)
        self._instance_cache[kind] = (list(instances), key, emb)
        return emb

    @classmethod
    def load(
        cls,
        clip: str | os.PathLike | None = DEFAULT_CLIP,
        dino: str | os.PathLike | None = DEFAULT_DINO,
        device: torch.device | str | None = None,
        batch_size: int = 32,
    ) -> "LearnedMetrics":
        """Load CLIP and DINO from hub ids or local folders; never raises for missing weights.

        ``local_files_only=True`` is used for local folders and whenever ``HF_HUB_OFFLINE`` is
        set.  A model that cannot be loaded is recorded in ``clip_skipped`` / ``dino_skipped``
        and its metrics return ``MetricResult(None, reason)``.  ``None`` disables a model.
        """
        dev = torch.device(device) if device is not None else _default_device()

        def load_clip(source: str, local_only: bool):
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(source, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            return model.to(dev).eval(), tokenizer, processor

        def load_dino(source: str, local_only: bool):
            from transformers import AutoImageProcessor, AutoModel

            model = AutoModel.from_pretrained(source, local_files_only=local_only)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            return model.to(dev).eval(), processor

        clip_parts, clip_reason = _load("CLIP", None if clip is None else str(clip), load_clip)
        dino_parts, dino_reason = _load("DINO", None if dino is None else str(dino), load_dino)
        return cls(clip_parts, dino_parts, clip_reason, dino_reason, dev, batch_size)

    # ------------------------------------------------------------------ embeddings

    @torch.inference_mode()
    def _clip_image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        model, _, processor = self._clip
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [as_rgb(im) for im in images[start : start + self.batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, model.dtype)
            out.append(_normalise(_features_tensor(model.get_image_features(pixel_values=pixels))))
        return torch.cat(out)

    @torch.inference_mode()
    def _clip_text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        model, tokenizer, _ = self._clip
        max_len = getattr(model.config.text_config, "max_position_embeddings", 77)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            keep = ("input_ids", "attention_mask")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in keep}
            out.append(_normalise(_features_tensor(model.get_text_features(**tokens))))
        return torch.cat(out)

    @torch.inference_mode()
    def _dino_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        model, processor = self._dino
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [as_rgb(im) for im in images[start : start + self.batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, model.dtype)
            cls_token = model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(_normalise(cls_token))
        return torch.cat(out)

    # ------------------------------------------------------------------ metrics

    def clip_t(self, images: Sequence[ImageLike], prompts: str | Sequence[str]) -> MetricResult:
        """Mean cosine similarity of each image's CLIP embedding with its prompt's.

        ``prompts`` is one prompt for all images or one per image.
        """
        if self._clip is None:
            return MetricResult(None, self.clip_skipped)
        images = _non_empty(images, "clip_t")
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"clip_t got {len(images)} images but {len(prompts)} prompts")
        img = self._clip_image_embeddings(images)
        txt = self._clip_text_embeddings(prompts)
        per = (img * txt).sum(dim=-1).clamp(-1.0, 1.0).tolist()
        return MetricResult(float(sum(per) / len(per)), None, per)

    def clip_i(self, images: Sequence[ImageLike], instances: Sequence[ImageLike]) -> MetricResult:
        """Mean over ``images`` of the mean CLIP image-embedding cosine to the instance images."""
        if self._clip is None:
            return MetricResult(None, self.clip_skipped)
        images = _non_empty(images, "clip_i")
        instances = _non_empty(instances, "clip_i (instances)")
        ref = self._instance_embeddings("clip", instances, self._clip_image_embeddings)
        per = _mean_cosine_to_set(self._clip_image_embeddings(images), ref)
        return MetricResult(float(sum(per) / len(per)), None, per)

    def dino(self, images: Sequence[ImageLike], instances: Sequence[ImageLike]) -> MetricResult:
        """Mean over ``images`` of the mean DINO CLS-feature cosine to the instance images."""
        if self._dino is None:
            return MetricResult(None, self.dino_skipped)
        images = _non_empty(images, "dino")
        instances = _non_empty(instances, "dino (instances)")
        ref = self._instance_embeddings("dino", instances, self._dino_embeddings)
        per = _mean_cosine_to_set(self._dino_embeddings(images), ref)
        return MetricResult(float(sum(per) / len(per)), None, per)


def _non_empty(items: Sequence[ImageLike], what: str) -> list[ImageLike]:
    items = list(items)
    if not items:
        raise ValueError(f"{what} needs at least one image")
    return items
