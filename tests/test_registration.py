"""Registration of photo/angiogram pairs: a known similarity recovered on a UWF phantom, an unrelated
pair refused (identity kept, one warning), two phases checked against each other and written with
the angiogram unchanged, real pairs (the unregistered CFP/FFA pair; shared UWF training eye 2), and
the `data register` verb."""

from __future__ import annotations

import csv
import json
import logging
import math

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.data.alignment import aligned_pairs, keep_refused, register_folder
from ffasynth.data.io import read_image
from ffasynth.data.pair_check import check_pairs
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.data.phantom_uwf import make_uwf_eye
from ffasynth.data.registration import RegistrationParams, corner_residual, register_pair, to_numpy
from ffasynth.errors import PairError

runner = CliRunner()
SIZE = 512


def _similarity(size: int, degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """3x3: rotate by `degrees` and scale about the image centre, then shift."""
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), degrees, scale)
    matrix[:, 2] += shift
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def _save(array: np.ndarray, path) -> None:
    Image.fromarray(np.uint8(np.clip(array, 0, 1) * 255 + 0.5)).save(path)


@pytest.fixture(scope="module")
def moved_eye():
    """A UWF phantom eye whose photo is moved by a known similarity (40 px, x1.05, 3 degrees)."""
    eye = make_uwf_eye(SIZE, seed=0)
    known = _similarity(SIZE, 3.0, 1.05, (40.0, 0.0))
    return eye, known, cv2.warpPerspective(eye.photo, known, (SIZE, SIZE))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["affine", "similarity"])
def test_known_similarity_is_recovered_on_a_uwf_phantom(moved_eye, model):
    eye, known, moved_photo = moved_eye

    result = register_pair(moved_photo, eye.ffa_early, RegistrationParams(model=model))

    assert result.ok, result.reason
    truth = np.linalg.inv(known)  # moved photo → the angiogram's frame
    assert corner_residual(result.matrix, truth, (SIZE, SIZE)) <= 2.0
    assert result.correlation > result.identity_correlation + 0.3
    if model == "similarity":  # a rotation and one scale: no shear
        linear = result.matrix[:2, :2]
        assert np.allclose(linear @ linear.T, np.eye(2) * np.linalg.det(linear), atol=1e-6)


@pytest.mark.slow
def test_unrelated_pair_is_refused_and_keeps_the_identity(moved_eye):
    _, _, moved_photo = moved_eye
    other = make_uwf_eye(SIZE, seed=10)

    result = register_pair(moved_photo, other.ffa_early)

    assert not result.ok and "unrelated eye" in result.reason
    assert np.array_equal(result.matrix, np.eye(3)) and result.method == "identity"
    assert result.found is not None  # what was found is kept for the report


@pytest.fixture(scope="module")
def two_eyes(tmp_path_factory, moved_eye):
    """uwf layout at 512 px: eye 1 the moved photo with its early and late angiograms as drawn (the late
    one a 16-bit PNG); eye 2 the same photo with another eye's angiogram."""
    eye, _, moved_photo = moved_eye
    root = tmp_path_factory.mktemp("two-eyes")
    for name, image in {
        "1.png": moved_photo,
        "1.1.png": eye.ffa_early,
        "2.png": moved_photo,
        "2.1.png": make_uwf_eye(SIZE, seed=10).ffa_early,
    }.items():
        _save(image, root / name)
    late = np.clip(eye.ffa_late.reshape(SIZE, SIZE, -1)[..., 0], 0, 1)
    Image.fromarray(np.uint16(late * 65535 + 0.5)).save(root / "1.2.png")
    return root


@pytest.mark.slow
def test_folder_checks_the_phases_writes_the_angiogram_unchanged_and_warns_once(two_eyes, moved_eye, tmp_path, caplog):
    _, known, _ = moved_eye
    out = tmp_path / "aligned"
    with caplog.at_level(logging.WARNING, logger="ffasynth.data.alignment"):
        rows = {f"{row.id}-{row.phase}": row for row in register_folder(two_eyes, out)}

    early, late, other = rows["1-early"], rows["1-late"], rows["2-early"]
    assert early.status == late.status == "registered", (early.reason, late.reason)
    assert early.consistency_px <= 2.0 and late.consistency_px == early.consistency_px
    assert early.dog_registered > early.dog_identity + 0.2
    details = json.loads((out / early.details).read_text())
    assert corner_residual(np.array(details["matrix"]), np.linalg.inv(known), (SIZE, SIZE)) <= 2.0
    for row, suffix in ((early, "1"), (late, "2")):  # the angiogram as it came (16 bits kept), the photo moved
        assert np.array_equal(read_image(out / row.aligned_target), read_image(two_eyes / f"1.{suffix}.png"))
    assert Image.open(out / late.aligned_target).mode.startswith("I")  # it was cut to 8 bits
    assert not np.array_equal(read_image(out / early.aligned_source), read_image(two_eyes / "1.png"))

    # refused and no better at the identity than an unrelated eye: written aside, never trained on
    assert other.status == "identity" and "unrelated eye" in other.reason
    assert other.aligned_source == "_refused/2-early.png" and other.aligned_target == "_refused/2-early.1.png"
    assert np.array_equal(read_image(out / other.aligned_source), read_image(two_eyes / "2.png"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "2@early: registration refused, written as it is under _refused/"
    )
    assert sorted(p.id for p in check_pairs(out).pairs) == ["1-early", "1-late"]
    with (out / "registration.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["registered", "registered", "identity"]
    # a test set keeps every eye: the refused pair moved up, as shipped, and still not counted as aligned
    assert [p.name for p in keep_refused(out)] == ["2-early.1.png", "2-early.png"] and not (out / "_refused").exists()
    assert sorted(p.id for p in check_pairs(out).pairs) == ["1-early", "1-late", "2-early"]
    assert sorted(p.id for p in aligned_pairs(out)) == ["1-early", "1-late"]


@pytest.mark.slow
def test_real_unregistered_pair_is_registered_and_written(shared_data, tmp_path):
    out = tmp_path / "aligned"
    (row,) = register_folder(shared_data / "cfp-ffa-unregistered", out)

    assert row.status == "registered", row.reason
    assert row.correlation >= row.null_correlation + 2 * RegistrationParams.min_margin
    matrix = np.array([float(v) for v in row.transform.split()]).reshape(3, 3)
    scale = math.sqrt(np.linalg.det(matrix[:2, :2]))
    assert 0.5 < scale < 0.8  # the photo (2180 px wide) covers more retina per pixel than the angiogram
    report = check_pairs(out)  # the aligned set is a valid uwf-layout folder of same-size pairs
    assert [p.id for p in report.pairs] == ["cfp-ffa-unregistered"] and report.problems == []
    source, target = read_image(out / row.aligned_source), read_image(out / row.aligned_target)
    assert source.shape[0] == 3 and source.shape[1:] == target.shape[1:] == (1636, 1536)
    board = np.asarray(Image.open(out / row.checkerboard))
    assert board.ndim == 3 and board.shape[0] <= 1636 and board.shape[1] <= 1536


@pytest.mark.slow
def test_shared_uwf_training_eye_registers_consistently(shared_data, tmp_path):
    # As shipped, photo and angiograms of these eyes are tens of pixels apart (vessel correlation ~0
    # at the identity). Eye 2: both phases register on their own and agree through early→late.
    root = tmp_path / "eye2"
    root.mkdir()
    for name in ("2.bmp", "2.1.bmp", "2.2.bmp"):
        (root / name).symlink_to(shared_data / "uwf-slo-ffa" / "train" / name)

    rows = register_folder(root, tmp_path / "aligned")

    limit = RegistrationParams.max_residual * math.hypot(853, 682)
    for row in rows:
        assert row.status == "registered", row.reason
        assert row.correlation > row.identity_correlation + 0.2 and row.dog_registered > row.dog_identity + 0.15
        assert row.consistency_px < limit


def test_output_folder_is_guarded(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    _save(np.full((64, 64, 3), 0.5), root / "1.png")
    _save(np.full((64, 64), 0.5), root / "1.1.png")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(PairError, match="not empty"):
        register_folder(root, tmp_path / "taken")
    with pytest.raises(PairError, match="must not lie inside"):
        register_folder(root, root / "aligned")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "user data"


@pytest.fixture(scope="module")
def named_folder(tmp_path_factory):
    """One pair per folder: a 256-px standard phantom photo moved by a known affine, its angiogram."""
    phantom = write_phantom_dataset(tmp_path_factory.mktemp("ph256"), n=1, size=256, seed=4)
    eye = tmp_path_factory.mktemp("named") / "in" / "eye-a"
    eye.mkdir(parents=True)
    photo = to_numpy(read_image(phantom / "1.png"))
    _save(cv2.warpAffine(photo, cv2.getRotationMatrix2D((128, 128), 8.0, 1.1), (256, 256)), eye / "photo.png")
    Image.open(phantom / "1.1.png").save(eye / "angio.png")
    return eye.parent


@pytest.mark.slow
def test_register_cli_on_a_named_folder(named_folder, tmp_path):
    out = tmp_path / "out"
    args = ["data", "register", str(named_folder), "--out", str(out), "--source", "photo", "--target", "angio"]
    result = runner.invoke(app, [*args, "--model", "similarity"])

    assert result.exit_code == 0, result.output
    assert "1 of 1 pairs registered" in result.output
    assert (out / "eye-a.png").is_file() and (out / "eye-a.1.png").is_file()
    with (out / "registration.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["id"] == "eye-a" and row["model"] == "similarity" and row["status"] == "registered"
    assert float(row["correlation"]) > float(row["null_correlation"]) + 0.2

    bad = runner.invoke(app, [*args, "--model", "thin-plate", "--overwrite"])
    assert bad.exit_code == 2 and "thin-plate" in bad.output
    half = runner.invoke(app, ["data", "register", str(named_folder), "--out", str(out), "--source", "photo"])
    assert half.exit_code == 2 and "--target" in half.output


def test_unreadable_pair_is_reported_not_fatal(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "1.png").write_bytes(b"")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "1.1.png")
    (row,) = register_folder(root, tmp_path / "out")
    assert row.status == "unreadable" and "empty file" in row.reason
    assert (tmp_path / "out" / "registration.csv").is_file() and not (tmp_path / "out" / "1-early.png").exists()
