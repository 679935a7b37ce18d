"""The model's shapes: `ModelConfig` → the constructor arguments of the U-Net, VAE and CLIP image
encoder (+ its preprocessing), and the latent downsampling factor. No I/O: `models/loading.py`
(real weights) and `models/components.py` (random or loaded parts) both build on this.

The defaults of ModelConfig give exactly SD1.5's U-Net and VAE and CLIP ViT-L/14's vision tower.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import CLIPImageProcessor, CLIPVisionConfig

from ffasynth.config import ModelConfig

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def downsampling_factor(config_or_block_out_channels) -> int:
    """Pixels per latent (VAE) or per deepest feature (U-Net) along each side: every level but the
    last halves height and width, so 2^(levels - 1) (8 for SD1.5's four-level VAE and U-Net).
    Takes a diffusers model's config (anything with `block_out_channels`) or the channels themselves."""
    channels: Sequence[int] = getattr(config_or_block_out_channels, "block_out_channels", config_or_block_out_channels)
    return 2 ** (len(channels) - 1)


def unet_in_channels(model: ModelConfig) -> int:
    """The noisy latent, plus the source latent concatenated to it when model.use_concat."""
    return model.latent_channels * (2 if model.use_concat else 1)


def unet_config(model: ModelConfig, in_channels: int | None = None) -> dict:
    """UNet2DConditionModel arguments; the defaults of ModelConfig give exactly SD1.5's U-Net."""
    levels = len(model.unet_channels)
    return {
        "sample_size": 64,
        "in_channels": in_channels or model.latent_channels,
        "out_channels": model.latent_channels,
        "layers_per_block": model.unet_layers_per_block,
        "block_out_channels": list(model.unet_channels),
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "attention_head_dim": model.unet_attention_heads,
        "norm_num_groups": model.unet_norm_groups,
        "cross_attention_dim": model.cross_attention_dim,
    }


def vae_config(model: ModelConfig) -> dict:
    """AutoencoderKL arguments; the defaults give SD1.5's VAE (downsampling 2^(levels-1) = 8)."""
    levels = len(model.vae_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(model.vae_channels),
        "layers_per_block": model.vae_layers_per_block,
        "latent_channels": model.latent_channels,
        "norm_num_groups": model.vae_norm_groups,
        "sample_size": 512,
        "scaling_factor": model.latent_scaling,
    }


def clip_config(model: ModelConfig) -> CLIPVisionConfig:
    """CLIPVisionModelWithProjection's config; its projection lands in the U-Net's cross-attention width."""
    return CLIPVisionConfig(
        hidden_size=model.clip_hidden_size,
        intermediate_size=model.clip_intermediate_size,
        num_hidden_layers=model.clip_layers,
        num_attention_heads=model.clip_heads,
        image_size=model.clip_image_size,
        patch_size=model.clip_patch_size,
        projection_dim=model.cross_attention_dim,
    )


def clip_processor(image_size: int) -> CLIPImageProcessor:
    """OpenAI CLIP's preprocessing (shortest-edge resize, centre crop, its mean/std) at `image_size`."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
