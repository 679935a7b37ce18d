"""A torch Dataset of registered pairs with paired transforms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ffasynth.data.io import read_image
from ffasynth.data.pairs import Pair
from ffasynth.data.transforms import PairedTransform, fov_mask, normalise
from ffasynth.errors import PairError

PHASES = ("early", "late")


def phase_index(phase: str | None) -> int:
    """early → 0, late → 1; pairs with no phase (one angiogram per eye) count as early."""
    return PHASES.index(phase) if phase in PHASES else 0


class PairDataset(Dataset):
    """Items: {"source": (3, h, w), "target": (1, h, w)} in [-1, 1], "mask" (1, h, w) FOV {0, 1},
    "phase" (0 early / 1 late), "label", "id", "index".

    With a transform, each item is a random paired crop drawn from a generator seeded by
    (seed, epoch, index): deterministic across workers and resumes. Without, whole images.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        transform: PairedTransform | None = None,
        seed: int = 0,
        cache: bool = True,
        max_pixels: int | None = None,
        source_channels: int = 3,
        target_channels: int = 1,
    ):
        if not pairs:
            raise PairError("the dataset has no pairs")
        self.pairs = list(pairs)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.max_pixels = max_pixels
        self.source_channels = source_channels
        self.target_channels = target_channels
        self._images: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, path, channels: int) -> torch.Tensor:
        key = (str(path), channels)
        cached = self._images.get(key)
        if cached is None:
            image = read_image(path, channels=channels, max_pixels=self.max_pixels)
            # uint16 codes: exact for 8-bit (k/255 = 257k/65535) and 16-bit data, half of float32's memory.
            cached = (image * 65535.0).round().to(torch.int32).to(torch.uint16)
            if self.cache:
                self._images[key] = cached
        return cached.to(torch.float32) / 65535.0

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole source (3, H, W) and target (1, H, W) in [0, 1]."""
        pair = self.pairs[index]
        source = self._read(pair.source, self.source_channels)
        target = self._read(pair.target, self.target_channels)
        if source.shape[-2:] != target.shape[-2:]:
            raise PairError(
                f"{pair.target}: size {target.shape[-1]}x{target.shape[-2]} differs from its source "
                f"{pair.source} ({source.shape[-1]}x{source.shape[-2]})"
            )
        return source, target

    def generator(self, index: int) -> torch.Generator:
        # One stream per (seed, epoch, index); the large odd multipliers keep streams apart.
        seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        source, target = self.load(index)
        if self.transform is not None:
            item = self.transform(source, target, self.generator(index))
        else:
            item = {"source": normalise(source), "target": normalise(target), "mask": fov_mask(source)}
        item.update(phase=phase_index(pair.phase), label=pair.label or "", id=pair.id, index=index)
        return item
