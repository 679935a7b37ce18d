"""Checkpoints: safetensors weights + JSON state, written to a temporary folder and renamed, so a
run killed at any instant leaves its newest complete checkpoint loadable. No pickle anywhere.

Layout of RUN/checkpoints/step-000120/:
  <module>.safetensors        trainable weights (e.g. unet, projection, decoder, discriminator)
  <module>.ema.safetensors    their exponential moving average, when kept
  optimizer-<name>.safetensors + .json   AdamW moments (tensors) and param groups (JSON)
  state.json                  step, LR-schedule position, counters; written last
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_folder
from ffasynth.models.loading import load_safetensors_into
from ffasynth.run_folder import complete_checkpoints  # what "complete" means is the run folder's rule


class ExponentialMovingAverage:
    """shadow ← decay·shadow + (1 − decay)·param, with decay warmed up as min(decay, (1+n)/(10+n)).
    The shadow (float32, of the trainable parameters) lives on `device` (default: beside them)."""

    def __init__(self, module: nn.Module, decay: float, device: torch.device | str | None = None):
        self.decay = decay
        self.updates = 0
        self.shadow = {
            k: p.detach().to(device, torch.float32, copy=True) for k, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in module.named_parameters():
            if name in self.shadow:
                shadow = self.shadow[name]
                shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.device, param.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
        self.updates = updates


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous, de-aliased CPU copy (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(folder / f"optimizer-{name}.safetensors"))
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    (folder / f"optimizer-{name}.json").write_text(json.dumps(meta, default=list))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    tensors = load_file(str(folder / f"optimizer-{name}.safetensors"))
    meta = json.loads((folder / f"optimizer-{name}.json").read_text())
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete the temporary folders a killed save left behind (never a complete checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for path in root.glob(".step-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None (a run that may start fresh, e.g. on resume); a run
    that must have one uses run_folder.latest_checkpoint, which says so in one error."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: dict[str, nn.Module],
    emas: dict[str, ExponentialMovingAverage],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict,
    keep: int,
) -> Path:
    """Write RUN/checkpoints/step-N atomically, then prune to the newest `keep`."""

    def fill(folder: Path) -> None:
        for name, module in modules.items():
            save_file(module_state(module), str(folder / f"{name}.safetensors"))
        for name, ema in emas.items():
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(folder / f"{name}.ema.safetensors"))
        for name, optimizer in optimizers.items():
            save_optimizer(optimizer, folder, name)
        ema_updates = {name: ema.updates for name, ema in emas.items()}
        (folder / "state.json").write_text(json.dumps({**state, "step": step, "ema_updates": ema_updates}, indent=1))

    path = atomic_folder(Path(run_dir) / "checkpoints" / f"step-{step:06d}", fill)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(
    folder: Path,
    modules: dict[str, nn.Module],
    emas: dict[str, ExponentialMovingAverage],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict:
    """Restore everything save_checkpoint wrote; returns state.json's contents."""
    try:
        state = json.loads((folder / "state.json").read_text())
        for name, module in modules.items():
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        for name, ema in emas.items():
            ema.load_state_dict(load_file(str(folder / f"{name}.ema.safetensors")), state["ema_updates"][name])
        for name, optimizer in optimizers.items():
            load_optimizer(optimizer, folder, name)
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as error:
        raise FFASynthError(f"checkpoint {folder} cannot be resumed ({str(error).splitlines()[0]})") from None
    return state


def load_weights(folder: Path, name: str, module: nn.Module, ema: bool = True) -> bool:
    """Load one module's weights from a checkpoint, the EMA copy when asked and present.
    Returns whether EMA weights were used."""
    ema_path = folder / f"{name}.ema.safetensors"
    if ema and ema_path.is_file():
        weights = load_file(str(ema_path))
        with torch.no_grad():
            params = dict(module.named_parameters())
            missing = [k for k in weights if k not in params]
            if missing:
                raise FFASynthError(f"{ema_path} does not fit the {name} (e.g. {missing[0]})")
            load_safetensors_into(module, folder / f"{name}.safetensors", name)
            for key, value in weights.items():
                params[key].copy_(value.to(params[key].dtype))
        return True
    load_safetensors_into(module, folder / f"{name}.safetensors", name)
    return False
