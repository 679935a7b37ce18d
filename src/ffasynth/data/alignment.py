"""Register a folder of photo/angiogram pairs and write the aligned set.

For each pair found by `ffasynth.data.pairs` (any layout), `register_pair` estimates the transform;
the source photo is warped into the angiogram's frame (black outside its field) and the angiogram
is written unchanged, in the `uwf` layout:

    ALIGNED_DIR/<id>.png     the photo in the angiogram's frame (<id> gets "-<phase>" when the input has phases)
    ALIGNED_DIR/<id>.1.png   the angiogram, unchanged      (.2 for a late-phase target)
    ALIGNED_DIR/registration.csv        one row per input pair: status, reason, transform, figures
    ALIGNED_DIR/_registration/<id>.json the same per pair, with the 3x3 transform
    ALIGNED_DIR/_checkerboards/<id>.png photo and angiogram tiles alternating, for a person to check

Consistency, where a photo has two angiograms (early and late): photo→early, photo→late and
early→late are registered independently; early→late after photo→early should put the photo where
photo→late does. When all three are accepted and disagree by more than `max_residual` of the image
diagonal at its corners, both pairs are refused. When one phase is refused on its own but the
other phase and early→late are accepted, it is registered through them (status `transferred`).

A refused pair of same-size images keeps the identity (status `identity`, one warning line naming it):
written as it is when it already matches there (vessels at the identity beat the mirrored-eye bar by
the margin), else under `_refused/`, for a person to look at, not in the aligned set; a refused pair of
different sizes is left out (status `flagged`). Pair discovery skips `_`-folders, so `train` and
`ffasynth data check ALIGNED_DIR` see only the aligned pairs. 16-bit grey images are written in 16 bits.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ffasynth.data.dataset import PHASES
from ffasynth.data.io import read_image, save_image
from ffasynth.data.pair_check import load_pairs
from ffasynth.data.pairs import Pair, discover_pairs
from ffasynth.data.registration import (
    Registration,
    RegistrationParams,
    angiogram_field,
    corner_residual,
    photo_field,
    register_pair,
    to_numpy,
    vessel_channel,
)
from ffasynth.errors import ImageReadError, OutputError, PairError
from ffasynth.files import atomic_folder, atomic_write, atomic_write_text

log = logging.getLogger(__name__)

CHECKERBOARD_FOLDER = "_checkerboards"
REFUSED_FOLDER = "_refused"  # refused pairs that do not match at the identity either: as misaligned as shipped
JSON_FOLDER = "_registration"
REPORT_NAME = "registration.csv"
PHASE_SUFFIX = {None: "1", "early": "1", "late": "2"}
ACCEPTED = ("registered", "transferred")  # statuses whose pair is aligned by what was written
WRITTEN = ("registered", "transferred", "identity")  # statuses whose pair is in the aligned set


@dataclass
class AlignedPair:
    source: np.ndarray  # (H, W[, 3]) float32 in [0, 1]: the photo in the target's frame
    target: np.ndarray  # (H, W[, 3]) float32 in [0, 1]: the angiogram, unchanged
    common: np.ndarray  # (H, W) bool: the common field of view


@dataclass
class RegistrationRow:
    """One line of registration.csv (and the figures of its JSON)."""

    id: str
    phase: str
    source: str
    target: str
    status: str = "unreadable"  # registered, transferred, identity, flagged or unreadable
    reason: str = ""
    model: str = ""
    correlation: float = float("nan")  # vessel-map NCC, transform found
    identity_correlation: float = float("nan")  # the same at the identity
    null_correlation: float = float("nan")  # best NCC against the mirrored angiograms
    overlap: float = 0.0
    dog_identity: float = float("nan")  # DoG vessel correlation (dog_correlation) at the identity
    dog_registered: float = float("nan")  # the same for the transform written
    consistency_px: float = float("nan")  # photo→other phase vs the two steps, at the image corners
    seconds: float = 0.0
    transform: str = ""  # 9 numbers, row-major 3x3, source px → target px: the transform written
    aligned_source: str = ""
    aligned_target: str = ""
    checkerboard: str = ""
    details: str = ""  # the JSON file


def warp_to_target(source: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Warp a (H, W[, C]) source by `matrix` into a target frame of `shape` (black outside).
    When the warp shrinks the image, the source is first area-resized so that it does not alias."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2] / matrix[2, 2]))))
    if scale < 0.8:
        height, width = source.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
        sx, sy = size[0] / width, size[1] / height
        # small px → source px, pixel centres kept: x = (x_small + 0.5) / sx - 0.5
        back = np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1]])
        source, matrix = small, matrix @ back
    warped = cv2.warpPerspective(
        source, matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    return np.clip(warped, 0.0, 1.0)


def apply_registration(source: np.ndarray, target: np.ndarray, matrix: np.ndarray) -> AlignedPair:
    """Warp the source photo into the target's frame; the target stays as it is."""
    shape = target.shape[:2]
    warped = warp_to_target(source, matrix, shape)
    source_fov = cv2.warpPerspective(
        photo_field(source).astype(np.uint8), matrix, (shape[1], shape[0]), flags=cv2.INTER_NEAREST
    )
    common = angiogram_field(target) & (source_fov > 0)
    if not common.any():
        raise ValueError("the source and target fields of view do not overlap")
    return AlignedPair(warped, target, common)


def _display(image: np.ndarray, mask: np.ndarray, photo: bool) -> np.ndarray:
    """(h, w, 3) in [0, 1] for the checkerboard: the vessel channel, contrast-equalised (CLAHE) and
    stretched to its 1st-99th percentile in the field; photo tiles get a warm tint to tell them apart."""
    channel = np.uint8(np.clip(vessel_channel(image), 0, 1) * 255 + 0.5)
    grey = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(channel).astype(np.float32)
    low, high = np.percentile(grey[mask], (1, 99)) if mask.any() else (0.0, 255.0)
    grey = np.clip((grey - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    tint = np.array([1.0, 0.8, 0.55] if photo else [1.0, 1.0, 1.0], np.float32)
    return grey[..., None] * tint


def checkerboard(aligned: AlignedPair, tiles: int = 8) -> np.ndarray:
    """(h, w, 3) uint8 over the common field's bounding box: source (warm tint) and target (grey) in
    alternating square tiles, `tiles` along the longer side, so that a vessel crossing a tile
    border shows whether they line up."""
    ys, xs = np.nonzero(aligned.common)
    box = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    common = aligned.common[box]
    source = _display(aligned.source[box], common, photo=True)
    target = _display(aligned.target[box], common, photo=False)
    height, width = common.shape
    side = max(1, round(max(height, width) / tiles))
    ys, xs = np.mgrid[0:height, 0:width]
    from_source = ((ys // side + xs // side) % 2 == 0)[..., None]
    board = np.where(from_source, source, target) * common[..., None]
    return np.uint8(board * 255 + 0.5)


def dog_correlation(source: np.ndarray, target: np.ndarray, matrix: np.ndarray, source_is_photo: bool = True) -> float:
    """A figure independent of the search: Pearson correlation of difference-of-Gaussians vessel
    maps (σ 1.5 − 6 px, clipped at 0; of the inverted green of a photo, of the angiogram itself)
    over both fields (eroded 12 px), the source warped by `matrix` (full-resolution px)."""
    shape = target.shape[:2]

    def dog(grey: np.ndarray) -> np.ndarray:
        return np.clip(cv2.GaussianBlur(grey, (0, 0), 1.5) - cv2.GaussianBlur(grey, (0, 0), 6.0), 0, None)

    grey = vessel_channel(source)
    grey, field = (1.0 - grey, photo_field(source)) if source_is_photo else (grey, angiogram_field(source))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (25, 25))
    inside = cv2.erode(angiogram_field(target).astype(np.uint8), kernel) > 0
    inside &= cv2.erode(warp_to_target(field.astype(np.float32), matrix, shape), kernel) > 0.99
    if inside.sum() < 16:
        return float("nan")
    warped = cv2.warpPerspective(dog(grey), matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR)
    return float(np.corrcoef(warped[inside], dog(vessel_channel(target))[inside])[0, 1])


def output_stem(pair: Pair) -> str:
    """The aligned pair's id: the input id, with "-<phase>" when the input has phases ("." would
    end the id in the uwf layout, so it becomes "_")."""
    return (f"{pair.id}-{pair.phase}" if pair.phase else pair.id).replace(".", "_")


def eye_of(item_id: str) -> str:
    """The eye an aligned pair's id names: output_stem's id without its "-early" / "-late"."""
    for phase in PHASES:
        item_id = item_id.removesuffix(f"-{phase}")
    return item_id


def _target_suffix(pair: Pair) -> str:
    if pair.phase in PHASE_SUFFIX:
        return PHASE_SUFFIX[pair.phase]
    digits = "".join(c for c in pair.phase or "" if c.isdigit())
    return digits or "1"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(image, 0.0, 1.0) * 255 + 0.5)


def _format_matrix(matrix: np.ndarray) -> str:
    return " ".join(f"{value:.6g}" for value in matrix.ravel())


@dataclass
class _Work:
    """One pair on its way: its row, its images, what registration found and the transform to write."""

    pair: Pair
    row: RegistrationRow
    source: np.ndarray | None = None
    target: np.ndarray | None = None
    result: Registration | None = None
    matrix: np.ndarray | None = None  # None: refused
    transferred: bool = False  # registered through the photo's other angiogram
    bits: tuple[int, int] = (8, 8)  # of the photo and the angiogram files: 16 for 16-bit grey


def _register(pair: Pair, params: RegistrationParams) -> _Work:
    started = time.perf_counter()
    work = _Work(
        pair, RegistrationRow(pair.id, pair.phase or "", str(pair.source), str(pair.target), model=params.model)
    )
    try:
        work.source, work.target = to_numpy(read_image(pair.source)), to_numpy(read_image(pair.target))
        work.bits = (_bits(pair.source), _bits(pair.target))
    except ImageReadError as error:
        work.row.reason = str(error)
        return work
    work.result = result = register_pair(work.source, work.target, params)
    work.matrix = result.matrix if result.ok else None
    work.row.reason = result.reason
    for name in ("correlation", "identity_correlation", "null_correlation", "overlap"):
        setattr(work.row, name, round(float(getattr(result, name)), 4))
    work.row.seconds = round(time.perf_counter() - started, 3)
    return work


def _check_phases(first: _Work, second: _Work, params: RegistrationParams) -> None:
    """Two angiograms of one photo: registered to each other, then either the two photo→angiogram
    transforms must agree through that step (else both are refused), or an accepted one carries a
    refused one (status `transferred`)."""
    started = time.perf_counter()
    between = register_pair(first.target, second.target, params, source_is_photo=False)
    seconds = (time.perf_counter() - started) / 2
    shape = first.source.shape[:2]
    if first.result.found is not None and second.result.found is not None and between.found is not None:
        residual = round(corner_residual(between.found @ first.result.found, second.result.found, shape), 2)
        first.row.consistency_px = second.row.consistency_px = residual
    names = f"{first.pair.phase or 'first'}→{second.pair.phase or 'second'}"
    for work in (first, second):
        work.row.seconds = round(work.row.seconds + seconds, 3)
        if not between.ok:
            work.row.reason = "; ".join(filter(None, [work.row.reason, f"{names} not checked: {between.reason}"]))
    if not between.ok:
        return
    limit = params.max_residual * float(np.hypot(*shape))
    if first.matrix is not None and second.matrix is not None and first.row.consistency_px > limit:
        for work in (first, second):
            work.matrix = None
            work.row.reason = (
                f"the two phases disagree: photo→{second.pair.phase} and {names} after photo→{first.pair.phase} "
                f"differ by {first.row.consistency_px:.0f} px at the corners (> {limit:.0f})"
            )
    elif first.matrix is not None and second.matrix is None:
        second.matrix, second.transferred = between.matrix @ first.matrix, True
        second.row.reason = f"through {names}; own match refused: {second.row.reason}"
    elif second.matrix is not None and first.matrix is None:
        first.matrix, first.transferred = np.linalg.inv(between.matrix) @ second.matrix, True
        first.row.reason = f"through {names}; own match refused: {first.row.reason}"


def _bits(path: Path) -> int:
    """16 for a 16-bit grey file (what read_image reads at 16 bits), else 8."""
    with Image.open(path) as image:
        return 16 if image.mode.startswith("I;16") or image.mode == "I" else 8


def _save(image: np.ndarray, path: Path, bits: int) -> None:
    """[0, 1] (H, W[, C]) at the file's own depth: a 16-bit grey input stays 16-bit (PNG), else 8-bit."""
    if bits == 16 and (image.ndim == 2 or image.shape[-1] == 1):
        levels = np.uint16(np.clip(image.reshape(image.shape[:2]), 0.0, 1.0) * 65535 + 0.5)
        atomic_write(path, lambda tmp: Image.fromarray(levels).save(tmp, format="PNG"))
    else:
        save_image(_to_uint8(image), path)


def _matches_at_identity(identity_correlation: float, null_correlation: float, margin: float) -> bool:
    """Vessels at the identity beat the mirrored-eye bar by the registration's margin (NaN: no)."""
    return identity_correlation - null_correlation >= margin


def _write(work: _Work, out: Path, margin: float) -> None:
    """The pair's images (when written), checkerboard, JSON; its status and one warning if refused."""
    row, pair, stem = work.row, work.pair, output_stem(work.pair)
    if work.result is None:
        return
    if not (out / f"{stem}.png").resolve().is_relative_to(out.resolve()):  # pairs.py refuses such ids first
        raise OutputError(f"{pair.name}: its id {pair.id!r} would write outside {out}; give it a relative id")
    same_size = work.source.shape[:2] == work.target.shape[:2]
    folder = ""
    if work.matrix is not None:
        row.status = "transferred" if work.transferred else "registered"
    else:
        row.status = "identity" if same_size else "flagged"
        if not same_size:
            action = "left out (the sizes differ)"
        elif _matches_at_identity(row.identity_correlation, row.null_correlation, margin):
            action = "kept as it is (identity): it already matches there"
        else:
            folder = f"{REFUSED_FOLDER}/"
            action = (
                f"written as it is under {REFUSED_FOLDER}/, not in the aligned set (it matches no better than "
                "an unrelated eye; move its two files up to train on it anyway)"
            )
        log.warning("%s: registration refused, %s: %s", pair.name, action, row.reason)
    written = work.matrix if work.matrix is not None else (np.eye(3) if same_size else None)
    shown = written if written is not None else work.result.found  # what the checkerboard shows
    row.transform = "" if written is None else _format_matrix(written)
    if same_size:
        row.dog_identity = round(dog_correlation(work.source, work.target, np.eye(3)), 4)
    if shown is not None:
        row.dog_registered = round(dog_correlation(work.source, work.target, shown), 4)
        try:
            aligned = apply_registration(work.source, work.target, shown)
        except ValueError as error:
            aligned, row.reason = None, "; ".join(filter(None, [row.reason, str(error)]))
        if aligned is not None:
            row.checkerboard = (Path(CHECKERBOARD_FOLDER) / f"{stem}.png").as_posix()
            save_image(checkerboard(aligned), out / row.checkerboard)
            if written is not None:
                row.aligned_source = f"{folder}{stem}.png"
                row.aligned_target = f"{folder}{stem}.{_target_suffix(pair)}.png"
                _save(aligned.source, out / row.aligned_source, work.bits[0])
                _save(aligned.target, out / row.aligned_target, work.bits[1])
    row.details = (Path(JSON_FOLDER) / f"{stem}.json").as_posix()
    found = work.result.found
    record = {
        **{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(row).items()},
        "matrix": None if written is None else written.tolist(),
        "found": None if found is None else found.tolist(),
    }
    atomic_write_text(out / row.details, json.dumps(record, indent=1) + "\n")


def rows_to_csv(rows: list[RegistrationRow]) -> str:
    buffer = io.StringIO()
    names = list(RegistrationRow.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    return buffer.getvalue()


def register_folder(
    root: str | Path,
    out: str | Path,
    params: RegistrationParams | None = None,
    layout: str = "auto",
    names: tuple[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, RegistrationRow], object] | None = None,
) -> list[RegistrationRow]:
    """Register every pair under `root` and write the aligned set to `out` (atomically: the folder
    appears complete or not at all). `names` = (source stem, target stem) for one-pair-per-folder
    data such as `cfp.jpg` + `ffa.jpg`. `progress(done, total, row)` follows the registrations.
    Returns one row per pair, as written to registration.csv."""
    params = params or RegistrationParams()
    root, out = Path(root), Path(out)
    _, pairs, _ = discover_pairs(root, "named" if names else layout, names=names)
    if not pairs:
        raise PairError(f"{root}: no pairs found to register")
    if out.resolve().is_relative_to(root.resolve()):
        raise PairError(f"{out}: the output folder must not lie inside {root}")
    if root.resolve().is_relative_to(out.resolve()):  # replacing `out` would delete the inputs
        raise PairError(f"{out}: the output folder must not hold the inputs {root}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PairError(f"{out}: folder exists and is not empty (choose another --out, or --overwrite)")
    rows: list[RegistrationRow] = []

    def fill(folder: Path) -> None:
        works: list[_Work] = []
        for index, pair in enumerate(pairs):
            works.append(_register(pair, params))
            if progress is not None:
                progress(index + 1, len(pairs), works[-1].row)
        by_photo: dict[Path, list[_Work]] = {}
        for work in works:
            if work.result is not None:
                by_photo.setdefault(work.pair.source, []).append(work)
        for group in by_photo.values():
            if len(group) == 2 and group[0].target.shape[:2] == group[1].target.shape[:2]:
                _check_phases(*sorted(group, key=lambda work: _target_suffix(work.pair)), params)
        for work in works:
            _write(work, folder, params.min_margin)
            rows.append(work.row)
        atomic_write_text(folder / REPORT_NAME, rows_to_csv(rows))

    atomic_folder(out, fill)
    return rows


def keep_refused(folder: Path) -> list[Path]:
    """Move the pairs a registration refused (under `_refused/`) up into `folder`, as shipped: for a set that
    must keep every eye, e.g. test eyes scored against their own real angiogram. Returns the files moved;
    registration.csv still names them refused, so `aligned_pairs` leaves them out."""
    moved = []
    refused = folder / REFUSED_FOLDER
    for path in sorted(refused.iterdir()) if refused.is_dir() else []:
        moved.append(path.replace(folder / path.name))
    if refused.is_dir():
        refused.rmdir()
    return moved


def aligned_pairs(folder: Path) -> list[Pair]:
    """The pairs of a registered folder that are aligned: registered, transferred through the other
    phase, or left at the identity because they already matched there (vessels at the identity beat the
    mirrored-eye bar by the registration's margin). A pair refused for want of any match is as
    misaligned as shipped and would teach the U-Net to ignore the photo."""
    margin = RegistrationParams().min_margin

    def aligned(row: dict) -> bool:
        if row["status"] in ACCEPTED:
            return True
        figures = (float(row["identity_correlation"] or "nan"), float(row["null_correlation"] or "nan"))
        return row["status"] == "identity" and _matches_at_identity(*figures, margin)

    with open(folder / REPORT_NAME, newline="") as handle:
        kept = {row["aligned_target"] for row in csv.DictReader(handle) if aligned(row)}
    return [pair for pair in load_pairs(folder) if pair.target.relative_to(folder).as_posix() in kept]
