"""What the standard (`phantom`) and ultra-widefield (`phantom_uwf`) phantom eyes share: the eye's
record, smooth textures, the branching vessel tree and its rasteriser, and lesion placement and maps.

Every function that draws something random takes the eye's `numpy.random.Generator`, so an eye is a
pure function of its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

DISEASES = ("normal", "microaneurysms", "haemorrhages", "leakage", "non_perfusion")
LESION_OF = {
    "microaneurysms": "microaneurysm",
    "haemorrhages": "haemorrhage",
    "leakage": "leakage",
    "non_perfusion": "non_perfusion",
}
SUPERSAMPLE = 2  # vessels are drawn at 2x and area-downsampled: anti-aliased sub-pixel widths


@dataclass(frozen=True)
class Lesion:
    kind: str  # microaneurysm, haemorrhage, leakage, non_perfusion (+ laser_scar in UWF eyes)
    x: float  # pixels
    y: float
    radius: float


@dataclass
class PhantomEye:
    photo: np.ndarray  # (H, W, 3) float32 in [0, 1]
    ffa_early: np.ndarray  # (H, W) float32 in [0, 1]
    ffa_late: np.ndarray
    vessel_mask: np.ndarray  # (H, W) bool, vessels at least ~1 px wide
    fov: np.ndarray  # (H, W) bool: retina seen in both photo and angiogram
    label: str
    lesions: list[Lesion] = field(default_factory=list)
    disc: tuple[float, float] = (0.0, 0.0)
    macula: tuple[float, float] = (0.0, 0.0)
    style: str = "standard"


def gauss(shape, cx, cy, sigma) -> np.ndarray:
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * sigma**2)).astype(np.float32)


def texture(rng: np.random.Generator, size: int, scales=(0.01, 0.03, 0.08), coarse_from: float = 1.0) -> np.ndarray:
    """Smooth noise, unit std, summed over a few spatial scales (fractions of the image size).
    Scales >= coarse_from are blurred on a grid of ~4 cells per sigma and resized up (bicubic):
    the same look for a fraction of a wide blur's time."""
    total = np.zeros((size, size), np.float32)
    for scale in scales:
        sigma = max(0.6, scale * size)
        if scale >= coarse_from:
            cells = max(4, int(round(4 * size / sigma)))
            layer = cv2.GaussianBlur(rng.standard_normal((cells, cells)).astype(np.float32), (0, 0), 4.0)
            layer = cv2.resize(layer, (size, size), interpolation=cv2.INTER_CUBIC)
        else:
            layer = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
        total += layer / (layer.std() + 1e-8)
    return total / (total.std() + 1e-8)


def grow_tree(
    rng,
    start,
    heading,
    width,
    size,
    fov_radius,
    centre,
    macula,
    faz_radius,
    curl,
    *,
    step: float | None = None,
    min_width: float | None = None,
    branch_p: float = 0.07,
    max_depth: int = 6,
    inside: Callable[[float, float], bool] | None = None,
    curl_decay: float = 1.0,
    taper: float = 0.992,
):
    """Random-walk vessel segments (x0, y0, x1, y1, width) branching by Murray's law. A branch stops
    where it leaves the field (`inside(x, y)`, else the circle (centre, 1.02·fov_radius)), enters the
    foveal avascular zone, or thins below `min_width`; it forks with probability `branch_p` a step.
    The pull around the macula (`curl`) is multiplied by `curl_decay` each step (1: it never fades);
    the width by `taper`."""
    segments = []
    stack = [(start, heading, width, 0, curl)]
    step = 0.012 * size if step is None else step
    min_width = 0.0035 * size if min_width is None else min_width
    while stack:
        (x, y), theta, w, depth, curl = stack.pop()
        for _ in range(200):
            # Arcades bend around the macula: turn towards the tangent of a circle about it.
            to_mac = math.atan2(macula[1] - y, macula[0] - x)
            tangent = to_mac - math.copysign(math.pi / 2, curl)
            delta = (tangent - theta + math.pi) % (2 * math.pi) - math.pi
            theta += 0.12 * delta * abs(curl) + rng.normal(0.0, 0.12)
            nx, ny = x + step * math.cos(theta), y + step * math.sin(theta)
            if inside is not None:
                if not inside(nx, ny):
                    break
            elif math.hypot(nx - centre[0], ny - centre[1]) > fov_radius * 1.02:
                break
            if math.hypot(nx - macula[0], ny - macula[1]) < faz_radius * 1.6:
                break
            segments.append((x, y, nx, ny, w))
            x, y = nx, ny
            if curl_decay != 1.0:
                curl *= curl_decay
            w *= taper
            if w < min_width:
                break
            if depth < max_depth and rng.random() < branch_p:
                share = rng.uniform(0.35, 0.65)  # Murray: w^3 = w1^3 + w2^3
                w_child = w * share ** (1 / 3)
                w = w * (1 - share) ** (1 / 3)
                side = 1 if rng.random() < 0.5 else -1
                stack.append(((x, y), theta + side * rng.uniform(0.45, 1.0), w_child, depth + 1, curl))
    return segments


def draw_segments(segments, size: int, skip=None) -> np.ndarray:
    """Rasterise segments as round-capped tubes, anti-aliased by supersampling."""
    big = size * SUPERSAMPLE
    canvas = np.zeros((big, big), np.float32)
    shift = 4  # cv2 sub-pixel coordinates: 1/16 px
    scale = SUPERSAMPLE * (1 << shift)
    for x0, y0, x1, y1, w in segments:
        if skip is not None and skip(x0, y0, w):
            continue
        thickness = max(1, int(round(w * SUPERSAMPLE)))
        p0 = (int(x0 * scale), int(y0 * scale))
        p1 = (int(x1 * scale), int(y1 * scale))
        cv2.line(canvas, p0, p1, 1.0, thickness, cv2.LINE_AA, shift)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)


def place(rng, radius_range, anchor, avoid, min_gap):
    """A point at a random angle and distance (radius_range) from anchor, at least min_gap[i] from
    avoid[i] (50 tries, then the last one drawn)."""
    for _ in range(50):
        angle = rng.uniform(0, 2 * math.pi)
        r = rng.uniform(*radius_range)
        x, y = anchor[0] + r * math.cos(angle), anchor[1] + r * math.sin(angle)
        if all(math.hypot(x - ax, y - ay) > gap for (ax, ay), gap in zip(avoid, min_gap, strict=True)):
            return x, y
    return x, y


def scatter_lesions(rng, kind, count, distance, anchor, avoid, min_gap, radius, scale) -> list[Lesion]:
    """`count` lesions placed by `place`; radius: a fixed number of pixels, or a (low, high) range
    drawn per lesion and multiplied by `scale`."""
    lesions = []
    for _ in range(count):
        x, y = place(rng, distance, anchor, avoid, min_gap)
        r = radius if isinstance(radius, float) else rng.uniform(*radius) * scale
        lesions.append(Lesion(kind, x, y, r))
    return lesions


def perfusion_map(lesions, shape) -> np.ndarray:
    """1 where the capillary bed is perfused, down to 0.15 inside non-perfusion areas."""
    perfusion = np.ones(shape, np.float32)
    for lesion in lesions:
        if lesion.kind == "non_perfusion":
            blob = gauss(shape, lesion.x, lesion.y, lesion.radius / 1.5)
            perfusion *= 1.0 - 0.85 * np.clip(blob * 1.6, 0, 1)
    return perfusion


def pruner(perfusion: np.ndarray, max_width: float):
    """A `draw_segments` skip rule: vessels thinner than max_width vanish where perfusion < 0.5."""
    height, width = perfusion.shape

    def pruned(x, y, w):
        inside = 0 <= int(y) < height and 0 <= int(x) < width and perfusion[int(y), int(x)] < 0.5
        return inside and w < max_width

    return pruned


def lesion_blobs(lesions, kind, shape, sigma_scale=1.0) -> np.ndarray:
    """The brightest Gaussian (sigma = radius·sigma_scale) of the lesions of one kind, per pixel."""
    total = np.zeros(shape, np.float32)
    for lesion in lesions:
        if lesion.kind == kind:
            total = np.maximum(total, gauss(shape, lesion.x, lesion.y, lesion.radius * sigma_scale))
    return total


def ramp(rng, xs, ys, centre, size, strength) -> np.ndarray:
    """1 + g·(d·(p − centre))/size, at least 0.3: light rising along a random direction d, g ≤ strength."""
    angle, slope = rng.uniform(0, 2 * math.pi), rng.uniform(0, strength)
    along = ((xs - centre[0]) * math.cos(angle) + (ys - centre[1]) * math.sin(angle)) / size
    return np.clip(1.0 + slope * along, 0.3, None).astype(np.float32)


@dataclass
class VascularMaps:
    perfusion: np.ndarray
    artery: np.ndarray
    vein: np.ndarray
    vessel_mask: np.ndarray
    haemorrhage: np.ndarray
    leakage: np.ndarray
    leakage_late: np.ndarray  # the leak spread 1.8× by the late phase


def vascular_maps(arteries, veins, lesions, size: int, fov: np.ndarray, prune_width: float) -> VascularMaps:
    """What both styles draw from their trees and lesions: the perfusion map, the vessels (those
    thinner than prune_width px vanish inside non-perfused areas), the vessel mask inside the field,
    and the haemorrhage and leakage blobs."""
    shape = (size, size)
    perfusion = perfusion_map(lesions, shape)
    pruned = pruner(perfusion, prune_width)
    artery, vein = draw_segments(arteries, size, pruned), draw_segments(veins, size, pruned)
    return VascularMaps(
        perfusion,
        artery,
        vein,
        (np.maximum(artery, vein) > 0.5) & fov,
        np.clip(lesion_blobs(lesions, "haemorrhage", shape, 0.7) * 1.5, 0, 1),
        lesion_blobs(lesions, "leakage", shape),
        lesion_blobs(lesions, "leakage", shape, 1.8),
    )
