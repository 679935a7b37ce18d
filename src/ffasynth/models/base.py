"""A pretrained base model for presets without public weights (the tiny preset): one safetensors file
with the U-Net, VAE and CLIP-encoder weights and, in its header, the architecture it was built with,
the VAE's latent scaling factor and the recipe that made it.

model.base names it: `tiny` (the file shipped in ffasynth/base/, made by `ffasynth base build`), a path
to such a file, or `none` (random initialisation, for ablations). Fine-tuning starts from it the way the
paper's fine-tuning starts from SD1.5: every part it holds replaces the random values, unless the config
names its own weights for that part (model.pretrained, model.vae, model.image_encoder).
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ffasynth.config import ModelConfig
from ffasynth.errors import ConfigError, WeightsNotFoundError
from ffasynth.files import atomic_write

PACKAGED = ("tiny",)
PARTS = ("unet", "vae", "image_encoder")
# The model.* keys that decide the weights' shapes: a base only fits a config that agrees on all of them.
ARCHITECTURE_KEYS = (
    "unet_channels",
    "unet_layers_per_block",
    "unet_attention_heads",
    "unet_norm_groups",
    "cross_attention_dim",
    "vae_channels",
    "vae_layers_per_block",
    "vae_norm_groups",
    "latent_channels",
    "clip_hidden_size",
    "clip_layers",
    "clip_heads",
    "clip_intermediate_size",
    "clip_patch_size",
    "clip_image_size",
    "use_clip",
    "use_concat",
    "num_phases",
)


def packaged_path(name: str) -> Path:
    return Path(str(resources.files("ffasynth") / "base" / f"{name}.safetensors"))


def resolve(base: str | None) -> Path | None:
    """model.base → the file to load, or None for random initialisation."""
    if base is None or base.lower() == "none":
        return None
    path = packaged_path(base) if base in PACKAGED else Path(base).expanduser()
    if not path.is_file():
        where = "the packaged base model" if base in PACKAGED else "model.base"
        raise WeightsNotFoundError(
            f"model.base={base}: {where} {path} does not exist; rebuild it with `ffasynth base build --out DIR` "
            "and point model.base at DIR/base.safetensors, or set model.base=none to start from random weights"
        )
    return path


def architecture(model: ModelConfig) -> dict:
    values = dataclasses.asdict(model)
    return {key: list(values[key]) if isinstance(values[key], tuple) else values[key] for key in ARCHITECTURE_KEYS}


def read_header(path: Path) -> dict:
    """The base's description (architecture, scaling factor, recipe, ...) from the safetensors header."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise WeightsNotFoundError(f"model.base: {path} is not a readable safetensors file ({error})") from None
    if "ffasynth_base" not in metadata:
        raise WeightsNotFoundError(f"model.base: {path} is not an ffasynth base model (no ffasynth_base header)")
    try:
        header = json.loads(metadata["ffasynth_base"])
    except ValueError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("architecture"), dict) or "parts" not in header:
        raise WeightsNotFoundError(
            f"model.base: {path} has a damaged ffasynth_base header (no architecture and parts); build it again "
            "(`ffasynth base build`) or set model.base=none"
        )
    return header


def save(path: str | Path, modules: dict[str, nn.Module], model: ModelConfig, scaling_factor: float, **info) -> Path:
    """Write `modules` (parts of PARTS) as one file; floating tensors in float16 except the VAE's, which
    stays float32 (its decoder is where half precision's rounding would show: see the recipe's check)."""
    tensors = {}
    for part, module in modules.items():
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
        half = part != "vae"
        for key, value in module.state_dict().items():
            value = value.detach().cpu()
            if half and value.is_floating_point():
                value = value.to(torch.float16)
            tensors[f"{part}.{key}"] = value.contiguous()
    header = {"architecture": architecture(model), "scaling_factor": scaling_factor, "parts": list(modules), **info}
    metadata = {"ffasynth_base": json.dumps(header)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def apply(base: str | None, model: ModelConfig, modules: dict[str, nn.Module | None]) -> dict[str, str]:
    """Load the base named by model.base into the given modules (None entries and parts the base lacks are
    left alone). Returns part → where its weights came from ("base:<name>")."""
    path = resolve(base)
    if path is None:
        return {}
    header = read_header(path)
    wanted, have = header["architecture"], architecture(model)
    differing = [key for key in ARCHITECTURE_KEYS if key in wanted and wanted[key] != have[key]]
    if differing:
        listed = ", ".join(f"model.{key}={have[key]} (base: {wanted[key]})" for key in differing)
        raise ConfigError(
            f"model.base={base} was built for another architecture: {listed}; "
            "use the preset's values or set model.base=none"
        )
    loaded = {}
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        for part, module in modules.items():
            prefix = f"{part}."
            if module is None or part not in header["parts"]:
                continue
            own = module.state_dict()
            state = {key[len(prefix) :]: handle.get_tensor(key) for key in keys if key.startswith(prefix)}
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            wrong = [key for key in own if key in state and state[key].shape != own[key].shape]
            if missing or unexpected or wrong:
                first = (missing or unexpected or wrong)[0]
                raise ConfigError(
                    f"model.base={base}: its {part} does not fit this config's ({len(missing)} missing, "
                    f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors, e.g. {first}); set model.base=none"
                )
            module.load_state_dict({key: value.to(own[key].dtype) for key, value in state.items()})
            loaded[part] = f"base:{base}"
    vae = modules.get("vae")
    if vae is not None and "vae" in loaded:
        vae.register_to_config(scaling_factor=float(header["scaling_factor"]))
    return loaded
