"""Hyperfluorescence (leakage, staining, window defects) and hypofluorescence (non-perfusion,
blocking) regions of an angiogram, drawn the same way on the real and the generated image:

- local background: the median grey level in a window BACKGROUND_WINDOW × the shorter side wide
  (at 1/4 scale; outside the field of view filled with the nearest value inside, so the rim is
  measured against the rim);
- hyperfluorescent: brighter than that background by more than REGION_MARGIN grey levels (images in
  [0, 1]), vessels (the `evaluation.vessels` mask, widened by 2 px) left out;
- hypofluorescent: darker than it by more than REGION_MARGIN;
- both opened with a disc and cleared of pieces under REGION_MIN_SIDE² (sides as fractions of
  the shorter image side), inside the field of view less a rim of RIM × the shorter side.

Scores: Dice of the real and generated region masks (NaN when the real image has none of that kind)
and the area error |generated − real| as a fraction of the field of view.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ffasynth.evaluation.vessels import dice, drop_small

REGION_MARGIN = 0.1  # grey levels above / below the local background
BACKGROUND_WINDOW = 0.3  # median window, fraction of the shorter side
BACKGROUND_SCALE = 4  # the background is computed at 1/4 size: a median this wide is blind to detail
REGION_MIN_SIDE = 0.015  # regions smaller than (0.015 · shorter side)² pixels are dropped
RIM = 0.02  # the field of view's rim (vignetting, lids) is left out
REGION_METRICS = ("hyper_dice", "hypo_dice", "hyper_area_error", "hypo_area_error")


def local_background(image: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """(H, W) median background of a grey image in [0, 1] (see the module docstring)."""
    height, width = image.shape
    small_size = (max(1, round(width / BACKGROUND_SCALE)), max(1, round(height / BACKGROUND_SCALE)))
    small = cv2.resize(image.astype(np.float32), small_size, interpolation=cv2.INTER_AREA)
    inside = cv2.resize(fov.astype(np.uint8), small_size, interpolation=cv2.INTER_NEAREST) > 0
    if inside.any() and not inside.all():  # each outside pixel takes the value of the nearest inside one
        _, labels = cv2.distanceTransformWithLabels(
            (~inside).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
        )
        values = np.zeros(labels.max() + 1, np.float32)
        values[labels[inside]] = small[inside]
        small = values[labels]
    window = max(3, int(BACKGROUND_WINDOW * min(height, width) / BACKGROUND_SCALE) // 2 * 2 + 1)
    median = cv2.medianBlur(np.uint8(np.clip(small, 0, 1) * 255 + 0.5), min(window, 255))
    return cv2.resize(median.astype(np.float32) / 255.0, (width, height), interpolation=cv2.INTER_LINEAR)


def core_of(fov: np.ndarray) -> np.ndarray:
    """The field of view less its rim."""
    rim = max(1, round(RIM * min(fov.shape)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim + 1, 2 * rim + 1))
    return cv2.erode(fov.astype(np.uint8), disc) > 0


def region_masks(image: np.ndarray, fov: np.ndarray, vessels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hyperfluorescent, hypofluorescent) bool masks of a grey angiogram in [0, 1]."""
    if not fov.any():
        return np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    side = min(image.shape)
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(0.5, 0.004 * side))  # grain is not a region
    difference = smooth - local_background(image, fov)
    core = core_of(fov)
    widened = cv2.dilate(vessels.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    radius = max(1, round(0.004 * side))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    min_area = max(4, round((REGION_MIN_SIDE * side) ** 2))

    def clean(mask: np.ndarray) -> np.ndarray:
        opened = cv2.morphologyEx((mask & core).astype(np.uint8), cv2.MORPH_OPEN, disc) > 0
        return drop_small(opened, min_area)

    return clean((difference > REGION_MARGIN) & ~widened), clean(difference < -REGION_MARGIN)


def region_scores(real: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray], fov) -> dict:
    """Dice and area error of the (hyper, hypo) masks of a real and a generated angiogram."""
    area = max(1, int(core_of(fov).sum()))
    scores = {}
    for name, real_mask, generated_mask in zip(("hyper", "hypo"), real, generated, strict=True):
        scores[f"{name}_dice"] = dice(real_mask, generated_mask) if real_mask.any() else math.nan
        scores[f"{name}_area_error"] = abs(int(generated_mask.sum()) - int(real_mask.sum())) / area
    return scores


def regions_image(image: np.ndarray, hyper: np.ndarray, hypo: np.ndarray) -> np.ndarray:
    """(3, H, W): the angiogram dimmed to half, hyperfluorescent regions yellow, hypofluorescent blue."""
    rgb = np.repeat(0.5 * np.clip(image, 0, 1)[None], 3, axis=0).astype(np.float32)
    rgb[:, hyper] = np.array([1.0, 0.85, 0.0], np.float32)[:, None]
    rgb[:, hypo] = np.array([0.2, 0.45, 1.0], np.float32)[:, None]
    return rgb
