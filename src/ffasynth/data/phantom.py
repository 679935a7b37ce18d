"""Procedural, registered fundus-photo / FFA pairs with disease labels, reproducible from a seed.

One eye's geometry (field of view, optic disc, macula, a branching artery/vein tree from the
disc, lesions) is drawn twice: as a colour photograph (dark vessels on an orange fundus) and as
early- and late-phase angiograms (bright vessels, dark foveal avascular zone, hyperfluorescent
disc). Lesions follow their angiographic signs: microaneurysms are bright dots, haemorrhages block
fluorescence (dark on both), leakage is a diffuse bright blob that grows in the late phase,
non-perfusion is a dark area with pruned capillaries.

Two styles: "standard" (this module: a 45-degree colour fundus photo in a round field) and "uwf"
(`phantom_uwf`: an Optos-like ultra-widefield pseudo-colour photo). `vary=True` gives standard eyes
random illumination, disc/macula position, field size and vessel calibre, drawn from a second
generator so that vary=False keeps every eye this module has drawn for a seed. What both styles
draw with (vessel trees, lesions, textures) is in `phantom_draw`; `phantom_stream` serves unlimited
crops of either for pretraining.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import cv2
import numpy as np

from ffasynth.data.phantom_draw import (
    DISEASES,
    LESION_OF,
    Lesion,
    PhantomEye,
    gauss,
    grow_tree,
    lesion_blobs,
    ramp,
    scatter_lesions,
    texture,
    vascular_maps,
)
from ffasynth.data.phantom_uwf import make_uwf_eye
from ffasynth.files import atomic_write, atomic_write_text

# Lesion and PhantomEye are re-exported: callers know them as phantom.Lesion, phantom.PhantomEye.
__all__ = [
    "DISEASES",
    "LESION_OF",
    "LESIONS_SUFFIX",
    "STYLES",
    "Lesion",
    "PhantomEye",
    "assign_diseases",
    "dataset_eye_seed",
    "lesion_record",
    "make_eye",
    "read_lesion_record",
    "write_phantom_dataset",
]

STYLES = ("standard", "uwf")
LESIONS_SUFFIX = ".lesions.json"  # `N.lesions.json` beside `N.png`: where the eye's lesions were drawn


def make_eye(
    size: int = 256,
    seed: int = 0,
    disease: str = "normal",
    style: str = "standard",
    vary: bool = False,
    grain: float = 1.0,
    grain_seed: int | None = None,
):
    """One eye, fully determined by (size, seed, disease, style, vary). style="uwf" draws an
    Optos-like ultra-widefield eye (see `phantom_uwf`); vary=True gives a standard eye random
    illumination, disc/macula position, field size and vessel calibre (vary=False: the eyes this
    function always drew for a seed).

    For ceilings (benchmarks/demo_ceiling.py), standard eyes only: the angiograms' capillary grain and
    sensor noise are drawn independently of everything the photo shows, so no method can predict them.
    `grain` scales them (0: the angiograms without them); `grain_seed` draws them from that seed instead
    (another realisation of the same eye). Every other draw, and the photo, stay as they are."""
    if style not in STYLES:
        raise ValueError(f"unknown phantom style {style!r}; choose from {STYLES}")
    if style == "uwf":
        if grain != 1.0 or grain_seed is not None:
            raise ValueError("grain and grain_seed are for standard eyes only")
        return make_uwf_eye(size, seed, disease)
    if disease not in DISEASES:
        raise ValueError(f"unknown disease {disease!r}; choose from {DISEASES}")
    rng = np.random.default_rng(seed)
    # vary's draws come from their own stream, so the base eye's draws stay those of vary=False.
    extra = np.random.default_rng([seed, 1]) if vary else None
    shape = (size, size)
    centre = (size / 2 + rng.normal(0, 0.01 * size), size / 2 + rng.normal(0, 0.01 * size))
    fov_radius = size * rng.uniform(0.45, 0.48)
    side = 1 if rng.random() < 0.5 else -1  # right or left eye: disc on one side of the macula
    macula = (centre[0] - side * 0.06 * size, centre[1] + rng.normal(0, 0.01 * size))
    disc = (centre[0] + side * 0.2 * size, centre[1] - 0.02 * size + rng.normal(0, 0.01 * size))
    disc_radius = 0.055 * size
    faz_radius = 0.035 * size
    calibre = 1.0
    if extra is not None:
        fov_radius = size * extra.uniform(0.40, 0.49)
        macula = (centre[0] - side * extra.uniform(0.02, 0.1) * size, macula[1] + extra.normal(0, 0.03 * size))
        disc = (macula[0] + side * extra.uniform(0.2, 0.3) * size, macula[1] + extra.normal(-0.02, 0.04) * size)
        disc_radius *= extra.uniform(0.8, 1.2)
        calibre = extra.uniform(0.75, 1.25)
    ys, xs = np.ogrid[:size, :size]
    r_norm = np.sqrt((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / fov_radius
    fov = r_norm <= 1.0

    # Vessel trees: temporal arcades curl around the macula, nasal ones run out straight.
    arteries, veins = [], []
    towards_macula = math.atan2(macula[1] - disc[1], macula[0] - disc[0])
    for up in (-1, 1):
        for tree, w0, offset in ((veins, 0.013 * calibre, 0.0), (arteries, 0.010 * calibre, 0.12)):
            temporal = towards_macula + up * (0.9 + offset + rng.normal(0, 0.08))
            tree += grow_tree(
                rng, disc, temporal, w0 * size, size, fov_radius, centre, macula, faz_radius, curl=up * side * 0.9
            )
            nasal = towards_macula + math.pi - up * (0.7 + offset + rng.normal(0, 0.1))
            tree += grow_tree(rng, disc, nasal, 0.8 * w0 * size, size, fov_radius, centre, macula, faz_radius, curl=0.0)

    avoid = [disc, macula]
    if disease == "microaneurysms":
        gaps = [disc_radius * 1.5, faz_radius]
        lesions = scatter_lesions(
            rng, "microaneurysm", int(rng.integers(10, 20)), (0.08 * size, 0.25 * size), macula, avoid, gaps,
            max(1.0, 0.006 * size), size,
        )  # fmt: skip
    elif disease == "haemorrhages":
        gaps = [disc_radius * 1.8, faz_radius]
        lesions = scatter_lesions(
            rng, "haemorrhage", int(rng.integers(3, 7)), (0.08 * size, 0.32 * size), macula, avoid, gaps,
            (0.018, 0.035), size,
        )  # fmt: skip
    elif disease == "leakage":
        gaps = [disc_radius * 2, faz_radius]
        lesions = scatter_lesions(
            rng, "leakage", int(rng.integers(2, 4)), (0.06 * size, 0.22 * size), macula, avoid, gaps,
            (0.025, 0.04), size,
        )  # fmt: skip
    elif disease == "non_perfusion":
        gaps = [disc_radius * 3, faz_radius * 3]
        lesions = scatter_lesions(
            rng, "non_perfusion", int(rng.integers(1, 3)), (0.2 * size, 0.32 * size), centre, avoid, gaps,
            (0.08, 0.12), size,
        )  # fmt: skip
    else:
        lesions = []

    maps = vascular_maps(arteries, veins, lesions, size, fov, 0.008 * size)
    perfusion, artery_map, vein_map, vessel_mask = maps.perfusion, maps.artery, maps.vein, maps.vessel_mask
    haem, leak, leak_late = maps.haemorrhage, maps.leakage, maps.leakage_late
    ma = lesion_blobs(lesions, "microaneurysm", shape, 0.8)
    disc_blob = np.clip(gauss(shape, *disc, disc_radius * 0.75) * 1.4, 0, 1)
    macula_blob = gauss(shape, *macula, 0.07 * size)
    faz = gauss(shape, *macula, faz_radius)
    vignette = np.clip(1.0 - 0.5 * r_norm**2.5, 0.0, 1.0).astype(np.float32)
    choroid = texture(rng, size)
    capillary = texture(rng, size, scales=(0.004, 0.01))
    # the angiograms' photo-independent texture: the eye's own draws, or another seed's (see the docstring)
    other = None if grain_seed is None else np.random.default_rng([seed, 2, grain_seed])
    capillary_ffa = capillary if other is None else texture(other, size, scales=(0.004, 0.01))

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
    if extra is not None:  # uneven illumination: a linear ramp across the field, and exposure
        photo = photo * (extra.uniform(0.7, 1.2) * ramp(extra, xs, ys, centre, size, 0.6))[..., None]
    photo = photo * vignette[..., None] + rng.normal(0, 0.01, photo.shape)
    photo = np.where(fov[..., None], photo, 0.0)

    # Angiograms: choroidal flush, capillary bed (absent where not perfused), bright vessels.
    background = (0.16 + 0.03 * choroid + 0.05 * grain * capillary_ffa) * perfusion * (1.0 - 0.85 * faz)
    gain = 1.0 if extra is None else extra.uniform(0.8, 1.15) * ramp(extra, xs, ys, centre, size, 0.3)

    def angiogram(artery_level, vein_level, disc_level, leak_map, stain):
        ffa = background + stain
        ffa = np.maximum(ffa, artery_level * artery_map)
        ffa = np.maximum(ffa, vein_level * vein_map)
        ffa = np.maximum(ffa, disc_level * disc_blob)
        ffa = np.maximum(ffa, 0.95 * np.clip(ma * 1.4, 0, 1))
        ffa = ffa + leak_map
        ffa = ffa * (1.0 - 0.8 * haem)  # blood blocks fluorescence
        if extra is not None:
            ffa = ffa * gain
        noise = rng.normal(0, 0.012, shape)  # drawn either way: the stream after it stays the eye's
        noise = noise if other is None else other.normal(0, 0.012, shape)
        ffa = ffa * (0.55 + 0.45 * vignette) + grain * noise
        return np.where(fov, ffa, 0.0)

    ffa_early = angiogram(0.85, 0.45, 0.55, 0.30 * leak, 0.0)
    ffa_late = angiogram(0.55, 0.65, 0.75, 0.75 * leak_late, 0.05 * perfusion)
    clip = lambda a: np.clip(a, 0.0, 1.0).astype(np.float32)  # noqa: E731
    return PhantomEye(clip(photo), clip(ffa_early), clip(ffa_late), vessel_mask, fov, disease, lesions, disc, macula)


def dataset_eye_seed(seed: int, index: int) -> int:
    """The seed of eye `index` (0-based; its id is index + 1) in write_phantom_dataset(seed=seed)."""
    return seed * 100_003 + index


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


def lesion_record(eye: PhantomEye) -> dict:
    """What evaluation needs to find the eye's lesions again: the image size, and each lesion's kind,
    centre and radius in pixels of that size."""
    lesions = [{"kind": lesion.kind, "x": lesion.x, "y": lesion.y, "radius": lesion.radius} for lesion in eye.lesions]
    return {"size": list(eye.ffa_early.shape), "style": eye.style, "label": eye.label, "lesions": lesions}


def read_lesion_record(path: str | Path) -> tuple[tuple[int, int], list[Lesion]]:
    """((height, width), lesions) from a record `lesion_record` wrote; ValueError when it is not one."""
    try:
        record = json.loads(Path(path).read_text())
        size = (int(record["size"][0]), int(record["size"][1]))
        lesions = [Lesion(str(item["kind"]), float(item["x"]), float(item["y"]), float(item["radius"]))
                   for item in record["lesions"]]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path}: not a phantom lesion record ({error})") from None
    return size, lesions


def write_phantom_dataset(
    out: str | Path,
    n: int = 100,
    size: int = 256,
    seed: int = 0,
    diseases=DISEASES,
    test_fraction: float = 0.0,
    progress=None,
    style: str = "standard",
) -> Path:
    """Write n eyes of `style` in the `uwf` layout (`N.png` photo, `N.1.png` early, `N.2.png` late
    FFA) with `labels.csv` (id, label, lesion counts; UWF eyes may mix in a second kind and laser
    scars, counted in a `laser_scars` column) and `N.lesions.json` (where each lesion was drawn, for
    the evaluation's lesion recall). With test_fraction > 0, ids go to train/ and test/."""
    if n < 1 or size < 32:
        raise ValueError("a phantom set needs n >= 1 and size >= 32")
    if style not in STYLES:
        raise ValueError(f"unknown phantom style {style!r}; choose from {STYLES}")
    columns = {d: LESION_OF[d] for d in DISEASES[1:]} | ({"laser_scars": "laser_scar"} if style == "uwf" else {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = assign_diseases(n, seed, diseases)
    n_test = int(round(n * test_fraction))
    rows = []
    for i in range(n):
        eye = make_eye(size, dataset_eye_seed(seed, i), labels[i], style)
        split = "" if test_fraction <= 0 else ("test/" if i >= n - n_test else "train/")
        pair_id = f"{split}{i + 1}"
        for suffix, array in (("", eye.photo), (".1", eye.ffa_early), (".2", eye.ffa_late)):
            data = _png_bytes(array)
            atomic_write(out / f"{pair_id}{suffix}.png", lambda tmp, data=data: tmp.write_bytes(data))
        atomic_write_text(out / f"{pair_id}{LESIONS_SUFFIX}", json.dumps(lesion_record(eye), indent=1) + "\n")
        counts = {column: sum(lesion.kind == kind for lesion in eye.lesions) for column, kind in columns.items()}
        rows.append({"id": pair_id, "label": eye.label, **counts})
        if progress is not None:
            progress(i + 1)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "label", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", buffer.getvalue())
    return out
