"""A tiny decoder for previews: the pipeline's latents (scaled, as the U-Net sees them) → a grey angiogram
on the [-1, 1] scale (not clamped: the pipeline clamps), in a few small convolutions per doubling instead
of the VAE decoder's ResNet stack (TAESD's idea, Bohan 2023, much smaller here). It is distilled from the
VAE decoder on FFA latents (`training.distill`, `distill_loss`), so it shows the same image, softer, in a
fraction of the time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ffasynth.errors import FFASynthError
from ffasynth.models.architecture import downsampling_factor


class PreviewDecoder(ModelMixin, ConfigMixin):
    """z (B, latent_channels, h, w) → x (B, 1, h·scale_factor, w·scale_factor) on the [-1, 1] scale.

    Per doubling: nearest 2× upsampling, then a 3×3 convolution and a residual pair of 3×3 convolutions;
    `channels` wide throughout (halved, at least 8, after the first doubling when there are several)."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, scale_factor: int = 8, channels: int = 64):
        super().__init__()
        doublings = round(math.log2(scale_factor))
        if scale_factor < 1 or 2**doublings != scale_factor:
            raise FFASynthError(f"the preview decoder needs a power-of-two VAE downsampling, not {scale_factor}")
        if channels < 8:
            raise FFASynthError(f"the preview decoder needs at least 8 channels, not {channels}")
        self.stem = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        width = channels
        for index in range(doublings):
            out = width if index == 0 else max(8, width // 2)
            self.blocks.append(_Block(width, out))
            width = out
        self.head = nn.Conv2d(width, 1, 3, padding=1)

    @classmethod
    def for_vae(cls, vae_config, channels: int) -> PreviewDecoder:
        """A preview decoder for the latents of the VAE with this config."""
        return cls(vae_config.latent_channels, downsampling_factor(vae_config), channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.stem(latents.to(self.stem.weight.dtype)))
        for block in self.blocks:
            hidden = block(F.interpolate(hidden, scale_factor=2.0, mode="nearest"))
        return self.head(hidden)  # linear: a tanh here saturated on the dark FFA background and stopped learning


class _Block(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.residual = nn.Sequential(
            nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(hidden)
        return F.silu(hidden + self.residual(hidden))


def distill_loss(preview: nn.Module, latents: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """L1 between the preview of `latents` and the VAE decoder's grey image of the same latents
    (`conditioning.decode_latents`, [-1, 1]): the preview learns the decoder, not the data."""
    return F.l1_loss(preview(latents).float(), decoded.float())
