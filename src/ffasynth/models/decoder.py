"""The VAE's decoder half as one module: what stage 2 fine-tunes and saves as "decoder", and what
loading a stage-2 run swaps into its stage-1 model."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn


class Decoder(nn.Module):
    """The trainable part of the VAE: post_quant_conv + decoder, z (scaled) → 3-channel image.
    It shares its layers with `vae`: training it changes the VAE's decoding."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = vae.config.scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents / self.scaling_factor))

    @property
    def last_layer(self) -> torch.Tensor:
        """conv_out's weight: where LDM's adaptive weight compares the loss terms' gradients."""
        return self.decoder.conv_out.weight
