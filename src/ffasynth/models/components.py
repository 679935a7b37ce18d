"""Build the model's components from a config: VAE, denoising U-Net (with the 8-channel conv_in
surgery), CLIP image encoder + its preprocessing, and the training noise scheduler.

Shapes come from `ModelConfig` (defaults = SD1.5 + CLIP ViT-L/14; the `tiny` preset shrinks them)
when a component has no weights to load; `model.pretrained`, `model.vae` and `model.image_encoder`
point at real weights (see `models/loading.py`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ffasynth.config import Config, DistillConfig, ModelConfig
from ffasynth.errors import ConfigError
from ffasynth.models import base
from ffasynth.models.architecture import clip_config, clip_processor, unet_config, unet_in_channels, vae_config
from ffasynth.models.loading import load_image_encoder, load_unet_and_vae, load_vae
from ffasynth.models.lora import add_student_adapters

log = logging.getLogger(__name__)


@dataclass
class Components:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    image_encoder: CLIPVisionModelWithProjection | None
    image_processor: CLIPImageProcessor | None
    scheduler: DDPMScheduler
    # Where each frozen component came from ("" = random init, saved with the run).
    sources: dict[str, str]


def widen_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> UNet2DConditionModel:
    """conv_in: C → C + extra input channels; the new weights are zero, so the output is unchanged
    for any content in the new channels until training moves them (InstructPix2Pix's surgery)."""
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        dtype=old.weight.dtype,
        device=old.weight.device,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
    return unet


def add_phase_embedding(unet: UNet2DConditionModel, num_phases: int) -> None:
    """Give the U-Net an FFA-phase input (early/late) added to its time embedding, zero-initialised
    so a pretrained U-Net's output is unchanged until training moves it."""
    if not num_phases or getattr(unet, "class_embedding", None) is not None:
        return
    unet.class_embedding = nn.Embedding(num_phases, unet.time_embedding.linear_2.out_features)
    nn.init.zeros_(unet.class_embedding.weight)
    unet.register_to_config(num_class_embeds=num_phases)


GUIDANCE_EMBEDDING_DIM = 256  # LCM's width for the guidance-scale features (conditioning.guidance_features)


def add_guidance_embedding(unet: UNet2DConditionModel, dim: int = GUIDANCE_EMBEDDING_DIM) -> None:
    """Give the U-Net the guidance scale as an input (diffusers' `time_cond_proj_dim`: a linear map of the
    scale's features added to the timestep features before the time MLP), zero-initialised so the
    output is the unguided one's until distillation moves it. A U-Net saved with it reloads with it."""
    if getattr(unet.time_embedding, "cond_proj", None) is not None:
        return
    width = unet.time_embedding.linear_1.in_features
    weight = unet.time_embedding.linear_1.weight
    unet.time_embedding.cond_proj = nn.Linear(dim, width, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    unet.register_to_config(time_cond_proj_dim=dim)


def make_student(unet, config: DistillConfig):
    """The student for `unet` (the frozen teacher): LoRA adapters on it (rank > 0; returned: the same
    module) or a whole trainable copy; either with the guidance-scale input."""
    if config.lora.rank:
        add_guidance_embedding(unet)
        add_student_adapters(unet, config.lora)
        return unet
    student = copy.deepcopy(unet)
    add_guidance_embedding(student)
    return student.requires_grad_(True)


def training_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD1.5's noise schedule (scaled-linear β from 0.00085 to 0.012)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def sampling_scheduler(training: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """The sampler exported pipelines (and stage 2's sampler latents) use: DPM-Solver++ (2nd order) on
    the training noise schedule and prediction type."""
    return DPMSolverMultistepScheduler.from_config(training.config, algorithm_type="dpmsolver++", solver_order=2)


def set_attention(unet: UNet2DConditionModel, attention: str) -> None:
    """SDPA (torch's fused attention, the default) or the eager maths, for comparison and debugging."""
    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def refuse_silent_random_init(model: ModelConfig) -> None:
    """One sentence naming each weight option left empty, unless model.allow_random_init asks for
    random values (a U-Net, VAE or CLIP trained from scratch is not the paper's method)."""
    parts, options = [], []
    if not model.pretrained:
        parts += ["U-Net"] if model.vae else ["U-Net", "VAE"]
        options.append(
            "model.pretrained to an SD1.5 diffusers folder, hub id or single-file .safetensors "
            "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    if model.use_clip and not model.image_encoder:
        parts.append("CLIP image encoder")
        options.append("model.image_encoder to a CLIP vision folder or hub id (e.g. openai/clip-vit-large-patch14)")
    if parts and not model.allow_random_init and base.resolve(model.base) is None:
        raise ConfigError(
            f"no weights are named for the {_listed(parts)}, which would start from random values: set "
            f"{' and '.join(options)}, or model.allow_random_init=true to train from random initialisation"
        )


def check_loaded_architecture(unet: UNet2DConditionModel, vae: AutoencoderKL, model: ModelConfig) -> None:
    """Loaded weights of another family are refused in one line before anything is built on them (an SDXL
    U-Net loaded, then failed deep in its first forward; an SD2 one trained behind a new random projection)."""
    if model.pretrained and unet.config.addition_embed_type is not None:
        raise ConfigError(
            f"model.pretrained={model.pretrained}: its U-Net takes added {unet.config.addition_embed_type!r} "
            "embeddings (an SDXL-family model); ffasynth fine-tunes SD1.5-family U-Nets"
        )
    if model.pretrained and unet.config.cross_attention_dim != model.cross_attention_dim:
        raise ConfigError(
            f"model.pretrained={model.pretrained}: its U-Net's cross-attention is {unet.config.cross_attention_dim} "
            f"wide but model.cross_attention_dim is {model.cross_attention_dim} (SD1.5: 768, SD2: 1024); set "
            f"model.cross_attention_dim={unet.config.cross_attention_dim} to train a projection to it from CLIP"
        )
    latents = model.latent_channels
    if model.pretrained and unet.config.out_channels != latents:
        raise ConfigError(
            f"model.pretrained={model.pretrained}: its U-Net draws {unet.config.out_channels} latent channels but "
            f"model.latent_channels is {latents} (SD1.5: 4)"
        )
    if (model.pretrained or model.vae) and vae.config.latent_channels != latents:
        key = f"model.vae={model.vae}" if model.vae else f"model.pretrained={model.pretrained}"
        raise ConfigError(
            f"{key}: its VAE has {vae.config.latent_channels} latent channels but model.latent_channels is "
            f"{latents} (SD1.5: 4); give a VAE of the U-Net's latent space"
        )


def build_components(config: Config, *, random_weights: bool = False) -> Components:
    """Everything stage 1 needs, from real weights where the config names them; random init only
    where model.allow_random_init asks for it (or `random_weights`: every part random, for tests and
    benchmarks). `sources` records where each part came from ("" = random init).

    The U-Net always ends with `unet_in_channels(config.model)` input channels (8 with the source
    latent concatenated), widened by zero-initialised channels when loaded with 4.
    """
    model = config.model
    if not random_weights:
        refuse_silent_random_init(model)
    sources = {"unet": "", "vae": "", "image_encoder": ""}
    if model.pretrained and not random_weights:
        unet, vae = load_unet_and_vae(model.pretrained, model)
        sources["unet"] = sources["vae"] = model.pretrained
    else:
        # From scratch there is no pretrained behaviour to preserve: conv_in gets all its input channels
        # with the default initialisation (zero-initialised source channels would only slow learning).
        unet = UNet2DConditionModel(**unet_config(model, in_channels=unet_in_channels(model)))
        vae = AutoencoderKL(**vae_config(model))
    if model.vae and not random_weights:
        vae = load_vae(model.vae)
        sources["vae"] = model.vae
    if not random_weights:
        check_loaded_architecture(unet, vae, model)
    wanted = unet_in_channels(model)
    if unet.config.in_channels == model.latent_channels and wanted > model.latent_channels:
        widen_conv_in(unet, wanted - model.latent_channels)
    elif unet.config.in_channels != wanted:
        raise ConfigError(
            f"the U-Net has {unet.config.in_channels} input channels but model.use_concat={model.use_concat} "
            f"needs {wanted}"
        )
    add_phase_embedding(unet, model.num_phases)
    image_encoder = processor = None
    if model.use_clip:
        if model.image_encoder and not random_weights:
            image_encoder, processor = load_image_encoder(model.image_encoder)
            sources["image_encoder"] = model.image_encoder
        else:
            image_encoder = CLIPVisionModelWithProjection(clip_config(model))
            processor = clip_processor(model.clip_image_size)
    if not random_weights:
        # the base fills every part no weight option named (model.pretrained, model.vae, model.image_encoder)
        named = {"unet": bool(model.pretrained), "vae": bool(model.pretrained or model.vae)}
        named["image_encoder"] = bool(model.image_encoder)
        parts = {"unet": unet, "vae": vae, "image_encoder": image_encoder}
        sources.update(base.apply(model.base, model, {k: v for k, v in parts.items() if not named[k]}))
    set_attention(unet, model.attention)
    vae.requires_grad_(False)
    if image_encoder is not None:
        image_encoder.requires_grad_(False).eval()
    vae.eval()
    scheduler = training_scheduler(config.stage1.num_train_timesteps, config.stage1.prediction_type)
    return Components(vae, unet, image_encoder, processor, scheduler, sources)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
