"""The clinical experiment's classifier: a timm backbone, or two whose pooled features are concatenated
(`two-branch`), from random weights or a timm .safetensors file (its first convolution fitted to the
input channels, the head new)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ffasynth.errors import FFASynthError, WeightsNotFoundError

FUSIONS = ("stack", "two-branch")


class TwoBranch(nn.Module):
    """Two backbones (one per input), pooled features concatenated, one linear head."""

    def __init__(self, branches: list[nn.Module], channels: list[int], num_classes: int):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.channels = channels
        self.head = nn.Linear(sum(b.num_features for b in branches), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.channels, dim=1)
        return self.head(torch.cat([b(p) for b, p in zip(self.branches, parts, strict=True)], dim=1))


def build_classifier(
    backbone: str, in_chans: list[int], num_classes: int, fusion: str = "stack", weights: str | Path | None = None
) -> nn.Module:
    """A timm classifier; `weights` (a .safetensors state dict of the backbone) if given, else
    random initialisation (the CLI warns)."""
    import timm

    if fusion not in FUSIONS:
        raise FFASynthError(f"unknown fusion {fusion!r}; choose {' or '.join(FUSIONS)}")
    if not timm.is_model(backbone):
        raise FFASynthError(f"unknown backbone {backbone!r}: not a timm model name (e.g. resnet10t, resnet18)")

    def one(channels: int, classes: int) -> nn.Module:
        model = timm.create_model(backbone, pretrained=False, in_chans=channels, num_classes=classes)
        if weights is not None:
            _load_backbone(model, Path(weights))
        return model

    if fusion == "stack" or len(in_chans) == 1:
        return one(sum(in_chans), num_classes)
    return TwoBranch([one(c, 0) for c in in_chans], in_chans, num_classes)


def _load_backbone(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsNotFoundError(f"classifier weights {path} not found; put a timm .safetensors file there")
    if path.suffix != ".safetensors":
        raise WeightsNotFoundError(f"classifier weights {path}: expected a .safetensors file (pickles are not loaded)")
    try:
        state = load_file(path)
    except Exception as error:  # SafetensorError (damaged, cut short, not safetensors), OSError
        raise WeightsNotFoundError(f"classifier weights {path}: not a readable safetensors file ({error})") from None
    own = model.state_dict()
    # Keep what fits: the first conv is averaged/repeated to the input channels, the head is new.
    for key, value in list(state.items()):
        if key not in own:
            state.pop(key)
        elif own[key].shape != value.shape:
            if value.ndim == 4 and value.shape[0] == own[key].shape[0] and value.shape[2:] == own[key].shape[2:]:
                mean = value.mean(dim=1, keepdim=True)
                state[key] = mean.repeat(1, own[key].shape[1], 1, 1) * value.shape[1] / own[key].shape[1]
            else:
                state.pop(key)
    body = [key for key in own if not key.startswith(("fc.", "head", "classifier"))]  # the new head is not in it
    fitted = sum(key in state for key in body)
    if fitted < len(body) / 2:  # another network's file: say so, do not train from noise
        raise WeightsNotFoundError(
            f"classifier weights {path} fit {fitted} of this backbone's {len(body)} "
            "tensors: give the timm .safetensors file of the --backbone chosen"
        )
    model.load_state_dict(state, strict=False)
