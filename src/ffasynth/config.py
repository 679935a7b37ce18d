"""One typed configuration tree (plain dataclasses), YAML in and out, presets and `key=value`
overrides. Unknown keys and bad values are refused with the dotted key's name.

Add a section by writing a dataclass and a field on `Config`; loading, saving, overrides and
validation follow from the type hints (int, float, bool, str, Literal[...], X | None, tuple/list).
Cross-field rules go in a section's `validate()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ffasynth.configtree import build, merge, overrides_to_dict, parse_override, read_yaml, validate
from ffasynth.configtree import require as _require
from ffasynth.errors import ConfigError
from ffasynth.files import atomic_write_text
from ffasynth.presets import PRESETS

__all__ = ["Config", "PRESETS", "load_config", "save_config", "from_dict", "to_dict", "parse_override", "validate"]

# The one list of pair layouts: data/pairs.py finds pairs in each, data.layout accepts each or "auto"
# (detect). Kept here, the lowest layer, so the config needs nothing from data/ (nor torch).
LAYOUTS = ("uwf", "isfahan", "manifest", "named")
Layout = Literal[("auto", *LAYOUTS)]
# Seeds feed torch's and numpy's generators: both take 0 to 2**32 - 1 (numpy refuses a negative one).
SEED_MAX = 2**32 - 1


@dataclass
class DataConfig:
    layout: Layout = "auto"
    # uwf layout: which FFA phase(s) are targets; "both" makes one sample per phase.
    phase: Literal["early", "late", "both"] = "both"
    crop_size: int = 768
    hflip: bool = True
    vflip: bool = False
    # Crops: windows with at least this fraction in the field of view (low: inference tiles hold its edge too)
    min_fov_fraction: float = 0.1
    fov_threshold: float = 0.04  # source intensity (0-1) above which a pixel is inside the FOV
    zoom_out: float = 1.0  # > 1: crops also cover windows up to zoom_out x crop_size, shrunk (transforms)
    source_jitter: float = 0.0  # > 0: each crop's photo gets random gains and a gamma (transforms.jitter_photo)
    max_pixels: int = 64_000_000
    # each image decoded once, with its FOV mask and crop-window counts, into .npy files every loader worker
    # memory-maps (data.cache); cache_dir: where (null: a temporary folder per run process, removed at its end;
    # a folder: kept and shared by the processes and runs that name it, e.g. on a local SSD)
    cache_images: bool = True
    cache_dir: str | None = None

    def validate(self) -> None:
        _require(self.crop_size >= 8, "data.crop_size", "must be at least 8")
        _require(0.0 <= self.min_fov_fraction <= 1.0, "data.min_fov_fraction", "must be in [0, 1]")
        _require(0.0 <= self.fov_threshold < 1.0, "data.fov_threshold", "must be in [0, 1)")
        _require(1.0 <= self.zoom_out <= 16.0, "data.zoom_out", "must be in [1, 16] (1 = no zoom)")
        _require(0.0 <= self.source_jitter < 1.0, "data.source_jitter", "must be in [0, 1) (0 = off)")
        _require(self.max_pixels > 0, "data.max_pixels", "must be positive")


@dataclass
class ModelConfig:
    """Shapes for random initialisation (defaults: exactly SD1.5 + CLIP ViT-L/14) and where real weights are.

    pretrained: an SD1.5 diffusers folder, a hub id, or a single-file .safetensors checkpoint (U-Net + VAE).
    vae: a `ffasynth train vae` run folder or a diffusers VAE folder; replaces pretrained's VAE.
    image_encoder: a CLIP vision folder (or one with an image_encoder/ subfolder) or a hub id, e.g.
    openai/clip-vit-large-patch14 (a .bin-only encoder: `ffasynth weights convert-clip` first).
    allow_random_init: a component with no weights named above starts from random values only when
    this is true (the tiny preset, which has no pretrained weights); otherwise training refuses.
    base: a pretrained base model file (models/base.py) for the parts no option above names: `tiny`
    (shipped in the package, made by `ffasynth base build`), a path, or none (random initialisation).
    """

    pretrained: str | None = None
    base: str | None = None
    vae: str | None = None
    image_encoder: str | None = None
    allow_random_init: bool = False
    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_layers_per_block: int = 2
    unet_attention_heads: int = 8
    unet_norm_groups: int = 32
    cross_attention_dim: int = 768
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_groups: int = 32
    latent_channels: int = 4
    latent_scaling: float = 0.18215
    clip_hidden_size: int = 1024
    clip_layers: int = 24
    clip_heads: int = 16
    clip_intermediate_size: int = 4096
    clip_patch_size: int = 14
    clip_image_size: int = 224
    # Conditioning paths (ablations): CLIP tokens into cross-attention, source latent concatenated to conv_in.
    use_clip: bool = True
    clip_tokens: Literal["embed", "patches"] = "embed"
    # What CLIP sees, the same in training and inference: "tile" = the training crop / each denoising
    # tile's own pixels; "whole" = the whole photo (its 224² CLIP view) for every crop and tile. Tile by
    # default: a token per crop, not one per eye; on the UWF pairs (tiny, 200 steps) the two measured alike.
    clip_view: Literal["tile", "whole"] = "tile"
    use_concat: bool = True
    attention: Literal["sdpa", "eager"] = "sdpa"
    # FFA phases the U-Net is told about (early/late, a zero-initialised embedding); 0 = no phase input.
    num_phases: int = 2

    def validate(self) -> None:
        _require(len(self.unet_channels) >= 2, "model.unet_channels", "needs at least two levels")
        _require(len(self.vae_channels) >= 1, "model.vae_channels", "needs at least one level")
        for key in ("unet_channels", "vae_channels"):
            groups = self.unet_norm_groups if key == "unet_channels" else self.vae_norm_groups
            bad = [c for c in getattr(self, key) if c % groups]
            _require(not bad, f"model.{key}", f"must be multiples of the norm groups ({groups}), not {bad}")
        _require(self.use_clip or self.use_concat, "model.use_clip", "or model.use_concat must be true")
        _require(0 <= self.num_phases <= 16, "model.num_phases", "must be between 0 and 16")
        _require(self.clip_hidden_size % self.clip_heads == 0, "model.clip_hidden_size", "must divide by clip_heads")
        sizes = "unet_layers_per_block unet_attention_heads cross_attention_dim vae_layers_per_block latent_channels"
        for key in (*sizes.split(), "clip_layers", "clip_heads", "clip_intermediate_size", "clip_patch_size"):
            _require(getattr(self, key) >= 1, f"model.{key}", "must be at least 1")
        _require(all(c >= 1 for c in (*self.unet_channels, *self.vae_channels)), "model.unet_channels", "must be >= 1")
        _require(self.latent_scaling > 0, "model.latent_scaling", "must be positive")
        image, patch = self.clip_image_size, self.clip_patch_size
        _require(image % patch == 0, "model.clip_image_size", f"must be a multiple of clip_patch_size ({patch})")


@dataclass
class TrainConfig:
    """What every training stage's loop shares (`training/loop.py`)."""

    max_steps: int = 10_000
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 1e-5
    lr_warmup_steps: int = 500
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # linear: 1 for half the steps, then to 0
    # adamw8bit: bitsandbytes' 8-bit AdamW (a CUDA GPU with bitsandbytes installed): moments in 2 bytes, not 8
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999  # 0 = no EMA
    ema_device: Literal["same", "cpu"] = "same"  # cpu: the EMA copy leaves the accelerator (a copy per step)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    channels_last: bool = False  # NHWC memory format for the trainable convolutional modules
    compile: bool = False  # torch.compile the trainable modules (first steps slower while it compiles)
    save_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 10
    # DataLoader worker processes preparing batches beside the training step; auto = 0 without a GPU,
    # min(4, cores) with one (data.dataset.loader_workers). A batch is the same with any number.
    num_workers: int | Literal["auto"] = "auto"
    max_bad_steps: int = 20  # non-finite losses in a row before the run stops
    max_minutes: float | None = None  # wall-clock budget: stop (with a checkpoint) when it runs out

    def validate(self) -> None:
        counts = ("max_steps", "batch_size", "gradient_accumulation", "save_every", "sample_every", "log_every")
        for key in (*counts, "keep_checkpoints", "max_bad_steps"):
            _require(getattr(self, key) >= 1, f"{self._section}.{key}", "must be at least 1")
        _require(self.lr > 0, f"{self._section}.lr", "must be positive")
        _require(0.0 <= self.ema_decay < 1.0, f"{self._section}.ema_decay", "must be in [0, 1)")
        _require(self.lr_warmup_steps >= 0, f"{self._section}.lr_warmup_steps", "must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, key) < 1.0, f"{self._section}.{key}", "must be in [0, 1)")
        for key in ("weight_decay", "max_grad_norm"):
            _require(getattr(self, key) >= 0, f"{self._section}.{key}", "must be >= 0 (0 = off)")
        minutes = self.max_minutes
        _require(minutes is None or minutes > 0, f"{self._section}.max_minutes", "must be positive or null (no limit)")
        workers = self.num_workers
        _require(workers == "auto" or workers >= 0, f"{self._section}.num_workers", "must be >= 0 or auto")

    _section = "train"


@dataclass
class VAETrainConfig(TrainConfig):
    """Stage 0: train the VAE (encoder + decoder) on source and target crops when no pretrained one exists."""

    kl_weight: float = 1e-6
    lr: float = 2e-4
    lr_warmup_steps: int = 50
    ema_decay: float = 0.0
    _section = "vae"

    def validate(self) -> None:
        super().validate()
        _require(self.kl_weight >= 0, "vae.kl_weight", "must be >= 0")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the stage-1 U-Net (peft, as diffusers uses them) instead of training all its
    weights: each targeted layer W learns W + (alpha/rank)·B·A, B (out×rank) zero at the start, A (rank×in).
    rank 0 = full fine-tuning. conv_in (it reads the source latent) and the phase embedding stay fully
    trainable. target_modules: layer names (a name or its dotted tail); the attention projections by
    default; "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2" (transformer blocks), "conv1", "conv2"
    (ResNet convolutions) add more."""

    rank: int = 0
    alpha: float | None = None  # None = rank (scale 1)
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    _section = "stage1.lora"

    def validate(self) -> None:
        key = self._section
        _require(self.rank >= 0, f"{key}.rank", "must be >= 0 (0 = full fine-tuning)")
        _require(self.alpha is None or self.alpha > 0, f"{key}.alpha", "must be positive or null (= rank)")
        _require(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")
        _require(not self.rank or bool(self.target_modules), f"{key}.target_modules", "must name a layer")


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: the denoising U-Net on target latents, conditioned on the source."""

    offset_noise_strength: float = 0.1  # noise + s·randn(B, C, 1, 1); 0 = off
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float | None = None  # min-SNR-γ loss weighting (5.0 is the paper's choice); None = off
    conditioning_dropout: float = 0.05  # drop the source (both paths) for image classifier-free guidance
    num_train_timesteps: int = 1000
    sample_steps: int = 20  # DDIM steps for the sample grids written during training
    # the exported pipeline's DPM-Solver++ steps when a call gives none (translate, serve); 20 for SD1.5
    inference_steps: int = 20
    # image classifier-free guidance (sample grids, the exported default); 1 = none, one pass a step (IP2P: 1.5)
    image_guidance_scale: float = 1.0
    # conditioning gain (training/conditioning_gain.py): the loss with shuffled photos minus the loss with the
    # true ones, on the first `cond_gain_items` crops, logged every this many steps; None = sample_every, 0 = off
    cond_gain_every: int | None = None
    cond_gain_items: int = 8
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    rehearsal: float = 0.0  # from a base: share of each epoch's crops that are its procedural pairs (0 = none)
    freeze: tuple[str, ...] = ()  # U-Net name prefixes kept as loaded (a base, model.pretrained); () = all train
    lr: float = 1e-5
    _section = "stage1"

    def validate(self) -> None:
        super().validate()
        _require(self.offset_noise_strength >= 0, "stage1.offset_noise_strength", "must be >= 0")
        _require(0.0 <= self.conditioning_dropout < 1.0, "stage1.conditioning_dropout", "must be in [0, 1)")
        _require(0.0 <= self.rehearsal < 1.0, "stage1.rehearsal", "must be in [0, 1)")
        _require(all(prefix.strip(".") for prefix in self.freeze), "stage1.freeze", "may not hold an empty name")
        _require(self.snr_gamma is None or self.snr_gamma > 0, "stage1.snr_gamma", "must be positive or null")
        _require(self.image_guidance_scale >= 1.0, "stage1.image_guidance_scale", "must be >= 1 (1 = no guidance)")
        every = self.cond_gain_every
        _require(every is None or every >= 0, "stage1.cond_gain_every", "must be >= 0 (0 = off) or null")
        _require(self.cond_gain_items >= 2, "stage1.cond_gain_items", "must be at least 2 (to shuffle photos)")
        _require(self.num_train_timesteps >= 2, "stage1.num_train_timesteps", "must be at least 2")
        most = f"must be in [1, num_train_timesteps - 1 = {self.num_train_timesteps - 1}]"  # see pipeline.max_steps
        _require(1 <= self.sample_steps < self.num_train_timesteps, "stage1.sample_steps", most)
        _require(1 <= self.inference_steps < self.num_train_timesteps, "stage1.inference_steps", most)


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2: fine-tune only the VAE decoder (L1 + LPIPS + adaptive-weight PatchGAN)."""

    # what the decoder learns to decode (stage2.py); "sampler": the U-Net's samples, best on the shared UWF pairs
    latents: Literal["encoder", "unet", "mix", "sampler", "split"] = "sampler"
    unet_max_timestep: int = 500  # the one-step U-Net estimate is drawn from t in [0, this)
    sampler_steps: int = 10  # DPM-Solver++ steps of the "sampler" latents (10 also where translate takes 4: README)
    # each sampled batch of latents trains the decoder about this many steps: one step in `latent_reuse`
    # samples afresh, the others train on a batch drawn from the last `latent_reuse` sampled ones (photos,
    # targets and latents together). 1: every step samples (the "sampler" latents cost `sampler_steps`
    # guided U-Net passes a batch, most of a stage-2 step)
    latent_reuse: int = 1
    rec_loss: Literal["l1", "l2"] = "l1"
    lpips_weight: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    weights_dir: str | None = None  # LPIPS backbone files; default $FFASYNTH_WEIGHTS_DIR or the torch hub cache
    adv_weight: float = 0.5
    disc_start: int = 2000
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr_factor: float = 1.0
    # the decoder reconstruction report at the end (evaluation/decoder_report.py): this many test angiograms
    report_images: int = 4
    # the frozen U-Net and CLIP encoder: "same" = the mixed-precision dtype (float32 without it); bf16 halves
    # their memory even when the decoder trains in float32
    frozen_dtype: Literal["same", "fp32", "bf16", "fp16"] = "same"
    lr: float = 1e-5
    ema_decay: float = 0.0
    _section = "stage2"

    def validate(self) -> None:
        super().validate()
        _require(self.lpips_weight >= 0, "stage2.lpips_weight", "must be >= 0")
        _require(self.adv_weight >= 0, "stage2.adv_weight", "must be >= 0")
        _require(self.unet_max_timestep >= 1, "stage2.unet_max_timestep", "must be at least 1")
        _require(self.sampler_steps >= 1, "stage2.sampler_steps", "must be at least 1")
        _require(self.latent_reuse >= 1, "stage2.latent_reuse", "must be at least 1")
        _require(1 <= self.disc_layers <= 6, "stage2.disc_layers", "must be between 1 and 6")
        _require(self.report_images >= 1, "stage2.report_images", "must be at least 1")
        _require(self.disc_start >= 0, "stage2.disc_start", "must be >= 0")
        _require(self.disc_channels >= 1, "stage2.disc_channels", "must be at least 1")
        _require(self.disc_lr_factor > 0, "stage2.disc_lr_factor", "must be positive")


@dataclass
class DistillLoRAConfig(LoRAConfig):
    """The distilled student as LoRA adapters over the frozen stage-1 U-Net (LCM-LoRA's layers: attention, projections,
    feed-forward, ResNet convolutions, time projections); only they and the guidance input learn. rank 0: a copy."""

    target_modules: tuple[str, ...] = (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "time_emb_proj",
    )  # fmt: skip
    _section = "distill.lora"


@dataclass
class DistillConfig(TrainConfig):
    """`ffasynth train distill` (training/distill.py): a student U-Net with the guidance scale as an input,
    distilled from a trained (frozen) stage-1 U-Net and its image guidance. method "lcm": latent consistency
    distillation (few steps, sampled with diffusers' LCMScheduler); "guidance": guidance distillation only
    (the guided prediction in one pass, sampled as before). With preview_decoder, a tiny decoder is
    distilled from the VAE decoder in the same run, for fast previews."""

    method: Literal["lcm", "guidance"] = "lcm"
    guidance_min: float = 1.0  # the guidance scales the student learns, drawn uniformly
    guidance_max: float = 5.0
    solver_steps: int = 50  # LCM's teacher schedule: DDIM steps t → t − k, k = num_train_timesteps / this
    huber_c: float = 0.001  # LCM's pseudo-Huber loss √(d² + c²) − c; 0 = squared error
    default_steps: int = 4  # steps the exported pipeline takes when a call gives none (method lcm)
    preview_decoder: bool = True
    preview_channels: int = 64
    preview_lr: float = 1e-3
    lora: DistillLoRAConfig = field(default_factory=DistillLoRAConfig)
    lr: float = 1e-4
    lr_warmup_steps: int = 100
    ema_decay: float = 0.95
    _section = "distill"

    def validate(self) -> None:
        super().validate()
        _require(1.0 <= self.guidance_min <= self.guidance_max, "distill.guidance_min", "must be in [1, guidance_max]")
        _require(self.solver_steps >= 2, "distill.solver_steps", "must be at least 2")
        _require(self.huber_c >= 0, "distill.huber_c", "must be >= 0 (0 = squared error)")
        _require(1 <= self.default_steps <= self.solver_steps, "distill.default_steps", "must be in [1, solver_steps]")
        _require(self.preview_channels >= 8, "distill.preview_channels", "must be at least 8")
        _require(self.preview_lr > 0, "distill.preview_lr", "must be positive")


@dataclass
class Pix2PixConfig(TrainConfig):
    """The GAN baseline (Isola et al. 2017): U-Net generator + 70×70 PatchGAN, GAN + λ·L1 (λ = 100)."""

    ngf: int = 64
    num_downs: int = 8
    norm: Literal["batch", "instance"] = "batch"
    use_dropout: bool = True
    num_phases: int = 2  # FFA phases given as input maps (with_phase), as the U-Net gets them; 0 = the paper's
    l1_weight: float = 100.0
    gan_loss: Literal["vanilla", "hinge"] = "vanilla"
    disc_channels: int = 64
    disc_layers: int = 3
    tile: int = 512  # whole-image inference in tiles of this size (pixels)
    tile_overlap: int = 64
    lr: float = 2e-4
    adam_beta1: float = 0.5
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "linear"  # the paper's: constant, then linear to 0
    lr_warmup_steps: int = 0
    ema_decay: float = 0.0
    max_grad_norm: float = 0.0
    _section = "pix2pix"

    def validate(self) -> None:
        super().validate()
        _require(self.num_downs >= 5, "pix2pix.num_downs", "must be at least 5")
        _require(0 <= self.num_phases <= 16, "pix2pix.num_phases", "must be between 0 and 16")
        _require(self.l1_weight >= 0, "pix2pix.l1_weight", "must be >= 0")
        _require(0 <= self.tile_overlap < self.tile, "pix2pix.tile_overlap", "must be in [0, tile)")
        for key in ("ngf", "disc_channels"):
            _require(getattr(self, key) >= 1, f"pix2pix.{key}", "must be at least 1")
        _require(1 <= self.disc_layers <= 6, "pix2pix.disc_layers", "must be between 1 and 6")
        multiple = 2**self.num_downs
        _require(self.tile % multiple == 0, "pix2pix.tile", f"must be a multiple of 2**num_downs ({multiple})")


@dataclass
class Config:
    preset: str = "tiny"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pix2pix: Pix2PixConfig = field(default_factory=Pix2PixConfig)

    def validate(self) -> None:
        _require(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}")
        _require(0 <= self.seed <= SEED_MAX, "seed", f"must be between 0 and {SEED_MAX}")
        # every crop must pass through the VAE and the U-Net's levels whole (the pipeline's default tile is it)
        factor = 2 ** (len(self.model.vae_channels) - 1) * 2 ** (len(self.model.unet_channels) - 1)
        _require(self.data.crop_size % factor == 0, "data.crop_size", f"must be a multiple of {factor}, the model's "
                 "downsampling (2^(VAE levels - 1) x 2^(U-Net levels - 1))")  # fmt: skip
        limit = self.stage1.num_train_timesteps
        _require(self.distill.solver_steps <= limit, "distill.solver_steps", f"must be at most {limit} "
                 "(stage1.num_train_timesteps)")  # fmt: skip
        _require(self.stage2.unet_max_timestep <= limit, "stage2.unet_max_timestep", f"must be at most {limit} "
                 "(stage1.num_train_timesteps)")  # fmt: skip


def to_dict(config: Config) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def from_dict(values: dict[str, Any]) -> Config:
    """Defaults ← preset ← values. `values["preset"]` picks the preset (default tiny)."""
    if not isinstance(values, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    preset = values.get("preset", Config.preset)
    named = [f"model.{key}" for key in ("pretrained", "image_encoder") if (values.get("model") or {}).get(key)]
    if "preset" not in values and named:  # the tiny preset's CPU recipe (v-prediction, lr 5e-4) would train SD1.5
        raise ConfigError(f"{named[0]} names weights but no preset is given: add `preset: sd15` (or tiny) or --preset")
    if preset not in PRESETS:
        raise ConfigError(f"config value preset={preset!r} is not one of {sorted(PRESETS)}")
    config = build(Config, merge(merge(to_dict(Config()), PRESETS[preset]), values))
    validate(config)
    return config


def load_config(path: str | Path | None = None, preset: str | None = None, overrides: list[str] | None = None):
    """Defaults ← preset ← YAML file (over the file it `extends:`, if any) ← key=value overrides."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    values = merge({**values, **({"preset": preset} if preset is not None else {})}, overrides_to_dict(overrides or []))
    try:
        return from_dict(values)
    except ConfigError as error:  # which file, e.g. a run's config.yaml written by an older ffasynth
        raise ConfigError(f"{error} (with the config file {path})" if path is not None else str(error)) from None


def save_config(config: Config, path: str | Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
