"""Does each synthetic angiogram follow its own photo? Retrieval over a set of pairs: a synthetic FFA
should be more like its own eye's real FFA than like any other real FFA of the same phase. A method
that ignores its input scores chance here however good its pixel metrics look (an FFA-grey texture
can out-score an input-shaped but imperfect output on PSNR/SSIM). With few translated eyes (a
cross-validation fold of two), the real FFAs of other eyes can join as `distractors`, and the excess
over the mean of the others is reported beside the margin over the best one.

Two similarities, each over the field of view of the real FFA being compared (its largest bright
blob, holes filled: data.registration.field_of_view), the synthetic image resized to that real
image's size first:
- `correlation`: Pearson correlation of the grey levels;
- `vessel_overlap`: Dice of the two vessel masks (`evaluation.vessels.vessel_mask`, the synthetic
  one drawn inside its own eye's field of view): does it show this eye's vessel tree?
Outputs can be filtered first: `centred` (what all outputs of a phase share taken out); and
`vessel_band_retrieval` scores both sides' vessel band (the low-frequency layout taken out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from ffasynth.data.registration import field_of_view, inset
from ffasynth.evaluation.vessels import dice


def _at_shape(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An (H, W) grey image area-resized (as float32) to `shape`'s height and width, or as it is when it fits."""
    if image.shape[:2] == tuple(shape[:2]):
        return image
    return cv2.resize(image.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def correlation(fake: np.ndarray, real: np.ndarray, fov: np.ndarray) -> float:
    """Pearson correlation of two (H, W) images over the mask (0 where either is constant there)."""
    fake = _at_shape(fake, real.shape)
    a, b = fake[fov].astype(np.float64), real[fov].astype(np.float64)
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def vessel_band(image: np.ndarray, fine: float = 1.5, coarse: float = 6.0) -> np.ndarray:
    """The vessel-scale part of an (H, W) grey image: its Gaussian blur at `fine` px minus at `coarse` px."""
    image = image.astype(np.float32)
    return cv2.GaussianBlur(image, (0, 0), fine) - cv2.GaussianBlur(image, (0, 0), coarse)


def vessel_overlap(fake_vessels: np.ndarray, real_vessels: np.ndarray, fov: np.ndarray) -> float:
    """Dice of two bool vessel masks inside `fov` (0 when neither has a vessel there)."""
    if fake_vessels.shape != real_vessels.shape:
        size = (real_vessels.shape[1], real_vessels.shape[0])
        fake_vessels = cv2.resize(fake_vessels.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    overlap = dice(fake_vessels & fov, real_vessels & fov)
    return 0.0 if np.isnan(overlap) else overlap


def centred(fakes: dict[str, np.ndarray], groups: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Each synthetic image minus the mean of its group's (resized to its size): what varies with the input.

    A pattern every output shares (an FFA-grey texture, the layout of a tiled decode's brightness blocks)
    can resemble one real angiogram more than the others and decide `retrieval` for every output alike;
    centred, it is gone, and outputs that are all the same become all zero, which is own-first for none
    (such a method scores 0 here, not the chance level). Scored with `retrieval(centred(fakes, groups),
    reals, groups)`. An image alone in its group has nothing to share and is returned as it is."""
    groups = groups or {}
    members: dict[str | None, list[str]] = {}
    for key in fakes:
        members.setdefault(groups.get(key), []).append(key)
    out = {}
    for keys in members.values():
        if len(keys) == 1:
            out[keys[0]] = fakes[keys[0]].astype(np.float32)
            continue
        images = {key: fakes[key].astype(np.float32) for key in keys}
        shape = images[keys[0]].shape
        mean = np.mean([_at_shape(images[key], shape) for key in keys], axis=0)
        for key, image in images.items():
            out[key] = image - _at_shape(mean, image.shape)
    return out


@dataclass
class Retrieval:
    keys: list[str]  # the synthetic images (rows)
    similarity: np.ndarray  # (n, m): row i = synthetic i against real j (same group only; NaN across groups)
    own_first: list[bool]  # is each synthetic image's own real FFA the most similar of its group?
    margins: list[float]  # own similarity minus the best other one of its group
    # own similarity minus the mean of the others of its group: steadier than the margin, which hangs on one
    # other eye (the same outputs at another noise seed move it less)
    excess: list[float] = field(default_factory=list)
    # the real images (columns): keys first, then any distractors (real FFAs of eyes not translated)
    columns: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.own_first)) if self.own_first else float("nan")

    @property
    def mean_margin(self) -> float:
        return float(np.mean(self.margins)) if self.margins else float("nan")

    @property
    def mean_excess(self) -> float:
        return float(np.mean(self.excess)) if self.excess else float("nan")

    @property
    def chance(self) -> float:
        """Expected accuracy of an input-blind method: the mean of 1/(candidates) over the scored rows (an
        item with no other candidate is left out of `accuracy`, so of this too)."""
        sizes = np.sum(~np.isnan(self.similarity), axis=1)
        scored = sizes[sizes > 1]
        return float(np.mean(1.0 / scored)) if len(scored) else float("nan")


def retrieval(
    fakes: dict[str, np.ndarray],
    reals: dict[str, np.ndarray],
    groups: dict[str, str] | None = None,
    measure: Callable[[np.ndarray, np.ndarray, np.ndarray], float] = correlation,
    fovs: dict[str, np.ndarray] | None = None,
    distractors: dict[str, np.ndarray] | None = None,
) -> Retrieval:
    """fakes/reals: key → (H, W) grey in [0, 1], or bool vessel masks with measure=vessel_overlap (the
    same keys); groups: key → phase (compare within a phase only; default: one group); fovs: key → the
    real image's field of view (default: found in the real image). Items alone in their group are
    left out of the score. distractors: key → the real FFA of an eye that was not translated (e.g. a
    training eye's, in the same frame): a candidate every synthetic image of its group must also beat,
    so a few translated eyes still give a demanding test; its keys may not be among the fakes'."""
    keys = sorted(fakes)
    distractors = distractors or {}
    shared = sorted(set(distractors) & set(keys))
    if shared:
        raise ValueError(f"distractor {shared[0]!r} is also a translated eye")
    columns = keys + sorted(distractors)
    candidates = {**{key: reals[key] for key in keys}, **distractors}
    groups = groups or {}
    fovs = fovs or {}
    for key in columns:
        if key not in fovs:
            fovs[key] = field_of_view(candidates[key])
    similarity = np.full((len(keys), len(columns)), np.nan)
    for i, key in enumerate(keys):
        for j, other in enumerate(columns):
            if groups.get(key) == groups.get(other):
                similarity[i, j] = measure(fakes[key], candidates[other], fovs[other])
    own_first, margins, excess = [], [], []
    for i in range(len(keys)):
        others = [similarity[i, j] for j in range(len(columns)) if j != i and not np.isnan(similarity[i, j])]
        if others:
            own_first.append(bool(similarity[i, i] > max(others)))
            margins.append(float(similarity[i, i] - max(others)))
            excess.append(float(similarity[i, i] - np.mean(others)))
    return Retrieval(keys, similarity, own_first, margins, excess, columns)


def vessel_band_retrieval(
    fakes: dict[str, np.ndarray],
    reals: dict[str, np.ndarray],
    groups: dict[str, str] | None = None,
    fovs: dict[str, np.ndarray] | None = None,
    distractors: dict[str, np.ndarray] | None = None,
    coarse: float = 6.0,
) -> Retrieval:
    """`retrieval` on the vessel band of both sides: does each output's vessel-scale structure lie where its
    own eye's does, apart from the low-frequency layout (field shape, bright centre, dark periphery) that
    dominates the grey-level correlation and that real angiograms of different eyes largely share (their grey
    correlations with each other are 0.4-0.7 on the shared UWF eyes)? The real images are banded too, so an
    eye's layout contrast does not enter the correlation's denominator; each field of view (found in the whole
    real image unless given) is eroded by 2 × `coarse` px, so the ring the band draws along the field's edge
    and the eyelids' cannot decide it."""
    everything = {**reals, **(distractors or {})}
    fovs = fovs or {}
    inner = {
        key: inset(fovs[key] if key in fovs else field_of_view(real), 2 * int(coarse))
        for key, real in everything.items()
    }
    band = {key: vessel_band(image, coarse=coarse) for key, image in fakes.items()}
    return retrieval(
        band,
        {key: vessel_band(image, coarse=coarse) for key, image in reals.items()},
        groups,
        fovs=inner,
        distractors={key: vessel_band(image, coarse=coarse) for key, image in (distractors or {}).items()},
    )
