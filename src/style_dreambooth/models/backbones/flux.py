"""FLUX.1 (dev and schnell): a rectified-flow MM-DiT (``FluxTransformer2DModel``) over a 16-channel VAE,
conditioned on CLIP ViT-L's pooled vector and T5-XXL's per-token states.

What this family owns:
* the objective: flow matching, ``x_t = (1 - sigma) x0 + sigma noise`` against ``noise - x0``, sigma
  drawn uniformly and unshifted by default, as diffusers' ``train_dreambooth_lora_flux.py`` does (its
  scheduler shifts by resolution only when sampling);
* latent normalisation ``(z - 0.1159) * 0.3611`` (the VAE config's shift and scaling factors);
* packing: each 2x2 patch of latents is one token of 64 channels, with (0, row, column) position ids
  for the image tokens and zeros for the text tokens;
* the timestep units (the transformer takes sigma in [0, 1]) and the guidance embedding: dev is
  guidance-distilled and gets a guidance value (3.5 in training, as diffusers' script), schnell has
  none;
* its text encoders: CLIP-L may train (LoRA or full), T5 never;
* its single file: the transformer alone in BFL's layout (flux_single_file.py), as ``flux1-dev.safetensors``
  ships, which ComfyUI's diffusion-model loader and diffusers' ``from_single_file`` read; loading one takes
  the other parts from --base-config;
* its LoRA file: kohya sd-scripts' layout on BFL's module names with fused projections, which ComfyUI
  and Forge load (flux_lora.py), CLIP-L's layers under ``lora_te1_``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from . import flux_lora, flux_single_file
from .base import Adapter, Backbone, ImageSize, PromptEmbeds
from .objectives import flow_matching_objective
from .random_parts import clip_text_config

FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
TRAIN_GUIDANCE = 3.5
T5_WHY = "T5-XXL, which no trainer fine-tunes (9.5 GB in bf16; its embeddings are read, never trained)"

# FluxPipeline's scheduler (FLUX.1-dev's scheduler_config.json): the shift grows with the image's tokens.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}


def _vae(channels: tuple[int, ...], layers: int, groups: int) -> dict[str, Any]:
    n = len(channels)
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
        "layers_per_block": layers, "norm_num_groups": groups, "act_fn": "silu", "sample_size": 1024,
        "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True, **FLUX_VAE,
    }


def _components(transformer: dict[str, Any], clip, t5: dict[str, Any], vae: dict[str, Any],
                t5_max_length: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from ..t5_tokenizer import build_t5_tokenizer
    from ..tokenizer import build_clip_tokenizer

    return {
        "transformer": FluxTransformer2DModel(**transformer), "vae": AutoencoderKL(**vae),
        "text_encoder": CLIPTextModel(clip), "tokenizer": build_clip_tokenizer(),
        "text_encoder_2": T5EncoderModel(T5Config(**t5)), "tokenizer_2": build_t5_tokenizer(t5_max_length),
    }


def _t5(d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, vocab: int) -> dict[str, Any]:
    return {"vocab_size": vocab, "d_model": d_model, "d_ff": d_ff, "num_layers": layers, "num_heads": heads,
            "d_kv": d_kv, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "is_encoder_decoder": False,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}


def _tiny(guidance_embeds: bool) -> dict[str, Any]:
    transformer = {
        "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
        "guidance_embeds": guidance_embeds, "axes_dims_rope": (4, 6, 6),
    }
    t5 = _t5(32, 37, 2, 4, 8, vocab=400)
    return _components(transformer, clip_text_config(32, 37, 2, 4, 32), t5, _vae((16, 16, 16, 16), 1, 8), 32)


def flux_tiny() -> dict[str, Any]:
    """Miniature FLUX.1-dev (guidance embedding): 2 double and 2 single blocks, 64 px images are 16 tokens."""
    return _tiny(guidance_embeds=True)


def flux_schnell_tiny() -> dict[str, Any]:
    """Miniature FLUX.1-schnell: as flux-tiny without the guidance embedding."""
    return _tiny(guidance_embeds=False)


def flux_dev() -> dict[str, Any]:
    """FLUX.1-dev's exact architecture: transformer 11.9B (19 double, 38 single blocks), T5-XXL encoder 4.76B,
    CLIP-L 123M, VAE 83.8M. Our offline T5 tokenizer stands in for T5's."""
    transformer = {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
    }
    t5 = _t5(4096, 10240, 24, 64, 64, vocab=32128)
    return _components(transformer, clip_text_config(768, 3072, 12, 12, 768), t5,
                       _vae((128, 256, 512, 512), 2, 32), 512)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channels before the patch offsets."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows * cols, 3) position ids (0, row, column) of the packed image tokens."""
    grid = torch.zeros(rows, cols, 3)
    grid[..., 1] += torch.arange(rows)[:, None]
    grid[..., 2] += torch.arange(cols)[None, :]
    return grid.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class FLUX(Backbone):
    family = "flux"
    title = "FLUX.1"
    default_resolution = 1024
    pipeline_class_name = "FluxPipeline"
    folder_class_names = ("FluxImg2ImgPipeline",)
    has_regional_prompts = False
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    samplers = ("flow-euler",)
    default_guidance = TRAIN_GUIDANCE  # dev's distilled guidance; schnell takes none
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    default_trained_text_encoders = ("text_encoder",)
    frozen_text_encoders = {"text_encoder_2": T5_WHY}
    tokenizer_names = ("tokenizer", "tokenizer_2")
    lora_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
    single_file_denoiser_only = True  # BFL's flux1-dev.safetensors: the transformer alone
    single_file_half_dtype = torch.bfloat16  # as BFL ships FLUX.1 (fp16 overflows its activations)
    kohya_base_version = "flux1"
    modelspec_architecture = "flux-1-dev"
    shapes = {"flux-tiny": flux_tiny, "flux-schnell-tiny": flux_schnell_tiny, "flux-dev": flux_dev}
    resolution_multiple = 16
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
        "q_proj", "k_proj", "v_proj", "out_proj",
    )

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        return "joint_attention_dim" in config and "pooled_projection_dim" in config and "guidance_embeds" in config

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        """BFL's transformer file (``double_blocks.``, ``img_in`` ... with no prefix) or ComfyUI's checkpoint
        (the same under ``model.diffusion_model.``); not FLUX.2, Chroma or a LoRA in BFL names."""
        return flux_single_file.is_bfl_transformer(keys)

    # ------------------------------------------------------------------ single files

    @classmethod
    def load_single_file(cls, path: Path, kwargs: dict[str, Any]):
        """The transformer from the file (BFL's or ComfyUI's names, any block sizes) through diffusers'
        ``FluxTransformer2DModel.from_single_file`` with ``config``'s transformer config; the VAE, text
        encoders, tokenizers and scheduler from the ``config`` pipeline. A ComfyUI checkpoint's own VAE
        and text encoders are not read (a warning names them)."""
        import logging

        from diffusers import FluxTransformer2DModel
        from safetensors.torch import load_file

        state, left_out = flux_single_file.transformer_tensors(load_file(str(path)))
        if left_out:
            logging.getLogger(__name__).warning(
                "%s: %d tensors beside the transformer (e.g. %s) are not read; the VAE and text encoders come "
                "from --base-config", path.name, len(left_out), left_out[0])
        config, dtype = kwargs["config"], kwargs.get("dtype")
        common = {k: kwargs[k] for k in ("local_files_only",) if k in kwargs}
        converted = flux_single_file.from_bfl(state)
        revision = kwargs.get("revision")
        model_config = FluxTransformer2DModel.load_config(config, subfolder="transformer", revision=revision, **common)
        with torch.device("meta"):
            expected = FluxTransformer2DModel.from_config(model_config).state_dict()
        _check_fits(converted, expected)
        transformer = FluxTransformer2DModel.from_single_file(
            converted, config=config, subfolder="transformer", dtype=dtype, config_revision=revision, **common)
        pipe = cls.pipeline_class().from_pretrained(
            config, transformer=transformer, revision=revision,
            **({"dtype": dtype} if dtype is not None else {}), **common)
        if dtype is None and transformer.dtype != pipe.text_encoder.dtype:  # match the prompt embeddings' precision
            transformer.to(pipe.text_encoder.dtype)
        return pipe

    @classmethod
    def single_file_state_dict(cls, pipe) -> dict[str, torch.Tensor]:
        """The transformer alone in BFL's layout, as ``flux1-dev.safetensors``."""
        transformer = cls.denoiser(pipe)
        return flux_single_file.to_bfl(getattr(transformer, "_orig_mod", transformer).state_dict())

    @classmethod
    def single_file_architecture(cls, pipe) -> str:
        return "flux-1-dev" if cls.denoiser(pipe).config.guidance_embeds else "flux-1-schnell"

    @classmethod
    def default_image_size(cls, pipe) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    @classmethod
    def random_scheduler_config(cls, prediction_type: str = "epsilon") -> dict[str, Any]:
        return dict(SCHEDULER_CONFIG)

    @classmethod
    def objective(cls, cfg, scheduler_config: dict[str, Any], device: torch.device):
        shift = cfg.flow_shift if cfg.flow_shift is not None else 1.0
        return flow_matching_objective(cfg, cls.title, scheduler_config, "uniform",
                                       shift=1.0 if shift == "resolution" else float(shift),
                                       shift_by_resolution=shift == "resolution")

    @classmethod
    def image_tokens(cls, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    @classmethod
    def train_guidance(cls, denoiser, cfg) -> float | None:
        if not denoiser.config.guidance_embeds:
            if cfg.train_guidance is not None:
                raise UserError(f"--train-guidance {cfg.train_guidance:g}: this {cls.title} model has no guidance "
                                "embedding (schnell is not guidance-distilled); drop the option")
            return None
        return TRAIN_GUIDANCE if cfg.train_guidance is None else cfg.train_guidance

    @classmethod
    def encode_prompts(cls, text_encoders: dict[str, torch.nn.Module], ids: list[torch.Tensor]) -> PromptEmbeds:
        pooled = text_encoders["text_encoder"](ids[0], output_hidden_states=False).pooler_output
        hidden = text_encoders["text_encoder_2"](ids[1], output_hidden_states=False)[0]
        return PromptEmbeds(hidden, pooled=pooled)

    @classmethod
    def denoise(cls, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                sizes: list[ImageSize], guidance: float | None = None) -> torch.Tensor:
        b, _, height, width = noisy.shape
        dtype = embeds.hidden.dtype
        text_ids = torch.zeros(embeds.hidden.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance_values = None if guidance is None else torch.full((b,), guidance, device=noisy.device)
        out = transformer(
            hidden_states=pack(noisy), timestep=timesteps, guidance=guidance_values,
            pooled_projections=embeds.pooled, encoder_hidden_states=embeds.hidden, txt_ids=text_ids,
            img_ids=image_ids(height // 2, width // 2, noisy.device, dtype), return_dict=False,
        )[0]
        return unpack(out, height, width)

    @classmethod
    def pipe_call_kwargs(cls, pipe) -> dict[str, Any]:
        """T5 reads as many tokens as in training (its tokenizer's length; 512 for FLUX.1's own)."""
        return {"max_sequence_length": min(512, pipe.tokenizer_2.model_max_length)}

    # ------------------------------------------------------------------ LoRA files

    @classmethod
    def lora_tensors(cls, adapters: dict[str, dict[str, Adapter]], models: dict[str, torch.nn.Module]
                     ) -> dict[str, torch.Tensor]:
        """CLIP-L's layers named as for the UNet families (``lora_te1_``), the transformer's in kohya's FLUX.1
        layout: BFL names, q/k/v (and a single block's MLP input) fused on a block diagonal."""
        out = super().lora_tensors({r: a for r, a in adapters.items() if r != cls.denoiser_name}, models)
        if adapters.get(cls.denoiser_name):
            inner, mlp = _sizes(models[cls.denoiser_name])
            out.update(flux_lora.to_kohya(adapters[cls.denoiser_name], inner, mlp))
        return out

    @classmethod
    def lora_from_tensors(cls, tensors: dict[str, torch.Tensor], paths: dict[str, list[str]],
                          models: dict[str, torch.nn.Module]) -> tuple[dict[str, dict[str, Adapter]], set[str]]:
        """The inverse of :meth:`lora_tensors`; also reads ComfyUI's and diffusers' names for the transformer
        and LoRAs kohya trained (one fused matrix per module). ValueError for a tensor of no known module."""
        text = {k: v for k, v in tensors.items() if k.startswith(flux_lora.TEXT_ENCODER_PREFIX)}
        found, used = super().lora_from_tensors(text, {r: p for r, p in paths.items() if r != cls.denoiser_name},
                                                models)
        rest = {k: v for k, v in tensors.items() if k not in text}
        if rest and cls.denoiser_name in paths:
            inner, mlp = _sizes(models[cls.denoiser_name])
            adapters = flux_lora.from_kohya(rest, inner, mlp)
            wanted = set(paths[cls.denoiser_name])
            found[cls.denoiser_name] = {p: a for p, a in adapters.items() if p in wanted}
            used |= set(rest) if set(adapters) <= wanted else set()
        return found, used

    @classmethod
    def load_lora(cls, pipe, file: Path, adapter_name: str) -> None:
        """Read the file with our own converter (diffusers' hard-codes FLUX.1's real block sizes) and hand
        diffusers the adapters in its own names, each scale folded into its up weights."""
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        models = {cls.denoiser_name: cls.denoiser(pipe), "text_encoder": pipe.text_encoder}
        paths = {role: _linear_paths(model) for role, model in models.items()}
        found, used = cls.lora_from_tensors(tensors, paths, models)
        if set(tensors) - used or not found:
            unknown = sorted(set(tensors) - used)
            raise ValueError(f"{len(unknown)} tensors match no layer, e.g. {unknown[0]}" if unknown else "no tensors")
        state = {}
        for role, layers in found.items():
            for path, (down, up, alpha) in layers.items():
                state[f"{role}.{path}.lora_A.weight"] = down
                state[f"{role}.{path}.lora_B.weight"] = up * (alpha / down.shape[0])
        pipe.load_lora_weights(state, adapter_name=adapter_name)

    @classmethod
    def owns_lora(cls, keys: set[str]) -> bool:
        return flux_lora.is_flux_lora(keys)


def _check_fits(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """ValueError unless a converted file has exactly the config's transformer tensors, each of its shape
    (diffusers would leave missing ones on the meta device and drop extra ones)."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        name, how = (missing[0], "the file lacks") if missing else (extra[0], "the config's transformer has no")
        raise ValueError(f"{how} {name} ({len(missing) or len(extra)} tensors): the file and the config are not the "
                         "same FLUX.1 model (dev has a guidance embedding, schnell none)")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"the file's {name} is {tuple(tensor.shape)}, the config's transformer wants "
                             f"{tuple(expected[name].shape)}: the file and the config are not the same FLUX.1 size")


def _linear_paths(model: torch.nn.Module) -> list[str]:
    """The module paths of a model's Linear layers, as before any LoRA adapter wrapped them."""
    paths = (n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return list(dict.fromkeys(p for p in paths if ".lora_" not in p))


def _sizes(transformer) -> tuple[int, int]:
    """(attention width, MLP width) of a FLUX.1 transformer: heads x head size, and 4 times that."""
    config = getattr(transformer, "config", None) or transformer.module.config
    inner = config.num_attention_heads * config.attention_head_dim
    return inner, 4 * inner
