"""A torch Dataset of registered pairs with paired transforms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ffasynth.data.io import read_image
from ffasynth.data.pairs import Pair
from ffasynth.data.transforms import PairedTransform, fov_mask, normalise, whole_view
from ffasynth.errors import PairError

PHASES = ("early", "late")


def phase_index(phase: str | None) -> int:
    """early → 0, late → 1; pairs with no phase (one angiogram per eye) count as early."""
    return PHASES.index(phase) if phase in PHASES else 0


class PairDataset(Dataset):
    """Items: {"source": (3, h, w), "target": (1, h, w)} in [-1, 1], "mask" (1, h, w) FOV {0, 1},
    "phase" (0 early / 1 late), "label", "id", "index"; with a transform, also "whole_source": the
    whole photo's CLIP view (3, 224, 224) in [-1, 1], flipped as the crop (see `transforms.whole_view`).

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
        self._views: dict[str, torch.Tensor] = {}  # whole-photo CLIP views by source path (kept when caching)

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

    def _whole_view(self, path, source: torch.Tensor) -> torch.Tensor | None:
        size = self.transform.whole_view_size
        if size <= 0:
            return None
        view = self._views.get(str(path))
        if view is None:
            view = whole_view(source, size)
            if self.cache:
                self._views[str(path)] = view
        return view

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        # One stream per (seed, epoch, index); the large odd multipliers keep streams apart.
        epoch = self.epoch if epoch is None else epoch
        seed = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """key: an index (crop drawn for the current epoch) or (index, epoch) from a StreamBatchSampler."""
        index, epoch = key if isinstance(key, tuple) else (key, None)
        pair = self.pairs[index]
        source, target = self.load(index)
        if self.transform is not None:
            view = self._whole_view(pair.source, source)
            item = self.transform(source, target, self.generator(index, epoch), view)
        else:
            item = {"source": normalise(source), "target": normalise(target), "mask": fov_mask(source)}
        item.update(phase=phase_index(pair.phase), label=pair.label or "", id=pair.id, index=index)
        return item


class StreamBatchSampler:
    """Micro-batches from an endless stream of per-epoch permutations, addressed by position.

    Micro-batch m of process `rank` (of `world`) holds stream positions
    [(m·world + rank)·B, … + B); position p is item perm_e[p mod N] of epoch e = p div N, where
    perm_e is seeded by (seed, e). So any micro-batch is known without replaying the ones before
    it: a resumed run continues exactly where it stopped, and N < B still works.
    Yields lists of (index, epoch) keys for PairDataset.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if size < 1:
            raise PairError("the dataset has no pairs")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world = start, rank, world
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._perms[epoch]

    def batch(self, micro_batch: int) -> list[tuple[int, int]]:
        first = (micro_batch * self.world + self.rank) * self.batch_size
        keys = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.size)
            keys.append((self._perm(epoch)[offset], epoch))
        return keys

    def __iter__(self):
        micro_batch = self.start
        while True:
            yield self.batch(micro_batch)
            micro_batch += 1


class Mixture(Dataset):
    """Several datasets as one, keyed like PairDataset ((index, epoch) from a StreamBatchSampler):
    index i < len(first) is the first's item i, the next len(second) the second's, and so on. An
    epoch visits every part's items once, so each part's share is its length over the total (repeat
    a small part's pairs to give it more)."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = [part for part in parts if len(part)]
        if not self.parts:
            raise PairError("the mixture has no items")
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        which = next(i for i in range(len(self.parts)) if index < self.starts[i + 1])
        inner = index - self.starts[which]
        item = self.parts[which][(inner, epoch) if epoch is not None else inner]
        item["index"] = index
        return item
