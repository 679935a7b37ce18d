"""A torch Dataset of registered pairs with paired transforms, and the DataLoader that feeds training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ffasynth.data.cache import ArrayStore, file_key
from ffasynth.data.io import read_image, unit_float
from ffasynth.data.pairs import Pair
from ffasynth.data.transforms import PairedTransform, as_tensor, fov_mask, normalise, whole_view, window_counts
from ffasynth.errors import FFASynthError, PairError

PHASES = ("early", "late")


def phase_index(phase: str | None) -> int:
    """early → 0, late → 1; pairs with no phase (one angiogram per eye) count as early."""
    return PHASES.index(phase) if phase in PHASES else 0


def requested_phase(phase: str | None, num_phases: int, model: str = "model") -> int | None:
    """The phase input a model with `num_phases` of them is given when `phase` is asked for (early when none
    is); None for a model without one. A phase it was not trained on is refused in one line."""
    if not num_phases:
        if phase is not None:
            raise FFASynthError(f"phase={phase!r}: this {model} was trained without a phase input; leave it out")
        return None
    if phase is not None and phase not in PHASES[:num_phases]:
        raise FFASynthError(f"phase={phase!r} is not one this {model} knows ({', '.join(PHASES[:num_phases])})")
    return PHASES.index(phase) if phase else 0


def stored_levels(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] float → uint16 codes, exact for 8-bit (k/255 = 257k/65535) and 16-bit data, or uint8 levels
    when every code is a multiple of 257 (8-bit data): half or a quarter of float32's memory.
    `unit_float` gives back the same float32 values either way."""
    codes = (image * 65535.0).round().to(torch.int32)
    if bool((codes % 257 == 0).all()):
        return (codes // 257).to(torch.uint8)
    return codes.to(torch.uint16)


class PairDataset(Dataset):
    """Items: {"source": (3, h, w), "target": (1, h, w)} in [-1, 1], "mask" (1, h, w) FOV {0, 1},
    "phase" (0 early / 1 late), "label", "id", "index"; with a transform, also "whole_source": the
    whole photo's CLIP view (3, 224, 224) in [-1, 1], flipped as the crop (see `transforms.whole_view`).

    With a transform, each item is a random paired crop drawn from a generator seeded by
    (seed, epoch, index): deterministic across workers and resumes. Without, whole images.

    cache: each image is decoded once, and its FOV mask, window counts and CLIP view computed once,
    into .npy files (`cache.ArrayStore`) that every loader worker maps instead of copying; a crop
    reads and converts only its window. cache_dir: where (None: a temporary folder for this dataset;
    a folder: kept, and shared by the processes and runs that name it). cache=False: everything is
    recomputed from the files for every item.
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
        cache_dir: str | Path | None = None,
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
        self.store = ArrayStore(cache_dir) if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, path, channels: int) -> torch.Tensor:
        return stored_levels(read_image(path, channels=channels, max_pixels=self.max_pixels))

    def _levels(self, path, channels: int) -> torch.Tensor | np.ndarray:
        """The image as stored (`stored_levels`), (C, H, W): memory-mapped when caching."""
        if self.store is None:
            return self._decode(path, channels)
        name = "image-" + file_key(path, channels, self.max_pixels)
        return self.store.get(name, lambda: self._decode(path, channels).numpy())

    def _pair_levels(self, index: int):
        pair = self.pairs[index]
        source = self._levels(pair.source, self.source_channels)
        target = self._levels(pair.target, self.target_channels)
        if source.shape[-2:] != target.shape[-2:]:
            raise PairError(
                f"{pair.target}: size {target.shape[-1]}x{target.shape[-2]} differs from its source "
                f"{pair.source} ({source.shape[-1]}x{source.shape[-2]})"
            )
        return source, target

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole source (3, H, W) and target (1, H, W) in [0, 1]."""
        source, target = self._pair_levels(index)
        return unit_float(as_tensor(source)), unit_float(as_tensor(target))

    def _field_of_view(self, index: int, source) -> dict:
        """What the transform would compute from the whole source, computed once per image and kept:
        the FOV mask (uint8), its window counts (a function of the window size: the crop size, or
        zoom_out's sizes) and the CLIP view."""
        if self.store is None:
            return {}
        transform, path = self.transform, self.pairs[index].source
        key = (self.source_channels, self.max_pixels, transform.fov_threshold)
        mask_name = "fov-" + file_key(path, *key)

        def mask() -> np.ndarray:
            return fov_mask(as_tensor(source), transform.fov_threshold).to(torch.uint8).numpy()

        def view() -> np.ndarray:
            return whole_view(as_tensor(source), transform.whole_view_size).numpy()

        parts = {"mask": self.store.get(mask_name, mask)}

        def counts(window: int) -> np.ndarray:  # per window size (zoom_out draws a few), each computed once
            name = "counts-" + file_key(path, *key, window)
            return self.store.get(name, lambda: window_counts(parts["mask"], window).numpy())

        parts["counts"] = counts
        if transform.whole_view_size > 0:
            view_name = "view-" + file_key(path, self.source_channels, self.max_pixels, transform.whole_view_size)
            parts["view"] = self.store.get(view_name, view)
        return parts

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        # One stream per (seed, epoch, index); the large odd multipliers keep streams apart.
        epoch = self.epoch if epoch is None else epoch
        seed = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """key: an index (crop drawn for the current epoch) or (index, epoch) from a StreamBatchSampler."""
        index, epoch = key if isinstance(key, tuple) else (key, None)
        pair = self.pairs[index]
        if self.transform is not None:
            source, target = self._pair_levels(index)
            item = self.transform(source, target, self.generator(index, epoch), **self._field_of_view(index, source))
        else:
            source, target = self.load(index)
            item = {"source": normalise(source), "target": normalise(target), "mask": fov_mask(source)}
        item.update(phase=phase_index(pair.phase), label=pair.label or "", id=pair.id, index=index)
        return item


def loader_workers(setting: int | str, cuda: bool) -> int:
    """DataLoader worker processes for a num_workers setting: a number as it is; "auto" 0 without a
    GPU (the training step uses every core) and min(4, the cores this process may use) with one."""
    if setting != "auto":
        return int(setting)
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def training_loader(dataset, batch_sampler, num_workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """The training DataLoader: `num_workers` processes prepare batches ahead of the training step
    (kept for the whole run), pinned for a fast copy to the GPU when `pin_memory`. A batch depends only
    on its sampler keys, so it is the same with any number of workers. Code that draws from a worker's
    global generators gets them seeded (torch, NumPy, random) from `seed` and the worker's number."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


class StreamBatchSampler:
    """Micro-batches from an endless stream of per-epoch permutations, addressed by position.

    Micro-batch m of process `rank` (of `world`) holds stream positions
    offset + [(m·world + rank)·B, … + B); position p is item perm_e[p mod N] of epoch e = p div N, where
    perm_e is seeded by (seed, e). So any micro-batch is known without replaying the ones before
    it: a resumed run continues exactly where it stopped (offset = the positions read before it, which
    holds also when it resumes with another batch size or number of processes), and N < B still works.
    Yields lists of (index, epoch) keys for PairDataset.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, offset: int = 0):
        if size < 1:
            raise PairError("the dataset has no pairs")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.offset = rank, world, offset
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._perms[epoch]

    def batch(self, micro_batch: int) -> list[tuple[int, int]]:
        first = self.offset + (micro_batch * self.world + self.rank) * self.batch_size
        keys = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.size)
            keys.append((self._perm(epoch)[offset], epoch))
        return keys

    def __iter__(self):
        micro_batch = 0
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
