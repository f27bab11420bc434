"""The interface every model family implements; the training loop, generation and export only call it.

A family module (sd1.py, sd2.py, sdxl.py, flux.py) owns everything that differs between backbones:
the pipeline classes, how its files are recognised, prompt encoding, the training objective (see
objectives.py), latent normalisation, the denoiser call (packing, timestep units, guidance), which
text encoders exist and which may train, the LoRA and single-file key layouts, the samplers, the
default resolution and the random shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

# One LoRA layer: down (r, in), up (out, r) and alpha (its scale is alpha / r).
Adapter = tuple[torch.Tensor, torch.Tensor, float]


def kohya_name(prefix: str, module_path: str) -> str:
    """The kohya layer name of a module. Text-encoder paths are spelled from `text_model.` as in the SD
    checkpoint layout, whether or not this transformers version nests CLIP under `text_model`."""
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return prefix + module_path.replace(".", "_")


def kohya_tensors(name: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    down, up, alpha = adapter
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(float(alpha))}


def kohya_adapter(tensors: dict[str, torch.Tensor], name: str) -> Adapter | None:
    """The (down, up, alpha) stored under a kohya layer name; alpha defaults to the rank, as kohya reads it."""
    down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
    if down is None or up is None:
        return None
    alpha = tensors.get(f"{name}.alpha")
    return down, up, float(alpha) if alpha is not None else float(down.shape[0])


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length (77 for CLIP)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids


@dataclass
class PromptEmbeds:
    """What the denoiser is conditioned on: per-token states, and (SDXL, FLUX.1) a pooled vector per prompt."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, rows: list[int]) -> "PromptEmbeds":
        return PromptEmbeds(self.hidden[rows], None if self.pooled is None else self.pooled[rows])

    @staticmethod
    def stack(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), pooled)


@dataclass(frozen=True)
class ImageSize:
    """What SDXL's micro-conditioning needs of one training image (pixels): its size before resizing,
    where the crop starts in the resized image, and the crop's size."""

    original: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]
    target: tuple[int, int]


class Backbone:
    """One model family. Subclasses fill the class attributes and override what differs."""

    family: ClassVar[str]
    title: ClassVar[str]
    default_resolution: ClassVar[int]
    pipeline_class_name: ClassVar[str]
    # model_index.json class names a folder of this family may carry (the pipeline it was saved from).
    folder_class_names: ClassVar[tuple[str, ...]] = ()
    controlnet_pipeline_class_name: ClassVar[str | None] = None
    # Regional prompts (--layout) need the family's cross-attention processor (sampling/regional_attention.py).
    has_regional_prompts: ClassVar[bool] = True
    scheduler_class_name: ClassVar[str] = "PNDMScheduler"  # what the family's releases ship with
    # Sampler short names (sampling/images.py) the family's objective can be sampled with; the first is the default.
    samplers: ClassVar[tuple[str, ...]] = ("dpm++", "ddim", "euler-a", "pndm")
    default_guidance: ClassVar[float | None] = 7.5  # classifier-free guidance scale when none is given
    # Component names of the pipeline, in the pipeline's own spelling.
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # The text encoders --train-text-encoder trains unless a per-encoder flag says otherwise.
    default_trained_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # Text encoders that never train, and why (FLUX.1's and SD 3.5's T5).
    frozen_text_encoders: ClassVar[dict[str, str]] = {}
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # kohya LoRA key prefixes per trained module.
    lora_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    # Original (LDM / sgm) single-file layout: each text encoder's key prefix and its layout,
    # "openai" (CLIP as transformers names it) or "openclip" (fused qkv, resblocks); the UNet is
    # always under model.diffusion_model. and the VAE under first_stage_model.
    single_file_text_encoders: ClassVar[dict[str, tuple[str, str]]] = {
        "text_encoder": ("cond_stage_model.transformer.", "openai"),
    }
    has_single_file_export: ClassVar[bool] = True  # export --to single-file writes the original layout
    # The original single file holds the denoiser alone (BFL's flux1-dev.safetensors): loading one needs
    # --base-config for the VAE, text encoders, tokenizers and scheduler, whose weights then shape images too.
    single_file_denoiser_only: ClassVar[bool] = False
    # What `export --half` stores: the half precision the family's own releases ship in.
    single_file_half_dtype: ClassVar[torch.dtype] = torch.float16
    kohya_base_version: ClassVar[str]  # ss_base_model_version in a kohya LoRA's metadata
    modelspec_architecture: ClassVar[str]
    # Random-weight shapes this family can build: name -> () -> components (see random_model.py).
    shapes: ClassVar[dict[str, Callable[[], dict[str, Any]]]] = {}
    # Keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16).
    vae_needs_fp32: ClassVar[bool] = False
    # Image sides must be a multiple of this (the VAE's downscale, times FLUX.1's 2x2 patches).
    resolution_multiple: ClassVar[int] = 8
    # LoRA layers by default (--lora-targets): the attention projections of the denoiser and the text encoders.
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")

    # ------------------------------------------------------------------ classes

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def controlnet_pipeline_class(cls):
        import diffusers

        if cls.controlnet_pipeline_class_name is None:
            return None
        return getattr(diffusers, cls.controlnet_pipeline_class_name)

    @classmethod
    def modelspec(cls, prediction_type: str | None = None) -> str:
        """The modelspec architecture name other tools read from a file's metadata."""
        return cls.modelspec_architecture

    # ------------------------------------------------------------------ recognising files

    @classmethod
    def owns_pipeline_class(cls, class_name: str, unet_config: dict[str, Any]) -> bool:
        """Whether a diffusers folder with this model_index `_class_name` and UNet config is ours."""
        names = (cls.pipeline_class_name, *cls.folder_class_names, cls.controlnet_pipeline_class_name)
        return class_name in names and cls.owns_unet_config(unet_config)

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        """Whether a UNet (or ControlNet) config has this family's shape."""
        raise NotImplementedError

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        """Whether an original-layout checkpoint with these tensor names is ours."""
        raise NotImplementedError

    # ------------------------------------------------------------------ single files

    @classmethod
    def load_single_file(cls, path: Path, kwargs: dict[str, Any]):
        """The pipeline of an original-layout checkpoint; ``kwargs`` are ``from_single_file``'s (``config``,
        ``dtype``, ``local_files_only``, ``revision``)."""
        return cls.pipeline_class().from_single_file(str(path), **kwargs)

    @classmethod
    def single_file_state_dict(cls, pipe) -> dict[str, torch.Tensor]:
        """The pipeline's weights in the family's original single-file layout (``export --to single-file``):
        for the SD families the LDM / sgm checkpoint of UNet, VAE and text encoders (models/single_file.py)."""
        from ..single_file import ldm_state_dict

        return ldm_state_dict(cls, pipe)

    @classmethod
    def single_file_architecture(cls, pipe) -> str:
        """The modelspec architecture an exported file of this pipeline declares."""
        scheduler_config = getattr(getattr(pipe, "scheduler", None), "config", None) or {}
        return cls.modelspec(scheduler_config.get("prediction_type"))

    # ------------------------------------------------------------------ components

    @classmethod
    def denoiser(cls, pipe) -> torch.nn.Module:
        """The network that trains: the UNet, or a diffusion transformer."""
        return getattr(pipe, cls.denoiser_name)

    @classmethod
    def default_image_size(cls, pipe) -> int:
        """The side, in pixels, the model draws at when no size is asked for."""
        return cls.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    @classmethod
    def random_scheduler_config(cls, prediction_type: str = "epsilon") -> dict[str, Any] | None:
        """The noise scheduler config the random shapes ship with; None: SD 1.5's (random_model.py)."""
        return None

    @classmethod
    def text_encoders(cls, pipe) -> dict[str, torch.nn.Module]:
        return {name: getattr(pipe, name) for name in cls.text_encoder_names}

    @classmethod
    def unused_modules(cls, name: str, text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
        """Parts of a text encoder the conditioning never reads (they get no gradient, which multi-GPU
        training refuses), so they stay frozen."""
        return []

    @classmethod
    def tokenizers(cls, pipe) -> list:
        return [getattr(pipe, name) for name in cls.tokenizer_names]

    @classmethod
    def assemble(cls, base, unet, text_encoders: dict[str, torch.nn.Module]):
        """The base pipeline with trained modules swapped in (no safety checker)."""
        parts = {name: getattr(base, name) for name in base.components}
        parts.update({cls.denoiser_name: unet}, **text_encoders)
        for name in ("safety_checker", "feature_extractor", "image_encoder"):
            if name in parts:
                parts[name] = None
        kwargs = {"requires_safety_checker": False} if "safety_checker" in parts else {}
        return type(base)(**parts, **kwargs)

    # ------------------------------------------------------------------ the maths that differs

    @classmethod
    def objective(cls, cfg, scheduler_config: dict[str, Any], device: torch.device):
        """The training objective: DDPM on the scheduler's schedule, over --min-timestep..--max-timestep."""
        from ...errors import UserError
        from .objectives import DDPMObjective

        total = scheduler_config["num_train_timesteps"]
        high = total if cfg.max_timestep is None else cfg.max_timestep
        if high > total:
            raise UserError(f"--max-timestep {high} is beyond the base model's {total} noise timesteps")
        for name in ("timestep_sampling", "flow_shift", "weighting_scheme"):
            if getattr(cfg, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} is for flow-matching families (flux); {cls.title} "
                                "draws integer timesteps (see --min-timestep, --max-timestep, --snr-gamma)")
        return DDPMObjective(scheduler_config, (cfg.min_timestep, high), scheduler_config.get(
            "prediction_type", "epsilon"), cfg.snr_gamma, device)

    @classmethod
    def latents(cls, sample: torch.Tensor, vae_config) -> torch.Tensor:
        """A VAE sample normalised to what the denoiser was trained on: (z - shift) * scale (SD: no shift)."""
        return (sample - (vae_config.get("shift_factor") or 0.0)) * vae_config.scaling_factor

    @classmethod
    def image_tokens(cls, latents: torch.Tensor) -> int:
        """How many image tokens the denoiser sees (a resolution-dependent shift reads it); 0 for a UNet."""
        return 0

    @classmethod
    def train_guidance(cls, denoiser, cfg) -> float | None:
        """The guidance value a guidance-distilled denoiser is conditioned on in training; None for the rest."""
        return None

    @classmethod
    def encode_prompts(cls, text_encoders: dict[str, torch.nn.Module], ids: list[torch.Tensor]) -> PromptEmbeds:
        """Token ids (one tensor per tokenizer) -> the denoiser's conditioning."""
        raise NotImplementedError

    @classmethod
    def denoise(cls, unet, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                sizes: list[ImageSize], guidance: float | None = None) -> torch.Tensor:
        """The denoiser's prediction for latents shaped (B, C, H, W), in the same shape; ``timesteps`` are
        the objective's (integer steps, or flow-matching sigmas in [0, 1])."""
        raise NotImplementedError

    # ------------------------------------------------------------------ LoRA files

    @classmethod
    def lora_tensors(cls, adapters: dict[str, dict[str, Adapter]], models: dict[str, torch.nn.Module]
                     ) -> dict[str, torch.Tensor]:
        """The family's LoRA file: kohya names (prefix + module path, dots as underscores) per layer."""
        out: dict[str, torch.Tensor] = {}
        for role, layers in adapters.items():
            for path, adapter in layers.items():
                out.update(kohya_tensors(kohya_name(cls.lora_prefixes[role], path), adapter))
        return out

    @classmethod
    def lora_from_tensors(cls, tensors: dict[str, torch.Tensor], paths: dict[str, list[str]],
                          models: dict[str, torch.nn.Module]) -> tuple[dict[str, dict[str, Adapter]], set[str]]:
        """The adapters a LoRA file holds for the given module paths of each role, and the tensor names used."""
        found: dict[str, dict[str, Adapter]] = {}
        used: set[str] = set()
        for role, names in paths.items():
            for path in names:
                name = kohya_name(cls.lora_prefixes[role], path)
                adapter = kohya_adapter(tensors, name)
                if adapter is not None:
                    found.setdefault(role, {})[path] = adapter
                    used.update(k for k in (f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha")
                                if k in tensors)
        return found, used

    @classmethod
    def owns_lora(cls, keys: set[str]) -> bool:
        """Whether a LoRA file's tensor names are in a layout only this family writes."""
        return False

    @classmethod
    def load_lora(cls, pipe, file: Path, adapter_name: str) -> None:
        """Load a LoRA file into ``pipe`` as a named adapter (diffusers reads kohya's UNet-family layout)."""
        pipe.load_lora_weights(str(file), adapter_name=adapter_name)

    @classmethod
    def pipe_call_kwargs(cls, pipe) -> dict[str, Any]:
        """Extra arguments the family's pipeline needs to sample as the model trained."""
        return {}


class PromptEncoder:
    """Prompts -> conditioning, through a family's tokenizers and text encoders.

    The token ids of each distinct prompt list are made once and kept on the device (a training run
    has about as many as it has captions), so a training step does no tokenizing. When no text encoder
    trains (``frozen``), each distinct *prompt* is encoded once and its conditioning kept: a batch is
    the stack of its own prompts' rows, whatever order the data loader draws them in. Once every prompt
    of a run is encoded, the text encoders can leave the device (:meth:`precompute`)."""

    def __init__(self, backbone: type[Backbone], tokenizers: list, device: torch.device, frozen: bool = False) -> None:
        self.backbone = backbone
        self.tokenizers = tokenizers
        self.device = device
        self.frozen = frozen
        self._ids: dict[tuple[str, ...], list[torch.Tensor]] = {}
        self._embeds: dict[str, PromptEmbeds] = {}

    def __call__(self, text_encoders: dict[str, torch.nn.Module], prompts: list[str]) -> PromptEmbeds:
        if not self.frozen:
            return self._encode(text_encoders, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            with torch.no_grad():
                encoded = self._encode(text_encoders, missing)
            self._embeds.update({p: encoded.select([i]) for i, p in enumerate(missing)})
        return PromptEmbeds.stack([self._embeds[p] for p in prompts])

    def precompute(self, text_encoders: dict[str, torch.nn.Module], prompts: list[str], batch: int = 8) -> None:
        """Encode ``prompts`` now, a few at a time (frozen encoders only)."""
        assert self.frozen, "only a frozen text encoder's conditioning can be kept"
        unique = list(dict.fromkeys(prompts))
        for start in range(0, len(unique), batch):
            self(text_encoders, unique[start:start + batch])

    def _encode(self, text_encoders: dict[str, torch.nn.Module], prompts: list[str]) -> PromptEmbeds:
        key = tuple(prompts)
        ids = self._ids.get(key)
        if ids is None:
            ids = [tokenize(t, prompts).to(self.device) for t in self.tokenizers]
            if not self.frozen:
                self._ids[key] = ids
        return self.backbone.encode_prompts(text_encoders, ids)


def prediction_type(scheduler) -> str:
    return scheduler.config.get("prediction_type", "epsilon")
