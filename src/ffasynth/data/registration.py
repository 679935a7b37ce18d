"""Estimate the transform that aligns a photograph (source) onto its angiogram (target).

The two modalities have opposite contrast (vessels dark in the photo, bright in the FFA), so both
are first turned into the same thing: a vesselness map (Frangi filter on the contrast-equalised
green channel, bright = vessel) at a working resolution of ~430 px, inside each image's own field:
the photo's fundus without its eyelids and lashes (bright green/yellow on a UWF photo) and the dark
gap around them; the angiogram's lit area. A photo shows only the larger vessels, so against a
photo the angiogram's map keeps only its long connected vessel pieces.

The score is the normalised correlation (NCC) of the two maps over their common field:
1. at half the working resolution, for each (scale, angle) of a grid, every shift at once (FFT
   cross-correlation of the standardised maps): the best few distinct similarity transforms;
2. each refined by OpenCV's ECC (which maximises that same correlation over both masks) as an
   affine map, at half, then at working resolution (the half level alone can prefer a wrong
   basin); the best wins; `similarity` is then polished as a similarity (Powell), `homography`
   refined as one by ECC;
3. significance: the same search against the angiogram mirrored left-right and up-down (a
   mirrored angiogram looks like the fellow eye: what an unrelated eye gives); `margin` is how far
   the correlation stands above the better of the two.
On the shared UWF train eyes 1-4 a photo against another eye's angiogram reaches NCC 0.17-0.28
(margins -0.05..+0.04, 24 pairs); the pairs accepted reach 0.28-0.41 (margins +0.09..+0.17).
A pair is accepted when the margin, the gain over the identity (same-size images share one canvas)
and the transform itself (no mirror, plausible scale and shear, enough common field) all pass;
otherwise `matrix` is the identity, `found` keeps what was found, and the reasons are listed.
Matrices are 3x3 and map source pixel coordinates (x, y, 1) to target pixel coordinates at full
resolution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from scipy import fft, ndimage, optimize
from skimage.filters import frangi

from ffasynth.data.transforms import fov_mask

MODELS = ("affine", "similarity", "homography")


@dataclass(frozen=True)
class RegistrationParams:
    model: str = "affine"
    work_size: int = 432  # longest side of the working images (both images are resized to it)
    vessel_sigmas: tuple[float, ...] = (1.5, 2.5, 3.5)  # Frangi scales, working px (> 1: skimage's slow path)
    search_scales: tuple[float, float] = (0.8, 1.25)  # coarse grid, source→target, both at the working size
    search_scale_step: float = 0.04  # log-scale step (~4%)
    search_degrees: float = 15.0  # rotation range searched, ±
    search_degree_step: float = 2.0
    search_shift: float = 0.25  # shifts searched, as a fraction of the longest side
    candidates: int = 6  # best distinct coarse transforms refined
    min_margin: float = 0.06  # correlation above the best match with the mirrored angiograms
    min_gain: float = 0.05  # correlation above the identity's (same-size images)
    min_overlap: float = 0.3  # common field / target field
    scale_range: tuple[float, float] = (0.25, 4.0)  # plausible source→target scale
    max_residual: float = 0.02  # two phases of one photo may disagree by this much of the diagonal


@dataclass
class Registration:
    matrix: np.ndarray  # (3, 3) float64, source px → target px, full resolution
    model: str
    correlation: float  # NCC of the vessel maps over the common field for the transform found
    identity_correlation: float  # the same at the identity (NaN when the sizes differ)
    null_correlation: float  # best NCC found against the mirrored angiograms
    overlap: float  # common field as a fraction of the target's field
    method: str  # "registered", "identity" (refused, same size) or "none" (refused)
    found: np.ndarray | None = None  # the transform found, also when refused
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def margin(self) -> float:
        return self.correlation - self.null_correlation


def to_numpy(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) tensor or (H, W[, C]) array in [0, 1] → (H, W) or (H, W, 3) float32 array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    image = np.asarray(image, dtype=np.float32)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def field_of_view(image: np.ndarray, threshold: float = 0.04) -> np.ndarray:
    """(H, W[, C]) in [0, 1] → bool mask: the project's FOV threshold, largest blob, holes filled."""
    chw = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else image[..., None])).permute(2, 0, 1)
    mask = fov_mask(chw, threshold)[0].numpy() > 0.5
    return _largest_blob(mask)


def inset(fov: np.ndarray, margin: int) -> np.ndarray:
    """The (H, W) field of view less a rim `margin` px wide (eroded by a disc), as a bool mask."""
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1,) * 2)
    return cv2.erode(fov.astype(np.uint8), disc) > 0


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count > 1:
        mask = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(mask)


def vessel_channel(image: np.ndarray) -> np.ndarray:
    """The channel with the vessel contrast: green of a colour photo, the image itself when grey."""
    return image[..., 1] if image.ndim == 3 else image


def vessel_map(grey: np.ndarray, fov: np.ndarray, dark_vessels: bool, sigmas=(1.0, 2.0, 3.0, 4.0)) -> np.ndarray:
    """(H, W) in [0, 1] → vesselness in [0, 1] (bright = vessel whatever the modality), zero outside
    the field of view and near its rim."""
    equalised = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(np.uint8(np.clip(grey, 0, 1) * 255 + 0.5))
    equalised = equalised.astype(np.float32) / 255.0
    level = float(np.median(equalised[fov])) if fov.any() else 0.0
    filled = np.where(fov, equalised, level)  # no ridge response at the rim
    ridges = frangi(filled, sigmas=sigmas, black_ridges=dark_vessels).astype(np.float32)
    margin = int(2 * max(sigmas) + 1)
    core = inset(fov, margin)
    ridges *= core
    top = float(np.percentile(ridges[core], 99)) if core.any() else 0.0
    return np.clip(ridges / top, 0.0, 1.0) if top > 0 else ridges


def photo_field(image: np.ndarray) -> np.ndarray:
    """The photo's fundus: a colour photo's field without eyelids and lashes (bright green/yellow:
    G > 0.45 and R < 0.9 G) and the dark gap around them, grown by 1/80 of the width; a grey photo's
    field of view. Largest blob, holes filled."""
    if image.ndim != 3:
        return field_of_view(image)
    red, green = (cv2.GaussianBlur(image[..., c], (0, 0), 2.0) for c in (0, 1))
    lids = ((green > 0.45) & (red < 0.9 * green)) | (np.maximum(red, green) < 0.1)
    side = 2 * max(1, round(image.shape[1] / 80)) + 1
    lids = cv2.dilate(lids.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))) > 0
    return _largest_blob(~lids) if not lids.all() else ~lids


def angiogram_field(image: np.ndarray) -> np.ndarray:
    """The angiogram's lit area: smoothed above half the median of its field of view (an FFA's
    outside is grey 6-20/255 and its burnt-in annotation boxes 12-23/255, its field 40-70)."""
    grey = cv2.GaussianBlur(vessel_channel(image), (0, 0), max(1.0, image.shape[1] / 170))
    loose = field_of_view(image)
    level = max(0.04, 0.5 * float(np.median(grey[loose]))) if loose.any() else 0.04
    return _largest_blob(grey > level)


def _long_vessels(vessels: np.ndarray, mask: np.ndarray, level: float = 0.3, min_area: int = 80) -> np.ndarray:
    """The vesselness on its connected pieces above `level` of at least `min_area` px (drops texture)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(((vessels > level) & mask).astype(np.uint8), 8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return vessels * keep[labels] if count > 1 else np.zeros_like(vessels)


@dataclass
class _View:
    """One image at working resolution: vessel map, where it is valid, and full → working matrix."""

    vessels: np.ndarray
    mask: np.ndarray
    to_work: np.ndarray  # (3, 3): full-resolution px → working px
    full_shape: tuple[int, int]


def _prepare(image: np.ndarray, dark_vessels: bool, params: RegistrationParams) -> _View:
    height, width = image.shape[:2]
    factor = params.work_size / max(height, width)
    size = (max(16, round(width * factor)), max(16, round(height * factor)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    sx, sy = small.shape[1] / width, small.shape[0] / height
    # cv2.resize keeps pixel centres: x_small + 0.5 = (x + 0.5) * sx
    to_work = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
    fov = photo_field(small) if dark_vessels else angiogram_field(small)
    vessels = vessel_map(vessel_channel(small), fov, dark_vessels, params.vessel_sigmas)
    margin = int(2 * max(params.vessel_sigmas) + 1)  # vessel_map's own rim
    mask = inset(fov, margin)
    return _View(vessels, mask, to_work, (height, width))


def _warp(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return cv2.warpPerspective(image, matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR)


def correlation(fixed, fixed_mask, moving, moving_mask, matrix, min_overlap: float = 0.2) -> float:
    """NCC of `fixed` and `moving` warped by `matrix`, over both masks (-1 when they barely meet)."""
    common = fixed_mask & (_warp(moving_mask.astype(np.float32), matrix, fixed.shape) > 0.99)
    if common.sum() < max(16, min_overlap * fixed_mask.sum()):
        return -1.0
    a, b = _warp(moving, matrix, fixed.shape)[common], fixed[common]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))


def _standard(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance inside `mask`, zero outside."""
    out = np.zeros(image.shape, np.float32)
    values = image[mask]
    out[mask] = (values - values.mean()) / (values.std() + 1e-9)
    return out


def _coarse(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half the working resolution (pixel centres kept: x_half = (x + 0.5) / 2 - 0.5), blurred 1 px."""
    size = (image.shape[1] // 2, image.shape[0] // 2)
    small = cv2.GaussianBlur(cv2.resize(image, size, interpolation=cv2.INTER_AREA), (0, 0), 1.0)
    return small, cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0


HALF = np.array([[0.5, 0, -0.25], [0, 0.5, -0.25], [0, 0, 1]])  # working px → coarse px


def _grid_starts(moving, moving_mask, fixed, fixed_mask, params: RegistrationParams) -> list[np.ndarray]:
    """The best few distinct similarity transforms (coarse px) over the (scale, angle) grid, each
    with its best shift: for every shift at once, Σ f̂·m̂ / |fixed mask| of the maps standardised
    inside their masks (FFT cross-correlation; a partial overlap scores less)."""
    height, width = fixed.shape
    reach = max(1, int(params.search_shift * max(height, width)))
    shape = (fft.next_fast_len(height + reach), fft.next_fast_len(width + reach))
    fixed_spectrum = fft.rfft2(_standard(fixed, fixed_mask), shape) / max(1, int(fixed_mask.sum()))
    rows, cols = np.arange(-reach, reach + 1) % shape[0], np.arange(-reach, reach + 1) % shape[1]
    base = np.sqrt(fixed.size / moving.size)  # scale of a same-field pair (1 for one canvas)
    centre_s, centre_t = (np.array(image.shape[::-1]) / 2 - 0.5 for image in (moving, fixed))
    low, high = params.search_scales
    scales = base * np.exp(np.arange(np.log(low), np.log(high) + 1e-9, params.search_scale_step))
    angles = np.arange(-params.search_degrees, params.search_degrees + 1e-9, params.search_degree_step)
    found = []
    for scale, angle in itertools.product(scales, angles):
        matrix = cv2.getRotationMatrix2D(tuple(centre_s), float(angle), float(scale))
        matrix[:, 2] += centre_t - centre_s  # source centre onto target centre
        warped_mask = cv2.warpAffine(moving_mask.astype(np.float32), matrix, (width, height)) > 0.99
        if warped_mask.sum() < 16:
            continue
        warped = _standard(cv2.warpAffine(moving, matrix, (width, height)), warped_mask)
        scores = fft.irfft2(fixed_spectrum * np.conj(fft.rfft2(warped, shape)), shape)[np.ix_(rows, cols)]
        dy, dx = np.unravel_index(int(np.argmax(scores)), scores.shape)
        matrix[:, 2] += (dx - reach, dy - reach)
        found.append((float(scores[dy, dx]), np.vstack([matrix, [0, 0, 1]])))
    found.sort(key=lambda item: -item[0])
    starts: list[np.ndarray] = []
    for _, matrix in found:  # distinct: another scale/angle (> 5%) or another shift (> 4 coarse px)
        if all(np.abs(matrix - kept)[:2, :2].max() > 0.05 or np.abs(matrix - kept)[:2, 2].max() > 4 for kept in starts):
            starts.append(matrix)
        if len(starts) == params.candidates:
            break
    return starts


def _ecc(fixed, fixed_mask, moving, moving_mask, start, motion: int, iterations: int = 60) -> np.ndarray | None:
    """ECC refinement of `start` (source → target, working px); None when it does not converge.
    OpenCV's warp maps target to source coordinates: the inverse of ours."""
    warp = np.linalg.inv(start)
    warp = (warp / warp[2, 2]).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-5)
    masks = [(m.astype(np.uint8) * 255) for m in (fixed_mask, moving_mask)]
    try:
        warp = warp if motion == cv2.MOTION_HOMOGRAPHY else warp[:2]
        _, warp = cv2.findTransformECCWithMask(fixed, moving, *masks, warp, motion, criteria, 3)
    except cv2.error:
        return None
    warp = warp.astype(np.float64)
    return np.linalg.inv(warp if warp.shape == (3, 3) else np.vstack([warp, [0, 0, 1]]))


def _as_similarity(fixed, fixed_mask, moving, moving_mask, start: np.ndarray) -> np.ndarray:
    """The similarity (log-scale, angle, shift about the target centre) of highest correlation,
    from the nearest similarity to `start` (Powell; ECC has no similarity model)."""
    linear = start[:2, :2]
    scale = np.sqrt(abs(np.linalg.det(linear)))
    angle = np.arctan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1])
    centre = np.array([fixed.shape[1] / 2, fixed.shape[0] / 2])
    pivot = np.linalg.inv(start) @ np.append(centre, 1.0)  # the source point start puts at the centre

    def build(p: np.ndarray) -> np.ndarray:
        s, a = scale * np.exp(p[0] / 100), angle + p[1] / 100  # steps of ~1%, ~0.6 degree
        rotation = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        matrix = np.eye(3)
        matrix[:2, :2], matrix[:2, 2] = rotation, centre + p[2:] - rotation @ pivot[:2] / pivot[2]
        return matrix

    result = optimize.minimize(
        lambda p: -correlation(fixed, fixed_mask, moving, moving_mask, build(p)),
        np.zeros(4),
        method="Powell",
        options={"xtol": 0.02, "ftol": 1e-5, "maxfev": 400},
    )
    return build(result.x)


def _search(source: _View, fixed: np.ndarray, target: _View, params: RegistrationParams) -> tuple[np.ndarray, float]:
    """Coarse grid → ECC affine per start at half resolution → each distinct result again by ECC at
    working resolution (as the model asks; the coarse level alone can prefer a wrong basin) →
    (the best matrix in working px, its correlation)."""
    moving_c, moving_mask_c = _coarse(source.vessels, source.mask)
    fixed_c, fixed_mask_c = _coarse(fixed, target.mask)
    shape = fixed_c.shape
    coarse: list[np.ndarray] = []
    for start in _grid_starts(moving_c, moving_mask_c, fixed_c, fixed_mask_c, params):
        refined = _ecc(fixed_c, fixed_mask_c, moving_c, moving_mask_c, start, cv2.MOTION_AFFINE)
        if refined is None or _implausible(refined, params) is not None:
            continue
        if all(corner_residual(refined, kept, shape) > 2 for kept in coarse):  # converged elsewhere
            coarse.append(refined)
    moving, fixed = (cv2.GaussianBlur(image, (0, 0), 1.0) for image in (source.vessels, fixed))
    motion = cv2.MOTION_HOMOGRAPHY if params.model == "homography" else cv2.MOTION_AFFINE
    best, best_score = np.eye(3), -1.0
    for start in coarse:
        start = np.linalg.inv(HALF) @ start @ HALF
        refined = _ecc(fixed, target.mask, moving, source.mask, start, motion, iterations=25)
        refined = refined if refined is not None and _implausible(refined, params) is None else start
        score = correlation(fixed, target.mask, moving, source.mask, refined)
        if score > best_score:
            best, best_score = refined, score
    if best_score > -1 and params.model == "similarity":
        best = _as_similarity(fixed, target.mask, moving, source.mask, best)
        best_score = correlation(fixed, target.mask, moving, source.mask, best)
    return best, best_score


def _mirrored(fixed: np.ndarray, target: _View, axis: int) -> tuple[np.ndarray, _View]:
    """The target's maps flipped along `axis`: what an unrelated eye's angiogram would give."""
    view = _View(np.flip(target.vessels, axis), np.flip(target.mask, axis), target.to_work, target.full_shape)
    return np.ascontiguousarray(np.flip(fixed, axis)), view


def _implausible(matrix: np.ndarray, params: RegistrationParams) -> str | None:
    linear = matrix[:2, :2] / matrix[2, 2]
    if not np.isfinite(matrix).all() or float(np.linalg.det(linear)) <= 0:
        return "transform is degenerate or mirrors the image"
    scale = float(np.sqrt(np.linalg.det(linear)))
    low, high = params.scale_range
    if not low <= scale <= high:
        return f"implausible scale {scale:.2f} (outside {low}-{high})"
    singular = np.linalg.svd(linear, compute_uv=False)
    if singular[0] / singular[1] > 1.5:
        return f"implausible shear/anisotropy {singular[0] / singular[1]:.2f}"
    if abs(matrix[2, 0]) + abs(matrix[2, 1]) > 2e-3 * abs(matrix[2, 2]):
        return "implausible perspective"
    return None


def register_pair(
    source: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    params: RegistrationParams | None = None,
    source_is_photo: bool = True,
) -> Registration:
    """Estimate the transform mapping the source (a photo: dark vessels; or, with
    source_is_photo=False, another angiogram) onto the target angiogram (bright vessels).
    Inputs are (C, H, W) tensors or (H, W[, C]) arrays in [0, 1]."""
    params = params or RegistrationParams()
    if params.model not in MODELS:
        raise ValueError(f"unknown model {params.model!r}; choose one of {', '.join(MODELS)}")
    source_view = _prepare(to_numpy(source), dark_vessels=source_is_photo, params=params)
    target_view = _prepare(to_numpy(target), dark_vessels=False, params=params)
    same_size = source_view.full_shape == target_view.full_shape
    refused = "identity" if same_size else "none"  # a same-size pair shares one canvas: keep it as it is
    if source_view.mask.sum() < 64 or target_view.mask.sum() < 64:
        which = "source (black, or all eyelid/lash colours)" if source_view.mask.sum() < 64 else "target (black)"
        reason = f"no field of view found in the {which}"
        return Registration(np.eye(3), params.model, -1.0, np.nan, -1.0, 0.0, refused, None, [reason])
    # A photo shows the larger vessels only: the angiogram's fine texture would be noise to it.
    fixed = _long_vessels(target_view.vessels, target_view.mask) if source_is_photo else target_view.vessels
    matrix, score = _search(source_view, fixed, target_view, params)
    null = max(_search(source_view, *_mirrored(fixed, target_view, axis), params)[1] for axis in (0, 1))
    at_identity = np.nan
    if same_size:
        fixed_blurred, moving_blurred = (cv2.GaussianBlur(image, (0, 0), 1.0) for image in (fixed, source_view.vessels))
        identity = target_view.to_work @ np.linalg.inv(source_view.to_work)
        at_identity = correlation(fixed_blurred, target_view.mask, moving_blurred, source_view.mask, identity)
    common = target_view.mask & (_warp(source_view.mask.astype(np.float32), matrix, fixed.shape) > 0.99)
    overlap = float(common.sum()) / max(1, int(target_view.mask.sum()))
    full = np.linalg.inv(target_view.to_work) @ matrix @ source_view.to_work
    full = full / full[2, 2]

    reasons = []
    if score <= -1:
        reasons.append("no plausible transform found")
    elif score - null < params.min_margin:
        reasons.append(
            f"vessels match no better than an unrelated eye's (correlation {score:.2f}, "
            f"mirrored angiogram {null:.2f}, margin < {params.min_margin})"
        )
    if same_size and score - at_identity < params.min_gain:
        reasons.append(f"no clear gain over the identity (correlation {at_identity:.2f} → {score:.2f})")
    if score > -1 and overlap < params.min_overlap:
        reasons.append(f"small common field of view ({overlap:.0%} < {params.min_overlap:.0%})")
    if score > -1 and (problem := _implausible(full, params)):
        reasons.append(problem)
    if reasons:
        return Registration(np.eye(3), params.model, score, at_identity, null, overlap, refused, full, reasons)
    return Registration(full, params.model, score, at_identity, null, overlap, "registered", full)


def corner_residual(first: np.ndarray, second: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest distance (px) between where two transforms put the corners of a (H, W) image."""
    height, width = shape
    corners = np.float64([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]]).reshape(-1, 1, 2)
    moved = [cv2.perspectiveTransform(corners, matrix) for matrix in (first, second)]
    return float(np.linalg.norm(moved[0] - moved[1], axis=2).max())
