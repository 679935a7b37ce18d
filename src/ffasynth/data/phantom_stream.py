"""An unlimited stream of phantom pairs for pretraining, drawn on the fly.

`PhantomStream` is a map-style dataset of virtual length eyes_per_epoch x crops_per_eye with the
items of `PairDataset` ("source" (3, c, c) and "target" (1, c, c) in [-1, 1], "mask", "phase",
"label", "id", "index", and "whole_source" when the transform makes CLIP views), so the training
loop's `StreamBatchSampler` drives it unchanged: its key (index, epoch) names

    eye n = (epoch · world_size + rank) · eyes_per_epoch + index // crops_per_eye,  crop c = index % crops_per_eye

Every epoch brings eyes_per_epoch new eyes per process, and process `rank` never draws another
process's eyes. Eye n is a pure function of (seed, n): its style (from the `styles` weights),
disease, size and generator seed come from numpy's generator seeded [seed, n]; crop c of eye n
(position, flips, phase) from a torch generator seeded by (seed, n, c). So an item is the same on
every run, worker and resume. The last `cache_eyes` eyes are kept (as 8-bit, like the PNGs
`write_phantom_dataset` writes): the sampler visits an epoch's items in a random order, so the
cache holds a whole epoch's eyes by default and each eye is drawn once. With W processes (the
sampler gives each 1/W of an epoch's positions) or k loader workers (each with its own cache), an
eye yields only crops_per_eye/W (or /k) crops: raise crops_per_eye by that factor to keep the cost.

Throughput on one core (benchmarks/phantom_uwf_stats.py, torch and OpenCV on 1 thread, defaults:
8 eyes x 16 crops an epoch, CLIP view 224²): 256² eyes, 128² crops: ~280 items per CPU-second for
UWF eyes (~50 ms to draw one), ~320 for standard ones (~30 ms), ~350 mixed; half of that time is
drawing eyes (32 crops per eye: ~390). 512-853² UWF eyes (real UWF scale), 64 crops per eye: ~130.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ffasynth.data.dataset import PHASES, Mixture
from ffasynth.data.phantom import DISEASES, STYLES, make_eye
from ffasynth.data.transforms import PairedTransform, fov_mask, whole_view, window_counts

# The tiny base's procedural pairs (pretrain.py): eye sides per style (real UWF photos are 853 px wide: vessels and
# disc at native calibre need eyes of that size; standard fundus-camera eyes at 256-512 px give the 1-3 px vessels
# and capillary grain of smaller photos) and the share of each style.
BASE_SIZES = {"uwf": (512, 853), "standard": (256, 512)}
BASE_STYLES = {"uwf": 0.7, "standard": 0.3}
REHEARSAL_CROPS_PER_EYE = 8


def _levels(array: np.ndarray) -> torch.Tensor:
    """[0, 1] float (H, W) or (H, W, C) → uint8 (C, H, W), rounded as the PNG writer rounds."""
    levels = (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return torch.from_numpy(levels[None] if levels.ndim == 2 else levels.transpose(2, 0, 1).copy())


class PhantomStream(Dataset):
    """Procedural photo/FFA crops without end: see the module's docstring for how keys map to eyes.

    size: the eyes' side in pixels, or a (low, high) range drawn per eye (vessel calibre in pixels
    scales with it: a range shows the model several scales), or a mapping style → either of those
    (e.g. UWF-like eyes at native UWF size, standard eyes at fundus-camera sizes). crop: the crop side. styles: weights
    of "standard" and "uwf" eyes (standard eyes are drawn with vary=True). transform: crop, flip
    and CLIP-view settings (its crop_size is replaced by `crop`); by default a plain PairedTransform.
    """

    def __init__(
        self,
        size: int | tuple[int, int] | Mapping[str, int | tuple[int, int]] = 256,
        crop: int = 128,
        styles: Mapping[str, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        eyes_per_epoch: int = 8,
        crops_per_eye: int = 16,
        diseases: Sequence[str] = DISEASES,
        phases: Sequence[str] = PHASES,
        transform: PairedTransform | None = None,
        cache_eyes: int | None = None,
    ):
        styles = dict(styles or {"uwf": 0.5, "standard": 0.5})
        per_style = dict(size) if isinstance(size, Mapping) else {style: size for style in styles}
        missing = [style for style in styles if style not in per_style]
        if missing:
            raise ValueError(f"no size given for style {missing[0]!r}")
        ranges = {
            style: (value, value) if isinstance(value, int) else tuple(value) for style, value in per_style.items()
        }
        low = min(ranges[style][0] for style in styles)  # the smallest eye any style used may draw
        for name, chosen, known in (
            ("style", styles, STYLES),
            ("disease", diseases, DISEASES),
            ("phase", phases, PHASES),
        ):
            unknown = [value for value in chosen if value not in known]
            if unknown:
                raise ValueError(f"unknown {name} {unknown[0]!r}; choose from {known}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if (
            any(r[0] > r[1] for r in ranges.values())
            or low < 32
            or crop > low
            or min(eyes_per_epoch, crops_per_eye) < 1
        ):
            raise ValueError(f"need 32 <= size {size}, crop {crop} <= the smallest size, and >= 1 eye and crop")
        if not diseases or not phases or sum(styles.values()) <= 0:
            raise ValueError("need at least one disease, one phase and a positive style weight")
        self.sizes = {style: ranges[style] for style in styles}  # style → (low, high)
        self.styles = list(styles)
        self.style_weights = np.array([styles[s] for s in self.styles], float) / sum(styles.values())
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.eyes_per_epoch, self.crops_per_eye = eyes_per_epoch, crops_per_eye
        self.diseases, self.phases = tuple(diseases), tuple(phases)
        self.transform = dataclasses.replace(transform or PairedTransform(), crop_size=crop)
        self.cache_eyes = eyes_per_epoch if cache_eyes is None else cache_eyes
        self.epoch = 0
        self._eyes: OrderedDict[int, dict] = OrderedDict()

    def __len__(self) -> int:
        return self.eyes_per_epoch * self.crops_per_eye

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def eye_number(self, index: int, epoch: int) -> int:
        return (epoch * self.world_size + self.rank) * self.eyes_per_epoch + index // self.crops_per_eye

    def describe(self, number: int) -> dict:
        """Eye `number`'s style, disease, size and generator seed."""
        rng = np.random.default_rng([self.seed, number])
        style = self.styles[int(rng.choice(len(self.styles), p=self.style_weights))]
        disease = self.diseases[int(rng.integers(len(self.diseases)))]
        low, high = self.sizes[style]
        size = int(rng.integers(low, high + 1))
        return {"style": style, "disease": disease, "size": size, "seed": int(rng.integers(2**62))}

    def eye(self, number: int) -> dict:
        """Eye `number` as 8-bit tensors (photo (3, H, W), early and late (1, H, W)), cached."""
        cached = self._eyes.get(number)
        if cached is not None:
            self._eyes.move_to_end(number)
            return cached
        spec = self.describe(number)
        eye = make_eye(spec["size"], spec["seed"], spec["disease"], spec["style"], vary=spec["style"] == "standard")
        cached = {"source": _levels(eye.photo), "early": _levels(eye.ffa_early), "late": _levels(eye.ffa_late), **spec}
        if self.transform.whole_view_size > 0:
            cached["view"] = whole_view(cached["source"], self.transform.whole_view_size)
        cached["mask"] = fov_mask(cached["source"], self.transform.fov_threshold)
        cached["counts"] = functools.cache(functools.partial(window_counts, cached["mask"]))  # per eye and window size
        if self.cache_eyes > 0:
            self._eyes[number] = cached
            while len(self._eyes) > self.cache_eyes:
                self._eyes.popitem(last=False)
        return cached

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """key: an index (for the current epoch) or (index, epoch) from a StreamBatchSampler."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        number = self.eye_number(index, epoch)
        eye = self.eye(number)
        crop = index % self.crops_per_eye
        # (seed, eye, crop) → one generator seed, hashed by numpy's SeedSequence: no two keys collide in practice.
        state = np.random.SeedSequence([self.seed, number, crop]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) >> 1)
        phase = self.phases[int(torch.randint(len(self.phases), (1,), generator=generator))]
        # 8-bit levels: the transform converts the crop's window to float, not the whole eye
        item = self.transform(eye["source"], eye[phase], generator, eye.get("view"), eye["mask"], eye["counts"])
        item.update(phase=PHASES.index(phase), label=eye["disease"], id=f"{eye['style']}-{number}", index=index)
        return item


def with_rehearsal(
    pairs: Dataset, share: float, transform: PairedTransform, seed: int, rank: int = 0, world_size: int = 1
) -> Dataset:
    """`pairs` mixed with the base's procedural stream so that `share` of each epoch's items are procedural
    (rounded up; 0: `pairs` unchanged): fine-tuning a base on a few pairs then keeps rehearsing what the base
    learnt on its own data. The stream draws new eyes every epoch (at most REHEARSAL_CROPS_PER_EYE crops each)."""
    if share <= 0:
        return pairs
    wanted = int(np.ceil(len(pairs) * share / (1 - share)))
    crops = min(REHEARSAL_CROPS_PER_EYE, wanted)
    stream = PhantomStream(
        size=BASE_SIZES,
        crop=transform.crop_size,
        styles=BASE_STYLES,
        seed=seed,
        rank=rank,
        world_size=world_size,
        eyes_per_epoch=int(np.ceil(wanted / crops)),
        crops_per_eye=crops,
        transform=transform,
    )
    return Mixture([pairs, stream])
