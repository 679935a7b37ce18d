"""Procedural, registered fundus-photo / FFA pairs with disease labels, reproducible from a seed.

One eye's geometry (field of view, optic disc, macula, a branching artery/vein tree from the
disc, lesions) is drawn twice: as a colour photograph (dark vessels on an orange fundus) and as
early- and late-phase angiograms (bright vessels, dark foveal avascular zone, hyperfluorescent
disc). Lesions follow their angiographic signs: microaneurysms are bright dots, haemorrhages block
fluorescence (dark on both), leakage is a diffuse bright blob that grows in the late phase,
non-perfusion is a dark area with pruned capillaries.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ffasynth.files import atomic_write, atomic_write_text

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
    kind: str  # microaneurysm, haemorrhage, leakage, non_perfusion
    x: float  # pixels
    y: float
    radius: float


@dataclass
class PhantomEye:
    photo: np.ndarray  # (H, W, 3) float32 in [0, 1]
    ffa_early: np.ndarray  # (H, W) float32 in [0, 1]
    ffa_late: np.ndarray
    vessel_mask: np.ndarray  # (H, W) bool, vessels at least ~1 px wide
    fov: np.ndarray  # (H, W) bool
    label: str
    lesions: list[Lesion] = field(default_factory=list)
    disc: tuple[float, float] = (0.0, 0.0)
    macula: tuple[float, float] = (0.0, 0.0)


def _gauss(shape, cx, cy, sigma) -> np.ndarray:
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * sigma**2)).astype(np.float32)


def _texture(rng: np.random.Generator, size: int, scales=(0.01, 0.03, 0.08)) -> np.ndarray:
    """Smooth noise, unit std, summed over a few spatial scales (fractions of the image size)."""
    total = np.zeros((size, size), np.float32)
    for scale in scales:
        sigma = max(0.6, scale * size)
        layer = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
        total += layer / (layer.std() + 1e-8)
    return total / (total.std() + 1e-8)


def _grow_tree(rng, start, heading, width, size, fov_radius, centre, macula, faz_radius, curl):
    """Random-walk vessel segments (x0, y0, x1, y1, width) branching by Murray's law."""
    segments = []
    stack = [(start, heading, width, 0)]
    step = 0.012 * size
    min_width = 0.0035 * size
    while stack:
        (x, y), theta, w, depth = stack.pop()
        for _ in range(200):
            # Arcades bend around the macula: turn towards the tangent of a circle about it.
            to_mac = math.atan2(macula[1] - y, macula[0] - x)
            tangent = to_mac - math.copysign(math.pi / 2, curl)
            delta = (tangent - theta + math.pi) % (2 * math.pi) - math.pi
            theta += 0.12 * delta * abs(curl) + rng.normal(0.0, 0.12)
            nx, ny = x + step * math.cos(theta), y + step * math.sin(theta)
            if math.hypot(nx - centre[0], ny - centre[1]) > fov_radius * 1.02:
                break
            if math.hypot(nx - macula[0], ny - macula[1]) < faz_radius * 1.6:
                break
            segments.append((x, y, nx, ny, w))
            x, y = nx, ny
            w *= 0.992
            if w < min_width:
                break
            if depth < 6 and rng.random() < 0.07:
                share = rng.uniform(0.35, 0.65)  # Murray: w^3 = w1^3 + w2^3
                w_child = w * share ** (1 / 3)
                w = w * (1 - share) ** (1 / 3)
                side = 1 if rng.random() < 0.5 else -1
                stack.append(((x, y), theta + side * rng.uniform(0.45, 1.0), w_child, depth + 1))
    return segments


def _draw(segments, size: int, skip=None) -> np.ndarray:
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


def _place(rng, centre, radius_range, anchor, avoid, min_gap):
    for _ in range(50):
        angle = rng.uniform(0, 2 * math.pi)
        r = rng.uniform(*radius_range)
        x, y = anchor[0] + r * math.cos(angle), anchor[1] + r * math.sin(angle)
        if all(math.hypot(x - ax, y - ay) > gap for (ax, ay), gap in zip(avoid, min_gap, strict=True)):
            return x, y
    return x, y


def make_eye(size: int = 256, seed: int = 0, disease: str = "normal") -> PhantomEye:
    """One eye, fully determined by (size, seed, disease)."""
    if disease not in DISEASES:
        raise ValueError(f"unknown disease {disease!r}; choose from {DISEASES}")
    rng = np.random.default_rng(seed)
    shape = (size, size)
    centre = (size / 2 + rng.normal(0, 0.01 * size), size / 2 + rng.normal(0, 0.01 * size))
    fov_radius = size * rng.uniform(0.45, 0.48)
    side = 1 if rng.random() < 0.5 else -1  # right or left eye: disc on one side of the macula
    macula = (centre[0] - side * 0.06 * size, centre[1] + rng.normal(0, 0.01 * size))
    disc = (centre[0] + side * 0.2 * size, centre[1] - 0.02 * size + rng.normal(0, 0.01 * size))
    disc_radius = 0.055 * size
    faz_radius = 0.035 * size
    ys, xs = np.ogrid[:size, :size]
    r_norm = np.sqrt((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / fov_radius
    fov = r_norm <= 1.0

    # Vessel trees: temporal arcades curl around the macula, nasal ones run out straight.
    arteries, veins = [], []
    towards_macula = math.atan2(macula[1] - disc[1], macula[0] - disc[0])
    for up in (-1, 1):
        for tree, w0, offset in ((veins, 0.013, 0.0), (arteries, 0.010, 0.12)):
            temporal = towards_macula + up * (0.9 + offset + rng.normal(0, 0.08))
            tree += _grow_tree(
                rng, disc, temporal, w0 * size, size, fov_radius, centre, macula, faz_radius, curl=up * side * 0.9
            )
            nasal = towards_macula + math.pi - up * (0.7 + offset + rng.normal(0, 0.1))
            tree += _grow_tree(
                rng, disc, nasal, 0.8 * w0 * size, size, fov_radius, centre, macula, faz_radius, curl=0.0
            )

    lesions: list[Lesion] = []
    avoid = [disc, macula]
    if disease == "microaneurysms":
        for _ in range(int(rng.integers(10, 20))):
            x, y = _place(rng, centre, (0.08 * size, 0.25 * size), macula, avoid, [disc_radius * 1.5, faz_radius])
            lesions.append(Lesion("microaneurysm", x, y, max(1.0, 0.006 * size)))
    elif disease == "haemorrhages":
        for _ in range(int(rng.integers(3, 7))):
            x, y = _place(rng, centre, (0.08 * size, 0.32 * size), macula, avoid, [disc_radius * 1.8, faz_radius])
            lesions.append(Lesion("haemorrhage", x, y, rng.uniform(0.018, 0.035) * size))
    elif disease == "leakage":
        for _ in range(int(rng.integers(2, 4))):
            x, y = _place(rng, centre, (0.06 * size, 0.22 * size), macula, avoid, [disc_radius * 2, faz_radius])
            lesions.append(Lesion("leakage", x, y, rng.uniform(0.025, 0.04) * size))
    elif disease == "non_perfusion":
        for _ in range(int(rng.integers(1, 3))):
            x, y = _place(rng, centre, (0.2 * size, 0.32 * size), centre, avoid, [disc_radius * 3, faz_radius * 3])
            lesions.append(Lesion("non_perfusion", x, y, rng.uniform(0.08, 0.12) * size))

    perfusion = np.ones(shape, np.float32)
    for lesion in lesions:
        if lesion.kind == "non_perfusion":
            blob = _gauss(shape, lesion.x, lesion.y, lesion.radius / 1.5)
            perfusion *= 1.0 - 0.85 * np.clip(blob * 1.6, 0, 1)

    def pruned(x, y, w):  # small vessels vanish inside non-perfused areas
        inside = 0 <= int(y) < size and 0 <= int(x) < size and perfusion[int(y), int(x)] < 0.5
        return inside and w < 0.008 * size

    artery_map = _draw(arteries, size, pruned)
    vein_map = _draw(veins, size, pruned)
    vessel_mask = (np.maximum(artery_map, vein_map) > 0.5) & fov

    def blobs(kind, sigma_scale=1.0):
        total = np.zeros(shape, np.float32)
        for lesion in lesions:
            if lesion.kind == kind:
                total = np.maximum(total, _gauss(shape, lesion.x, lesion.y, lesion.radius * sigma_scale))
        return total

    ma = blobs("microaneurysm", 0.8)
    haem = np.clip(blobs("haemorrhage", 0.7) * 1.5, 0, 1)
    leak = blobs("leakage")
    leak_late = blobs("leakage", 1.8)
    disc_blob = np.clip(_gauss(shape, *disc, disc_radius * 0.75) * 1.4, 0, 1)
    macula_blob = _gauss(shape, *macula, 0.07 * size)
    faz = _gauss(shape, *macula, faz_radius)
    vignette = np.clip(1.0 - 0.5 * r_norm**2.5, 0.0, 1.0).astype(np.float32)
    choroid = _texture(rng, size)
    capillary = _texture(rng, size, scales=(0.004, 0.01))

    # Photograph: orange fundus, darker macula, pale disc, dark-red vessels (veins darker).
    pigment = rng.uniform(0.85, 1.1)
    base = np.array([0.80, 0.40, 0.16], np.float32) * pigment
    photo = base * (1.0 + 0.06 * choroid)[..., None]
    photo = photo * (1.0 - 0.35 * macula_blob)[..., None]
    photo = photo * (1.0 - np.array([0.30, 0.55, 0.55]) * vein_map[..., None])
    photo = photo * (1.0 - np.array([0.18, 0.40, 0.40]) * artery_map[..., None])
    photo = photo * (1.0 - np.array([0.35, 0.65, 0.65]) * np.maximum(haem, 0.8 * ma)[..., None])
    exudate = np.clip(leak_late - 0.5, 0, 1) * 2.0  # yellow hard exudates ring the leak
    photo = photo + np.array([0.15, 0.25, 0.05]) * (exudate * (capillary > 0))[..., None]
    photo = photo * (1.0 - disc_blob[..., None]) + np.array([0.98, 0.86, 0.62]) * disc_blob[..., None]
    photo = photo * vignette[..., None] + rng.normal(0, 0.01, photo.shape)
    photo = np.where(fov[..., None], photo, 0.0)

    # Angiograms: choroidal flush, capillary bed (absent where not perfused), bright vessels.
    background = (0.16 + 0.03 * choroid + 0.05 * capillary) * perfusion * (1.0 - 0.85 * faz)

    def angiogram(artery_level, vein_level, disc_level, leak_map, stain):
        ffa = background + stain
        ffa = np.maximum(ffa, artery_level * artery_map)
        ffa = np.maximum(ffa, vein_level * vein_map)
        ffa = np.maximum(ffa, disc_level * disc_blob)
        ffa = np.maximum(ffa, 0.95 * np.clip(ma * 1.4, 0, 1))
        ffa = ffa + leak_map
        ffa = ffa * (1.0 - 0.8 * haem)  # blood blocks fluorescence
        ffa = ffa * (0.55 + 0.45 * vignette) + rng.normal(0, 0.012, shape)
        return np.where(fov, ffa, 0.0)

    ffa_early = angiogram(0.85, 0.45, 0.55, 0.30 * leak, 0.0)
    ffa_late = angiogram(0.55, 0.65, 0.75, 0.75 * leak_late, 0.05 * perfusion)
    clip = lambda a: np.clip(a, 0.0, 1.0).astype(np.float32)  # noqa: E731
    return PhantomEye(clip(photo), clip(ffa_early), clip(ffa_late), vessel_mask, fov, disease, lesions, disc, macula)


def assign_diseases(n: int, seed: int, diseases=DISEASES) -> list[str]:
    """Balanced labels (each disease n/len times, ±1), shuffled by the seed."""
    labels = [diseases[i % len(diseases)] for i in range(n)]
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _png_bytes(array: np.ndarray) -> bytes:
    image = (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 3:
        image = image[..., ::-1]  # RGB → cv2's BGR
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def write_phantom_dataset(
    out: str | Path,
    n: int = 100,
    size: int = 256,
    seed: int = 0,
    diseases=DISEASES,
    test_fraction: float = 0.0,
    progress=None,
) -> Path:
    """Write n eyes in the `uwf` layout (`N.png` photo, `N.1.png` early, `N.2.png` late FFA) with
    `labels.csv` (id, label, lesion counts). With test_fraction > 0, ids go to train/ and test/."""
    if n < 1 or size < 32:
        raise ValueError("a phantom set needs n >= 1 and size >= 32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = assign_diseases(n, seed, diseases)
    n_test = int(round(n * test_fraction))
    rows = []
    for i in range(n):
        eye = make_eye(size, seed * 100_003 + i, labels[i])
        split = "" if test_fraction <= 0 else ("test/" if i >= n - n_test else "train/")
        pair_id = f"{split}{i + 1}"
        for suffix, array in (("", eye.photo), (".1", eye.ffa_early), (".2", eye.ffa_late)):
            data = _png_bytes(array)
            atomic_write(out / f"{pair_id}{suffix}.png", lambda tmp, data=data: tmp.write_bytes(data))
        counts = {d: sum(lesion.kind == LESION_OF[d] for lesion in eye.lesions) for d in DISEASES[1:]}
        rows.append({"id": pair_id, "label": eye.label, **counts})
        if progress is not None:
            progress(i + 1)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "label", *DISEASES[1:]], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", buffer.getvalue())
    return out
