"""Locate, verify and load third-party backbone weights (`ffasynth weights download` fetches them).

The metric backbones (torch-fidelity's FID Inception-v3, torchvision's VGG-16 and AlexNet for
LPIPS) are read from one weights folder: `--weights-dir`, else $FFASYNTH_WEIGHTS_DIR, else the
torch hub cache (`torch.hub.get_dir()/checkpoints`, where torch and torchvision download to).
Each file keeps its upstream name, so a hub cache filled on another machine can be copied as is.
A missing file raises `WeightsNotFoundError` saying which file goes where and the command that
fetches it. Every file is checked against the SHA-256 pinned below before it is read (hashed once
a process, cached by path, size and modification time), so a damaged or foreign file is named and
refused, never used; a file of your own (a re-saved backbone, the tests' random stand-ins) is
accepted when the folder's `ffasynth-trusted.sha256` lists its digest (`sha256sum` format), and is
reported as trusted, not upstream. Files are read with `torch.load(..., weights_only=True)`
(tensors only, no pickled code).

Public API:
- `resolve_weights_dir(weights_dir=None) -> Path`
- `locate(name, weights_dir=None) -> Path` (name in `KNOWN_WEIGHTS`: inception, vgg16, alexnet)
- `verify(name, path) -> str` (the file's origin: "upstream" or "trusted"; FFASynthError when damaged)
- `weights_status(weights_dir=None) -> list[WeightsStatus]` (what `ffasynth weights check` prints)
- `trust_file(path) -> str`: list a file of your own in its folder's trusted list
- `load_state_dict(name, weights_dir=None) -> dict[str, Tensor]`
- `build_inception(weights_dir=None) -> nn.Module`: uint8 (N, 3, H, W) → ((N, 2048) pool features,)
- `build_lpips(net="vgg", weights_dir=None) -> LPIPS`: differentiable distance, inputs in [-1, 1]
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ffasynth.errors import FFASynthError, WeightsNotFoundError
from ffasynth.files import atomic_write_text
from ffasynth.integrity import file_sha256

WEIGHTS_ENV = "FFASYNTH_WEIGHTS_DIR"
TRUSTED_LIST = "ffasynth-trusted.sha256"


@dataclass(frozen=True)
class WeightsFile:
    filename: str
    url: str
    used_for: str
    sha256: str  # the full hex digest, or the leading hex digits where only those are published
    size: int | None  # bytes, where known
    enables: str  # what the file makes possible, as `ffasynth weights check` lists it
    command: str  # its name for `ffasynth weights download`


# Digests: torch.hub names a file `name-<first 8 hex of its SHA-256>.ext` and checks that prefix
# (`check_hash`); neither torchvision nor torch-fidelity publishes more. The full Inception and
# VGG-16 digests and sizes are those recorded, in agreement, by several independent public projects
# that pin these same files (each begins with the upstream prefix; torchvision's VGG-16 metadata
# gives 527.796 MiB = 553433881 bytes; pytorch-fid's pt_inception-2015-12-05-6726825d.pth is recorded
# with the same digest as torch-fidelity's file). No full AlexNet digest was found: it is checked against
# torchvision's 8-digit prefix only, a weaker check (32 bits), said so by `ffasynth weights check`.
KNOWN_WEIGHTS: dict[str, WeightsFile] = {
    "inception": WeightsFile(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "FID/KID (torch-fidelity Inception-v3)",
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        95_628_359,
        "evaluate: FID, KID",
        "inception",
    ),
    "vgg16": WeightsFile(
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "LPIPS-VGG (torchvision VGG-16)",
        "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        553_433_881,
        "stage 2: LPIPS loss (stage2.lpips_net=vgg, the default); evaluate --lpips-net vgg",
        "vgg",
    ),
    "alexnet": WeightsFile(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "LPIPS-Alex (torchvision AlexNet)",
        "7be5be79",
        None,
        "evaluate: LPIPS (--lpips-net alex, the default); stage2.lpips_net=alex",
        "alexnet",
    ),
}
LPIPS_BACKBONES = {"vgg": "vgg16", "alex": "alexnet"}


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder in force: the argument, else $FFASYNTH_WEIGHTS_DIR, else the torch hub cache."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download_hint(name: str, weights_dir: str | os.PathLike | None) -> str:
    folder = f" --dir {Path(weights_dir).expanduser()}" if weights_dir is not None else ""
    return f"`ffasynth weights download {KNOWN_WEIGHTS[name].command}{folder}`"


def locate(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of a known weights file; WeightsNotFoundError (one sentence) when it is absent."""
    if name not in KNOWN_WEIGHTS:
        raise FFASynthError(f"unknown weights {name!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    spec = KNOWN_WEIGHTS[name]
    folder = resolve_weights_dir(weights_dir)
    path = folder / spec.filename
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{spec.used_for} needs {spec.filename} in {folder}: run {_download_hint(name, weights_dir)}, "
            f"or put the file from {spec.url} there by hand"
        )
    return path


def matches_pin(name: str, digest: str) -> bool:
    """Whether a SHA-256 is the pinned one (or begins with the pinned prefix)."""
    return digest.lower().startswith(KNOWN_WEIGHTS[name].sha256)


def _trusted(folder: Path) -> set[tuple[str, str]]:
    """(digest, file name) pairs listed in the folder's trusted list (`sha256sum` lines)."""
    listing = folder / TRUSTED_LIST
    if not listing.is_file():
        return set()
    pairs = set()
    for line in listing.read_text(errors="replace").splitlines():
        digest, _, filename = line.strip().partition(" ")
        if digest and filename:
            pairs.add((digest.lower(), Path(filename.strip().lstrip("*")).name))
    return pairs


def trust_file(path: str | os.PathLike) -> str:
    """Add a file of your own (not the upstream one) to its folder's trusted list; returns its SHA-256."""
    path = Path(path)
    digest = file_sha256(path)
    if (digest, path.name) not in _trusted(path.parent):
        listing = path.parent / TRUSTED_LIST
        before = listing.read_text() if listing.is_file() else ""
        if before and not before.endswith("\n"):
            before += "\n"
        atomic_write_text(listing, f"{before}{digest}  {path.name}\n")
    return digest


def _unreadable(path: Path, error: OSError) -> FFASynthError:
    return FFASynthError(f"{path}: cannot be read ({error.strerror or error}); check its permissions")


def origin(name: str, path: str | os.PathLike, digest: str | None = None) -> tuple[str, str]:
    """("upstream" | "trusted" | "damaged", SHA-256) of a file at a known weights name (`digest`: of bytes
    already read); FFASynthError (one line) when it cannot be read."""
    path = Path(path)
    try:
        digest = digest or file_sha256(path)
    except OSError as error:
        raise _unreadable(path, error) from None
    if matches_pin(name, digest):
        return "upstream", digest
    return ("trusted" if (digest, path.name) in _trusted(path.parent) else "damaged"), digest


def damaged_message(name: str, path: Path, digest: str, weights_dir: str | os.PathLike | None = None) -> str:
    spec = KNOWN_WEIGHTS[name]
    return (
        f"{path}: SHA-256 {digest[:16]}… is not the pinned {spec.sha256[:16]}… of {spec.used_for}: the file is "
        f"damaged or another one, and is not used; delete it and run {_download_hint(name, weights_dir)}"
    )


def verify(
    name: str, path: str | os.PathLike, weights_dir: str | os.PathLike | None = None, digest: str | None = None
) -> str:
    """The file's origin ("upstream" or "trusted"); FFASynthError (one line) when its hash does not match.
    `digest`: of the bytes already read (else the file is hashed)."""
    state, digest = origin(name, path, digest)
    if state == "damaged":
        raise FFASynthError(damaged_message(name, Path(path), digest, weights_dir))
    return state


@dataclass(frozen=True)
class WeightsStatus:
    name: str
    path: Path
    state: str  # "upstream" (hash matches the pin), "trusted" (listed in the folder), "damaged", "missing"
    sha256: str | None
    message: str  # empty when the file is usable


def weights_status(weights_dir: str | os.PathLike | None = None) -> list[WeightsStatus]:
    """Every known file in the weights folder: present and verified, trusted, damaged or missing."""
    folder = resolve_weights_dir(weights_dir)
    statuses = []
    for name, spec in KNOWN_WEIGHTS.items():
        path = folder / spec.filename
        if not path.is_file():
            message = f"missing: run {_download_hint(name, weights_dir)}"
            statuses.append(WeightsStatus(name, path, "missing", None, message))
            continue
        try:
            state, digest = origin(name, path)
        except FFASynthError as error:  # unreadable: said, and counted as not usable
            statuses.append(WeightsStatus(name, path, "damaged", None, str(error)))
            continue
        message = damaged_message(name, path, digest, weights_dir) if state == "damaged" else ""
        statuses.append(WeightsStatus(name, path, state, digest, message))
    return statuses


def load_state_dict(name: str, weights_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The file's state dict, loaded on the CPU with weights_only=True, once its hash is checked."""
    path = locate(name, weights_dir)
    try:  # read once: the bytes hashed are the bytes loaded (a file replaced in between cannot slip in)
        data = path.read_bytes()
    except OSError as error:
        raise _unreadable(path, error) from None
    verify(name, path, weights_dir, hashlib.sha256(data).hexdigest())
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated download or a pickle with code: say which file
        raise FFASynthError(f"{path}: not a readable tensor-only state dict ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FFASynthError(f"{path}: expected a state dict of tensors")
    return state


def _mismatch(name: str, weights_dir: str | os.PathLike | None) -> FFASynthError:
    spec = KNOWN_WEIGHTS[name]
    path = resolve_weights_dir(weights_dir) / spec.filename
    return FFASynthError(f"{path}: keys or shapes do not match {spec.used_for}; use the file from {spec.url}")


def build_inception(weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (TF-compatible resize to 299), returning the 2048-d pool
    features of uint8 (N, 3, H, W) images as a 1-tuple, in eval mode, on the CPU."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = load_state_dict("inception", weights_dir)
    # torch-fidelity unpickles its path without weights_only; hand it a re-serialised, tensor-only copy.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError:
        raise _mismatch("inception", weights_dir) from None


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) with the `lpips` package's calibrated
    linear layers. forward(x, y[, mask]) → (N,) distances; x, y in [-1, 1], 1 or 3 channels
    (grey is repeated to 3). Gradients flow to the inputs; the network's own parameters are frozen
    and it stays in eval mode (no dropout) even inside a model put in train mode."""

    def __init__(self, model: nn.Module, net: str):
        super().__init__()
        self.model = model
        self.net = net
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    @staticmethod
    def _rgb(image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects (N, 1 or 3, H, W) images, got {tuple(image.shape)}")
        return image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, y = self._rgb(x), self._rgb(y)
        if mask is None:
            return self.model(x, y).flatten()
        # Spatial map (each layer upsampled to the input size), averaged inside the (N, 1, H, W) mask.
        self.model.spatial = True
        try:
            distance = self.model(x, y)
        finally:
            self.model.spatial = False
        return (distance * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)


def build_lpips(net: str = "vgg", weights_dir: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS on a torchvision backbone loaded from the weights folder (net: "vgg" or "alex")."""
    import lpips
    import torchvision

    if net not in LPIPS_BACKBONES:
        raise FFASynthError(f"unknown LPIPS network {net!r}; choose {' or '.join(LPIPS_BACKBONES)}")
    name = LPIPS_BACKBONES[net]
    backbone = getattr(torchvision.models, name)(weights=None)
    try:
        backbone.load_state_dict(load_state_dict(name, weights_dir))
    except RuntimeError:
        raise _mismatch(name, weights_dir) from None
    with warnings.catch_warnings():  # lpips builds its random trunk with torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    # lpips slices the trunk's `features` keeping torchvision's indices as child names.
    for block in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for index, layer in block.named_children():
            layer.load_state_dict(backbone.features[int(index)].state_dict())
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    missing, unexpected = model.load_state_dict(torch.load(linear, map_location="cpu", weights_only=True), strict=False)
    # lin0..lin4 hold the calibrated layers (`lins.*` are the same modules, listed twice).
    if unexpected or any(key.startswith(tuple(f"lin{i}." for i in range(5))) for key in missing):
        raise FFASynthError(f"{linear}: the lpips package's linear layers do not fit its {net} network")
    return LPIPS(model, net)
