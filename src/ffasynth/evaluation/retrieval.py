"""Does each synthetic angiogram follow its own photo? Retrieval over a set of pairs: a synthetic FFA
should be more like its own eye's real FFA than like any other real FFA of the same phase. A method
that ignores its input scores chance here however good its pixel metrics look (an FFA-grey texture
can out-score an input-shaped but imperfect output on PSNR/SSIM).

Similarity: Pearson correlation over the field of view of the real FFA being compared (its largest
bright blob, holes filled: data.registration.field_of_view), after resizing the synthetic image to
that real image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ffasynth.data.registration import field_of_view


def correlation(fake: np.ndarray, real: np.ndarray, fov: np.ndarray) -> float:
    """Pearson correlation of two (H, W) images over the mask (0 where either is constant there)."""
    if fake.shape != real.shape:
        fake = cv2.resize(fake.astype(np.float32), (real.shape[1], real.shape[0]), interpolation=cv2.INTER_AREA)
    a, b = fake[fov].astype(np.float64), real[fov].astype(np.float64)
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else 0.0


@dataclass
class Retrieval:
    keys: list[str]
    similarity: np.ndarray  # (n, n): row i = synthetic i against real j (same group only; NaN across groups)
    own_first: list[bool]  # is each synthetic image's own real FFA the most similar of its group?
    margins: list[float]  # own similarity minus the best other one of its group

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.own_first)) if self.own_first else float("nan")

    @property
    def mean_margin(self) -> float:
        return float(np.mean(self.margins)) if self.margins else float("nan")

    @property
    def chance(self) -> float:
        """Expected accuracy of an input-blind method: the mean of 1/(group size)."""
        sizes = np.sum(~np.isnan(self.similarity), axis=1)
        return float(np.mean(1.0 / sizes[sizes > 0])) if len(sizes) else float("nan")


def retrieval(fakes: dict[str, np.ndarray], reals: dict[str, np.ndarray], groups: dict[str, str] | None = None):
    """fakes/reals: key → (H, W) grey in [0, 1] (the same keys); groups: key → phase (compare within a
    phase only; default: one group). Items alone in their group are left out of the score."""
    keys = sorted(fakes)
    groups = groups or {}
    fovs = {key: field_of_view(reals[key]) for key in keys}
    n = len(keys)
    similarity = np.full((n, n), np.nan)
    for i, key in enumerate(keys):
        for j, other in enumerate(keys):
            if groups.get(key) == groups.get(other):
                similarity[i, j] = correlation(fakes[key], reals[other], fovs[other])
    own_first, margins = [], []
    for i in range(n):
        others = [similarity[i, j] for j in range(n) if j != i and not np.isnan(similarity[i, j])]
        if others:
            own_first.append(bool(similarity[i, i] > max(others)))
            margins.append(float(similarity[i, i] - max(others)))
    return Retrieval(keys, similarity, own_first, margins)
