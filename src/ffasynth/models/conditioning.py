"""The source photo as conditioning: CLIP image tokens for every cross-attention layer, and the
source's VAE latent concatenated to the noisy latent (8-channel conv_in). Either path can be off;
"off" and "dropped" (classifier-free guidance) both mean zeros, which carry no information.

A U-Net with guidance folded in (`time_cond_proj_dim` set, `models.components.add_guidance_embedding`;
made by `ffasynth train distill`) takes the guidance scale as an input and gives the guided prediction
in one pass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ffasynth.data.io import unit_float

if TYPE_CHECKING:
    from ffasynth.tiling import Tile


def to_vae_input(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images with 1 (FFA) or 3 (photo) channels → the VAE's 3 channels."""
    return image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image


def from_vae_output(image: torch.Tensor) -> torch.Tensor:
    """The VAE's 3 decoded channels → one grey angiogram channel (their mean), still in [-1, 1]."""
    return image.mean(dim=1, keepdim=True)


def encode_latents(
    vae: AutoencoderKL, image: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
) -> torch.Tensor:
    """z = scaling · E(x): the posterior's mode, or a sample from it (the target during training)."""
    posterior = vae.encode(to_vae_input(image).to(vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mode()
    return latents * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """x = D(z / scaling) as a grey image in [-1, 1]."""
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return from_vae_output(image).clamp(-1.0, 1.0)


class SourceConditioner(nn.Module):
    """source (B, 3, H, W) in [-1, 1] → cond_tokens (B, T, cross_attention_dim) and source latents.

    clip_tokens="embed": the projected image embedding as one token (what SD image variation feeds
    SD1.5; 768-d = its cross-attention width, so no new weights). "patches": the last hidden states
    (CLS + patches) through a learned linear projection. A projection is also learned when the
    encoder's width differs from the U-Net's.
    """

    def __init__(
        self,
        image_encoder: CLIPVisionModelWithProjection | None,
        image_processor: CLIPImageProcessor | None,
        cross_attention_dim: int,
        use_clip: bool = True,
        use_concat: bool = True,
        clip_tokens: str = "embed",
    ):
        super().__init__()
        if use_clip and (image_encoder is None or image_processor is None):
            raise ValueError("use_clip needs an image encoder and its processor")
        self.image_encoder = image_encoder if use_clip else None
        self.image_processor = image_processor
        self.cross_attention_dim = cross_attention_dim
        self.use_clip = use_clip
        self.use_concat = use_concat
        self.clip_tokens = clip_tokens
        self.projection: nn.Linear | None = None
        if use_clip:
            width = (
                image_encoder.config.hidden_size if clip_tokens == "patches" else image_encoder.config.projection_dim
            )
            if clip_tokens == "patches" or width != cross_attention_dim:
                self.projection = nn.Linear(width, cross_attention_dim)

    @classmethod
    def from_components(cls, components, model) -> SourceConditioner:
        """The conditioner over built components (`models.components.Components`) as `model`
        (a `ModelConfig`) switches its paths."""
        return cls(
            components.image_encoder,
            components.image_processor,
            components.unet.config.cross_attention_dim,
            use_clip=model.use_clip,
            use_concat=model.use_concat,
            clip_tokens=model.clip_tokens,
        )

    def clip_pixels(self, source: torch.Tensor, unit_range: bool = False) -> torch.Tensor:
        """The CLIP processor's recipe on tensors: resize shortest side, centre crop, normalise.
        unit_range: the source is in [0, 1] (or uint8 levels) instead of [-1, 1]."""
        if source.dtype == torch.uint8 and not unit_range:
            raise ValueError("a uint8 source holds levels 0-255: pass unit_range=True")
        processor = self.image_processor
        size = processor.crop_size["height"]
        height, width = source.shape[-2:]
        scale = size / min(height, width)
        # the long side truncated, as CLIPImageProcessor and CLIP's own torchvision Resize compute it
        new_size = (max(size, int(height * scale)), max(size, int(width * scale)))
        # resize first (linear, so it commutes with [-1, 1] → [0, 1]), one channel at a time: no
        # full-size float copy of a large photo
        resize = dict(size=new_size, mode="bicubic", antialias=True, align_corners=False)
        channels = [F.interpolate(unit_float(source[:, c : c + 1]).float(), **resize) for c in range(source.shape[1])]
        pixels = torch.cat(channels, dim=1)
        pixels = pixels if unit_range else (pixels + 1.0) / 2.0
        top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        pixels = pixels[..., top : top + size, left : left + size].clamp(0.0, 1.0)
        mean = torch.tensor(processor.image_mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def clip_features(self, source: torch.Tensor, unit_range: bool = False) -> torch.Tensor:
        """The frozen encoder's output before any learned projection: (B, 1, proj) or (B, 1+P, hidden)."""
        encoder = self.image_encoder
        output = encoder(pixel_values=self.clip_pixels(source, unit_range).to(encoder.device, encoder.dtype))
        features = output.last_hidden_state if self.clip_tokens == "patches" else output.image_embeds.unsqueeze(1)
        return features.float()

    def project(self, features: torch.Tensor, projection: nn.Module | None = None) -> torch.Tensor:
        """CLIP features → cond_tokens. projection: the learned one as training holds it (possibly
        wrapped by DDP or torch.compile, which have no `.weight`); default: this conditioner's own."""
        projection = projection if projection is not None else self.projection
        if projection is None:
            return features
        return projection(features.to(next(projection.parameters()).dtype))

    def tokens(self, source: torch.Tensor, unit_range: bool = False) -> torch.Tensor:
        if not self.use_clip:
            dtype = source.dtype if source.is_floating_point() else torch.float32
            return torch.zeros(source.shape[0], 1, self.cross_attention_dim, device=source.device, dtype=dtype)
        return self.project(self.clip_features(source, unit_range))

    def source_latents(self, vae: AutoencoderKL, source: torch.Tensor) -> torch.Tensor | None:
        return encode_latents(vae, source) if self.use_concat else None

    def forward(
        self, vae: AutoencoderKL, source: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond_tokens, source_latents). keep: (B,) bool; False rows get the null (zero) condition."""
        tokens, latents = self.tokens(source), self.source_latents(vae, source)
        return drop_condition(tokens, latents, keep) if keep is not None else (tokens, latents)

    @staticmethod
    def unet_input(noisy_latents: torch.Tensor, source_latents: torch.Tensor | None) -> torch.Tensor:
        """conv_in's input: the noisy latent, then the source latent (channel order matters)."""
        if source_latents is None:
            return noisy_latents
        return torch.cat([noisy_latents, source_latents.to(noisy_latents.dtype)], dim=1)


def drop_condition(
    tokens: torch.Tensor, source_latents: torch.Tensor | None, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning dropout: rows where `keep` (B,) is False get the null (zero) condition on both paths,
    what image classifier-free guidance contrasts with."""
    tokens = tokens * keep.view(-1, 1, 1).to(tokens.dtype)
    if source_latents is not None:
        source_latents = source_latents * keep.view(-1, 1, 1, 1).to(source_latents.dtype)
    return tokens, source_latents


def guidance_features(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance scales w → (B, dim) sinusoidal features of 1000·(w − 1) (LCM's w-embedding, Luo et al.
    2023: w = 1, no guidance, maps to the features of 0), what a folded U-Net's cond_proj reads."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=scale.device) / max(half - 1, 1))
    angles = 1000.0 * (scale.float()[:, None] - 1.0) * frequencies[None]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(features, (0, dim % 2))


def folded_guidance(unet) -> int | None:
    """The width of the U-Net's guidance-scale input (`time_cond_proj_dim`), None when it has none."""
    module = getattr(unet, "module", unet)  # DDP keeps the model, and its config, under .module
    config = getattr(module, "config", None)
    return None if config is None else config.get("time_cond_proj_dim")


def guided_prediction(
    unet,
    latents: torch.Tensor,
    t,
    tokens: torch.Tensor,
    source_latents: torch.Tensor | None,
    labels: torch.Tensor | None,
    guidance: float | torch.Tensor,
    fold: bool = False,
) -> torch.Tensor:
    """The U-Net's output (float32) for a batch, conditioned on (tokens, source_latents). guidance > 1:
    image classifier-free guidance ε̂ = ε_∅ + s(ε_c − ε_∅) against the null (zero) condition that
    conditioning dropout trains, the conditional and null halves in one batched pass; a (B,) tensor
    gives each row its own scale (both halves always run). fold=True, for a U-Net distilled with the
    guidance scale as an input (`time_cond_proj_dim`): the scale goes in as that input instead, one pass of
    the batch; without fold a U-Net runs as the undistilled model (as distillation's teacher does when it
    shares its layers with a LoRA student)."""
    folded = folded_guidance(unet) if fold else None
    scales = torch.as_tensor(guidance, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
    doubled = folded is None and (isinstance(guidance, torch.Tensor) or guidance > 1.0)
    if doubled:
        latents = torch.cat([latents, latents])
        tokens = torch.cat([tokens, torch.zeros_like(tokens)])
        if source_latents is not None:
            source_latents = torch.cat([source_latents, torch.zeros_like(source_latents)])
        if labels is not None:
            labels = torch.cat([labels, labels])
        if isinstance(t, torch.Tensor) and t.numel() > 1:  # a timestep per row
            t = torch.cat([t, t])
    # a U-Net in training may be wrapped (DDP), which has no .dtype
    dtype = unet.dtype if hasattr(unet, "dtype") else next(unet.parameters()).dtype
    model_input = SourceConditioner.unet_input(latents, source_latents).to(dtype)
    extra = {} if folded is None else {"timestep_cond": guidance_features(scales, folded).to(dtype)}
    output = unet(model_input, t, encoder_hidden_states=tokens.to(dtype), class_labels=labels, **extra).sample.float()
    if doubled:
        conditional, unconditional = output.chunk(2)
        output = unconditional + scales.view(-1, 1, 1, 1) * (conditional - unconditional)
    return output


@dataclass
class SourceCondition:
    """What the photo contributes to every step and tile, computed once per image."""

    tokens: torch.Tensor  # (1, T, D) for every tile, or (n, T, D): row i for tiles[i]
    latents: torch.Tensor | None  # (1, C, h, w), None without the concat path
    tiles: list[Tile] | None = None  # the denoising tiles (latent units) of per-tile tokens

    def __post_init__(self):
        self._rows = None if self.tiles is None else {t: i for i, t in enumerate(self.tiles)}

    def tokens_for(self, tiles: list[Tile]) -> torch.Tensor:
        """(len(tiles), T, D): the tokens each of these denoising tiles is conditioned on."""
        if self._rows is None:
            return self.tokens.expand(len(tiles), -1, -1)
        return self.tokens[[self._rows[t] for t in tiles]]  # a tile not planned here: KeyError
