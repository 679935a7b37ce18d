"""Vessel, region, lesion and retrieval agreement (evaluation.vessels / regions / lesions / agreement)
on constructed images whose answer is known before the code runs."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest

from ffasynth.data.io import read_image, save_image
from ffasynth.data.phantom import (
    LESIONS_SUFFIX,
    Lesion,
    assign_diseases,
    dataset_eye_seed,
    make_eye,
    read_lesion_record,
    write_phantom_dataset,
)
from ffasynth.data.registration import field_of_view
from ffasynth.evaluation.agreement import analyse_real, pair_scores, scores_by_class
from ffasynth.evaluation.lesions import contrast, lesion_counts, lesions_for, recall_sentence, sightings
from ffasynth.evaluation.metrics import EvalSettings, evaluate
from ffasynth.evaluation.outputs import write_evaluation
from ffasynth.evaluation.regions import REGION_MARGIN, region_masks, region_scores
from ffasynth.evaluation.retrieval import retrieval, vessel_overlap
from ffasynth.evaluation.vessels import cldice, vessel_mask, vessel_scores

SIZE = 160
BRANCHES = [(80, 80, 150, 40), (80, 80, 20, 30), (80, 80, 30, 140), (80, 80, 140, 150), (115, 60, 130, 10)]


def disc_fov(size: int = SIZE) -> np.ndarray:
    ys, xs = np.mgrid[:size, :size]
    return (xs - size / 2) ** 2 + (ys - size / 2) ** 2 < (0.48 * size) ** 2


def vessel_tree(shift: int = 0, branches=BRANCHES) -> np.ndarray:
    """Bright 3-px vessels (0.8) on a 0.25 background inside a round field, moved `shift` px right."""
    image = np.full((SIZE, SIZE), 0.25, np.float32)
    for x0, y0, x1, y1 in branches:
        cv2.line(image, (x0 + shift, y0), (x1 + shift, y1), 0.8, 3, cv2.LINE_AA)
    return np.where(disc_fov(), image, 0.0).astype(np.float32)


def bar(left: int, width: int = 5) -> np.ndarray:
    mask = np.zeros((64, 64), bool)
    mask[:, left : left + width] = True
    return mask


def test_dice_of_a_bar_shifted_by_k_is_one_minus_k_over_its_width_and_cldice_forgives_under_half_a_width():
    everywhere = np.ones((64, 64), bool)
    for k in range(6):
        scores = vessel_scores(bar(20), bar(20 + k), everywhere)
        assert scores["vessel_dice"] == pytest.approx(1 - k / 5)
        assert scores["vessel_density_error"] == 0.0
        # the shifted centre line stays inside the real 5-px bar for k <= 2, leaves it from k = 3
        assert scores["vessel_cldice"] >= 0.95 if k <= 2 else scores["vessel_cldice"] <= 0.05
    assert math.isnan(cldice(np.zeros((8, 8), bool), bar(2)[:8, :8]))  # no real vessel: undefined
    assert cldice(bar(2)[:8, :8], np.zeros((8, 8), bool)) == 0.0


def test_vessel_masks_of_identical_shifted_and_blank_angiograms():
    fov = disc_fov()
    real = vessel_mask(vessel_tree(), fov)
    assert 0.03 < real[fov].mean() < 0.12  # the tree, not the background (3-px lines fill ~6% of the field)
    assert vessel_scores(real, vessel_mask(vessel_tree(), fov), fov) == {
        "vessel_dice": 1.0,
        "vessel_cldice": 1.0,
        "vessel_density_error": 0.0,
    }
    dices = [vessel_scores(real, vessel_mask(vessel_tree(k), fov), fov)["vessel_dice"] for k in (1, 2, 4, 8)]
    assert dices == sorted(dices, reverse=True) and dices[0] > 0.7 and dices[-1] < 0.15
    blank = vessel_scores(real, vessel_mask(np.where(fov, 0.25, 0.0).astype(np.float32), fov), fov)
    assert blank["vessel_dice"] == 0.0 and blank["vessel_cldice"] == 0.0
    assert blank["vessel_density_error"] == pytest.approx(-real.sum() / fov.sum())
    half = vessel_scores(real, vessel_mask(vessel_tree(branches=BRANCHES[:2]), fov), fov)
    assert half["vessel_density_error"] < -0.01 and 0.3 < half["vessel_dice"] < 0.9  # two of five branches


def blobs(bright: float, dark: float) -> np.ndarray:
    """A flat 0.3 field with a bright disc (r 12 at (55, 60)) and a dark one (r 15 at (105, 100))."""
    image = np.full((SIZE, SIZE), 0.3, np.float32)
    cv2.circle(image, (55, 60), 12, 0.3 + bright, -1)
    cv2.circle(image, (105, 100), 15, 0.3 + dark, -1)
    return np.where(disc_fov(), image, 0.0).astype(np.float32)


def test_regions_are_the_blobs_beyond_the_margin_and_their_dice_and_area_error():
    fov = disc_fov()
    none = np.zeros_like(fov)
    hyper, hypo = region_masks(blobs(0.3, -0.2), fov, none)
    assert hyper.sum() == pytest.approx(math.pi * 12**2, rel=0.15) and hyper[60, 55]
    assert hypo.sum() == pytest.approx(math.pi * 15**2, rel=0.15) and hypo[100, 105]
    assert not (hyper & hypo).any()
    faint = region_masks(blobs(0.5 * REGION_MARGIN, -0.5 * REGION_MARGIN), fov, none)
    assert not faint[0].any() and not faint[1].any()  # within the margin: no region
    assert region_scores((hyper, hypo), (hyper, hypo), fov) == {
        "hyper_dice": 1.0,
        "hyper_area_error": 0.0,
        "hypo_dice": 1.0,
        "hypo_area_error": 0.0,
    }
    missing = region_scores((hyper, hypo), region_masks(blobs(0.0, -0.2), fov, none), fov)
    assert missing["hyper_dice"] == 0.0 and missing["hypo_dice"] > 0.95
    assert missing["hyper_area_error"] == pytest.approx(hyper.sum() / fov.sum(), rel=0.1)
    vessel_blob = region_masks(blobs(0.3, -0.2), fov, hyper)  # bright pixels that are vessels do not count
    assert not vessel_blob[0].any()


def test_a_planted_leakage_blob_is_found_or_missed_and_a_blank_image_recalls_nothing():
    fov = disc_fov()
    background = np.where(fov, 0.3, 0.0).astype(np.float32)
    leak, hole = Lesion("leakage", 55, 60, 10), Lesion("non_perfusion", 105, 100, 14)
    ys, xs = np.mgrid[:SIZE, :SIZE]
    leakage = 0.4 * np.exp(-((xs - 55) ** 2 + (ys - 60) ** 2) / (2 * 10.0**2))  # a Gaussian of sigma = radius
    without_leak = background.copy()
    cv2.circle(without_leak, (105, 100), 14, 0.1, -1)  # non-perfused: 0.2 darker
    with_both = (without_leak + leakage).astype(np.float32)
    assert contrast(with_both, leak, fov) > 0.2 and contrast(with_both, hole, fov) == pytest.approx(-0.2, abs=0.01)
    found = {s.kind: s.found for s in sightings(with_both, with_both, [leak, hole], fov)}
    assert found == {"leakage": True, "non_perfusion": True}
    found = {s.kind: s.found for s in sightings(with_both, without_leak, [leak, hole], fov)}
    assert found == {"leakage": False, "non_perfusion": True}
    brightened = with_both.copy()
    cv2.circle(brightened, (105, 100), 14, 0.6, -1)  # bright where the real one is dark: not shown
    assert not [s for s in sightings(with_both, brightened, [hole], fov) if s.found]
    counts = lesion_counts(sightings(with_both, np.zeros_like(with_both), [leak, hole], fov))
    none_shown = {"shown_real": 1, "shown_generated": 0}
    assert counts == {"leakage": none_shown, "non_perfusion": none_shown}
    assert recall_sentence(counts) == "0 of 1 leakage blobs, 0 of 1 non-perfusion areas"
    assert lesion_counts(sightings(background, background, [leak], fov)) == {}  # not on the real one: not counted


def test_phantom_sets_record_their_lesions_and_evaluation_scales_them(tmp_path):
    data = write_phantom_dataset(tmp_path, n=5, size=64, seed=4)
    eye = make_eye(64, dataset_eye_seed(4, 2), assign_diseases(5, 4)[2])  # id 3: the third eye drawn
    size, lesions = read_lesion_record(data / f"3{LESIONS_SUFFIX}")
    assert size == (64, 64) and lesions == eye.lesions
    assert lesions_for(data / "3.1.png", (128, 128)) == [
        Lesion(item.kind, 2 * item.x, 2 * item.y, 2 * item.radius) for item in lesions
    ]
    assert np.array_equal(read_image(data / "3.2.png", channels=1)[0].numpy(), np.round(eye.ffa_late * 255) / 255)
    assert lesions_for(tmp_path / "elsewhere" / "3.1.png", (64, 64)) is None


def test_vessel_dice_retrieval_finds_each_eyes_own_tree():
    trees = {str(i): make_eye(128, seed=i).ffa_early for i in range(4)}
    fovs = {key: field_of_view(image) for key, image in trees.items()}
    masks = {key: vessel_mask(image, fovs[key]) for key, image in trees.items()}
    own = retrieval(masks, masks, measure=vessel_overlap, fovs=fovs)
    assert own.accuracy == 1.0 and own.mean_margin > 0.3
    keys = sorted(masks)
    shuffled = {key: masks[keys[(i + 1) % 4]] for i, key in enumerate(keys)}
    assert retrieval(shuffled, masks, measure=vessel_overlap, fovs=fovs).accuracy == 0.0


@pytest.fixture(scope="module")
def phantom_evaluation(tmp_path_factory):
    """Three UWF-layout phantom eyes at 128 px; 'copy' = the real angiograms, 'blank' = black images."""
    root = tmp_path_factory.mktemp("agreement")
    data = write_phantom_dataset(root / "data", n=3, size=128, seed=5, diseases=("leakage", "non_perfusion"))
    for path in sorted(data.glob("*.*.png")):
        image = read_image(path, channels=1)
        save_image(image, root / "copy" / f"{path.stem}_ffa.png")
        save_image(image * 0, root / "blank" / f"{path.stem}_ffa.png")
    settings = EvalSettings(metrics=("retrieval", "vessels", "regions", "lesions"))
    evaluation = evaluate(data, {"copy": root / "copy", "blank": root / "blank"}, settings)
    return evaluation, write_evaluation(evaluation, root / "report")


def test_evaluate_scores_a_copy_perfectly_and_a_blank_set_at_zero(phantom_evaluation):
    evaluation, _ = phantom_evaluation
    copy, blank = evaluation.methods
    assert copy.agreement["retrieval"]["own_eye"] == copy.agreement["retrieval"]["own_eye_vessels"] == 1.0
    assert copy.agreement["retrieval"]["chance"] == pytest.approx(1 / 3)
    assert copy.summary["vessel_dice"]["mean"] == copy.summary["hyper_dice"]["mean"] == 1.0
    assert copy.agreement["lesions"]["recall"] == 1.0 and copy.agreement["lesions"]["shown_real"] >= 3
    assert blank.agreement["lesions"]["recall"] == 0.0 and blank.agreement["retrieval"]["own_eye_vessels"] == 0.0
    assert blank.summary["vessel_dice"]["mean"] == 0.0
    assert set(copy.agreement["by_phase"]) == {"early", "late"} and not evaluation.skipped


def test_the_report_carries_the_new_columns_maps_and_lesion_counts(phantom_evaluation):
    evaluation, paths = phantom_evaluation
    data = json.loads(paths["metrics.json"].read_text())
    assert data["methods"]["copy"]["agreement"]["retrieval"]["own_eye"] == 1.0
    with paths["metrics.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert {"phase", "vessel_dice", "vessel_cldice", "hypo_dice", "lesion_recall"} <= set(rows[0])
    assert {row["phase"] for row in rows} == {"early", "late"}
    summary = paths["summary.md"].read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[2].startswith("own eye (corr.)")  # the first metric column
    assert "copy: the generated angiograms show" in summary and "blank: the generated angiograms show 0 of" in summary
    html = paths["report.html"].read_text()
    assert "Vessels and regions (vessels: real only green" in html
    vessels = read_image(paths["report.html"].parent / "images" / "pairs" / "1.1" / "vessels_0.png", channels=3)
    assert bool((vessels[1] > 0.5).any()) and bool(((vessels[0] > 0.5) == (vessels[1] > 0.5)).all())  # copy: white


def test_without_lesion_records_lesion_recall_is_skipped_with_its_reason(phantom_evaluation, tmp_path):
    evaluation, _ = phantom_evaluation
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(evaluation.real_dir.glob("*.png")):
        save_image(read_image(path), data / path.name)
    settings = EvalSettings(metrics=("lesions", "vessels"))
    skipped = evaluate(data, {"copy": evaluation.methods[0].fake_dir}, settings).skipped
    assert list(skipped) == ["lesions"] and "N.lesions.json" in skipped["lesions"]


def test_pair_scores_of_a_phantom_and_itself_are_perfect():
    eye = make_eye(96, seed=3, disease="leakage")
    maps = analyse_real(eye.ffa_late)
    scores = pair_scores(maps, maps)
    assert scores["vessel_dice"] == 1.0 and scores["hyper_dice"] == 1.0 and scores["vessel_density_error"] == 0.0


def test_scores_by_class_summarise_each_labels_pairs(tmp_path):
    eyes = {label: make_eye(128, seed=i, disease=label) for i, label in enumerate(("normal", "leakage"))}
    examples = []
    for label, eye in eyes.items():
        real = save_image(eye.ffa_late[None], tmp_path / f"{label}.png")
        copy = save_image(eye.ffa_late[None], tmp_path / f"{label}_copy.png")
        blank = save_image(np.zeros((1, 64, 64), np.float32), tmp_path / f"{label}_blank.png")  # resized to 128
        examples += [(label, real, copy), (label, real, blank)]
    by_class = scores_by_class(examples)
    assert list(by_class) == ["leakage", "normal"] and by_class["normal"]["n"] == 2
    assert by_class["normal"]["vessel_dice"] == {"mean": 0.5, "std": 0.5, "n": 2}  # a copy (1) and a blank (0)
    assert by_class["leakage"]["hyper_dice"]["mean"] == 0.5
