"""Typed training configuration: YAML file + command-line flags, validated once.

Every field is a YAML key and a flag. Flags accept dashes or underscores, and the
spellings of diffusers' `train_dreambooth.py` (`--pretrained_model_name_or_path`,
`--instance_data_dir`, `--class_data_dir`) are aliases, so its reference command line
works as written.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MAX_SEED = 2**32 - 1  # as in A1111 and diffusers' scripts; seed + i must still fit torch's 64-bit seeds

LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class TrainConfig(BaseModel):
    """Everything that shapes a training run. Defaults are the reference configuration."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)

    # Model
    base_model: str = Field(
        SD15_HUB_ID,
        validation_alias=_alias("base_model", "pretrained_model_name_or_path"),
        description="Hub id, local diffusers folder, or single .safetensors file.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    base_config: str | None = Field(
        None, description="Diffusers folder or hub id whose config a single-file base model uses (FLUX.1's "
        "transformer-only file: also its VAE, text encoders and scheduler)."
    )
    allow_pickle: bool = Field(False, description="Allow loading pickle (.ckpt/.bin) base models.")
    backbone: str = Field(
        "auto", description="Model family: auto (read from the model's files) or a family's name: sd1, sd2, sdxl, "
        "flux (FLUX.1), ... (the README's table lists every family).",
    )
    vae: str | None = Field(
        None, description="A replacement VAE (diffusers folder or hub id), e.g. SDXL's fp16-fixed VAE; "
        "without one SDXL's own VAE stays in fp32 (it overflows in fp16).",
    )

    # Data and prompts
    instance_dir: Path = Field(
        ..., validation_alias=_alias("instance_dir", "instance_data_dir"), description="Folder of style images."
    )
    instance_prompt: str = Field(..., description="Prompt with the rare identifier, e.g. 'yltcaxe artstyle'.")
    class_prompt: str | None = Field(
        None, description="Prompt for class images; default: the instance prompt without its identifier."
    )
    class_dir: Path | None = Field(
        None,
        validation_alias=_alias("class_dir", "class_data_dir"),
        description="Real class images (used as given), or where generated class images are cached.",
    )
    with_prior_preservation: bool = Field(True, description="Add the prior-preservation loss on class images.")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="Weight of the prior-preservation loss.")
    class_prompts_from_captions: bool = Field(
        False,
        description="Generate class images from the instance captions, the instance prompt swapped for the class "
        "prompt ('a red circle, yltcaxe artstyle' -> 'a red circle, artstyle'), so prior preservation keeps what "
        "the captions' other words draw.",
    )
    shuffle_caption: bool = Field(
        False,
        description="Shuffle the comma-separated parts of every training prompt per sample, instance and class "
        "('a red circle, yltcaxe artstyle' may train as 'yltcaxe artstyle, a red circle'), as kohya's "
        "--shuffle_caption: the identifier then works wherever a prompt puts it.",
    )
    caption_tag_dropout_rate: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Drop each comma-separated part of a training prompt with this probability per sample, as "
        "kohya's --caption_tag_dropout_rate; the instance and class prompts themselves are always kept.",
    )
    class_prompts: list[str] = Field(
        default_factory=list,
        description="More prompts to generate class images from (repeatable), cycled with those from the captions, "
        "e.g. 'a yellow circle, artstyle' so that prior preservation also holds colours the instance images lack.",
    )
    num_class_images: int = Field(50, ge=1, description="Number of class images.")
    sample_batch_size: int = Field(4, ge=1, description="Batch size when generating class images.")
    class_inference_steps: int = Field(25, ge=1, description="Sampler steps per generated class image.")
    class_guidance_scale: float | None = Field(
        None, ge=0.0, description="CFG scale for generated class images; default: the family's (7.5; FLUX.1-dev's "
        "distilled guidance 3.5, none for schnell).",
    )

    # Training
    method: Literal["full", "lora"] = Field("full", description="Fine-tune all weights (full) or train a LoRA.")
    rank: int = Field(4, ge=1, description="LoRA rank.")
    lora_alpha: float | None = Field(None, gt=0.0, description="LoRA alpha (scale = alpha / rank); default: the rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    lora_targets: list[str] = Field(
        default_factory=list,
        description="Module names that get LoRA layers (comma-separated or repeated); default: the family's "
        "attention projections, to_q,to_k,to_v,to_out.0 (UNet) and q_proj,k_proj,v_proj,out_proj (CLIP), and "
        "for FLUX.1 also add_q_proj,add_k_proj,add_v_proj,to_add_out, the feed-forward layers and proj_mlp.",
    )
    unet_layer_filter: list[str] = Field(
        default_factory=list,
        description="Full fine-tuning: train only the UNet weights whose names contain one of these parts "
        "(comma-separated or repeated), as OneTrainer's layer filter; a part written '!attn2' keeps the matching "
        "weights frozen instead. Default: every UNet weight trains.",
    )
    train_text_encoder: bool = Field(True, description="Train the text encoder along with the UNet.")
    text_encoder_scope: Literal["all", "identifier"] = Field(
        "all",
        description="What of the text encoder trains: all its weights, or only the identifier's token embeddings "
        "(pivotal-tuning style; prompts without the identifier then encode exactly as in the base model). Full "
        "fine-tuning only; moot with a frozen text encoder.",
    )
    use_8bit_adam: bool = Field(True, description="Use bitsandbytes' 8-bit AdamW.")
    learning_rate: float = Field(
        1e-6, gt=0.0, description="Learning rate; default 1e-6 for full fine-tuning, 1e-4 for LoRA."
    )
    text_encoder_lr: float | None = Field(
        None, gt=0.0, description="Text-encoder learning rate; default: --learning-rate."
    )
    train_text_encoder_2: bool | None = Field(
        None, description="SDXL: train the second text encoder (OpenCLIP bigG) too; default: off (its optimizer "
        "state alone is 11 GB in a full fine-tune).",
    )
    text_encoder_2_lr: float | None = Field(
        None, gt=0.0, description="SDXL: the second text encoder's learning rate; default: --text-encoder-lr."
    )
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    max_train_steps: int = Field(800, ge=1, description="Optimizer steps to train.")
    train_batch_size: int = Field(1, ge=1, description="Instance images per step (as many class images are added).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    cache_latents: bool = Field(
        True, description="Encode each training image's VAE latents once and reuse them (off: encode every step)."
    )
    allow_tf32: bool = Field(True, description="Let fp32 matrix products use TF32 tensor cores (Ampere and newer GPUs).")
    channels_last: bool = Field(False, description="Keep the UNet's convolution tensors in channels-last layout.")
    compile: bool = Field(False, description="torch.compile the UNet (GPU; the first steps compile, then run faster).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="no, fp16 or bf16; default fp16 on a CUDA GPU, no on CPU."
    )
    resolution: int | None = Field(
        None, ge=64, description="Training resolution in pixels (square); default: the backbone's "
        "(512 SD 1.x, 768 SD 2.x, 1024 SDXL).",
    )
    center_crop: bool = Field(False, description="Center-crop instead of random crop.")
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="One seed for data order, noise, timesteps and validation.")
    output_dir: Path = Field(..., description="Run folder.")
    overwrite: bool = Field(False, description="Replace a finished run in the output dir.")
    snr_gamma: float | None = Field(None, gt=0.0, description="Min-SNR weighting gamma (5.0 is common).")
    min_timestep: int = Field(0, ge=0, description="Lowest noise timestep trained (0: the scheduler's first).")
    max_timestep: int | None = Field(
        None, ge=1,
        description="Train timesteps below this only (default: all, 1000 for SD). A style lives in the low and middle "
        "timesteps, layout and colour in the high ones: e.g. 750 learns the look and leaves content to the base.",
    )
    offset_noise: float = Field(0.0, ge=0.0, description="Offset-noise strength (0.05-0.1 is common).")
    multires_noise_iterations: int = Field(
        0, ge=0, le=16,
        description="Multi-resolution (pyramid) noise levels added at 1/2, 1/4, ... of the latent size (0: off; "
        "6-10 is common at 512 px). Makes the loss weigh colours and tones, not only texture.",
    )
    multires_noise_discount: float = Field(
        0.3, gt=0.0, le=1.0, description="Weight of each coarser multi-resolution noise level (0.1-0.4 is common).",
    )
    ip_noise_gamma: float = Field(
        0.0, ge=0.0,
        description="Input perturbation (kohya's --ip_noise_gamma, diffusers' --input_perturbation; 0.1 is common): the "
        "latents are noised with the noise plus this times a fresh Gaussian draw, while the target stays the plain "
        "noise, so training inputs carry some of the error a sampler's own inputs do (against exposure bias).",
    )
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "logsnr"] | None = Field(
        None,
        description="Flow-matching families: how the noise level sigma is drawn: uniform, logit_normal (sigmoid of a "
        "normal, --logit-mean/--logit-std), mode (SD3's, --mode-scale) or logsnr (the style-friendly sampler: log-SNR "
        "from a normal with a negative mean, --logsnr-mean/--logsnr-std, biased to high noise); default: the "
        "family's published recipe (FLUX.1: uniform).",
    )
    logit_mean: float = Field(0.0, description="Mean of the normal under --timestep-sampling logit_normal.")
    logit_std: float = Field(1.0, gt=0.0, description="Standard deviation under --timestep-sampling logit_normal.")
    mode_scale: float = Field(1.29, description="Scale of --timestep-sampling mode (SD3 paper's s).")
    logsnr_mean: float = Field(-6.0, description="Mean log-SNR under --timestep-sampling logsnr (arXiv 2411.14793: -6).")
    logsnr_std: float = Field(2.0, gt=0.0, description="Standard deviation of the log-SNR under --timestep-sampling logsnr.")
    flow_shift: float | Literal["resolution"] | None = Field(
        None,
        description="Flow-matching families: shift sigma towards noise, s*sigma/(1+(s-1)*sigma) for a number s "
        "(1: none), or 'resolution' for FLUX.1's shift that grows with the image's token count; default: the "
        "family's (FLUX.1: none, as diffusers' script).",
    )
    weighting_scheme: Literal["none", "sigma_sqrt", "cosmap"] | None = Field(
        None, description="Flow-matching families: per-sample loss weighting (SD3 paper); default: none.",
    )
    train_guidance: float | None = Field(
        None, ge=0.0,
        description="FLUX.1-dev: the distilled guidance value the transformer is conditioned on while training "
        "(default 3.5, as diffusers' script); refused for models without a guidance embedding (schnell).",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0.0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Keep an exponential moving average of the trained weights (0.999 is common); samples, "
        "checkpoints and the final model use it. Its decay warms up, so short runs average their later steps.",
    )

    # Validation and checkpoints
    validation_prompt: list[str] = Field(
        default_factory=list, description="Validation prompt (repeatable); default: the instance prompt."
    )
    validation_steps: int = Field(100, ge=0, description="Sample a validation grid every N steps (0: never).")
    num_validation_images: int = Field(2, ge=1, description="Images per validation prompt.")
    validation_inference_steps: int = Field(25, ge=1, description="Sampler steps for validation images.")
    checkpointing_steps: int = Field(500, ge=0, description="Save a checkpoint every N steps (0: never).")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="Keep at most N checkpoints.")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint folder.")
    logging_steps: int = Field(
        10, ge=1,
        description="Read the losses back from the device and write them every N steps (one line per step is kept; "
        "reading them every step would stall the GPU).",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("mixed_precision") is False:  # YAML reads a bare `no` as false
                data = {**data, "mixed_precision": "no"}
            if data.get("learning_rate") is None:
                data = {**data, "learning_rate": 1e-4 if data.get("method") == "lora" else 1e-6}
            for key in ("validation_prompt", "class_prompts"):
                if isinstance(data.get(key), str):  # one prompt written without a list
                    data = {**data, key: [data[key]]}
            for key in ("lora_targets", "unet_layer_filter"):  # comma-separated, repeated, or both
                parts = data.get(key)
                if isinstance(parts, str):
                    parts = [parts]
                if isinstance(parts, (list, tuple)):
                    data = {**data, key: [t.strip() for item in parts for t in str(item).split(",") if t.strip()]}
        return data

    @model_validator(mode="after")
    def _identifier_scope(self) -> "TrainConfig":
        if self.unet_layer_filter and self.method != "full":
            raise ValueError("unet_layer_filter is for method 'full' (LoRA chooses its layers with lora_targets)")
        if self.text_encoder_scope == "identifier" and self.method != "full" and self.train_text_encoder:
            raise ValueError("text_encoder_scope 'identifier' is for method 'full' (LoRA trains adapters, not embeddings)")
        return self

    @model_validator(mode="after")
    def _timestep_range(self) -> "TrainConfig":
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(
                f"max_timestep ({self.max_timestep}) must be above min_timestep ({self.min_timestep})"
            )
        return self

    @field_validator("instance_prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the instance prompt must not be empty; name the style, e.g. 'yltcaxe artstyle'")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value != "auto":
            from .models.backbones import FAMILIES  # here, not at the top: --help must not import torch

            if value not in FAMILIES:
                raise ValueError(f"unknown family; use auto or one of {', '.join(FAMILIES)}")
        return value

    @field_validator("flow_shift")
    @classmethod
    def _positive_shift(cls, value):
        if isinstance(value, float) and value <= 0:
            raise ValueError("must be a positive number (1: no shift) or 'resolution'")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE's scale), e.g. {value // 8 * 8}")
        return value

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data, re-runnable with `--config`."""
        data = self.model_dump(mode="json")
        data.pop("overwrite", None)
        data.pop("resume_from_checkpoint", None)
        return data


def field_aliases(name: str) -> list[str]:
    """All names a field answers to (its own first), in underscore spelling."""
    alias = TrainConfig.model_fields[name].validation_alias
    names = [name]
    if isinstance(alias, AliasChoices):
        names += [a for a in alias.choices if isinstance(a, str) and a != name]
    return names


def _canonical_keys() -> dict[str, str]:
    table: dict[str, str] = {}
    for name in TrainConfig.model_fields:
        for alias in field_aliases(name):
            table[alias] = name
    return table


def normalize_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map dashed spellings and aliases to field names; reject unknown keys with a suggestion."""
    table = _canonical_keys()
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"config key {key!r} in {source} is not a name; use keys like 'learning_rate'")
        plain = key.strip().lstrip("-").replace("-", "_")
        if plain not in table:
            hint = difflib.get_close_matches(plain, list(table), n=1)
            tip = f"; did you mean '{hint[0]}'?" if hint else "; see 'style-dreambooth train --help'"
            raise UserError(f"unknown config key '{key}' in {source}{tip}")
        out[table[plain]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, what: str = "config file") -> Any:
    """The YAML in ``path``; a missing file, bad syntax or a repeated key is a one-line UserError naming ``what``."""
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; pass a YAML file")
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} '{path}' is not valid YAML ({first}); fix the syntax") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of field names."""
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys to values")
    return normalize_keys(data, f"'{path}'")


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Merge config-file values with flags (flags win) and validate once."""
    merged = {**file_values, **flag_values}
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first offending key and what is wrong with it."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "config"
    if err.get("type") == "missing":
        flag = "--" + loc.replace("_", "-")
        return f"missing required option '{flag}' (config key '{loc}')"
    if err.get("type") == "extra_forbidden":
        return f"unknown config key '{loc}'"
    value = err.get("input")
    msg = err.get("msg", "invalid value").replace("\n", " ").removeprefix("Value error, ")
    return f"invalid value {value!r} for '{loc}': {msg}"
