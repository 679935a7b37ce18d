"""Estimate the transform that aligns a photograph (source) onto its angiogram (target).

The two modalities have opposite contrast (vessels dark in the photo, bright in the FFA), so both
are first turned into the same thing: a vesselness map (Frangi filter on the contrast-equalised
green channel, bright = vessel) inside the field of view, at a working resolution of ~640 px.
Then, on the two vessel maps:

1. start points: a coarse global search (for each scale and angle on a grid, the shift by phase
   correlation, ranked by the correlation of the blurred vessel maps); SIFT keypoints on the vessel
   maps + a RANSAC similarity fit (reaches beyond the grid); for same-size images (one canvas,
   roughly placed), the identity and the identity plus a phase-correlation shift;
2. each start is refined by tile matching: the warped source is searched, tile by tile, for the
   target's vessels (normalised cross-correlation within a shrinking radius), and the requested
   model (similarity, affine or homography) is fitted to those displacements with OpenCV's RANSAC;
3. the start whose refined transform has the most inlier tiles wins.

Quality: `inliers` are the vessel tiles of the target whose best local match lies within
`inlier_px` of where the transform puts them; `score` is their fraction of all vessel tiles in the
common field (1 = every vessel region agrees; unrelated images score ~0). A pair is trustworthy
only when score, inliers, field overlap and the transform itself (no mirror, no extreme scale or
shear) all pass; otherwise the reasons are listed. Matrices are 3x3 and map source pixel
coordinates (x, y, 1) to target pixel coordinates at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.filters import frangi

from ffasynth.data.transforms import fov_mask

MODELS = ("affine", "similarity", "homography")


@dataclass(frozen=True)
class RegistrationParams:
    model: str = "affine"
    work_size: int = 640  # longest side of the working images (smaller and larger ones are resized)
    vessel_sigmas: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)  # Frangi scales at working resolution
    search_size: int = 256  # longest side for the coarse (scale, angle, shift) search
    search_scales: tuple[float, float] = (0.5, 2.0)  # source→target scale range searched (working px)
    search_scale_step: float = 0.07  # log-scale step (~7%)
    search_degrees: float = 20.0  # rotation range searched, ±
    search_degree_step: float = 4.0
    search_keep: int = 3  # best coarse transforms refined
    ratio: float = 0.8  # Lowe's ratio test for keypoint matches
    tile: int = 48  # tile side for local vessel matching (working px); tiles overlap by half
    search_px: tuple[int, ...] = (24, 12, 6)  # local search radius per refinement round (working px)
    inlier_px: float = 2.0  # a tile agrees when its match is this close (working px)
    min_inliers: int = 20
    min_score: float = 0.15  # fraction of vessel tiles that agree
    min_overlap: float = 0.3  # common field of view / target field of view
    scale_range: tuple[float, float] = (0.25, 4.0)  # plausible source→target scale


@dataclass
class Registration:
    matrix: np.ndarray  # (3, 3) float64, source px → target px, full resolution
    model: str
    score: float  # fraction of vessel tiles in the common field that agree with `matrix`
    inliers: int  # vessel tiles that agree
    tiles: int  # vessel tiles in the common field
    overlap: float  # common field of view as a fraction of the target's
    method: str  # the start that won: "search", "keypoints", "identity", "identity+shift" or "none"
    keypoint_matches: int = 0  # SIFT ratio-test matches between the vessel maps
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


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
    core = cv2.erode(fov.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1,) * 2))
    ridges *= core
    top = float(np.percentile(ridges[core > 0], 99)) if core.any() else 0.0
    return np.clip(ridges / top, 0.0, 1.0) if top > 0 else ridges


@dataclass
class _View:
    """One image at working resolution: vessel map, field of view, and full → working matrix."""

    vessels: np.ndarray
    fov: np.ndarray
    to_work: np.ndarray  # (3, 3): full-resolution px → working px
    full_shape: tuple[int, int]


def _prepare(image: np.ndarray, dark_vessels: bool, params: RegistrationParams) -> _View:
    height, width = image.shape[:2]
    # Every image is brought to the same working size, so that tiles and scores mean the same thing.
    factor = params.work_size / max(height, width)
    size = (max(16, round(width * factor)), max(16, round(height * factor)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    sx, sy = small.shape[1] / width, small.shape[0] / height
    # cv2.resize keeps pixel centres: x_small + 0.5 = (x + 0.5) * sx
    to_work = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
    fov = field_of_view(small)
    vessels = vessel_map(vessel_channel(small), fov, dark_vessels, params.vessel_sigmas)
    return _View(vessels, fov, to_work, (height, width))


def _as3x3(matrix: np.ndarray) -> np.ndarray:
    matrix = matrix.astype(np.float64)
    return matrix if matrix.shape == (3, 3) else np.vstack([matrix, [0.0, 0.0, 1.0]])


def _warp(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpPerspective(image, matrix, (shape[1], shape[0]), flags=flags, borderMode=cv2.BORDER_CONSTANT)


def _common(source: _View, target: _View, matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """The common field of view in the target frame, and its fraction of the target's field."""
    warped = _warp(source.fov.astype(np.uint8), matrix, target.fov.shape, nearest=True) > 0
    common = target.fov & warped
    return common, float(common.sum()) / max(1, int(target.fov.sum()))


def _keypoint_matches(source: _View, target: _View, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """SIFT on the vessel maps, ratio-test matches → (N, 2) source and target points (working px)."""
    sift = cv2.SIFT_create(nfeatures=3000)
    found = []
    for view in (source, target):
        mask = cv2.erode(view.fov.astype(np.uint8), np.ones((5, 5), np.uint8))
        found.append(sift.detectAndCompute(np.uint8(view.vessels * 255), mask))
    (kp_s, des_s), (kp_t, des_t) = found
    if des_s is None or des_t is None or len(kp_s) < 2 or len(kp_t) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    candidates = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_s, des_t, k=2)
    good = [m[0] for m in candidates if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    src = np.float32([kp_s[m.queryIdx].pt for m in good]).reshape(-1, 2)
    dst = np.float32([kp_t[m.trainIdx].pt for m in good]).reshape(-1, 2)
    return src, dst


def fit_model(model: str, src: np.ndarray, dst: np.ndarray, threshold_px: float) -> np.ndarray | None:
    """Robust fit of `model` to point matches with OpenCV's RANSAC; 3x3 matrix, or None."""
    if model == "homography" and len(src) >= 4:
        matrix, _ = cv2.findHomography(src, dst, cv2.RANSAC, threshold_px, maxIters=5000, confidence=0.999)
    elif model == "affine" and len(src) >= 3:
        matrix, _ = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold_px, maxIters=5000)
    elif model == "similarity" and len(src) >= 2:
        matrix, _ = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold_px, maxIters=5000
        )
    else:
        return None
    return None if matrix is None else _as3x3(matrix)


def _subpixel(response: np.ndarray, x: int, y: int) -> tuple[float, float]:
    """Peak offset of a parabola through the maximum and its two neighbours, per axis."""

    def vertex(values: np.ndarray, i: int) -> float:
        if i == 0 or i == len(values) - 1:
            return 0.0
        before, at, after = float(values[i - 1]), float(values[i]), float(values[i + 1])
        curvature = before - 2.0 * at + after  # x* = (f(-1) - f(+1)) / (2 f'')
        return 0.5 * (before - after) / curvature if curvature < 0 else 0.0

    return vertex(response[y, :], x), vertex(response[:, x], y)


def _tile_matches(source: _View, target: _View, matrix: np.ndarray, radius: int, params: RegistrationParams):
    """Target vessel tiles and where the warped source's vessels best match them.
    Returns (tile centres, matched points in the target frame or NaN when no match, common overlap)."""
    shape = target.vessels.shape
    moving = cv2.GaussianBlur(_warp(source.vessels, matrix, shape), (0, 0), 1.5)
    fixed = cv2.GaussianBlur(target.vessels, (0, 0), 1.5)
    common, overlap = _common(source, target, matrix)
    tile, centres, matched = params.tile, [], []
    for y in range(radius, shape[0] - tile - radius + 1, tile // 2):
        for x in range(radius, shape[1] - tile - radius + 1, tile // 2):
            patch = fixed[y : y + tile, x : x + tile]
            if common[y : y + tile, x : x + tile].mean() < 0.9 or patch.mean() < 0.03 or patch.std() < 0.05:
                continue  # outside the common field, or too few vessels to match on
            centre = (x + tile / 2, y + tile / 2)
            window = moving[y - radius : y + tile + radius, x - radius : x + tile + radius]
            centres.append(centre)
            if window.std() < 1e-3:
                matched.append((np.nan, np.nan))
                continue
            response = cv2.matchTemplate(window, patch, cv2.TM_CCOEFF_NORMED)
            _, peak, _, (px, py) = cv2.minMaxLoc(response)
            if peak < 0.2:
                matched.append((np.nan, np.nan))
                continue
            fx, fy = _subpixel(response, px, py)
            matched.append((centre[0] + px - radius + fx, centre[1] + py - radius + fy))
    return np.float32(centres).reshape(-1, 2), np.float32(matched).reshape(-1, 2), overlap


def _refine(source: _View, target: _View, start: np.ndarray, params: RegistrationParams) -> np.ndarray | None:
    """Tile matching → displacements → RANSAC fit of the model, with a shrinking search radius."""
    matrix = start
    for radius in params.search_px:
        centres, matched, _ = _tile_matches(source, target, matrix, radius, params)
        found = np.isfinite(matched).all(axis=1)
        if found.sum() < 4:
            return None
        # A match at p in the warped source is the source point matrix⁻¹(p), seen at the tile centre.
        src = cv2.perspectiveTransform(matched[found].reshape(-1, 1, 2).astype(np.float64), np.linalg.inv(matrix))
        fitted = fit_model(params.model, src.reshape(-1, 2).astype(np.float32), centres[found], params.inlier_px)
        if fitted is None or _implausible(fitted, params):
            return None
        matrix = fitted / fitted[2, 2]
    return matrix


def _agreement(source: _View, target: _View, matrix: np.ndarray, params: RegistrationParams):
    """(inlier tiles, vessel tiles, overlap) for a final transform."""
    centres, matched, overlap = _tile_matches(source, target, matrix, params.search_px[-1], params)
    distance = np.linalg.norm(matched - centres, axis=1)
    return int(np.sum(distance <= params.inlier_px)), len(centres), overlap


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


def _phase_shift(moving: np.ndarray, fixed: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """The (dx, dy) that moves `moving` onto `fixed`, by phase correlation."""
    # phaseCorrelate may overwrite its inputs (seen with OpenCV 5.0): give it copies.
    (dx, dy), _ = cv2.phaseCorrelate(moving.copy(), fixed.copy(), window.copy())
    return dx, dy


def _shifted_identity(source: _View, target: _View) -> np.ndarray:
    """For same-size images (one canvas, roughly placed): the translation alone, at working size."""
    identity = target.to_work @ np.linalg.inv(source.to_work)
    moving = cv2.GaussianBlur(_warp(source.vessels, identity, target.vessels.shape), (0, 0), 3.0)
    fixed = cv2.GaussianBlur(target.vessels, (0, 0), 3.0)
    dx, dy = _phase_shift(moving, fixed, cv2.createHanningWindow(fixed.shape[::-1], cv2.CV_32F))
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]]) @ identity


def _grid_starts(source: _View, target: _View, params: RegistrationParams) -> list[np.ndarray]:
    """Coarse global search: for each (scale, angle) on a grid, the translation by phase correlation,
    scored by the NCC of the blurred vessel maps in the common field; the best few transforms."""
    factor = params.search_size / max(target.vessels.shape)
    shape = (round(target.vessels.shape[0] * factor), round(target.vessels.shape[1] * factor))
    fixed = cv2.GaussianBlur(cv2.resize(target.vessels, shape[::-1], interpolation=cv2.INTER_AREA), (0, 0), 2.0)
    fixed_fov = cv2.resize(target.fov.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    moving = cv2.GaussianBlur(source.vessels, (0, 0), 2.0 / factor)
    window = cv2.createHanningWindow(shape[::-1], cv2.CV_32F)
    centre_s = np.array(source.vessels.shape[::-1]) / 2 - 0.5
    centre_t = np.array(shape[::-1]) / 2 - 0.5
    low, high = params.search_scales
    found = []
    for scale in np.exp(np.arange(np.log(low), np.log(high) + 1e-9, params.search_scale_step)):
        for angle in np.arange(-params.search_degrees, params.search_degrees + 1e-9, params.search_degree_step):
            matrix = cv2.getRotationMatrix2D(tuple(centre_s), float(angle), float(scale * factor))
            matrix[:, 2] += centre_t - centre_s
            matrix[:, 2] += _phase_shift(cv2.warpAffine(moving, matrix, shape[::-1]), fixed, window)
            warped = cv2.warpAffine(moving, matrix, shape[::-1])
            common = fixed_fov & (cv2.warpAffine(source.fov.astype(np.uint8), matrix, shape[::-1]) > 0)
            if common.sum() < params.min_overlap * fixed_fov.sum():
                continue
            a, b = warped[common] - warped[common].mean(), fixed[common] - fixed[common].mean()
            ncc = float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))
            found.append((ncc, np.diag([1 / factor, 1 / factor, 1.0]) @ _as3x3(matrix)))
    found.sort(key=lambda item: -item[0])
    return [matrix for _, matrix in found[: params.search_keep]]


def register_pair(
    source: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    params: RegistrationParams | None = None,
) -> Registration:
    """Estimate the transform mapping the source photo (dark vessels) onto the target angiogram
    (bright vessels). Inputs are (C, H, W) tensors or (H, W[, C]) arrays in [0, 1]."""
    params = params or RegistrationParams()
    if params.model not in MODELS:
        raise ValueError(f"unknown model {params.model!r}; choose one of {', '.join(MODELS)}")
    source_view = _prepare(to_numpy(source), dark_vessels=True, params=params)
    target_view = _prepare(to_numpy(target), dark_vessels=False, params=params)
    if not source_view.fov.any() or not target_view.fov.any():
        reason = "no field of view found (an image is black or nearly so)"
        return Registration(np.eye(3), params.model, 0.0, 0, 0, 0.0, "none", 0, [reason])
    src, dst = _keypoint_matches(source_view, target_view, params.ratio)

    starts = [("search", matrix) for matrix in _grid_starts(source_view, target_view, params)]
    if (keypoints := fit_model("similarity", src, dst, 3.0)) is not None:
        starts.append(("keypoints", keypoints))
    if source_view.full_shape == target_view.full_shape:
        starts.append(("identity", target_view.to_work @ np.linalg.inv(source_view.to_work)))
        starts.append(("identity+shift", _shifted_identity(source_view, target_view)))

    best = None  # (inliers, tiles, overlap, method, matrix)
    for method, start in starts:
        if _implausible(start, params) or (matrix := _refine(source_view, target_view, start, params)) is None:
            continue
        inliers, tiles, overlap = _agreement(source_view, target_view, matrix, params)
        if best is None or inliers > best[0]:
            best = (inliers, tiles, overlap, method, matrix)
    if best is None:
        reason = f"no plausible transform found ({len(src)} keypoint matches between the vessel maps)"
        return Registration(np.eye(3), params.model, 0.0, 0, 0, 0.0, "none", len(src), [reason])

    inliers, tiles, overlap, method, matrix = best
    score = inliers / tiles if tiles else 0.0
    reasons = []
    if score < params.min_score:
        reasons.append(f"poor vessel agreement (score {score:.2f} < {params.min_score})")
    if inliers < params.min_inliers:
        reasons.append(f"few vessel tiles agree ({inliers} < {params.min_inliers})")
    if overlap < params.min_overlap:
        reasons.append(f"small common field of view ({overlap:.0%} < {params.min_overlap:.0%})")
    full = np.linalg.inv(target_view.to_work) @ matrix @ source_view.to_work
    return Registration(full / full[2, 2], params.model, score, inliers, tiles, overlap, method, len(src), reasons)
