"""Checkpoints: safetensors weights + JSON state, written to a temporary folder and renamed, so a
run killed at any instant leaves its newest complete checkpoint loadable. No pickle anywhere.

Layout of RUN/checkpoints/step-000120/:
  <module>.safetensors        trainable weights (e.g. unet, projection, decoder, discriminator)
  <module>.ema.safetensors    their exponential moving average, when kept
  optimizer-<name>.safetensors + .json   AdamW moments (tensors) and param groups (JSON)
  state.json                  step, LR-schedule position, counters
  manifest.json               sha256 and size of every file above; written last

Resuming verifies checkpoints newest first (files present, sizes and hashes as the manifest says,
safetensors headers sound) and takes the newest that passes; the damaged ones it skipped are renamed
step-N.damaged (kept, never deleted; out of the run's sequence, so no later save replaces them).
Checkpoints written before manifests existed are accepted when their sizes and headers are sound.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_folder
from ffasynth.integrity import DamagedFileError, manifest_problem, read_manifest, safetensors_header, write_manifest
from ffasynth.models.loading import load_safetensors_into
from ffasynth.run_folder import checkpoint_folders, complete_checkpoints  # the run folder's rules


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
        write_manifest(folder)

    path = atomic_folder(Path(run_dir) / "checkpoints" / f"step-{step:06d}", fill)
    # only sound checkpoints count towards `keep` and are pruned: a damaged newer one never costs a good one
    expected = expected_files(modules, emas, optimizers)
    sound = [c for c in complete_checkpoints(run_dir) if checkpoint_problem(c, expected, hashes=False)[0] is None]
    for old in sound[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def expected_files(modules, emas, optimizers) -> list[str]:
    """The files save_checkpoint writes for these modules, EMAs and optimizers (the manifest aside)."""
    weights = [f"{name}.safetensors" for name in modules] + [f"{name}.ema.safetensors" for name in emas]
    optimizer_files = [f"optimizer-{name}{ext}" for name in optimizers for ext in (".safetensors", ".json")]
    return ["state.json", *weights, *optimizer_files]


def checkpoint_problem(folder: Path, expected: list[str], hashes: bool = True) -> tuple[str | None, bool]:
    """(why FOLDER cannot be resumed, in a few words, or None; whether it has a manifest). Checks
    that the `expected` files are there, that every file has the manifest's size (and sha256, when
    `hashes`), and that each safetensors header and JSON file parses. No tensor is loaded."""
    try:
        listed = read_manifest(folder)
    except DamagedFileError as error:
        return str(error), True
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing", listed is not None
    if listed is not None:
        unlisted = [name for name in expected if name not in listed]
        problem = f"{unlisted[0]} is not in its manifest" if unlisted else manifest_problem(folder, listed, hashes)
        if problem:
            return problem, True
    for name in sorted(set(expected) | set(listed or {})):
        try:
            if name.endswith(".safetensors"):
                safetensors_header(folder / name)
            elif name.endswith(".json"):
                json.loads((folder / name).read_text())
        except DamagedFileError as error:
            return f"{name}: {error}", listed is not None
        except (OSError, UnicodeDecodeError, ValueError):
            return f"{name} is not readable JSON", listed is not None
    return None, listed is not None


@dataclass
class ResumePoint:
    """The checkpoint a resumed run starts from (None: none to resume), and what was passed over."""

    folder: Path | None
    verified: bool = False  # its files matched the sha256 hashes of its manifest
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (newer checkpoint, why it was skipped)

    def set_aside_skipped(self) -> list[str]:
        """Rename the skipped checkpoints step-N.damaged (one process only); the warnings to print."""
        warnings = []
        if self.skipped:
            moved = [f"{folder.name} ({why}) → kept as {set_aside(folder).name}" for folder, why in self.skipped]
            warnings.append(
                f"warning: skipped damaged checkpoint(s) {'; '.join(moved)}; resuming from {self.folder.name}"
            )
        if self.folder is not None and not self.verified:
            warnings.append(
                f"warning: {self.folder.name} has no manifest (written before checkpoints had one): its sizes "
                "and safetensors headers are sound, but its contents were not hash-verified"
            )
        return warnings


def resume_point(run_dir: str | Path, expected: list[str]) -> ResumePoint:
    """The newest checkpoint of RUN that passes checkpoint_problem, and the newer ones that did not.
    A run whose checkpoints are all damaged is one FFASynthError naming each and why."""
    skipped = []
    for folder in reversed(checkpoint_folders(run_dir)):
        problem, has_manifest = checkpoint_problem(folder, expected)
        if problem is None:
            return ResumePoint(folder, has_manifest, skipped)
        skipped.append((folder, problem))
    if skipped:
        raise FFASynthError(
            f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'} can be resumed ("
            + "; ".join(f"{folder.name}: {why}" for folder, why in skipped)
            + "); they are left as they are: restore a good copy, or start again with another --out"
        )
    return ResumePoint(None)


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to step-N.damaged (-2, -3... when taken): kept, out of the sequence."""
    for number in range(1, 1000):
        target = folder.with_name(f"{folder.name}.damaged" + (f"-{number}" if number > 1 else ""))
        if not target.exists():
            os.replace(folder, target)
            return target
    raise FFASynthError(f"{folder}: too many damaged copies beside it; remove some {folder.name}.damaged-*")


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


def _check_files(folder: Path, names: list[str]) -> None:
    """The files about to be loaded match the checkpoint's manifest (size, then sha256): a damaged checkpoint is
    one error naming the file, never loaded (a resume checks its checkpoint alone; export, stage 2, distill and
    the reports load through load_weights). A checkpoint from before manifests is loaded as it is."""
    try:
        listed = read_manifest(folder)
        problem = manifest_problem(folder, {n: listed[n] for n in names if n in listed}) if listed else None
    except DamagedFileError as error:
        problem = str(error)
    if problem:
        raise FFASynthError(f"{folder}: {problem}; this checkpoint is damaged: give an earlier one, or train again")


def load_weights(folder: Path, name: str, module: nn.Module, ema: bool = True) -> bool:
    """Load one module's weights from a checkpoint, the EMA copy when asked and present, after checking them
    against its manifest. Returns whether EMA weights were used."""
    ema_path = folder / f"{name}.ema.safetensors"
    _check_files(folder, [f"{name}.safetensors"] + ([ema_path.name] if ema and ema_path.is_file() else []))
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
