"""Ultra-widefield (Optos-like) phantom eyes: a pseudo-colour SLO photo and its early and late
angiograms, registered pixel for pixel, drawn on a square canvas.

What they imitate, measured on the shared UWF-SLO train eyes 1-4 (853x682 px; photos `N.bmp`,
early/late FFA `N.1.bmp`/`N.2.bmp`; values in 0-255; "field" = the angiogram's lit area,
Gaussian-smoothed FFA > 25, eroded 20 px for the statistics):
- Photo: red and green only, blue exactly 4 everywhere; top 22 rows black. Inside the field
  R 66-120 (std 25-58), G 61-111 (std 32-52); R/G 1.00-1.09 on average but varying over the
  eye (greenish and orange regions), corr(R, G) 0.59-0.76; low-frequency illumination (G blurred,
  sigma 40 px) spans p10-p90 37-95 to 81-139, i.e. about +/-30 % around the mean. Orange
  choroidal bands radiate in the periphery of two eyes (2, 3), laser scars show as bright green
  spots in two (2, 3). Outside the field: eyelids and lashes, bright yellow-green bands (G p90
  128-196, R/G 0.64-0.90 where G > 150) with a dark gap at the fundus edge; lashes also cross
  the fundus as blurred dark streaks. Vessels (black top-hat of G, skeleton widths): median
  3 px, p90 6-9 px (the photo is blurrier than the angiogram); on their centrelines G is
  0.65-0.89 and R 0.78-0.93 of the local background (vessels darker in green). High-pass
  noise (sigma 1.5 px) std 2-9.
- Angiograms: field an ellipse-like area, 760-830 x 405-560 px (45-61 % of the canvas), its top
  cut flat by the upper lid, centre near (0.52 W, 0.58 H); outside it grey 6-20 (black band at
  top). Disc at (0.58-0.61 W, 0.54-0.57 H), 30-35 px across (0.04 W); fovea 85-100 px (0.10-0.12
  W) temporal of the disc, a dark zone 30-50 px across. Early: vessels ~99-151 on a background
  of 43-72 (p99 158-208); late: vessels 52-116 on 44-71 (barely above it), leakage and laser
  scars bright. Vessel widths (top-hat skeleton): median 1-2 px, p90 3.0-4.6 px, p99 3.4-9 px;
  within 60 px of the disc p90 3.4-5.4 px. High-pass noise std 7-12. A burnt-in dark box
  (values 12-23) at x 635-815, y 612-665 in every angiogram: not drawn here (nothing in the
  photo predicts it).
- The shared pairs are NOT registered pixel for pixel: vessel maps agree best with the angiogram
  shifted 30-85 px up and 15-37 px sideways (phase correlation of the vessel top-hats), with
  rotation/scale left over. Phantoms are registered exactly.

Measured the same way (benchmarks/phantom_uwf_stats.py), 6 phantoms at 853x853: field 44-57 % of
the canvas; R 52-107 (std 13-39), G 52-109 (std 17-61), R/G 0.98-1.14, corr(R, G) 0.66-0.82;
early vessels 108-154 on 41-64, late 65-92 on 47-72; outside 1-13; widths median 1.8, p90
3.4-4.6, p99 6.2-7.4 px; noise photo 3.3-7.7, FFA 9-12.

So at canvas side S: field semi-axes 0.44-0.54 S by 0.62-0.85 of that, tilted a few degrees;
disc radius 0.015-0.022 S, 0.03-0.14 S from the field centre; macula 0.09-0.125 S temporal of the
disc; main veins 0.0055-0.0075 S wide at the disc (4.7-6.4 px at 853), vessels followed down to
0.0012 S (1 px at 853); lids, lashes and a black top band of 0-4 %. Whole-canvas numbers drawn per
eye (exposure, hue, choroidal bands, illumination ramp, blur, noise) cover the ranges above.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ffasynth.data.phantom_draw import (
    DISEASES,
    LESION_OF,
    SUPERSAMPLE,
    Lesion,
    PhantomEye,
    gauss,
    grow_tree,
    ramp,
    scatter_lesions,
    texture,
    vascular_maps,
)

BLUE_LEVEL = 4 / 255  # Optos pseudo-colour has no blue: a constant 4 in the shared photos


def _ellipse_radius(xs, ys, centre, axes, tilt):
    """Normalised elliptical radius: 1 on the field's edge."""
    dx, dy = xs - centre[0], ys - centre[1]
    u = dx * math.cos(tilt) + dy * math.sin(tilt)
    v = -dx * math.sin(tilt) + dy * math.cos(tilt)
    return np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2)


def _field(rng, size, xs, ys):
    """The retina's ellipse, the lid margins that cut into it, and the black band on top."""
    centre = (size * (0.5 + rng.normal(0, 0.02)), size * (0.53 + rng.normal(0, 0.025)))
    half_width = size * rng.uniform(0.45, 0.56)
    axes = (half_width, half_width * rng.uniform(0.68, 0.92))
    tilt = rng.normal(0, 0.06)
    r_norm = _ellipse_radius(xs, ys, centre, axes, tilt)
    across = ((xs - centre[0]) / axes[0]) ** 2
    upper = centre[1] - axes[1] * rng.uniform(0.7, 1.1) + axes[1] * rng.uniform(0.1, 0.5) * across
    lower = centre[1] + axes[1] * rng.uniform(0.75, 1.1) - axes[1] * rng.uniform(0.1, 0.5) * across
    band = int(size * rng.uniform(0.0, 0.04))
    fov = (r_norm <= 1.0) & (ys > upper) & (ys < lower) & (ys >= band)
    return centre, axes, tilt, r_norm, band, fov


def _trees(rng, size, centre, axes, tilt, disc, macula, faz_radius, side):
    """Arteries and veins from the disc: four arcades (temporal ones curl round the macula, then
    run out) and 2-4 further radial trunks, followed to the field's edge and under the lids."""
    arteries, veins = [], []
    vein_width = size * rng.uniform(0.0055, 0.0075)

    cos, sin = math.cos(tilt), math.sin(tilt)

    def inside(x, y):  # within the canvas and 1.08 x the field's ellipse (vessels run on under the lids)
        u = (x - centre[0]) * cos + (y - centre[1]) * sin
        v = -(x - centre[0]) * sin + (y - centre[1]) * cos
        return 0 <= x < size and 0 <= y < size and (u / axes[0]) ** 2 + (v / axes[1]) ** 2 < 1.08**2

    grow = dict(step=0.01 * size, min_width=0.0012 * size, branch_p=0.08, max_depth=7, inside=inside, taper=0.988)
    towards_macula = math.atan2(macula[1] - disc[1], macula[0] - disc[0])
    headings = []
    for up in (-1, 1):
        headings += [(towards_macula + up * (0.9 + rng.normal(0, 0.1)), up * side * 0.9, 1.0)]
        headings += [(towards_macula + math.pi - up * (0.7 + rng.normal(0, 0.15)), 0.0, 0.8)]
    for _ in range(int(rng.integers(2, 5))):
        headings += [(rng.uniform(0, 2 * math.pi), 0.0, rng.uniform(0.4, 0.7))]
    for heading, curl, calibre in headings:
        for tree, width, offset in ((veins, vein_width, 0.0), (arteries, vein_width * rng.uniform(0.7, 0.85), 0.12)):
            tree += grow_tree(
                rng, disc, heading + offset, calibre * width, size, 0.0, centre, macula, faz_radius, curl,
                curl_decay=0.95, **grow,
            )  # fmt: skip
    return arteries, veins


def _lesions(rng, disease, size, centre, disc, macula, disc_radius, faz_radius):
    """The disease's lesions, and in half the diseased eyes a mix: fewer lesions of another kind;
    a quarter of them also carry laser scars (photocoagulation) in the mid-periphery."""
    avoid = [disc, macula]
    plans = {  # kind: (count range, distance from anchor (x S), anchor, gaps (x disc, FAZ radius), radius)
        "microaneurysms": ((15, 40), (0.03, 0.22), macula, (1.5, 1.0), max(0.8, 0.0035 * size)),
        "haemorrhages": ((4, 12), (0.04, 0.4), macula, (1.8, 1.0), (0.006, 0.02)),
        "leakage": ((2, 5), (0.03, 0.25), macula, (2.0, 1.0), (0.01, 0.022)),
        "non_perfusion": ((1, 3), (0.25, 0.42), centre, (3.0, 3.0), (0.06, 0.12)),
    }
    kinds = [] if disease == "normal" else [disease]
    if disease != "normal" and rng.random() < 0.5:
        kinds.append(str(rng.choice([d for d in DISEASES[1:] if d != disease])))
    lesions: list[Lesion] = []
    for order, kind in enumerate(kinds):
        (low, high), distance, anchor, (disc_gap, faz_gap), radius = plans[kind]
        count = max(1, int(rng.integers(low, high)) // (1 + order))  # a secondary kind: half as many
        gaps = [disc_radius * disc_gap, faz_radius * faz_gap]
        lesions += scatter_lesions(
            rng, LESION_OF[kind], count, (distance[0] * size, distance[1] * size), anchor, avoid, gaps, radius, size
        )
    if disease != "normal" and rng.random() < 0.25:
        gaps = [disc_radius * 4, 0.12 * size]
        count = int(rng.integers(40, 160))
        lesions += scatter_lesions(rng, "laser_scar", count, (0.18 * size, 0.45 * size), disc, avoid, gaps,
                                   (0.005, 0.009), size)  # fmt: skip
    return lesions


def _spots(lesions, kind, size, blur) -> np.ndarray:
    """Filled discs of the lesions' radii, blurred by blur x radius: many small lesions at once."""
    canvas = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.float32)
    radii = [lesion.radius for lesion in lesions if lesion.kind == kind]
    if not radii:
        return np.zeros((size, size), np.float32)
    for lesion in lesions:
        if lesion.kind == kind:
            centre = (int(lesion.x * SUPERSAMPLE * 16), int(lesion.y * SUPERSAMPLE * 16))
            cv2.circle(canvas, centre, int(lesion.radius * SUPERSAMPLE * 16), 1.0, -1, cv2.LINE_AA, 4)
    spots = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(spots, (0, 0), max(0.3, blur * float(np.mean(radii))))


def _lashes(rng, size, fov):
    """Eyelashes from the field's top or bottom edge into it, out of focus: (dark, bright) maps in [0, 1]."""
    maps = [np.zeros((size * SUPERSAMPLE,) * 2, np.float32) for _ in range(2)]
    columns = np.flatnonzero(fov.any(0))
    for _ in range(int(rng.integers(0, 12))):
        x0 = float(rng.choice(columns)) if len(columns) else size / 2
        rows = np.flatnonzero(fov[:, int(x0)])
        from_top = rng.random() < 0.5
        y0 = (rows[0] if from_top else rows[-1]) if len(rows) else size / 2
        y0 = y0 + (-1 if from_top else 1) * size * 0.02  # rooted in the lid, just outside the field
        heading = (math.pi / 2 if from_top else -math.pi / 2) + rng.normal(0, 0.5)
        length, bend = size * rng.uniform(0.03, 0.2), rng.normal(0, 0.4)
        t = np.linspace(0.0, 1.0, 12)
        angle = heading + bend * t
        points = np.stack([x0 + length * np.cumsum(np.cos(angle)) / 12, y0 + length * np.cumsum(np.sin(angle)) / 12], 1)
        width = max(1, int(round(size * rng.uniform(0.002, 0.008) * SUPERSAMPLE)))
        target = maps[1] if rng.random() < 0.15 else maps[0]
        cv2.polylines(target, [np.round(points * SUPERSAMPLE * 16).astype(np.int32)], False, 1.0, width, cv2.LINE_AA, 4)
    blur = size * rng.uniform(0.003, 0.01)
    return [cv2.GaussianBlur(cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA), (0, 0), blur) for m in maps]


def _radial_bands(rng, size, xs, ys, pole) -> np.ndarray:
    """Choroidal vessels seen through the retina: bands radiating from the posterior pole, in [-1, 1]."""
    samples = 2048  # around the pole; 15-60 bands, their angle drifting with the distance from it
    sigma = samples / (3.0 * rng.uniform(15, 60))
    noise = np.tile(rng.standard_normal((1, samples)).astype(np.float32), 3)  # three turns: blur wraps round
    around = cv2.GaussianBlur(noise, (0, 0), sigma)[0, samples : 2 * samples]
    around = np.tanh(2.0 * around / (around.std() + 1e-8))
    drift = cv2.GaussianBlur(rng.standard_normal((1, 256)).astype(np.float32), (0, 0), 12)[0]
    drift = drift / (drift.std() + 1e-8) * samples * 0.02
    theta = np.arctan2(ys - pole[1], xs - pole[0])
    rho = np.clip(np.hypot(xs - pole[0], ys - pole[1]) / size * 255, 0, 255).astype(np.int64)
    index = (theta / (2 * math.pi) * samples + drift[rho]).astype(np.int64)
    return around[index % samples]


def make_uwf_eye(size: int = 512, seed: int = 0, disease: str = "normal") -> PhantomEye:
    """One ultra-widefield eye, fully determined by (size, seed, disease)."""
    if disease not in DISEASES:
        raise ValueError(f"unknown disease {disease!r}; choose from {DISEASES}")
    rng = np.random.default_rng(seed)
    shape = (size, size)
    ys, xs = np.ogrid[:size, :size]
    centre, axes, tilt, r_norm, band, fov = _field(rng, size, xs, ys)
    side = 1 if rng.random() < 0.5 else -1  # right or left eye
    disc_radius = size * rng.uniform(0.015, 0.022)
    disc = (centre[0] + side * size * rng.uniform(0.03, 0.14), centre[1] + size * rng.normal(-0.02, 0.04))
    macula = (disc[0] - side * size * rng.uniform(0.09, 0.125), disc[1] + size * rng.normal(0.01, 0.01))
    faz_radius = size * rng.uniform(0.012, 0.02)

    arteries, veins = _trees(rng, size, centre, axes, tilt, disc, macula, faz_radius, side)
    lesions = _lesions(rng, disease, size, centre, disc, macula, disc_radius, faz_radius)
    maps = vascular_maps(arteries, veins, lesions, size, fov, 0.004 * size)
    perfusion, artery_map, vein_map, vessel_mask = maps.perfusion, maps.artery, maps.vein, maps.vessel_mask
    haem, leak, leak_late = maps.haemorrhage, maps.leakage, maps.leakage_late
    ma = _spots(lesions, "microaneurysm", size, 0.6)
    scars = _spots(lesions, "laser_scar", size, 0.35)
    scar_rims = cv2.dilate(scars, np.ones((3, 3))) - cv2.erode(scars, np.ones((3, 3)))  # window-defect rings
    disc_blob = np.clip(gauss(shape, *disc, disc_radius * 0.75) * 1.4, 0, 1)
    macula_blob = gauss(shape, *macula, 0.035 * size)
    faz = gauss(shape, *macula, faz_radius)
    dark_lashes, bright_lashes = _lashes(rng, size, fov)
    choroid = texture(rng, size, coarse_from=0.05)
    capillary = texture(rng, size, scales=(0.002, 0.006))
    broad = texture(rng, size, scales=(0.1, 0.25), coarse_from=0.05)
    edge = cv2.GaussianBlur(fov.astype(np.float32), (0, 0), max(0.5, 0.003 * size))
    outside = cv2.distanceTransform((~fov).astype(np.uint8), cv2.DIST_L2, 3) / size  # distance into the lids

    # Photo: luminance under a tilted, vignetted illumination; hue between green and orange.
    tilt_light = ramp(rng, xs, ys, centre, size, 0.9)
    illumination = rng.uniform(0.55, 1.15) * tilt_light * np.clip(1.0 - rng.uniform(0.1, 0.5) * r_norm**3, 0.2, None)
    illumination = illumination * np.exp(0.35 * broad)
    luminance = 0.42 * illumination * (1.0 + 0.15 * choroid)
    hue = texture(rng, size, scales=(0.08, 0.2), coarse_from=0.05)  # greenish and orange regions
    hue = rng.uniform(-0.05, 0.08) + 0.15 * (hue - hue[fov].mean())  # the eye's mean R/G: 0.9-1.17
    patches = np.clip(0.5 + texture(rng, size, scales=(0.1,), coarse_from=0.05), 0, 1)  # bands show in places only
    bands = _radial_bands(rng, size, xs, ys, macula) * rng.uniform(0.0, 1.0) * patches
    bands = bands * np.clip((r_norm - 0.3) / 0.4, 0, 1)
    red = luminance * (1.0 + hue + 0.25 * bands)
    green = luminance * (1.0 - hue - 0.12 * bands)
    glow = 0.12 * gauss(shape, *disc, 0.06 * size) * illumination  # yellow posterior pole
    red, green = (red + glow) * (1 - 0.25 * macula_blob), (green + glow) * (1 - 0.35 * macula_blob)
    contrast = rng.uniform(0.6, 1.1)
    red = red * (1 - contrast * (0.2 * vein_map + 0.08 * artery_map)) * (1 - 0.5 * haem) * (1 - 0.25 * ma)
    green = green * (1 - contrast * (0.5 * vein_map + 0.3 * artery_map)) * (1 - 0.7 * haem) * (1 - 0.5 * ma)
    exudate = np.clip(leak_late - 0.5, 0, 1) * 2.0 * (capillary > 0)  # hard exudates ring the leak
    red, green = red + 0.12 * exudate + 0.08 * scars, green + 0.2 * exudate + scars * (0.12 + 0.2 * illumination)
    red = red * (1 - disc_blob) + 0.85 * disc_blob * illumination
    green = green * (1 - disc_blob) + 0.8 * disc_blob * illumination
    # Lids: bright yellow-green bands beyond a dark gap at the fundus's edge.
    profile = 0.35 + 0.65 * np.exp(-(((outside - rng.uniform(0.02, 0.08)) / 0.06) ** 2))
    lid = rng.uniform(0.45, 0.8) * np.clip(1.0 + 0.25 * broad + 0.1 * choroid, 0.2, None) * profile
    lid = lid * (1.0 - 0.85 * np.exp(-outside / rng.uniform(0.006, 0.015)))
    red, green = red * edge + lid * rng.uniform(0.65, 0.95) * (1 - edge), green * edge + lid * (1 - edge)
    red = red * (1 - 0.6 * dark_lashes) + 0.25 * bright_lashes
    green = green * (1 - 0.6 * dark_lashes) + 0.35 * bright_lashes
    photo = np.stack([red, green], -1).astype(np.float32)
    photo = cv2.GaussianBlur(photo, (0, 0), size * rng.uniform(0.0005, 0.0015))
    photo = photo + rng.normal(0, rng.uniform(0.008, 0.03), photo.shape)
    photo = np.concatenate([photo, np.full((size, size, 1), BLUE_LEVEL)], -1)
    photo[:band, :, :2] = 0.0

    # Angiograms: choroidal flush and capillary bed (none where unperfused), bright vessels blended
    # over it by their anti-aliased coverage, dark fovea; black outside the field.
    flush = (0.24 + 0.04 * choroid + 0.04 * capillary) * perfusion * (1.0 - 0.85 * faz)
    gain = rng.uniform(0.8, 1.3) * ramp(rng, xs, ys, centre, size, 0.4)
    gain = gain * np.clip(1.0 - rng.uniform(0.3, 0.6) * r_norm**2, 0.2, None) * (1 - 0.7 * dark_lashes)
    noise, dark_level, blur = rng.uniform(0.01, 0.025), rng.uniform(0.0, 0.06), size * rng.uniform(0.0004, 0.001)

    def angiogram(artery_level, vein_level, disc_level, ma_level, stain, extra):
        ffa = flush + stain
        ffa = ffa * (1 - artery_map) + artery_level * artery_map
        ffa = ffa * (1 - vein_map) + vein_level * vein_map
        ffa = np.maximum(np.maximum(ffa, disc_level * disc_blob), ma_level * np.clip(ma * 1.4, 0, 1))
        ffa = cv2.GaussianBlur((ffa + extra) * (1.0 - 0.8 * haem) * gain, (0, 0), blur) + rng.normal(0, noise, shape)
        ffa = ffa * edge + (dark_level + rng.normal(0, 0.006, shape)) * (1 - edge)
        ffa[:band] = 0.0
        return ffa

    ffa_early = angiogram(0.72, 0.62, 0.85, 0.8, 0.0, 0.3 * leak + 0.2 * scars + 0.2 * scar_rims)
    ffa_late = angiogram(0.32, 0.36, 0.7, 0.5, 0.04 * perfusion, 0.75 * leak_late + 0.35 * scars)
    clip = lambda a: np.clip(a, 0.0, 1.0).astype(np.float32)  # noqa: E731
    return PhantomEye(
        clip(photo), clip(ffa_early), clip(ffa_late), vessel_mask, fov, disease, lesions, disc, macula, "uwf"
    )
