"""Register a folder of photo/angiogram pairs and write the aligned set.

For each pair found by `ffasynth.data.pairs` (any layout), `register_pair` estimates the transform;
the source is warped into the target's frame, both are cut to the bounding box of their common
field of view (black outside it, in both), and written in the `uwf` layout:

    ALIGNED_DIR/<id>.png     aligned source photo      (<id> gets "-<phase>" when the input has phases)
    ALIGNED_DIR/<id>.1.png   aligned target angiogram  (.2 for a late-phase target)
    ALIGNED_DIR/registration.csv        one row per input pair: status, reason, transform, quality
    ALIGNED_DIR/_checkerboards/<id>.png source and target tiles alternating, for a person to check

Pairs whose alignment is not trustworthy are flagged in the CSV (status `flagged`, with the
reason) and left out of the aligned images; their checkerboard is still written. Pair discovery
skips `_`-folders, so `ffasynth data check ALIGNED_DIR` sees only the aligned pairs.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ffasynth.data.dataset import PHASES
from ffasynth.data.io import read_image, save_image
from ffasynth.data.pairs import Pair, discover_pairs
from ffasynth.data.registration import (
    Registration,
    RegistrationParams,
    field_of_view,
    register_pair,
    to_numpy,
    vessel_channel,
)
from ffasynth.errors import ImageReadError, PairError
from ffasynth.files import atomic_folder, atomic_write_text

CHECKERBOARD_FOLDER = "_checkerboards"
REPORT_NAME = "registration.csv"
PHASE_SUFFIX = {None: "1", "early": "1", "late": "2"}


@dataclass
class AlignedPair:
    source: np.ndarray  # (h, w[, 3]) float32 in [0, 1], in the target's frame, cropped
    target: np.ndarray  # (h, w[, 3]) float32 in [0, 1], cropped
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the crop in the target's frame
    common: np.ndarray  # (h, w) bool: the common field of view inside the crop


@dataclass
class RegistrationRow:
    """One line of registration.csv."""

    id: str
    phase: str
    source: str
    target: str
    status: str = "unreadable"  # aligned, flagged or unreadable
    reason: str = ""
    model: str = ""
    method: str = "none"
    score: float = 0.0
    inliers: int = 0
    tiles: int = 0
    overlap: float = 0.0
    seconds: float = 0.0
    transform: str = ""  # 9 numbers, row-major 3x3, source px → target px (before the crop)
    crop: str = ""  # x0 y0 x1 y1 in the target's pixels
    aligned_source: str = ""
    aligned_target: str = ""
    checkerboard: str = ""


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
    """Warp the source into the target's frame and cut both to their common field of view."""
    shape = target.shape[:2]
    warped = warp_to_target(source, matrix, shape)
    source_fov = cv2.warpPerspective(
        field_of_view(source).astype(np.uint8), matrix, (shape[1], shape[0]), flags=cv2.INTER_NEAREST
    )
    common = field_of_view(target) & (source_fov > 0)
    if not common.any():
        raise ValueError("the source and target fields of view do not overlap")
    ys, xs = np.nonzero(common)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    inside = common[y0:y1, x0:x1]

    def cut(image: np.ndarray) -> np.ndarray:
        crop = image[y0:y1, x0:x1]
        return crop * (inside[..., None] if crop.ndim == 3 else inside)

    return AlignedPair(cut(warped), cut(target), (x0, y0, x1, y1), inside)


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
    """(h, w, 3) uint8: source (warm tint) and target (grey) in alternating square tiles, `tiles`
    along the longer side, so that a vessel crossing a tile border shows whether they line up."""
    source = _display(aligned.source, aligned.common, photo=True)
    target = _display(aligned.target, aligned.common, photo=False)
    height, width = aligned.common.shape
    side = max(1, round(max(height, width) / tiles))
    ys, xs = np.mgrid[0:height, 0:width]
    from_source = ((ys // side + xs // side) % 2 == 0)[..., None]
    board = np.where(from_source, source, target) * aligned.common[..., None]
    return np.uint8(board * 255 + 0.5)


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


def register_one(pair: Pair, out: Path, params: RegistrationParams) -> RegistrationRow:
    """Register one pair, write its checkerboard (and aligned images when trustworthy) under `out`."""
    stem, started = output_stem(pair), time.perf_counter()
    row = RegistrationRow(pair.id, pair.phase or "", str(pair.source), str(pair.target), model=params.model)
    try:
        source, target = to_numpy(read_image(pair.source)), to_numpy(read_image(pair.target))
    except ImageReadError as error:
        row.reason = str(error)
        return row
    result: Registration = register_pair(source, target, params)
    row.status, row.reason, row.method = ("aligned" if result.ok else "flagged"), result.reason, result.method
    row.score, row.inliers, row.tiles = round(result.score, 4), result.inliers, result.tiles
    row.overlap, row.transform = round(result.overlap, 4), _format_matrix(result.matrix)
    if result.method != "none":
        try:
            aligned = apply_registration(source, target, result.matrix)
        except ValueError as error:
            row.status, row.reason = "flagged", "; ".join(filter(None, [row.reason, str(error)]))
        else:
            row.crop = " ".join(str(v) for v in aligned.box)
            board = Path(CHECKERBOARD_FOLDER) / f"{stem}.png"
            save_image(checkerboard(aligned), out / board)
            row.checkerboard = board.as_posix()
            if row.status == "aligned":
                row.aligned_source, row.aligned_target = f"{stem}.png", f"{stem}.{_target_suffix(pair)}.png"
                save_image(_to_uint8(aligned.source), out / row.aligned_source)
                save_image(_to_uint8(aligned.target), out / row.aligned_target)
    row.seconds = round(time.perf_counter() - started, 3)
    return row


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
    data such as `cfp.jpg` + `ffa.jpg`. Returns one row per pair, as written to registration.csv."""
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
        for index, pair in enumerate(pairs):
            rows.append(register_one(pair, folder, params))
            if progress is not None:
                progress(index + 1, len(pairs), rows[-1])
        atomic_write_text(folder / REPORT_NAME, rows_to_csv(rows))

    atomic_folder(out, fill)
    return rows
