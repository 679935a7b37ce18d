"""Phantom eyes: deterministic, registered across modalities, labels match the lesions drawn."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from ffasynth.data.phantom import DISEASES, assign_diseases, make_eye, write_phantom_dataset


def _tophat_vessels(image: np.ndarray, bright: bool, fov: np.ndarray) -> np.ndarray:
    """Vessels found by a top-hat (white for bright vessels, black for dark), top 12% of the FOV."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    op = cv2.MORPH_TOPHAT if bright else cv2.MORPH_BLACKHAT
    response = cv2.morphologyEx(image.astype(np.float32), op, kernel)
    return (response > np.quantile(response[fov], 0.88)) & fov


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_same_seed_same_eye_other_seed_differs():
    a, b, c = make_eye(96, 5, "leakage"), make_eye(96, 5, "leakage"), make_eye(96, 6, "leakage")
    assert np.array_equal(a.photo, b.photo) and np.array_equal(a.ffa_late, b.ffa_late)
    assert not np.array_equal(a.photo, c.photo)


def test_photo_and_angiogram_are_registered():
    eye = make_eye(256, 1, "normal")
    inner = cv2.erode(eye.fov.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    in_photo = _tophat_vessels(eye.photo[..., 1], bright=False, fov=inner)
    in_ffa = _tophat_vessels(eye.ffa_early, bright=True, fov=inner)
    assert _dice(in_photo, in_ffa) > 0.6
    # Shifting one modality by a few pixels must destroy the agreement: the test can fail.
    assert _dice(in_photo, np.roll(in_ffa, 6, axis=1)) < 0.35
    truth = eye.vessel_mask & inner
    assert _dice(in_ffa, truth) > 0.6


def test_angiogram_signs_of_each_lesion():
    ma = make_eye(256, 2, "microaneurysms")
    for lesion in ma.lesions:
        x, y = int(round(lesion.x)), int(round(lesion.y))
        local = ma.ffa_early[y - 6 : y + 7, x - 6 : x + 7]
        assert ma.ffa_early[y, x] > np.median(local) + 0.2  # bright dot

    haem = make_eye(256, 3, "haemorrhages")
    normal = make_eye(256, 3, "normal")
    for lesion in haem.lesions:
        x, y = int(round(lesion.x)), int(round(lesion.y))
        assert haem.ffa_late[y, x] < 0.12 and haem.photo[y, x, 1] < normal.photo[y, x, 1]  # blocks, dark

    leak = make_eye(256, 4, "leakage")
    for lesion in leak.lesions:
        x, y = int(round(lesion.x)), int(round(lesion.y))
        assert leak.ffa_late[y, x] > leak.ffa_early[y, x] + 0.2  # grows in the late phase

    np_eye = make_eye(256, 5, "non_perfusion")
    for lesion in np_eye.lesions:
        x, y = int(round(lesion.x)), int(round(lesion.y))
        r = int(lesion.radius / 3)
        assert np_eye.ffa_early[y - r : y + r, x - r : x + r].mean() < 0.1  # dark, no capillary bed


def test_normal_eye_has_no_lesions_and_unknown_disease_refused():
    assert make_eye(64, 0, "normal").lesions == []
    with pytest.raises(ValueError, match="unknown disease"):
        make_eye(64, 0, "glaucoma")


def test_written_dataset_labels_match_lesions(tmp_path):
    out = write_phantom_dataset(tmp_path / "ph", n=10, size=64, seed=3, test_fraction=0.2)
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert [r["label"] for r in rows] == assign_diseases(10, 3)
    assert sum(r["id"].startswith("test/") for r in rows) == 2
    for row in rows:
        counts = {d: int(row[d]) for d in DISEASES[1:]}
        if row["label"] == "normal":
            assert sum(counts.values()) == 0
        else:
            assert counts[row["label"]] > 0 and sum(counts.values()) == counts[row["label"]]
        for suffix in ("", ".1", ".2"):
            assert (out / f"{row['id']}{suffix}.png").is_file()
    assert sorted(set(r["label"] for r in rows)) == sorted(DISEASES)


def test_grain_options_change_only_the_angiograms_photo_independent_texture():
    """grain=0 removes the capillary grain and sensor noise; grain_seed draws another realisation of them:
    the photo, vessels and lesions stay, and the two realisations' textures are uncorrelated."""
    eye = make_eye(256, 7, "microaneurysms")
    assert np.array_equal(make_eye(256, 7, "microaneurysms", grain=1.0).ffa_early, eye.ffa_early)
    clean = make_eye(256, 7, "microaneurysms", grain=0.0)
    other = make_eye(256, 7, "microaneurysms", grain_seed=1)
    for variant in (clean, other):
        assert np.array_equal(variant.photo, eye.photo) and np.array_equal(variant.vessel_mask, eye.vessel_mask)
        assert variant.lesions == eye.lesions
    # away from vessels, the rim and the disc the texture is all that differs (clipping aside)
    inner = cv2.erode(eye.fov.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    background = inner & ~cv2.dilate(eye.vessel_mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    background &= (eye.ffa_late < 0.45) & (clean.ffa_late > 0.05)
    grain, grain_other = (eye.ffa_late - clean.ffa_late)[background], (other.ffa_late - clean.ffa_late)[background]
    assert 0.015 < grain.std() < 0.06 and abs(grain.mean()) < 0.01  # 0.05·capillary + N(0, 0.012), scaled
    assert 0.8 < grain_other.std() / grain.std() < 1.25
    assert abs(np.corrcoef(grain, grain_other)[0, 1]) < 0.1
    # the clean angiogram keeps only the lesions' and edges' pixel-scale detail: its Laplacian is about a third
    laplacian = lambda image: cv2.Laplacian(image.astype(np.float32), cv2.CV_32F)[background].std()  # noqa: E731
    assert laplacian(clean.ffa_late) < 0.5 * laplacian(eye.ffa_late)
    with pytest.raises(ValueError, match="standard eyes only"):
        make_eye(96, 0, style="uwf", grain=0.0)
