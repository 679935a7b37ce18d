"""Random-valued weight files in the exact upstream formats (same file names, keys, shapes and
dtypes as torchvision's and torch-fidelity's downloads), so tests run the real loading code.

Layers the metrics never use (the classifier heads) are stored as one random value broadcast to
the full shape: the state dict is unchanged in keys and shapes, but the file stays small. Each file
is listed in its folder's trusted list (`ffasynth.weights.trust_file`): its hash is not upstream's.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch

from ffasynth.weights import KNOWN_WEIGHTS, trust_file


def _compact(state: dict[str, torch.Tensor], unused_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        key: value.flatten()[:1].clone().expand(value.shape) if key.startswith(unused_prefixes) else value
        for key, value in state.items()
    }


def _variance_preserving(model: torch.nn.Module, seed: int) -> None:
    """He-normal convolutions: activations keep their scale through deep random networks."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5


def write_inception(folder: Path, seed: int = 0) -> Path:
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    # Build the architecture without its download: skip the URL fetch and the load that follows it.
    with (
        mock.patch.object(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None),
        mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
    ):
        model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    _variance_preserving(model, seed)
    path = Path(folder) / KNOWN_WEIGHTS["inception"].filename
    torch.save(_compact(model.state_dict(), ("fc.",)), path)
    trust_file(path)
    return path


def write_torchvision(folder: Path, name: str, seed: int = 0) -> Path:
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    path = Path(folder) / KNOWN_WEIGHTS[name].filename
    torch.save(_compact(model.state_dict(), ("classifier.",)), path)
    trust_file(path)
    return path


def write_all(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_inception(folder)
    write_torchvision(folder, "alexnet")
    write_torchvision(folder, "vgg16")
    return folder


if __name__ == "__main__":
    import sys

    print(write_all(Path(sys.argv[1])))
