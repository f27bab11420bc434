"""Stable Diffusion 3.5 (large and medium): a rectified-flow MM-DiT (``SD3Transformer2DModel``) over a 16-channel
VAE, conditioned on two CLIP text encoders and T5-XXL.

What this family owns:
* the objective: flow matching, ``x_t = (1 - sigma) x0 + sigma noise`` against the plain velocity target
  ``noise - x0``. sigma is drawn logit-normal (mean 0, std 1) and shifted by the scheduler's static shift
  (3.0 in SD 3.5's ``scheduler_config.json``), ``s sigma / (1 + (s - 1) sigma)``: SD 3.5's published recipe,
  the sigmas diffusers' ``train_dreambooth_lora_sd3.py`` draws with its logit_normal weighting scheme.
  That script also defaults to ``precondition_outputs`` (the transformer's output turned into an x0
  estimate, ``x_t - sigma v``, against ``x0``); we do not: the velocity target is what the sampler integrates,
  and it is the same objective as FLUX.1's (objectives.py);
* latent normalisation ``(z - 0.0609) * 1.5305`` (the VAE config's shift and scaling factors, read by
  ``Backbone.latents``);
* the timestep units: the transformer takes ``sigma * 1000``, as ``StableDiffusion3Pipeline`` passes the
  scheduler's timesteps (sigmas times ``num_train_timesteps``);
* the conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it with ``clip_skip`` None: the
  penultimate hidden states of CLIP-L and CLIP-G concatenated on the feature axis, zero-padded to T5's width
  (``F.pad``, so a T5 narrower than the two CLIPs would cut them: the random shapes never are) and put before
  T5's last hidden states on the sequence axis; the pooled vector is CLIP-L's and CLIP-G's projected
  ``text_embeds`` concatenated. T5 reads as many tokens as the pipeline samples with (256, or its tokenizer's
  length when shorter: ``pipe_call_kwargs``);
* no guidance embedding: classifier-free guidance, 3.5 by default, the value SD 3.5 Large's model card
  samples with (28 steps). diffusers' ``StableDiffusion3Pipeline`` defaults to 7.0, SD 3 Medium's card value;
* its text encoders: CLIP-L trains with --train-text-encoder, CLIP-G (695M parameters) only with
  --train-text-encoder-2, as SDXL's second encoder; T5 never;
* its LoRA file: diffusers' own names, which diffusers' ``SD3LoraLoaderMixin`` and ComfyUI both load (see
  :meth:`SD3.lora_tensors`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserError
from .base import Adapter, Backbone, ImageSize, PromptEmbeds
from .objectives import flow_matching_objective
from .random_parts import clip_text_config

SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
DEFAULT_SHIFT = 3.0
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
T5_PAD_ID, T5_EOS_ID = 0, 1  # T5's vocabulary (and the offline tokenizer's)
T5_WHY = ("T5-XXL, which SD 3.5 trainers keep frozen (4.8B parameters, 9.5 GB in bf16; its states are read, "
          "never trained)")

# SD 3.5's scheduler_config.json: a static shift, no resolution-dependent one.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": DEFAULT_SHIFT, "use_dynamic_shifting": False}

TEXT_ROLES = ("text_encoder", "text_encoder_2")  # the CLIPs, the only text encoders with LoRA layers
_LORA_KEY = re.compile(r"^(transformer|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")


# --------------------------------------------------------------------------- random shapes


def _vae(channels: tuple[int, ...], layers: int, groups: int) -> dict[str, Any]:
    n = len(channels)
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
        "layers_per_block": layers, "norm_num_groups": groups, "act_fn": "silu", "sample_size": 1024,
        "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True, **SD3_VAE,
    }


def _t5(d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, vocab: int) -> dict[str, Any]:
    return {"vocab_size": vocab, "d_model": d_model, "d_ff": d_ff, "num_layers": layers, "num_heads": heads,
            "d_kv": d_kv, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "is_encoder_decoder": False,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6}


def _transformer(layers: int, heads: int, joint: int, pooled: int, **shape: Any) -> dict[str, Any]:
    return {
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": layers, "attention_head_dim": 64,
        "num_attention_heads": heads, "joint_attention_dim": joint, "caption_projection_dim": 64 * heads,
        "pooled_projection_dim": pooled, "qk_norm": "rms_norm", **shape,
    }


def _components(transformer: dict[str, Any], clip_l, clip_g, t5: dict[str, Any], vae: dict[str, Any],
                t5_max_length: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..t5_tokenizer import build_t5_tokenizer
    from ..tokenizer import build_clip_tokenizer

    return {
        "transformer": SD3Transformer2DModel(**transformer), "vae": AutoencoderKL(**vae),
        "text_encoder": CLIPTextModelWithProjection(clip_l), "tokenizer": build_clip_tokenizer(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_g), "tokenizer_2": build_clip_tokenizer(pad_token="!"),
        "text_encoder_3": T5EncoderModel(T5Config(**t5)), "tokenizer_3": build_t5_tokenizer(t5_max_length),
    }


def _clip_l():
    return clip_text_config(768, 3072, 12, 12, 768)


def _clip_g():
    return clip_text_config(1280, 5120, 32, 20, 1280, act="gelu", pad_token_id=0)


def _t5_xxl() -> dict[str, Any]:
    return _t5(4096, 10240, 24, 64, 64, vocab=32128)


def sd35_large() -> dict[str, Any]:
    """SD 3.5 Large's exact architecture: transformer 8,056,627,520 parameters (38 joint blocks, QK RMS-norm) plus its
    fixed position table (89.65M, a buffer its files hold: 8.15B, the published 8.1B), CLIP-L 123,650,304 and
    CLIP-G 694,659,840 (with their projections), T5-XXL encoder 4,762,310,656, VAE 83,819,683. Our offline T5
    tokenizer stands in for T5's."""
    transformer = _transformer(38, 38, 4096, 2048, sample_size=128, pos_embed_max_size=192)
    return _components(transformer, _clip_l(), _clip_g(), _t5_xxl(), _vae((128, 256, 512, 512), 2, 32), T5_TOKENS)


def sd35_medium() -> dict[str, Any]:
    """SD 3.5 Medium's exact architecture (MMDiT-X): transformer 2,243,171,520 parameters (24 joint blocks, the first
    13 with a second image self-attention, ``attn2``) plus a position table of 226.49M (2.47B, the published
    2.5B), the same text encoders and VAE as Large."""
    transformer = _transformer(24, 24, 4096, 2048, sample_size=128, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)))
    return _components(transformer, _clip_l(), _clip_g(), _t5_xxl(), _vae((128, 256, 512, 512), 2, 32), T5_TOKENS)


def sd3_tiny() -> dict[str, Any]:
    """Miniature SD 3.5: 2 joint blocks (the first with Medium's second self-attention, both with QK norm), a
    4-level VAE (a 64 px image is 8x8 latents, 16 tokens), CLIP-L 32 wide and CLIP-G 48 wide (as sdxl-tiny), and a
    T5 96 wide, wider than the two CLIPs together so the CLIP states are zero-padded as in the real model."""
    transformer = {
        "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 96, "caption_projection_dim": 32,
        "pooled_projection_dim": 32 + 48, "pos_embed_max_size": 16, "qk_norm": "rms_norm",
        "dual_attention_layers": (0,),
    }
    return _components(transformer, clip_text_config(32, 37, 2, 4, 32),
                       clip_text_config(48, 37, 2, 4, 48, act="gelu", pad_token_id=0),
                       _t5(96, 64, 2, 2, 16, vocab=400), _vae((16, 16, 16, 16), 1, 8), 32)


# --------------------------------------------------------------------------- the family


class SD3(Backbone):
    family = "sd3"
    title = "Stable Diffusion 3.5"
    default_resolution = 1024
    pipeline_class_name = "StableDiffusion3Pipeline"
    folder_class_names = ("StableDiffusion3Img2ImgPipeline",)
    has_regional_prompts = False
    controlnet_pipeline_class_name = None
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    samplers = ("flow-euler",)
    default_guidance = 3.5  # SD 3.5 Large's model card (diffusers' pipeline default, 7.0, is SD 3 Medium's)
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_trained_text_encoders = ("text_encoder",)
    frozen_text_encoders = {"text_encoder_3": T5_WHY}
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    lora_prefixes = {"transformer": "transformer.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
    single_file_text_encoders = {}
    has_single_file_export = False  # SAI's layout (joint_blocks, fused qkv): not written yet
    # sd-scripts writes its model type, "3-5-large" or "3-5-medium", and the modelspec architecture
    # "stable-diffusion-3-" + that type (library/sai_model_spec.py). A family has one of each (class attributes,
    # read without the model), so Large's, the flagship, stand for both.
    kohya_base_version = "3-5-large"
    modelspec_architecture = "stable-diffusion-3-3-5-large"
    shapes = {"sd3-tiny": sd3_tiny, "sd35-large": sd35_large, "sd35-medium": sd35_medium}
    resolution_multiple = 16  # the VAE's 8 times the transformer's 2x2 patches
    # The joint blocks' attention projections (Medium's attn2 too: the names match it), and the CLIPs'.
    default_lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "q_proj", "k_proj", "v_proj", "out_proj",
    )

    # ------------------------------------------------------------------ recognising files

    @classmethod
    def owns_unet_config(cls, config: dict[str, Any]) -> bool:
        """SD3Transformer2DModel's (and SD3ControlNetModel's) config: a caption projection and a bounded position
        embedding; FLUX.1's has ``guidance_embeds`` and neither of these."""
        return ("joint_attention_dim" in config and "caption_projection_dim" in config
                and "pos_embed_max_size" in config and "guidance_embeds" not in config)

    @classmethod
    def owns_single_file(cls, keys: set[str]) -> bool:
        """SAI's checkpoint layout (sd3.5_large.safetensors): MM-DiT joint blocks under model.diffusion_model."""
        return any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys)

    # ------------------------------------------------------------------ components and the maths

    @classmethod
    def random_scheduler_config(cls, prediction_type: str = "epsilon") -> dict[str, Any]:
        return dict(SCHEDULER_CONFIG)

    @classmethod
    def objective(cls, cfg, scheduler_config: dict[str, Any], device: torch.device):
        """Logit-normal sigma with the scheduler's static shift (3) unless --timestep-sampling / --flow-shift say
        otherwise; the velocity target (module docstring)."""
        if cfg.flow_shift == "resolution":
            raise UserError(f"--flow-shift resolution is FLUX.1's shift by image size; {cls.title} trains with a "
                            f"static shift (its scheduler's, {scheduler_config.get('shift', DEFAULT_SHIFT):g}): "
                            "pass a number or drop the option")
        shift = float(cfg.flow_shift) if cfg.flow_shift is not None else float(
            scheduler_config.get("shift", DEFAULT_SHIFT))
        return flow_matching_objective(cfg, cls.title, scheduler_config, "logit_normal", shift=shift)

    @classmethod
    def image_tokens(cls, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    @classmethod
    def train_guidance(cls, denoiser, cfg) -> float | None:
        if cfg.train_guidance is not None:
            raise UserError(f"--train-guidance {cfg.train_guidance:g} is for FLUX.1-dev's guidance embedding; "
                            f"{cls.title} has none (it samples with classifier-free guidance): drop the option")
        return None

    @classmethod
    def encode_prompts(cls, text_encoders: dict[str, torch.nn.Module], ids: list[torch.Tensor]) -> PromptEmbeds:
        clip_l = text_encoders["text_encoder"](ids[0], output_hidden_states=True)
        clip_g = text_encoders["text_encoder_2"](ids[1], output_hidden_states=True)
        t5 = text_encoders["text_encoder_3"](t5_ids(ids[2]))[0]
        clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)
        return PromptEmbeds(torch.cat([clip, t5], dim=-2), pooled=pooled)

    @classmethod
    def denoise(cls, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                sizes: list[ImageSize], guidance: float | None = None) -> torch.Tensor:
        return transformer(
            hidden_states=noisy, timestep=timesteps * 1000.0, encoder_hidden_states=embeds.hidden,
            pooled_projections=embeds.pooled, return_dict=False,
        )[0]

    @classmethod
    def pipe_call_kwargs(cls, pipe) -> dict[str, Any]:
        """T5 reads as many tokens as in training (see :func:`t5_ids`)."""
        return {"max_sequence_length": min(T5_TOKENS, pipe.tokenizer_3.model_max_length)}

    # ------------------------------------------------------------------ LoRA files

    @classmethod
    def lora_tensors(cls, adapters: dict[str, dict[str, Adapter]], models: dict[str, torch.nn.Module]
                     ) -> dict[str, torch.Tensor]:
        """diffusers' own names: ``transformer.<module path>.lora_A.weight`` (down) and ``.lora_B.weight`` (up),
        and ``text_encoder.`` / ``text_encoder_2.`` for CLIP-L and CLIP-G, their paths spelled from ``text_model.``.
        No ``.alpha`` tensors: diffusers' SD3 loader refuses a tensor without ``lora`` in its name, so each
        layer's scale alpha / r is folded into its up weights, and both readers then apply the delta as is
        (alpha missing = rank). Readers checked:
        * diffusers: ``SD3LoraLoaderMixin.load_lora_weights`` (loaders/lora_pipeline.py), which splits the
          ``transformer.``, ``text_encoder.`` and ``text_encoder_2.`` keys between the three modules;
        * ComfyUI: ``model_lora_keys_unet`` (comfy/lora.py), whose SD3 branch names every
          ``transformer.<diffusers path>`` after ``comfy.utils.mmdit_to_diffusers`` (q, k and v as row slices
          of SAI's fused qkv), and ``model_lora_keys_clip``, which maps ``text_encoder.text_model.encoder.layers.
          N.<self_attn.q_proj ...>`` to CLIP-L and ``text_encoder_2.`` to CLIP-G when CLIP-L is present;
          ``load_lora`` there reads the ``.lora_A`` / ``.lora_B`` pair. Its ``mmdit_to_diffusers`` has no names
          for Medium's ``attn2``, so ComfyUI skips those layers (with a warning); diffusers loads them.

        The up weights are written in float32 when unfolding them again (dividing by the scale, in float64)
        gives them back bit for bit, which holds for a power-of-two scale such as the default alpha = rank;
        otherwise in float64, where it always does, so that a resumed run trains on exactly the adapters it
        saved."""
        out: dict[str, torch.Tensor] = {}
        for role, layers in adapters.items():
            for path, (down, up, alpha) in layers.items():
                key = _file_key(role, path)
                out[f"{key}.lora_A.weight"] = down
                out[f"{key}.lora_B.weight"] = _folded(up, alpha / down.shape[0])
        return out

    @classmethod
    def lora_from_tensors(cls, tensors: dict[str, torch.Tensor], paths: dict[str, list[str]],
                          models: dict[str, torch.nn.Module]) -> tuple[dict[str, dict[str, Adapter]], set[str]]:
        """The inverse of :meth:`lora_tensors` for the peft layers at ``paths``: each up weight divided by its
        layer's own scaling (alpha / r, from ``models``), so the adapters come back exactly as they were saved.
        A module without a peft layer (a plain pipeline) reads the delta as stored: alpha = rank."""
        found: dict[str, dict[str, Adapter]] = {}
        used: set[str] = set()
        for (role, path), (down, up, keys) in _matched(tensors, paths).items():
            scale = _scaling(models.get(role), path)
            up = (up.double() / scale).to(torch.float32) if scale != 1.0 else up.to(torch.float32)
            found.setdefault(role, {})[path] = (down.to(torch.float32), up, scale * down.shape[0])
            used |= keys
        return found, used

    @classmethod
    def load_lora(cls, pipe, file: Path, adapter_name: str) -> None:
        """Hand diffusers the file's tensors under the pipeline's own module paths (the scale is folded already);
        ValueError names a tensor that is no SD 3.5 LoRA tensor of this pipeline."""
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        models = {"transformer": cls.denoiser(pipe), **{role: getattr(pipe, role) for role in TEXT_ROLES}}
        matched = _matched(tensors, {role: _linear_paths(model) for role, model in models.items()})
        used = set().union(*(keys for *_, keys in matched.values()))
        unknown = sorted(set(tensors) - used)
        if unknown or not matched:
            raise ValueError(f"{len(unknown)} tensors match no SD 3.5 layer, e.g. {unknown[0]}" if unknown
                             else "no tensors")
        state = {}
        for (role, path), (down, up, _) in matched.items():
            state[f"{role}.{path}.lora_A.weight"] = down.to(torch.float32)
            state[f"{role}.{path}.lora_B.weight"] = up.to(torch.float32)
        pipe.load_lora_weights(state, adapter_name=adapter_name)

    @classmethod
    def owns_lora(cls, keys: set[str]) -> bool:
        """diffusers' SD3 names (``transformer.transformer_blocks.N.``, no FLUX.1 ``single_transformer_blocks``),
        or sd-scripts' SAI-named ones (``lora_unet_joint_blocks_N_``). Attention-only names alone cannot tell SD3
        from a diffusers FLUX.1 LoRA of its double blocks only; our files say their family in their metadata."""
        diffusers_names = any(k.startswith("transformer.transformer_blocks.") for k in keys) and not any(
            k.startswith("transformer.single_transformer_blocks.") for k in keys)
        return diffusers_names or any(k.startswith(("lora_unet_joint_blocks_", "diffusion_model.joint_blocks."))
                                      for k in keys)


# --------------------------------------------------------------------------- helpers


def t5_ids(ids: torch.Tensor) -> torch.Tensor:
    """T5's token ids cut to the pipeline's ``max_sequence_length`` (256): the ids the tokenizer gives at that
    length, the end token moved into the last place when the prompt was longer."""
    if ids.shape[1] <= T5_TOKENS:
        return ids
    cut = ids[:, :T5_TOKENS].clone()
    longer = ids[:, T5_TOKENS] != T5_PAD_ID
    cut[longer, -1] = T5_EOS_ID
    return cut


def _file_key(role: str, path: str) -> str:
    """A module's name in the file: the role, then its path (a CLIP's from ``text_model.``)."""
    if role in TEXT_ROLES and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{role}.{path}"


def _matched(tensors: dict[str, torch.Tensor], paths: dict[str, list[str]]
             ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, set[str]]]:
    """(role, module path) -> (down, up as stored, the tensor names) for each module of ``paths`` in the file."""
    wanted = {_file_key(role, path): (role, path) for role, names in paths.items() for path in names}
    pairs: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _LORA_KEY.match(name)
        if m and f"{m[1]}.{m[2]}" in wanted:
            pairs.setdefault(f"{m[1]}.{m[2]}", {})[m[3]] = name
    return {wanted[key]: (tensors[p["A"]], tensors[p["B"]], {p["A"], p["B"]})
            for key, p in pairs.items() if {"A", "B"} <= p.keys()}


def _folded(up: torch.Tensor, scale: float) -> torch.Tensor:
    """``up * scale``, in float32 if dividing it by ``scale`` (as :meth:`SD3.lora_from_tensors` does) gives ``up``
    back exactly, else in float64."""
    up = up.to(torch.float32)
    if scale == 1.0:
        return up
    folded = up * scale
    if torch.equal((folded.double() / scale).to(torch.float32), up):
        return folded
    return up.double() * scale


def _scaling(model: torch.nn.Module | None, path: str) -> float:
    """The peft layer's own scale (alpha / r) of the adapter that trains ("default"); 1.0 for a module without
    one."""
    if model is None:
        return 1.0
    model = getattr(model, "module", model)  # DDP / compile wrappers
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        return 1.0
    scaling = getattr(layer, "scaling", None)
    return float(scaling["default"]) if isinstance(scaling, dict) and "default" in scaling else 1.0


def _linear_paths(model: torch.nn.Module) -> list[str]:
    """The module paths of a model's Linear layers, as before any LoRA adapter wrapped them."""
    paths = (n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return list(dict.fromkeys(p for p in paths if ".lora_" not in p))
