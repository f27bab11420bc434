"""What a run checks and settles before anything heavy: precision, family, paths, prompts, resume settings."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from ..config import TrainConfig
from ..data.dataset import Example, class_prompts_for
from ..data.images import IMAGE_EXTENSIONS
from ..errors import UserError
from ..models.backbones import get, native_resolution, resolve_backbone
from ..models.tokenizer import check_instance_prompt_fits, warn_if_truncated
from .run_folder import RunFolder

log = logging.getLogger(__name__)


def resolve_mixed_precision(requested: str | None, cuda: bool) -> str:
    if requested is None:
        return "fp16" if cuda else "no"
    if requested == "fp16" and not cuda:
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--mixed-precision bf16 is not supported by this GPU (e.g. a T4 or V100); use fp16")
    return requested


# Keys that must not change when a run is resumed: they shape the weights, optimizer or data order.
RESUME_FIXED_KEYS = (
    "base_model", "backbone", "vae", "method", "rank", "lora_alpha", "lora_targets", "train_text_encoder", "use_8bit_adam",
    "train_text_encoder_2", "seed", "train_batch_size", "gradient_accumulation_steps", "resolution", "center_crop",
    "with_prior_preservation", "instance_prompt",
    # the optimizer and schedule state come from the checkpoint, so a new value would be ignored
    "learning_rate", "text_encoder_lr", "text_encoder_2_lr", "lr_scheduler", "lr_warmup_steps", "ema_decay",
)


def check_resume_config(run: RunFolder, cfg: TrainConfig) -> None:
    """Refuse a resume whose settings contradict the run's config.yaml."""
    if not run.config.is_file():
        return
    saved = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    now = cfg.to_yaml_dict()
    if saved.get("backbone", now["backbone"]) != now["backbone"]:
        was, new = get(saved["backbone"]), get(now["backbone"])
        raise UserError(
            f"cannot resume '{run.root}': its checkpoints are {was.family} ({was.title}) but the base model "
            f"'{cfg.base_model}' is {new.family} ({new.title}); resume with the run's own base model"
        )
    for key in RESUME_FIXED_KEYS:
        if key in saved and saved[key] != now.get(key):
            raise UserError(
                f"cannot resume '{run.root}': {key} is {saved[key]!r} in its config.yaml but {now.get(key)!r} now; "
                "resume with the same value or start a new run"
            )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so the run's config.yaml works from any directory."""
    update: dict = {}
    for key in ("instance_dir", "class_dir", "output_dir"):
        value = getattr(cfg, key)
        if value is not None:
            update[key] = Path(value).expanduser().absolute()
    for key in ("base_model", "base_config"):
        value = getattr(cfg, key)
        if value and Path(value).expanduser().exists():
            update[key] = str(Path(value).expanduser().absolute())
    return cfg.model_copy(update=update)


def resolve_family(cfg: TrainConfig) -> TrainConfig:
    """--backbone auto becomes the family the base model's files name (a contradiction is refused), the LoRA
    targets default to the family's, and the resolution defaults to the size the model was trained at (its UNet's sample size; SD 2.x-base 512,
    2.x-v 768), or to the family's when its configs cannot be read (a single file)."""
    backbone = resolve_backbone(cfg.backbone, cfg.base_model, cfg.revision)
    resolution = cfg.resolution or native_resolution(cfg.base_model, cfg.revision) or backbone.default_resolution
    if resolution % backbone.resolution_multiple:
        step = backbone.resolution_multiple
        raise UserError(f"--resolution {resolution} is not a multiple of {step}, which {backbone.title} needs "
                        f"(the VAE's downscale times its patch size); use {resolution // step * step} or "
                        f"{(resolution // step + 1) * step}")
    return cfg.model_copy(update={"backbone": backbone.family, "resolution": resolution,
                                  "lora_targets": cfg.lora_targets or list(backbone.default_lora_targets)})


def resolve_class_prompt(cfg: TrainConfig) -> str:
    """The class prompt, or the instance prompt without its leading identifier word."""
    if cfg.class_prompt:
        return cfg.class_prompt
    words = cfg.instance_prompt.split()
    if len(words) < 2:
        raise UserError(
            f"cannot derive a class prompt from instance prompt '{cfg.instance_prompt}'; pass --class-prompt "
            "(e.g. 'artstyle') or --no-prior-preservation"
        )
    derived = " ".join(words[1:])
    log.info("class prompt not given; using '%s' (the instance prompt without '%s')", derived, words[0])
    return derived


def has_top_level_images(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.iterdir()
    )


def generated_class_prompts(cfg: TrainConfig, class_prompt: str, instances: list[Example]) -> tuple[str, ...]:
    """With --class-prompts-from-captions, one class prompt per instance caption; then the --class-prompts;
    none at all: the class prompt alone."""
    if not cfg.class_prompts_from_captions:
        return tuple(dict.fromkeys(cfg.class_prompts))
    prompts = class_prompts_for(instances, cfg.instance_prompt, class_prompt)
    if prompts == (class_prompt,):
        raise UserError(
            f"--class-prompts-from-captions needs .txt captions next to the instance images; none in '{cfg.instance_dir}'"
        )
    return tuple(dict.fromkeys(prompts + tuple(cfg.class_prompts)))


def check_prompt_lengths(
    tokenizer, cfg: TrainConfig, class_prompt: str | None, class_prompts: tuple[str, ...],
    instances: list[Example], identifier: str | None, warn: bool,
) -> None:
    """Refuse an instance prompt cut before its identifier; warn of every other prompt the text encoder cuts."""
    labelled = {"the instance prompt": cfg.instance_prompt}
    labelled.update({f"the prompt of '{e.path.name}' (with its caption)": e.prompt for e in instances})
    for label, prompt in labelled.items():
        check_instance_prompt_fits(tokenizer, label, prompt, class_prompt, identifier)
    if not warn:
        return
    if class_prompt:
        labelled["the class prompt"] = class_prompt
    labelled.update({f"class prompt {i + 1}": p for i, p in enumerate(class_prompts)})
    labelled.update({f"validation prompt {i + 1}": p for i, p in enumerate(cfg.validation_prompt)})
    warn_if_truncated(tokenizer, labelled)
