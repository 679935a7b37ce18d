"""Does the generated angiogram show what a clinician looks for in the real one, and does it follow
its own input? Metrics that need no downloaded network, computed with the pixel metrics:

- `retrieval`: is each generated FFA more like its own eye's real FFA than like every other real
  FFA of the same phase (`evaluation.retrieval`), by grey-level correlation and by vessel Dice;
- `vessels`: Dice, clDice and density error of the vessel masks (`evaluation.vessels`);
- `regions`: Dice and area error of the hyper- and hypofluorescent regions (`evaluation.regions`),
  also per phase where the pair's name gives it (uwf `N.1` early, `N.2` late);
- `lesions`: on phantoms, the share of drawn lesions that the generated FFA shows where the real
  one does (`evaluation.lesions`).

Every map is drawn inside the real image's field of view (`data.registration.field_of_view` at
the evaluation's threshold), the generated image at the real one's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ffasynth.data.io import read_image
from ffasynth.data.registration import field_of_view
from ffasynth.evaluation.lesions import LESION_METRICS, Sighting, lesion_counts, lesions_for, sightings
from ffasynth.evaluation.pairing import phase_of
from ffasynth.evaluation.regions import REGION_METRICS, region_masks, region_scores
from ffasynth.evaluation.retrieval import retrieval, vessel_overlap
from ffasynth.evaluation.vessels import VESSEL_METRICS, vessel_mask, vessel_scores

AGREEMENT_METRICS = ("retrieval", "vessels", "regions", "lesions")  # names in EvalSettings.metrics
# per-image columns; lesion recall is summarised pooled over the set (results()["lesions"]), not averaged
PER_IMAGE = {"vessels": VESSEL_METRICS, "regions": REGION_METRICS, "lesions": LESION_METRICS}
HIGHER_IS_BETTER = {
    "own_eye": True,
    "own_eye_vessels": True,
    "vessel_dice": True,
    "vessel_cldice": True,
    "vessel_density_error": False,
    "hyper_dice": True,
    "hypo_dice": True,
    "hyper_area_error": False,
    "hypo_area_error": False,
    "lesion_recall": True,
}
LABELS = {
    "retrieval": "own-eye retrieval",
    "vessels": "vessel agreement",
    "regions": "hyper/hypofluorescent regions",
    "lesions": "lesion recall",
    "own_eye": "own eye (corr.)",
    "own_eye_vessels": "own eye (vessels)",
    "vessel_dice": "vessel Dice",
    "vessel_cldice": "vessel clDice",
    "vessel_density_error": "vessel density error",
    "hyper_dice": "hyper Dice",
    "hypo_dice": "hypo Dice",
    "hyper_area_error": "hyper area error",
    "hypo_area_error": "hypo area error",
    "lesion_recall": "lesion recall",
}
MEANINGS = {
    "own_eye": "own eye: the share of generated FFAs more like their own eye's real FFA (correlation in the "
    "field of view; the mean margin over the best other eye in brackets) than like any other of the same phase",
    "own_eye_vessels": "the same judged by vessel Dice",
    "vessel_dice": "vessel Dice / clDice: overlap of the Frangi vessel masks (clDice on their centre lines, "
    "rewarding continuous thin vessels)",
    "vessel_density_error": "density error: |vessel share of the field, generated − real|",
    "hyper_dice": "hyper / hypo Dice and area error: agreement of regions brighter (leakage, staining) or "
    "darker (non-perfusion, blocking) than the local background by 0.1",
    "lesion_recall": "lesion recall: of the lesions the phantom drew and the real FFA shows, the share the "
    "generated FFA shows too",
}


def skipped(metrics: tuple[str, ...], methods: list) -> dict[str, str]:
    """metric → why, for each chosen agreement metric that no method (a `MethodResult`) has a value of."""
    reasons = {
        "retrieval": "needs at least two pairs of one phase",
        "lesions": "no lesion records (N.lesions.json, written with ffasynth's phantom sets) beside the real images",
    }
    return {
        metric: reasons.get(metric, "no real/generated pairs matched")
        for metric in AGREEMENT_METRICS
        if metric in metrics
        and not any(metric in m.agreement or any(c in m.summary for c in PER_IMAGE.get(metric, ())) for m in methods)
    }


@dataclass
class Maps:
    """What the agreement metrics see of one image; every mask inside the real image's field of view."""

    fov: np.ndarray
    vessels: np.ndarray
    hyper: np.ndarray
    hypo: np.ndarray


def analyse(image: np.ndarray, fov: np.ndarray) -> Maps:
    vessels = vessel_mask(image, fov)
    hyper, hypo = region_masks(image, fov, vessels)
    return Maps(fov, vessels, hyper, hypo)


def analyse_real(real: np.ndarray, fov_threshold: float = 0.04) -> Maps:
    """The maps of a real (H, W) angiogram in its own field of view (generated ones use that field)."""
    return analyse(real, field_of_view(real, fov_threshold))


def pair_scores(real_maps: Maps, fake_maps: Maps) -> dict[str, float]:
    """Vessel and region scores of one pair; the density and area errors as magnitudes."""
    scores = vessel_scores(real_maps.vessels, fake_maps.vessels, real_maps.fov)
    scores["vessel_density_error"] = abs(scores["vessel_density_error"])
    scores.update(region_scores((real_maps.hyper, real_maps.hypo), (fake_maps.hyper, fake_maps.hypo), real_maps.fov))
    return scores


@dataclass
class _Kept:
    """What retrieval needs of one pair; grey levels as uint8, a quarter of float32's memory."""

    real: np.ndarray
    fake: np.ndarray
    fov: np.ndarray
    real_vessels: np.ndarray
    fake_vessels: np.ndarray

    @staticmethod
    def grey(image: np.ndarray) -> np.ndarray:
        return np.uint8(np.clip(image, 0.0, 1.0) * 255 + 0.5)


@dataclass
class AgreementScorer:
    """Scores pairs one at a time (`score`), keeping what the set-level results need (`results`).
    `cache` (real path → Maps) lets the methods of one evaluation share the real images' maps."""

    metrics: tuple[str, ...]
    fov_threshold: float = 0.04
    cache: dict[Path, Maps] = field(default_factory=dict)
    kept: dict[str, _Kept] = field(default_factory=dict)
    sightings: list[Sighting] = field(default_factory=list)
    lesion_records: int = 0

    def real_maps(self, real_path: Path, real: np.ndarray) -> Maps:
        """The maps of a real (H, W) angiogram, computed once per evaluation (the cache) at this size."""
        real_maps = self.cache.get(Path(real_path))
        if real_maps is None or real_maps.fov.shape != real.shape:
            real_maps = analyse_real(real, self.fov_threshold)
            self.cache[Path(real_path)] = real_maps
        return real_maps

    def score(self, key: str, real_path: Path, real: np.ndarray, fake: np.ndarray) -> dict:
        """Per-image columns of one pair: (H, W) grey real and generated images in [0, 1], same size."""
        real_maps = self.real_maps(real_path, real)
        fake_maps = analyse(fake, real_maps.fov)
        row: dict = {"phase": phase_of(key)}
        scores = pair_scores(real_maps, fake_maps)
        for metric in ("vessels", "regions"):
            if metric in self.metrics:
                row.update({column: scores[column] for column in PER_IMAGE[metric]})
        if "lesions" in self.metrics and (lesions := lesions_for(Path(real_path), real.shape)) is not None:
            self.lesion_records += 1
            seen = sightings(real, fake, lesions, real_maps.fov)
            self.sightings += seen
            counts = lesion_counts(seen)
            shown = sum(c["shown_real"] for c in counts.values())
            found = sum(c["shown_generated"] for c in counts.values())
            row.update(lesions_shown_real=shown, lesions_shown_generated=found)
            row["lesion_recall"] = found / shown if shown else math.nan
        if "retrieval" in self.metrics:
            grey = _Kept.grey
            self.kept[key] = _Kept(grey(real), grey(fake), real_maps.fov, real_maps.vessels, fake_maps.vessels)
        return row

    def results(self, per_image: list[dict]) -> dict:
        """Set-level results: retrieval (fraction, mean margin, chance, items scored), lesion counts per
        kind and pooled, and the per-image columns summarised per phase."""
        found: dict = {}
        if "retrieval" in self.metrics and self.kept:
            kept = self.kept
            groups = {key: phase_of(key) for key in kept}
            fovs = {key: item.fov for key, item in kept.items()}
            fakes = {key: item.fake for key, item in kept.items()}  # uint8: a correlation ignores the scale
            by_grey = retrieval(fakes, {key: item.real for key, item in kept.items()}, groups, fovs=fovs)
            fakes = {key: item.fake_vessels for key, item in kept.items()}
            reals = {key: item.real_vessels for key, item in kept.items()}
            by_vessels = retrieval(fakes, reals, groups, vessel_overlap, fovs)
            if by_grey.own_first:
                found["retrieval"] = {
                    "own_eye": by_grey.accuracy,
                    "own_eye_margin": by_grey.mean_margin,
                    "own_eye_vessels": by_vessels.accuracy,
                    "own_eye_vessels_margin": by_vessels.mean_margin,
                    "chance": by_grey.chance,
                    "n": len(by_grey.own_first),
                }
        if self.lesion_records:
            counts = lesion_counts(self.sightings)
            shown = sum(c["shown_real"] for c in counts.values())
            found["lesions"] = {
                "kinds": counts,
                "shown_real": shown,
                "shown_generated": sum(c["shown_generated"] for c in counts.values()),
                "recall": sum(c["shown_generated"] for c in counts.values()) / shown if shown else math.nan,
            }
        phases = sorted({row["phase"] for row in per_image if row.get("phase")})
        columns = [c for metric in ("vessels", "regions") if metric in self.metrics for c in PER_IMAGE[metric]]
        if phases and columns:
            found["by_phase"] = {
                phase: summarise([row for row in per_image if row.get("phase") == phase], columns) for phase in phases
            }
        return found


def summarise(rows: list[dict], columns) -> dict[str, dict[str, float]]:
    """column → mean, std and count over the rows that have it (NaN left out); a column holding an
    infinity (PSNR of identical images) has the largest value as its mean and no std."""
    summary = {}
    for column in columns:
        values = np.array([row[column] for row in rows if column in row and not math.isnan(row[column])], float)
        if len(values):
            finite = bool(np.isfinite(values).all())
            summary[column] = {
                "mean": float(values.mean()) if finite else float(values.max()),
                "std": float(values.std()) if finite else math.nan,
                "n": len(values),
            }
    return summary


def scores_by_class(examples: list[tuple[str, Path, Path]], fov_threshold: float = 0.04) -> dict[str, dict]:
    """(label, real angiogram, synthetic angiogram) examples → label → the vessel and region columns
    summarised over that class (the synthetic image resized to its real partner first)."""
    rows: dict[str, list[dict]] = {}
    for label, real_path, fake_path in examples:
        real = read_image(real_path, channels=1)[0].numpy()
        fake = read_image(fake_path, channels=1)[0].numpy()
        if fake.shape != real.shape:
            fake = cv2.resize(fake, (real.shape[1], real.shape[0]), interpolation=cv2.INTER_AREA)
        real_maps = analyse_real(real, fov_threshold)
        rows.setdefault(label, []).append(pair_scores(real_maps, analyse(fake, real_maps.fov)))
    columns = (*PER_IMAGE["vessels"], *PER_IMAGE["regions"])
    return {label: summarise(found, columns) | {"n": len(found)} for label, found in sorted(rows.items())}
