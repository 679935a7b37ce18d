"""The optimizer a training stage steps (`<stage>.optimizer`) and where its EMA lives (`<stage>.ema_device`).

adamw      torch's AdamW: two float32 moments per trainable value (8 bytes).
adamw8bit  bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): the moments block-wise quantised to one
           byte each (2 bytes per value; tensors under 4,096 values stay float32). CUDA only; bitsandbytes
           is not a dependency of ffasynth, so it is imported here, when asked for.
"""

from __future__ import annotations

import importlib

import torch

from ffasynth.config import TrainConfig
from ffasynth.errors import ConfigError


def _adamw8bit(config: TrainConfig, device: torch.device) -> type[torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit, or one line naming the option and what is missing."""
    key = f"{config._section}.optimizer=adamw8bit"
    if device.type != "cuda":
        raise ConfigError(
            f"{key} needs a CUDA GPU (this run is on {device.type}); use {config._section}.optimizer=adamw"
        )
    try:
        bitsandbytes = importlib.import_module("bitsandbytes")
    except ImportError:
        raise ConfigError(
            f"{key} needs bitsandbytes, which is not installed: pip install bitsandbytes, "
            f"or use {config._section}.optimizer=adamw"
        ) from None
    return bitsandbytes.optim.AdamW8bit


def build_optimizer(params: list, lr: float, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """config.optimizer over `params` with the stage's betas and weight decay."""
    kind = _adamw8bit(config, device) if config.optimizer == "adamw8bit" else torch.optim.AdamW
    return kind(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)


def ema_device(config: TrainConfig, device: torch.device) -> torch.device:
    """Where the EMA copy lives: beside the weights ("same"), or in host memory ("cpu": frees as many
    accelerator bytes as the trainable weights take in float32, for a device-to-host copy each step)."""
    return torch.device("cpu") if config.ema_device == "cpu" else device
