"""Building blocks of the random-weight shapes each family declares (see random_model.py)."""

from __future__ import annotations

from typing import Any

from transformers import CLIPTextConfig

from ..tokenizer import VOCAB_SIZE

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407

UNET_COMMON: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
}


def clip_text_config(hidden: int, intermediate: int, layers: int, heads: int, projection: int,
                     act: str = "quick_gelu", pad_token_id: int = EOS_TOKEN_ID) -> CLIPTextConfig:
    """A CLIP text tower over the real 49408-token vocabulary (quick_gelu: OpenAI CLIP; gelu: OpenCLIP)."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, projection_dim=projection,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
        layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=pad_token_id,
    )


def vae_config(full: bool, scaling_factor: float = 0.18215, force_upcast: bool = True) -> dict[str, Any]:
    """The SD KL autoencoder (``full``: 4 levels, 83.65M parameters) or a 2-level miniature."""
    n, channels, layers, groups, size = (4, (128, 256, 512, 512), 2, 32, 512) if full else (2, (16, 32), 1, 8, 64)
    return {
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": channels, "layers_per_block": layers, "act_fn": "silu", "latent_channels": 4,
        "norm_num_groups": groups, "sample_size": size, "scaling_factor": scaling_factor,
        "force_upcast": force_upcast,
    }
