"""Does the generated angiogram show the real one's vessels? Both images get the same vessel mask:
the multiscale Frangi vesselness registration uses (`data.registration.vessel_map`: bright ridges
of the contrast-equalised image, scaled so that its 99th percentile inside the field of view is 1)
above VESSEL_THRESHOLD, where the image is also brighter than its surroundings by VESSEL_CONTRAST
grey levels (that scaling would otherwise find "vessels" in a flat image), without pieces under
VESSEL_MIN_AREA pixels (background texture). Both are drawn inside the real image's field of view,
so the two masks cover the same region.

Scores, inside that field:
- Dice = 2|R∩G| / (|R|+|G|);
- clDice (centre-line Dice, Shit et al. 2021), which rewards continuous thin vessels over thick
  blobs: Tprec = |skel(G)∩R| / |skel(G)|, Tsens = |skel(R)∩G| / |skel(R)|,
  clDice = 2·Tprec·Tsens / (Tprec + Tsens);
- vessel density error = |G| / |FOV| − |R| / |FOV| (signed in the per-image rows, its size in
  the summary).
Dice and clDice are undefined (NaN, left out of means) when the real image shows no vessel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from skimage.morphology import skeletonize

from ffasynth.data.registration import vessel_map

# Frangi scales in pixels of the evaluated image. skimage's Hessian switches to a 100-sigma kernel
# for sigma <= 1 (13x slower on a 853x682 image), so the finest scale is just above it.
VESSEL_SIGMAS = (1.25, 2.0, 3.0, 4.0)
VESSEL_THRESHOLD = 0.3  # on the vesselness scaled to its 99th percentile (tuned on UWF training eyes 1-4)
VESSEL_CONTRAST = 0.02  # grey levels above a Gaussian background of sigma 4 x the largest scale
VESSEL_MIN_AREA = 40  # pixels: smaller connected pieces are texture, not vessels
VESSEL_METRICS = ("vessel_dice", "vessel_cldice", "vessel_density_error")


def vessel_mask(image: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """(H, W) grey in [0, 1] (vessels bright, as in an FFA) → bool vessel mask inside `fov`."""
    if not fov.any():
        return np.zeros(image.shape, bool)
    # the black outside, filled with the field's median, leaves no step at the rim for CLAHE and the blur
    image = np.where(fov, image, np.median(image[fov])).astype(np.float32)
    vesselness = vessel_map(image, fov, dark_vessels=False, sigmas=VESSEL_SIGMAS)
    brighter = image - cv2.GaussianBlur(image, (0, 0), 4 * max(VESSEL_SIGMAS)) > VESSEL_CONTRAST
    return drop_small((vesselness > VESSEL_THRESHOLD) & brighter, VESSEL_MIN_AREA) & fov


def drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The bool mask without its 8-connected pieces of fewer than `min_area` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # the background
    return keep[labels] if count > 1 else np.zeros(mask.shape, bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|); NaN when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else math.nan


def cldice(real: np.ndarray, generated: np.ndarray) -> float:
    """Centre-line Dice of two bool masks; NaN when the real mask is empty, 0 when the generated one is."""
    if not real.any():
        return math.nan
    if not generated.any():
        return 0.0
    skeleton_real, skeleton_generated = skeletonize(real), skeletonize(generated)
    precision = (skeleton_generated & real).sum() / max(1, skeleton_generated.sum())
    sensitivity = (skeleton_real & generated).sum() / max(1, skeleton_real.sum())
    total = precision + sensitivity
    return float(2.0 * precision * sensitivity / total) if total > 0 else 0.0


def vessel_scores(real: np.ndarray, generated: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """Dice, clDice and density error of two vessel masks inside `fov` (see the module docstring)."""
    real, generated = real & fov, generated & fov
    area = max(1, int(fov.sum()))
    return {
        "vessel_dice": dice(real, generated) if real.any() else math.nan,
        "vessel_cldice": cldice(real, generated),
        "vessel_density_error": (int(generated.sum()) - int(real.sum())) / area,
    }


def overlap_image(real: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1]: real-only vessels green, generated-only magenta, both white, neither black."""
    generated, real = generated.astype(np.float32), real.astype(np.float32)
    return np.stack([generated, real, generated])  # (R, G, B): both → (1, 1, 1)
