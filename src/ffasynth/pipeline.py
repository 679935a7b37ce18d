"""FFASynthesisPipeline: retinal photograph → synthetic fluorescein angiogram, at the photo's size.

photo → pad (reflect) to a multiple of the model's downsampling → conditioning, computed once per
image (CLIP tokens of what training showed CLIP, `clip_view`: each denoising tile's own pixels,
"tile", or the whole photo, "whole"; the source latent, encoded in tiles) → N noise latents →
scheduler loop, each step's U-Net prediction blended over overlapping latent tiles, each tile with
its own tokens → tiled decode → crop back → mean of the N samples (the image) and their per-pixel
std (the uncertainty).

A diffusers pipeline: components are registered (save_pretrained / from_pretrained write and read
diffusers' folder format, safetensors only) and the scheduler is swappable, e.g.
`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # also looked up here by from_pretrained for TokenProjection
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from ffasynth.data.dataset import requested_phase
from ffasynth.data.io import source_tensor, unit_float
from ffasynth.data.registration import field_of_view
from ffasynth.data.transforms import whole_view
from ffasynth.errors import FFASynthError
from ffasynth.models.architecture import downsampling_factor
from ffasynth.models.conditioning import (
    SourceCondition,
    SourceConditioner,
    decode_latents,
    encode_latents,
    guided_prediction,
)
from ffasynth.models.folders import check_pipeline_folder
from ffasynth.models.lora import ADAPTER_FOLDER, load_lora
from ffasynth.models.preview_decoder import PreviewDecoder
from ffasynth.tiling import (
    TileSettings,
    check_tile_settings,
    latent_tile,
    pad_to_multiple,
    plan_tiles,
    tiled_decode,
    tiled_encode,
    tiled_map,
)

__all__ = ["FFASynthesisOutput", "FFASynthesisPipeline", "TileSettings", "TokenProjection", "source_tensor"]


class TokenProjection(ModelMixin, ConfigMixin):
    """The learned linear map CLIP features → cross-attention tokens, as a savable pipeline component."""

    @register_to_config
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TokenProjection:
        projection = cls(linear.in_features, linear.out_features)
        projection.linear.load_state_dict(linear.state_dict())
        return projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


@dataclass
class FFASynthesisOutput(BaseOutput):
    """One entry per input image. images: PIL "L" images ("pil"), float32 (H, W, 1) arrays in [0, 1]
    ("np") or (1, H, W) tensors ("pt"). uncertainty (num_samples > 1, else None): the per-pixel
    standard deviation over the samples, in the same [0, 1] units, as arrays ("pil", "np") or tensors."""

    images: list
    uncertainty: list | None = None


class FFASynthesisPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "image_encoder->projection->unet->vae"
    _optional_components = ["image_encoder", "image_processor", "projection", "preview_decoder"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler,
        image_encoder=None,
        image_processor=None,
        projection: TokenProjection | None = None,
        preview_decoder: PreviewDecoder | None = None,
        use_clip: bool = True,
        use_concat: bool = True,
        clip_tokens: str = "embed",
        num_phases: int = 0,
        prediction_type: str = "epsilon",
        tile_size: int = 768,
        image_guidance_scale: float = 1.0,
        clip_view: str = "whole",  # folders saved before the setting existed encoded the whole photo
        num_inference_steps: int = 20,
        guidance_input: bool = False,
        fov_threshold: float = 0.04,  # data.fov_threshold: outside_field="black" masks the field as training did
    ):
        super().__init__()
        if use_clip and (image_encoder is None or image_processor is None):
            raise FFASynthError("use_clip needs an image_encoder and an image_processor")
        self.register_modules(
            vae=vae,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            image_processor=image_processor,
            projection=projection,
            preview_decoder=preview_decoder,
        )
        self.register_to_config(
            use_clip=use_clip,
            use_concat=use_concat,
            clip_tokens=clip_tokens,
            num_phases=num_phases,
            prediction_type=prediction_type,
            tile_size=tile_size,
            image_guidance_scale=image_guidance_scale,  # the default when a call gives none
            clip_view=clip_view,
            num_inference_steps=num_inference_steps,  # the default when a call gives none (4 for an LCM student)
            guidance_input=guidance_input,  # the U-Net takes the guidance scale as an input (`train distill`)
            fov_threshold=fov_threshold,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A folder written by save_pretrained (or `ffasynth export`); safetensors weights only. A
        missing or damaged weights file is refused in one line naming it."""
        kwargs.setdefault("use_safetensors", True)
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            check_pipeline_folder(folder)
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if (folder / ADAPTER_FOLDER).is_dir():  # exported with `--lora separate`: the U-Net's adapters apart
            load_lora(pipeline.unet, folder / ADAPTER_FOLDER)
        return pipeline

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae.config)

    @property
    def unet_scale_factor(self) -> int:
        return downsampling_factor(self.unet.config)

    @property
    def max_steps(self) -> int:
        """An LCM student's solver grid (50), else training steps − 1: at N, "leading" spacing (DDIM, DDPM) ends
        past the schedule (t = N − 1 + offset) and "linspace" (DPM-Solver++) gives two steps one t (NaN)."""
        config = self.scheduler.config
        if config.get("original_inference_steps"):
            return int(config["original_inference_steps"])
        return int(config.get("num_train_timesteps", 1000)) - 1

    def conditioner(self) -> SourceConditioner:
        """The conditioning paths over the pipeline's current components (the projection shared, not copied)."""
        config = self.config
        conditioner = SourceConditioner(
            self.image_encoder if config.use_clip else None,
            self.image_processor,
            self.unet.config.cross_attention_dim,
            use_clip=config.use_clip,
            use_concat=config.use_concat,
            clip_tokens=config.clip_tokens,
        )
        if conditioner.projection is not None:
            if self.projection is None:
                raise FFASynthError("this model's CLIP tokens need a learned projection, but the pipeline has none")
            conditioner.projection = self.projection  # the component itself: an offload hook sits on its forward
        return conditioner

    @torch.no_grad()
    def encode_source(
        self,
        source: torch.Tensor,
        tile_px: int,
        overlap_px: int,
        photo_size: tuple[int, int] | None = None,
        batch_size: int = 8,
    ) -> SourceCondition:
        """source (1, 3, H, W), uint8 levels or float in [0, 1], H and W multiples of the downsampling,
        on any device (a large photo stays in host memory: only CLIP's resized copy and one tile at a
        time go to the model, converted to float there). photo_size: (h, w) before padding (the
        "whole" view is of the photo, as training's); batch_size: tiles per CLIP pass ("tile")."""
        device = self._execution_device
        conditioner = self.conditioner()
        tiles = None
        if self.config.get("clip_view", "whole") == "tile" and self.config.use_clip:
            # the tiles translate's tiled_map will plan; each gets CLIP of its own pixel window
            factor = self.vae_scale_factor
            tile, overlap = latent_tile(tile_px, overlap_px, factor, self.unet_scale_factor)
            tiles = plan_tiles(source.shape[-2] // factor, source.shape[-1] // factor, tile, overlap)
            chunks = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]
            windows = (torch.cat([source[(...,) + t.slices(factor)] for t in chunk]) for chunk in chunks)
            tokens = torch.cat([conditioner.tokens(w, unit_range=True).to(device, self.unet.dtype) for w in windows])
        else:
            height, width = source.shape[-2:] if photo_size is None else photo_size
            photo = source[..., :height, :width]
            tokens = conditioner.tokens(whole_view(photo) if self.config.use_clip else photo, unit_range=True)
            tokens = tokens.to(device, self.unet.dtype)
        latents = None
        if self.config.use_concat:
            vae = self.vae

            def encode(pixels: torch.Tensor) -> torch.Tensor:
                return encode_latents(vae, unit_float(pixels.to(device)).to(vae.dtype) * 2.0 - 1.0).float()

            latents = tiled_encode(encode, source, tile_px, None, self.vae_scale_factor)  # half-tile overlap
        return SourceCondition(tokens, latents, tiles)

    def _phase_label(self, phase: str | None, device) -> torch.Tensor | None:
        index = requested_phase(phase, self.config.num_phases)
        return None if index is None else torch.tensor([index], device=device)

    def _predict(self, condition: SourceCondition, label, num_samples: int, guidance: float, t):
        """The U-Net's prediction for stacked latent tiles, source-latent tiles alongside (concat path)."""

        def predict(latents: torch.Tensor, source_latents: torch.Tensor | None = None, *, tiles) -> torch.Tensor:
            batch = latents.shape[0]
            tokens = condition.tokens_for(tiles).repeat_interleave(num_samples, dim=0)  # tile-major, as latents
            if source_latents is not None:
                source_latents = source_latents.repeat_interleave(num_samples, dim=0)
            labels = None if label is None else label.expand(batch)
            fold = bool(self.config.get("guidance_input", False))  # a distilled U-Net: the scale is its input
            return guided_prediction(self.unet, latents, t, tokens, source_latents, labels, guidance, fold)

        return predict

    @torch.no_grad()
    def sample_image(
        self,
        source: torch.Tensor,
        num_inference_steps: int,
        generator: torch.Generator | None,
        image_guidance_scale: float,
        num_samples: int,
        phase: str | None,
        tiles: TileSettings,
        start_strength: float = 1.0,
        decoder: str = "vae",
        outside_field: str = "model",
    ) -> torch.Tensor:
        """One photo (3, H, W), uint8 levels or float in [0, 1] → num_samples angiograms (N, 1, H, W)
        in [0, 1], on the CPU. start_strength < 1: start from the photo's latent noised to that fraction
        of the schedule (the first steps skipped) instead of pure noise. decoder "preview": the tiny
        preview decoder instead of the VAE's. outside_field "black": 0 outside the photo's field_of_view
        (at the training's data.fov_threshold)."""
        device = self._execution_device
        height, width = source.shape[-2:]
        vae_factor = self.vae_scale_factor
        pixels = pad_to_multiple(source[None], vae_factor * self.unet_scale_factor)  # a view when no padding
        padded = pixels.shape[-2:]
        longest = max(padded)
        tile_px, overlap_px = (longest, 0) if tiles.size <= 0 or longest <= tiles.size else (tiles.size, tiles.overlap)
        condition = self.encode_source(pixels, tile_px, overlap_px, (height, width), tiles.batch_size)
        del pixels
        label = self._phase_label(phase, device)
        tile, overlap = latent_tile(tile_px, overlap_px, vae_factor, self.unet_scale_factor)
        shape = (num_samples, self.unet.config.out_channels) + tuple(s // vae_factor for s in padded)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if start_strength < 1.0:  # source-started: the photo's latent noised to an intermediate t (as img2img)
            skip = min(round(num_inference_steps * (1.0 - start_strength)), num_inference_steps - 1)
            timesteps = timesteps[skip * self.scheduler.order :]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(skip * self.scheduler.order)
            latents = self.scheduler.add_noise(condition.latents.expand(shape), latents, timesteps[:1])
        else:
            latents = latents * self.scheduler.init_noise_sigma
        sources = [] if condition.latents is None else [condition.latents]
        # stochastic schedulers (DDPM, Euler ancestral, SDE solvers) draw their noise from the same generator
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        for t in self.progress_bar(timesteps):
            predict = self._predict(condition, label, num_samples, image_guidance_scale, t)
            model_input = self.scheduler.scale_model_input(latents, t)
            prediction = tiled_map(
                predict, [model_input, *sources], tile, overlap, batch_size=tiles.batch_size, pass_tiles=True
            )
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
        vae, preview = self.vae, self.preview_decoder
        decode_tile = longest if tiles.decode_size <= 0 else min(longest, tiles.decode_size)
        decode_tile = max(1, decode_tile // vae_factor)

        def decode(z: torch.Tensor) -> torch.Tensor:  # one sample at a time: the decoder's peak memory is one's
            decoded = [preview(one) if decoder == "preview" else decode_latents(vae, one) for one in z.split(1)]
            return torch.cat([one.float() for one in decoded])

        images = tiled_decode(decode, latents, decode_tile, decode_tile // 4, vae_factor, "cpu")  # tile by tile, host
        images = images[..., :height, :width].add_(1.0).div_(2.0).clamp_(0.0, 1.0)  # [-1, 1] → [0, 1], in place
        if outside_field == "black":
            levels = source.cpu() if source.dtype == torch.uint8 else unit_float(source).cpu()  # no float copy of uint8
            threshold = self.config.fov_threshold  # a folder saved before it was recorded: __init__'s 0.04
            images.mul_(torch.from_numpy(field_of_view(levels.permute(1, 2, 0).numpy(), threshold)))
        return images

    def check_inputs(
        self,
        num_inference_steps: int,
        image_guidance_scale: float | None,
        num_samples: int,
        output_type: str = "pil",
        phase: str | None = None,
        start_strength: float = 1.0,
        decoder: str = "vae",
        outside_field: str = "model",
    ) -> None:
        """Raise FFASynthError (one line) for settings this pipeline cannot run (named as `__call__` names them)."""
        steps, guidance = num_inference_steps, image_guidance_scale
        self._phase_label(phase, "cpu")
        if outside_field not in ("black", "model"):
            raise FFASynthError(f"outside_field {outside_field!r}: allowed 'black' or 'model'")
        if decoder not in ("vae", "preview") or (decoder == "preview" and self.preview_decoder is None):
            raise FFASynthError(
                f"decoder {decoder!r}: allowed 'vae', or 'preview' for a pipeline with a preview decoder "
                "(made by `ffasynth train distill`)"
            )
        if not (0.0 < start_strength <= 1.0) or (start_strength < 1.0 and not self.config.use_concat):
            raise FFASynthError(
                f"start_strength {start_strength}: allowed 0 < s <= 1, and s < 1 only for a model with the concat path"
            )
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= steps <= self.max_steps:
            raise FFASynthError(f"num_inference_steps {steps!r}: allowed a whole number from 1 to {self.max_steps}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples < 1:
            raise FFASynthError(f"num_samples {num_samples!r}: allowed a whole number from 1")  # numpy ints pass
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 1.0):  # None: the config's value
            raise FFASynthError(f"image_guidance_scale {guidance}: allowed a finite number >= 1 (1 = no guidance)")
        if output_type not in ("pil", "np", "pt"):
            raise FFASynthError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        scheduler_type = self.scheduler.config.get("prediction_type", self.config.prediction_type)
        if scheduler_type != self.config.prediction_type:
            raise FFASynthError(
                f"the scheduler predicts {scheduler_type!r} but the model was trained for "
                f"{self.config.prediction_type!r}; build it with from_config(pipe.scheduler.config)"
            )

    @torch.no_grad()
    def __call__(
        self,
        image,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image_guidance_scale: float | None = None,
        num_samples: int = 1,
        phase: str | None = None,
        output_type: str = "pil",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        decode_tile_size: int | None = None,
        tile_batch_size: int = 8,
        return_dict: bool = True,
        start_strength: float = 1.0,
        decoder: str = "vae",
        outside_field: str = "model",
    ):
        """Translate one photo or a list of photos (any size; paths, PIL, arrays or [0, 1] tensors).

        image_guidance_scale: 1 = one U-Net pass per step; s > 1 = ε_∅ + s(ε_c − ε_∅) against the null (zero)
        condition, both in one batched pass; None = the pipeline's config value (exported from
        `stage1.image_guidance_scale`; 1 for a pipeline that records none). num_samples: samples per photo, drawn in
        one batch; > 1 returns their mean and per-pixel std. generator: one for all photos (drawn from in turn, so
        a photo's result depends on those before it) or a list, one per photo (each as if translated alone).
        phase: "early"/"late" (default early) when the model has a phase input. tile_size/tile_overlap/
        decode_tile_size: in pixels (defaults: the training crop, a quarter of it, max(tile, 1024)); 0 = the whole
        image in one piece (see TileSettings). start_strength: 1 = start from pure noise; s in (0, 1) = from the
        photo's latent noised to the schedule's fraction s (the first steps skipped; needs the concat path).
        num_inference_steps: None = the config's (20; 4 for the tiny preset and an LCM student). decoder: "vae", or
        "preview" (the tiny preview decoder of a distilled pipeline: a fast, softer image). outside_field: "model"
        (the model's output everywhere) or "black" (0 outside the photo's field of view, where no angiogram has a
        signal: looks like a real angiogram; scores lower SSIM, see the README).
        """
        guidance, steps = self.config.get("image_guidance_scale", 1.0), self.config.get("num_inference_steps", 20)
        image_guidance_scale = float(guidance) if image_guidance_scale is None else image_guidance_scale
        num_inference_steps = int(steps) if num_inference_steps is None else num_inference_steps
        self.check_inputs(
            num_inference_steps=num_inference_steps,
            image_guidance_scale=image_guidance_scale,
            num_samples=num_samples,
            output_type=output_type,
            phase=phase,
            start_strength=start_strength,
            decoder=decoder,
            outside_field=outside_field,
        )
        tile_size = self.config.tile_size if tile_size is None else tile_size
        check_tile_settings(tile_size, tile_overlap, decode_tile_size, self.vae_scale_factor, self.unet_scale_factor)
        tiles = TileSettings.resolve(tile_size, tile_overlap, decode_tile_size, tile_batch_size)
        photos = image if isinstance(image, (list, tuple)) else [image]
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(photos)
        if len(generators) != len(photos):
            raise FFASynthError(f"{len(generators)} generators for {len(photos)} photos: give one per photo")
        means, stds = [], []
        for photo, draws in zip(photos, generators, strict=True):
            settings = (num_inference_steps, draws, image_guidance_scale, num_samples, phase, tiles, start_strength)
            samples = self.sample_image(source_tensor(photo), *settings, decoder, outside_field)
            means.append(samples[0] if num_samples == 1 else samples.mean(dim=0))
            stds.append(samples.std(dim=0) if num_samples > 1 else None)  # sample std (n − 1)
        self.maybe_free_model_hooks()
        images = [_convert(m, output_type) for m in means]
        uncertainty = None
        if num_samples > 1:
            uncertainty = [s if output_type == "pt" else s.numpy().transpose(1, 2, 0) for s in stds]
        if not return_dict:
            return images, uncertainty
        return FFASynthesisOutput(images=images, uncertainty=uncertainty)


def _convert(image: torch.Tensor, output_type: str):
    """(1, H, W) in [0, 1] → the requested output type."""
    if output_type == "pt":
        return image
    array = image.numpy().transpose(1, 2, 0)
    if output_type == "np":
        return array
    return Image.fromarray((array[..., 0] * 255.0 + 0.5).astype(np.uint8))


# `diffusers.DiffusionPipeline.from_pretrained(folder)` looks the folder's `_class_name` up in the diffusers
# namespace: registering the class there lets plain diffusers load an exported folder once this module is imported.
setattr(diffusers, FFASynthesisPipeline.__name__, FFASynthesisPipeline)
