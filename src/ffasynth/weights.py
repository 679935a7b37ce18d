"""Locate and load third-party backbone weights without ever downloading them.

The metric backbones (torch-fidelity's FID Inception-v3, torchvision's VGG-16 and AlexNet for
LPIPS) are read from one weights folder: `--weights-dir`, else $FFASYNTH_WEIGHTS_DIR, else the
torch hub cache (`torch.hub.get_dir()/checkpoints`, where torch and torchvision download to).
Each file keeps its upstream name, so a hub cache filled on another machine can be copied as is.
A missing file raises `WeightsNotFoundError` saying which file goes where; every file is read
with `torch.load(..., weights_only=True)` (tensors only, no pickled code).

Public API:
- `resolve_weights_dir(weights_dir=None) -> Path`
- `locate(name, weights_dir=None) -> Path` (name in `KNOWN_WEIGHTS`: inception, vgg16, alexnet)
- `load_state_dict(name, weights_dir=None) -> dict[str, Tensor]`
- `build_inception(weights_dir=None) -> nn.Module`: uint8 (N, 3, H, W) → ((N, 2048) pool features,)
- `build_lpips(net="vgg", weights_dir=None) -> LPIPS`: differentiable distance, inputs in [-1, 1]
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ffasynth.errors import FFASynthError, WeightsNotFoundError

WEIGHTS_ENV = "FFASYNTH_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightsFile:
    filename: str
    url: str
    used_for: str


KNOWN_WEIGHTS: dict[str, WeightsFile] = {
    "inception": WeightsFile(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "FID/KID (torch-fidelity Inception-v3)",
    ),
    "vgg16": WeightsFile(
        "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "LPIPS-VGG (torchvision VGG-16)"
    ),
    "alexnet": WeightsFile(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "LPIPS-Alex (torchvision AlexNet)",
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


def locate(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of a known weights file; WeightsNotFoundError (one sentence) when it is absent."""
    if name not in KNOWN_WEIGHTS:
        raise FFASynthError(f"unknown weights {name!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    spec = KNOWN_WEIGHTS[name]
    folder = resolve_weights_dir(weights_dir)
    path = folder / spec.filename
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{spec.used_for} needs {spec.filename}: put it in {folder} (--weights-dir or ${WEIGHTS_ENV}); "
            f"it is normally downloaded from {spec.url}"
        )
    return path


def load_state_dict(name: str, weights_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The file's state dict, loaded on the CPU with weights_only=True."""
    path = locate(name, weights_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
