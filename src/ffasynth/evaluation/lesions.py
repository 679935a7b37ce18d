"""Per-lesion recall on phantom angiograms: the phantom generator records where it drew each lesion
(`N.lesions.json` beside `N.png`, `data.phantom.lesion_record`), so we can ask of every lesion
whether the generated angiogram shows it where the real one does.

A lesion's contrast in an image is median(disc of its radius) − median(ring from 2 to 3 radii),
inside the field of view (discs at least 1.5 px, rings at least 3 px wide). Bright lesions
(microaneurysms, leakage, laser scars) have a positive sign, dark ones (haemorrhages block,
non-perfusion) a negative one. A lesion counts in an angiogram when the real one shows it: its
signed contrast there is at least VISIBLE_CONTRAST. The generated angiogram shows it when its signed
contrast at the same place is at least FOUND_SHARE of the real one's. Recall = shown / counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffasynth.data.phantom import LESIONS_SUFFIX, Lesion, read_lesion_record

SIGN = {"microaneurysm": 1, "leakage": 1, "laser_scar": 1, "haemorrhage": -1, "non_perfusion": -1}
PLURAL = {
    "microaneurysm": "microaneurysms",
    "leakage": "leakage blobs",
    "laser_scar": "laser scars",
    "haemorrhage": "haemorrhages",
    "non_perfusion": "non-perfusion areas",
}
VISIBLE_CONTRAST = 0.03  # grey levels: the real angiogram shows the lesion
FOUND_SHARE = 0.5  # the generated one shows it with at least half the real one's contrast
LESION_METRICS = ("lesion_recall",)


@dataclass(frozen=True)
class Sighting:
    kind: str
    real_contrast: float  # signed by the lesion's kind: > 0 means it looks as it should
    generated_contrast: float

    @property
    def visible(self) -> bool:
        return self.real_contrast >= VISIBLE_CONTRAST

    @property
    def found(self) -> bool:
        return self.visible and self.generated_contrast >= FOUND_SHARE * self.real_contrast


def record_path(real: Path) -> Path:
    """Where the lesion record of a uwf-layout angiogram `N.k.ext` lies: `N.lesions.json`."""
    return real.with_name(real.name.split(".")[0] + LESIONS_SUFFIX)


def lesions_for(real: Path, shape: tuple[int, int]) -> list[Lesion] | None:
    """The lesions drawn in the eye of the angiogram `real`, in pixels of an image of `shape`
    (the record's own size scaled); None when there is no record (not a phantom)."""
    path = record_path(real)
    if not path.is_file():
        return None
    (height, width), lesions = read_lesion_record(path)
    sy, sx = shape[0] / height, shape[1] / width
    return [Lesion(item.kind, item.x * sx, item.y * sy, item.radius * math.sqrt(sx * sy)) for item in lesions]


def contrast(image: np.ndarray, lesion: Lesion, fov: np.ndarray) -> float:
    """median(disc) − median(ring) inside `fov` (see the module docstring); NaN when under half the
    disc lies inside the field of view or the ring has fewer than 8 pixels there."""
    radius = max(1.5, lesion.radius)
    outer = max(3 * radius, 2 * radius + 3)
    top, bottom = max(0, int(lesion.y - outer)), min(image.shape[0], int(math.ceil(lesion.y + outer)) + 1)
    left, right = max(0, int(lesion.x - outer)), min(image.shape[1], int(math.ceil(lesion.x + outer)) + 1)
    if top >= bottom or left >= right:
        return math.nan
    ys, xs = np.mgrid[top:bottom, left:right]
    distance = np.hypot(xs - lesion.x, ys - lesion.y)
    inside = fov[top:bottom, left:right]
    crop = image[top:bottom, left:right]
    disc, ring = (distance <= radius), (distance >= 2 * radius) & (distance <= outer)
    if (disc & inside).sum() < 0.5 * max(1, disc.sum()) or (ring & inside).sum() < 8:
        return math.nan
    return float(np.median(crop[disc & inside]) - np.median(crop[ring & inside]))


def sightings(real: np.ndarray, generated: np.ndarray, lesions: list[Lesion], fov: np.ndarray) -> list[Sighting]:
    """Each scorable lesion of a known kind with its signed contrast on the real and generated image."""
    found = []
    for lesion in lesions:
        if lesion.kind not in SIGN:
            continue
        on_real, on_generated = contrast(real, lesion, fov), contrast(generated, lesion, fov)
        if not math.isnan(on_real) and not math.isnan(on_generated):
            sign = SIGN[lesion.kind]
            found.append(Sighting(lesion.kind, sign * on_real, sign * on_generated))
    return found


def lesion_counts(found: list[Sighting]) -> dict[str, dict[str, int]]:
    """kind → {"shown_real": lesions the real angiograms show, "shown_generated": of those, shown by
    the generated ones}."""
    counts: dict[str, dict[str, int]] = {}
    for sighting in found:
        if sighting.visible:
            entry = counts.setdefault(sighting.kind, {"shown_real": 0, "shown_generated": 0})
            entry["shown_real"] += 1
            entry["shown_generated"] += sighting.found
    return counts


def recall_sentence(counts: dict[str, dict[str, int]]) -> str:
    """ "7 of 10 leakage blobs, 12 of 40 microaneurysms" (kinds in a fixed order)."""
    parts = [
        f"{counts[kind]['shown_generated']} of {counts[kind]['shown_real']} {PLURAL[kind]}"
        for kind in SIGN
        if kind in counts
    ]
    return ", ".join(parts)
