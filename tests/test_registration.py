"""Registration of unaligned photo/angiogram pairs: known transforms recovered, real pairs aligned,
unalignable pairs flagged and left out, and the `data register` verb."""

from __future__ import annotations

import csv
import math

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.data.alignment import register_folder
from ffasynth.data.io import read_image
from ffasynth.data.pairs import check_pairs, discover_pairs
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.data.registration import RegistrationParams, register_pair, to_numpy
from ffasynth.errors import PairError

runner = CliRunner()
SIZE = 512


@pytest.fixture(scope="module")
def phantom_512(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom512"), n=3, size=SIZE, seed=0)


def _affine(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """3x3: rotate by `angle` degrees and scale about the image centre, then shift."""
    matrix = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
    matrix[:, 2] += shift
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def _vessels(ffa: np.ndarray) -> np.ndarray:
    """Bright vessels of an angiogram: white top-hat, top 12% of the field."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    response = cv2.morphologyEx(ffa, cv2.MORPH_TOPHAT, kernel)
    fov = ffa > 0.04
    return (response > np.quantile(response[fov], 0.88)) & fov


def _dice_after(mask: np.ndarray, matrix: np.ndarray) -> float:
    """Dice of `mask` and `mask` carried through `matrix` (1 for the identity), where both exist."""
    shape = (mask.shape[1], mask.shape[0])
    moved = cv2.warpPerspective(mask.astype(np.uint8), matrix, shape, flags=cv2.INTER_NEAREST) > 0
    valid = cv2.warpPerspective(np.ones_like(mask, np.uint8), matrix, shape, flags=cv2.INTER_NEAREST) > 0
    a, b = mask & valid, moved & valid
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("eye", "angle", "scale", "shift", "model"),
    [
        (1, 15.0, 0.8, (20.0, -15.0), "affine"),
        (2, -12.0, 1.25, (-25.0, 10.0), "affine"),
        (3, 5.0, 1.1, (30.0, 25.0), "affine"),
        (1, -15.0, 0.85, (-10.0, -30.0), "similarity"),
    ],
)
def test_known_affine_is_recovered_on_a_phantom(phantom_512, eye, angle, scale, shift, model):
    photo = to_numpy(read_image(phantom_512 / f"{eye}.png"))
    ffa = to_numpy(read_image(phantom_512 / f"{eye}.1.png"))
    known = _affine(angle, scale, shift)
    moved_photo = cv2.warpAffine(photo, known[:2], (SIZE, SIZE))

    result = register_pair(moved_photo, ffa, RegistrationParams(model=model))

    assert result.ok, result.reason
    truth = np.linalg.inv(known)  # moved photo → original frame = the angiogram's
    corners = np.float64([[0, 0], [SIZE - 1, 0], [0, SIZE - 1], [SIZE - 1, SIZE - 1]]).reshape(-1, 1, 2)
    error = np.linalg.norm(
        cv2.perspectiveTransform(corners, result.matrix) - cv2.perspectiveTransform(corners, truth), axis=2
    )
    assert error.max() <= 3.0
    vessels = _vessels(ffa)
    assert _dice_after(vessels, result.matrix @ known) >= 0.8
    # The overlap measure is strict enough to fail: a 3-pixel slip already breaks it.
    slip = np.array([[1, 0, 3], [0, 1, 0], [0, 0, 1]], np.float64)
    assert _dice_after(vessels, slip @ result.matrix @ known) < 0.8


@pytest.mark.slow
def test_real_unregistered_pair_is_aligned_and_written(shared_data, tmp_path):
    out = tmp_path / "aligned"
    rows = register_folder(shared_data / "cfp-ffa-unregistered", out)

    assert len(rows) == 1 and rows[0].status == "aligned", rows[0].reason
    row = rows[0]
    assert row.score >= 2 * RegistrationParams.min_score and row.inliers >= 2 * RegistrationParams.min_inliers
    matrix = np.array([float(v) for v in row.transform.split()]).reshape(3, 3)
    scale = math.sqrt(np.linalg.det(matrix[:2, :2]))
    assert 0.5 < scale < 0.8  # the photo (2180 px wide) covers more retina per pixel than the angiogram
    report = check_pairs(out)  # the aligned set is a valid uwf-layout folder of same-size pairs
    assert [p.id for p in report.pairs] == ["cfp-ffa-unregistered"] and report.problems == []
    source, target = read_image(out / row.aligned_source), read_image(out / row.aligned_target)
    assert source.shape[0] == 3 and target.shape[0] == 1 and source.shape[1:] == target.shape[1:]
    board = np.asarray(Image.open(out / row.checkerboard))
    assert board.shape[:2] == tuple(source.shape[1:]) and board.ndim == 3
    with (out / "registration.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["aligned"]


@pytest.mark.slow
def test_already_registered_uwf_pairs_come_back_near_identity(shared_data):
    # These pairs share one canvas but are not pixel-registered: offsets of tens of pixels and a few
    # degrees of rotation remain, so "near identity" is: same scale, small rotation, small shift.
    _, pairs, _ = discover_pairs(shared_data / "uwf-slo-ffa" / "test")
    assert len(pairs) == 6
    for pair in pairs:
        source, target = read_image(pair.source), read_image(pair.target)
        result = register_pair(source, target)
        assert result.ok, f"{pair.name}: {result.reason}"
        linear = result.matrix[:2, :2]
        scale = math.sqrt(np.linalg.det(linear))
        angle = math.degrees(math.atan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
        height, width = target.shape[1:]
        centre = np.array([width / 2, height / 2, 1.0])
        shift = np.linalg.norm((result.matrix @ centre)[:2] - centre[:2])
        assert 0.9 <= scale <= 1.1 and abs(angle) <= 12, f"{pair.name}: scale {scale:.3f}, angle {angle:.1f}"
        assert shift <= 0.1 * math.hypot(width, height), f"{pair.name}: centre moved {shift:.0f} px"


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """uwf layout at 256 px: eye 1 a phantom photo moved by a known affine, eye 2 noise for a photo."""
    root = tmp_path_factory.mktemp("mixed")
    phantom = write_phantom_dataset(tmp_path_factory.mktemp("ph256"), n=1, size=256, seed=4)
    photo = to_numpy(read_image(phantom / "1.png"))
    matrix = cv2.getRotationMatrix2D((128, 128), 8.0, 1.1)
    moved = cv2.warpAffine(photo, matrix, (256, 256))
    Image.fromarray(np.uint8(moved * 255 + 0.5)).save(root / "1.png")
    Image.open(phantom / "1.1.png").save(root / "1.1.png")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "2.png")
    Image.open(phantom / "1.1.png").save(root / "2.1.png")
    return root


@pytest.mark.slow
def test_unalignable_pair_is_flagged_and_left_out(mixed_folder, tmp_path):
    out = tmp_path / "aligned"
    rows = {row.id: row for row in register_folder(mixed_folder, out)}

    assert rows["1"].status == "aligned", rows["1"].reason
    assert rows["2"].status == "flagged" and "vessel" in rows["2"].reason
    assert not (out / "2-early.png").exists() and not (out / "2-early.1.png").exists()
    assert (out / "_checkerboards" / "2-early.png").is_file()  # still there for a person to look at
    assert [p.id for p in check_pairs(out).pairs] == ["1-early"]  # checkerboards are not data


def test_output_folder_is_guarded(mixed_folder, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(PairError, match="not empty"):
        register_folder(mixed_folder, tmp_path / "taken")
    with pytest.raises(PairError, match="must not lie inside"):
        register_folder(mixed_folder, mixed_folder / "aligned")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_register_cli_on_a_named_folder(mixed_folder, tmp_path):
    eye = tmp_path / "in" / "eye-a"
    eye.mkdir(parents=True)
    Image.open(mixed_folder / "1.png").save(eye / "photo.png")
    Image.open(mixed_folder / "1.1.png").save(eye / "angio.png")
    out = tmp_path / "out"

    args = ["data", "register", str(tmp_path / "in"), "--out", str(out), "--source", "photo", "--target", "angio"]
    result = runner.invoke(app, [*args, "--model", "similarity"])

    assert result.exit_code == 0, result.output
    assert "1 of 1 pairs aligned" in result.output
    assert (out / "eye-a.png").is_file() and (out / "eye-a.1.png").is_file()
    with (out / "registration.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["id"] == "eye-a" and row["model"] == "similarity" and float(row["score"]) > 0.5

    bad = runner.invoke(app, [*args, "--model", "thin-plate", "--overwrite"])
    assert bad.exit_code == 2 and "thin-plate" in bad.output
    half = runner.invoke(app, ["data", "register", str(tmp_path / "in"), "--out", str(out), "--source", "photo"])
    assert half.exit_code == 2 and "--target" in half.output


def test_unreadable_pair_is_reported_not_fatal(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "1.png").write_bytes(b"")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "1.1.png")
    (row,) = register_folder(root, tmp_path / "out")
    assert row.status == "unreadable" and "empty file" in row.reason
    assert (tmp_path / "out" / "registration.csv").is_file() and not (tmp_path / "out" / "1-early.png").exists()
