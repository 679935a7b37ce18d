"""Builders the test modules share: micro configs, a micro pipeline, a micro stage-1 run, the CLI.

Test modules take shared builders from here (or from the format writers sd15_format, ldm_format,
fake_weights, corpus), never from one another: tests/test_layout.py checks it."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import Result
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.config import Config, load_config
from ffasynth.export import build_pipeline
from ffasynth.models.components import build_components
from ffasynth.models.conditioning import SourceConditioner
from ffasynth.pipeline import FFASynthesisPipeline
from ffasynth.training.loop import train
from ffasynth.training.run import LoadedRun, load_training_data, prepare_run, save_model_folder
from ffasynth.training.stage1 import build_stage1

# the smallest model that still has every part: 2 U-Net levels, 2 VAE levels (×2), a 32-d CLIP; random
# initialisation (the tiny preset's base model has the tiny architecture, not this one)
MICRO = [
    "model.base=none",
    "model.unet_channels=[16,32]",
    "model.unet_attention_heads=2",
    "model.cross_attention_dim=32",
    "model.vae_channels=[8,16]",
    "model.clip_hidden_size=32",
    "model.clip_intermediate_size=64",
    "model.clip_image_size=32",
]

# micro stage-1 training: 32 px crops, batches of 2, every step logged
MICRO_STAGE1 = MICRO + ["data.crop_size=32", "stage1.batch_size=2", "stage1.log_every=1"]

# micro stage-2 training from a micro stage-1 run: no LPIPS (no weights offline), the PatchGAN from step 0
STAGE2 = [
    "stage2.batch_size=2",
    "stage2.disc_start=0",
    "stage2.lpips_weight=0",
    "stage2.disc_channels=8",
    "stage2.log_every=1",
    "stage2.sampler_steps=2",
    "data.crop_size=32",
]


def micro_config(*extra: str) -> Config:
    return load_config(preset="tiny", overrides=MICRO + list(extra))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def micro_pipeline(*overrides: str, seed: int = 0) -> FFASynthesisPipeline:
    """Random micro components (VAE ×2, U-Net ×2 downsampling; tile 32 px), conv_in's source
    channels and the phase embedding moved off zero as training would, so every input matters."""
    config = micro_config("data.crop_size=32", *overrides)
    torch.manual_seed(seed)
    components = build_components(config, random_weights=True)
    torch.nn.init.normal_(components.unet.conv_in.weight, std=0.1)
    if components.unet.class_embedding is not None:
        torch.nn.init.normal_(components.unet.class_embedding.weight, std=0.5)
    conditioner = SourceConditioner.from_components(components, config.model)
    pipeline = build_pipeline(LoadedRun(config, components, conditioner, Path("."), False))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def train_micro_stage1(pairs: Path, run_dir: Path, max_steps: int, resume: bool = False, extra=()):
    """A micro stage-1 run through the real loop (checkpoint every 3 steps, warm-up 2, EMA 0.9, seed 3)."""
    schedule = ["stage1.sample_every=100", "stage1.lr_warmup_steps=2", "stage1.ema_decay=0.9", "seed=3"]
    config = load_config(
        preset="tiny",
        overrides=MICRO_STAGE1 + schedule + [f"stage1.max_steps={max_steps}", "stage1.save_every=3", *extra],
    )
    dataset = load_training_data(pairs, config)
    prepare_run(run_dir, config, "stage1", pairs, resume)
    task = build_stage1(config)
    save_model_folder(run_dir, task.components)
    return train(task, dataset, config.stage1, run_dir, config.seed, resume=resume, progress=False)


def invoke(*args) -> Result:
    """`ffasynth ARGS` in-process (typer's runner); paths and numbers may be passed as they are."""
    return CliRunner().invoke(app, [str(a) for a in args])


class BlankDataset:
    """Four items of one grey 8×8 target: what the training loop needs from a dataset."""

    def __len__(self):
        return 4

    def __getitem__(self, key):
        index, _ = key
        return {"target": torch.zeros(1, 8, 8), "index": index}


def two_level_vae():
    """A two-level AutoencoderKL (8 channels, factor 2), for tests of what runs the VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
