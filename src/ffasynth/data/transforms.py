"""Paired transforms: one random crop, the same flips, normalisation to [-1, 1], field-of-view mask,
and the whole photo's CLIP view (for `model.clip_view=whole`), flipped as the crop is.

Everything that is random takes an explicit `torch.Generator`, so a sample is a pure function of
(seed, epoch, index): resumed runs and any number of workers see the same crops.

Images may come as float in [0, 1] or as stored (uint8 levels, uint16 codes; tensors or memory-mapped
arrays): only the crop's window is read and converted to float. The FOV mask and its window counts
may be given, computed once per image (`PairDataset` caches them): each costs a pass over the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ffasynth.data.io import unit_float

ZOOM_LEVELS = 8  # zoom_out's window sizes: crop_size · zoom_out^(k/8), k = 0..8

# CLIP ViT-L/14's input side (SD image variation's encoder); a CLIP with another input size resizes
# this view once more, the same way in training and in the pipeline.
CLIP_VIEW_SIZE = 224


def fov_mask(source: torch.Tensor, threshold: float = 0.04, smooth: int = 7) -> torch.Tensor:
    """(C, H, W) in [0, 1] (or uint8/uint16 levels) → (1, H, W) float {0, 1}: pixels brighter than
    `threshold` after a `smooth`-pixel box blur (so dark vessels and pupil-edge noise inside the field stay inside)."""
    brightness = unit_float(source[:1])
    for channel in range(1, source.shape[0]):  # one channel in float at a time (and uint16 has no amax)
        brightness = torch.maximum(brightness, unit_float(source[channel : channel + 1]))
    brightness = brightness[None]
    if smooth > 1:
        brightness = F.avg_pool2d(brightness, smooth, stride=1, padding=smooth // 2, count_include_pad=False)
    return (brightness[0] > threshold).float()


def whole_view(image: torch.Tensor, size: int = CLIP_VIEW_SIZE) -> torch.Tensor:
    """The whole photo as CLIP's processor takes it: (C, H, W) or (N, C, H, W), float in [0, 1] or
    uint8 levels → float in [0, 1], (…, size, size): shortest side resized to `size` (bicubic,
    antialiased), then the centre crop. One channel at a time: no full-size float copy of a large photo."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, int(height * scale)), max(size, int(width * scale)))  # truncated, as CLIP's processor
    resize = dict(size=new_size, mode="bicubic", antialias=True, align_corners=False)
    batch = image if image.ndim == 4 else image[None]
    channels = [F.interpolate(unit_float(batch[:, c : c + 1]).float(), **resize) for c in range(batch.shape[1])]
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    view = torch.cat(channels, dim=1)[..., top : top + size, left : left + size].clamp(0.0, 1.0)
    return view if image.ndim == 4 else view[0]


def as_tensor(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor as it is; an array (e.g. memory-mapped, read-only) copied into one."""
    return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad with zeros (black) symmetrically to at least height x width."""
    pad_h, pad_w = max(0, height - image.shape[-2]), max(0, width - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image
    return F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def crop_padded(image: torch.Tensor | np.ndarray, top: int, left: int, size: int) -> torch.Tensor:
    """The size x size window at (top, left) of `image` (…, H, W) zero-padded as `pad_to(image, size,
    size)` pads it, reading only the window (from a tensor or an array, e.g. memory-mapped; a copy then)."""
    height, width = image.shape[-2:]
    top, left = top - max(0, size - height) // 2, left - max(0, size - width) // 2  # into image coordinates
    rows = slice(max(0, top), max(0, min(height, top + size)))
    cols = slice(max(0, left), max(0, min(width, left + size)))
    window = image[..., rows, cols]
    window = as_tensor(window)
    if window.shape[-2:] == (size, size):
        return window
    padded = window.new_zeros((*window.shape[:-2], size, size))
    padded[..., rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = window
    return padded


def _integral(mask: torch.Tensor) -> torch.Tensor:
    """Summed-area table with a zero first row/column: box sums in O(1)."""
    return F.pad(mask[0].double().cumsum(0).cumsum(1), (1, 0, 1, 0))


def _window_grid(height: int, width: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tops and lefts of the windows choose_crop draws from (stride ~size/16) in an image padded to size."""
    stride = max(1, size // 16)
    height, width = max(height, size), max(width, size)
    return torch.arange(0, height - size + 1, stride), torch.arange(0, width - size + 1, stride)


def window_counts(mask: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """FOV pixels inside each size x size window of the grid choose_crop draws from, for a (1, H, W)
    {0, 1} mask zero-padded to at least size: float64 (rows, cols), box sums of one integral image."""
    mask = pad_to(as_tensor(mask), size, size)
    table = _integral(mask)
    tops, lefts = _window_grid(mask.shape[-2], mask.shape[-1], size)
    t, lo = tops[:, None], lefts[None, :]
    return table[t + size, lo + size] - table[t, lo + size] - table[t + size, lo] + table[t, lo]


def choose_crop(
    mask: torch.Tensor | np.ndarray,
    size: int,
    generator: torch.Generator,
    min_fraction: float,
    counts: torch.Tensor | np.ndarray | None = None,
) -> tuple[int, int]:
    """Top-left (in the mask padded to size) of a size x size crop, uniform over the positions (on a
    grid of stride ~size/16) whose crop has at least `min_fraction` of its pixels inside the mask; the
    best position when none has. counts: `window_counts(mask, size)`, when computed before."""
    height, width = (max(side, size) for side in mask.shape[-2:])
    stride = max(1, size // 16)
    tops, lefts = _window_grid(height, width, size)
    inside = window_counts(mask, size) if counts is None else as_tensor(counts)
    fraction = inside / (size * size)
    valid = (fraction >= min_fraction).flatten().nonzero().flatten()
    if len(valid) == 0:
        flat = int(fraction.flatten().argmax())
    else:
        flat = int(valid[torch.randint(0, len(valid), (1,), generator=generator)])
    top, left = int(tops[flat // len(lefts)]), int(lefts[flat % len(lefts)])
    if stride > 1:  # jitter within the grid cell, kept only if the crop stays good enough
        jitter = torch.randint(0, stride, (2,), generator=generator)
        top_j, left_j = min(top + int(jitter[0]), height - size), min(left + int(jitter[1]), width - size)
        box = float(crop_padded(mask, top_j, left_j, size).sum(dtype=torch.float64))  # exact: a pixel count
        if box / (size * size) >= min(min_fraction, float(fraction.flatten()[flat])):
            top, left = top_j, left_j
    return top, left


@dataclass
class PairedTransform:
    crop_size: int = 768
    hflip: bool = True
    vflip: bool = False
    min_fov_fraction: float = 0.1  # as DataConfig's
    fov_threshold: float = 0.04
    whole_view_size: int = CLIP_VIEW_SIZE  # items carry the whole photo's CLIP view at this size; 0 = not
    # > 1: each crop covers a window z·crop_size wide (z = zoom_out^(k/ZOOM_LEVELS), k uniform in 0..ZOOM_LEVELS:
    # log-uniform over a few sizes, whose window counts a dataset can cache; the window at most the image's
    # longest side), area-averaged down to crop_size: the model also sees more of the eye at once, the layout
    # a crop of crop_size pixels at native scale cannot show; 1 = off
    zoom_out: float = 1.0
    source_jitter: float = 0.0  # > 0: jitter_photo on each crop's photo (and its CLIP view), never the target

    @classmethod
    def from_config(cls, data_config) -> PairedTransform:
        return cls(
            crop_size=data_config.crop_size,
            hflip=data_config.hflip,
            vflip=data_config.vflip,
            min_fov_fraction=data_config.min_fov_fraction,
            fov_threshold=data_config.fov_threshold,
            zoom_out=data_config.zoom_out,
            source_jitter=data_config.source_jitter,
        )

    def __call__(
        self,
        source: torch.Tensor | np.ndarray,
        target: torch.Tensor | np.ndarray,
        generator: torch.Generator,
        view: torch.Tensor | np.ndarray | None = None,
        mask: torch.Tensor | np.ndarray | None = None,
        counts: torch.Tensor | np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """source (Cs, H, W), target (Ct, H, W), float in [0, 1] or uint8/uint16 levels → crops in
        [-1, 1] and a (1, h, w) FOV mask; "whole_source": the whole source's CLIP view in [-1, 1], with
        the crop's flips. Computed here when not given (each a pass over the whole image): `view`, the
        source's CLIP view; `mask`, its (1, H, W) `fov_mask` at fov_threshold; `counts`, the mask's
        `window_counts` at crop_size, or a function window → `window_counts(mask, window)` (with zoom_out)."""
        if source.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in size")
        if view is None and self.whole_view_size > 0:
            view = whole_view(as_tensor(source), self.whole_view_size)
        if mask is None:
            mask = fov_mask(as_tensor(source), self.fov_threshold)
        size = window = self.crop_size
        if self.zoom_out > 1.0:  # drawn only when on: crops without zoom stay as they were
            level = int(torch.randint(0, ZOOM_LEVELS + 1, (1,), generator=generator))
            window = round(size * self.zoom_out ** (level / ZOOM_LEVELS))
            window = min(window, max(size, *source.shape[-2:]))  # never wider than the whole image
        if callable(counts):
            counts = counts(window)
        elif window != size:
            counts = None  # computed for this window below (a pass over the whole mask)
        top, left = choose_crop(mask, window, generator, self.min_fov_fraction, counts)
        crops = [unit_float(crop_padded(x, top, left, window)) for x in (source, target)]
        crops.append(crop_padded(mask, top, left, window).float())
        if window != size:  # area-averaged down to crop_size; the mask stays {0, 1}
            crops = [F.interpolate(x[None], size=(size, size), mode="area")[0] for x in crops]
            crops[2] = (crops[2] >= 0.5).float()
        flips = torch.rand(2, generator=generator)
        crops.append(None if view is None else as_tensor(view))
        if self.hflip and flips[0] < 0.5:
            crops = [None if x is None else x.flip(-1) for x in crops]
        if self.vflip and flips[1] < 0.5:
            crops = [None if x is None else x.flip(-2) for x in crops]
        source, target, mask, view = crops
        if self.source_jitter > 0:  # drawn only when on: crops without it stay as they were
            source, view = jitter_photo([source, view], self.source_jitter, generator)
        item = {"source": normalise(source), "target": normalise(target), "mask": mask.contiguous()}
        if view is not None:
            item["whole_source"] = normalise(view)
        return item


def jitter_photo(images: list[torch.Tensor | None], strength: float, generator: torch.Generator) -> list:
    """One random photometric change for (C, H, W) images in [0, 1] of one photo: x → clamp(gain_c · x^gamma),
    a gain per channel in [1 - strength, 1 + strength] (exposure and the lasers' balance differ between
    cameras and visits) and one gamma in [e^-strength, e^strength]. 0 stays 0; the crop's FOV mask is the
    unjittered photo's.
    Applied to the source only: the photo's overall levels then tell the model nothing about the angiogram's."""
    channels = next(x for x in images if x is not None).shape[0]
    draws = torch.rand(channels + 1, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    gain = (1.0 + strength * draws[:channels])[:, None, None]
    gamma = math.exp(strength * float(draws[-1]))
    return [None if x is None else (x.clamp(0.0, 1.0) ** gamma * gain.to(x.dtype)).clamp(0.0, 1.0) for x in images]


def normalise(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1] (the VAE's input range)."""
    return (image * 2.0 - 1.0).contiguous()


def denormalise(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped."""
    return ((image + 1.0) / 2.0).clamp(0.0, 1.0)
