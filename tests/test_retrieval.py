"""Own-eye retrieval (evaluation/retrieval.py) on constructed eyes with known answers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ffasynth.data.phantom import make_eye
from ffasynth.evaluation.retrieval import centred, correlation, retrieval, vessel_band, vessel_band_retrieval


@pytest.fixture(scope="module")
def eyes():
    return {str(i): make_eye(96, seed=i).ffa_early for i in range(4)}


def test_correlation_is_pearson_inside_the_mask():
    rng = np.random.default_rng(0)
    a = rng.random((20, 20))
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    b = np.where(mask, 2 * a + 1, rng.random((20, 20)))  # a linear function of a inside only
    assert correlation(a, b, mask) == pytest.approx(1.0)
    assert correlation(a, -b, mask) == pytest.approx(-1.0)
    assert correlation(a, np.full((20, 20), 0.5), mask) == 0.0  # constant: no information
    assert correlation(a, b, np.ones((20, 20), bool)) < 0.9  # outside the mask it is noise


def test_own_real_images_are_retrieved_perfectly(eyes):
    result = retrieval(eyes, eyes)
    assert result.accuracy == 1.0 and result.mean_margin > 0.1
    assert result.chance == pytest.approx(0.25)


def test_shuffled_outputs_are_never_their_own_and_a_blind_output_scores_no_better_than_chance(eyes):
    keys = sorted(eyes)
    shuffled = {key: eyes[keys[(i + 1) % len(keys)]] for i, key in enumerate(keys)}
    assert retrieval(shuffled, eyes).accuracy == 0.0
    mean = np.mean([eyes[key] for key in keys], axis=0)  # the same image for every input
    blind = retrieval({key: mean for key in keys}, eyes)
    assert blind.accuracy <= 0.5 and blind.mean_margin < 0  # at most one real FFA can be its best match


def test_groups_compare_within_a_phase_only(eyes):
    groups = {"0": "early", "1": "early", "2": "late", "3": "late"}
    result = retrieval(eyes, eyes, groups)
    assert np.isnan(result.similarity[0, 2]) and not np.isnan(result.similarity[0, 1])
    assert result.chance == pytest.approx(0.5) and result.accuracy == 1.0
    alone = retrieval({"0": eyes["0"], "2": eyes["2"]}, eyes, {"0": "early", "2": "late"})
    assert alone.own_first == []  # nothing to tell apart: not scored


def test_a_resized_output_is_compared_at_the_real_images_size(eyes):
    small = {key: cv2.resize(value, (48, 48), interpolation=cv2.INTER_AREA) for key, value in eyes.items()}
    assert retrieval(small, eyes).accuracy == 1.0


def test_distractors_are_candidates_every_synthetic_image_must_beat(eyes):
    translated = {"0": eyes["0"], "1": eyes["1"]}
    others = {"2": eyes["2"], "3": eyes["3"]}  # real FFAs of eyes that were not translated
    result = retrieval(translated, eyes, distractors=others)
    assert result.columns == ["0", "1", "2", "3"] and result.similarity.shape == (2, 4)
    assert result.accuracy == 1.0 and result.chance == pytest.approx(0.25)
    # an output that reproduces a distractor eye (e.g. a training eye it memorised) is not its own eye's
    copied = retrieval({"0": eyes["2"], "1": eyes["1"]}, eyes, distractors=others)
    assert copied.own_first == [False, True]
    assert copied.margins[0] == pytest.approx(copied.similarity[0, 0] - copied.similarity[0, 2])
    with pytest.raises(ValueError, match="'1'"):
        retrieval(translated, eyes, distractors={"1": eyes["1"]})


def test_excess_is_the_own_similarity_over_the_mean_of_the_others(eyes):
    groups = {"0": "early", "1": "early", "2": "early", "3": "late"}
    result = retrieval({k: eyes[k] for k in "012"}, eyes, groups, distractors={"3": eyes["3"]})
    row = result.similarity[1]
    assert np.isnan(row[3])  # the late distractor is not compared with an early image
    assert result.excess[1] == pytest.approx(row[1] - (row[0] + row[2]) / 2)
    assert result.mean_excess == pytest.approx(np.mean(result.excess))
    assert result.chance == pytest.approx(1 / 3)


def test_centring_removes_a_shared_pattern_that_decides_the_plain_retrieval(eyes):
    """Outputs = a strong pattern common to all (here eye 3's angiogram, as a tiled decode's blocks resembled
    one eye's) + a weak trace of their own eye: plain retrieval finds eye 3 for every output; centred, each
    output finds its own. Outputs that are all the same centre to zero and are own-first for none."""
    keys = sorted(eyes)
    fakes = {key: eyes["3"] + 0.15 * eyes[key] for key in keys}
    plain = retrieval(fakes, eyes)
    assert plain.own_first == [False, False, False, True]
    fair = retrieval(centred(fakes), eyes)
    assert fair.accuracy == 1.0 and fair.mean_excess > 0.1
    mean = np.mean([eyes[key] for key in keys], axis=0)
    blind = centred({key: mean for key in keys})
    assert all(np.abs(image).max() < 1e-6 for image in blind.values())
    assert retrieval(blind, eyes).accuracy == 0.0


def test_centring_is_within_a_group_and_at_each_outputs_own_size(eyes):
    groups = {"0": "early", "1": "early", "2": "late", "3": "late"}
    fakes = dict(eyes)
    fakes["1"] = cv2.resize(eyes["1"], (64, 48), interpolation=cv2.INTER_AREA)  # smaller and not square
    out = centred(fakes, groups)
    assert out["1"].shape == (48, 64) and out["0"].shape == (96, 96)
    np.testing.assert_allclose(out["2"], (eyes["2"] - eyes["3"]) / 2, atol=1e-6)  # the late pair only
    assert out["2"].dtype == np.float32
    assert retrieval(out, eyes, groups).accuracy == 1.0
    alone = centred({"0": eyes["0"], "2": eyes["2"]}, {"0": "early", "2": "late"})
    np.testing.assert_array_equal(alone["0"], eyes["0"].astype(np.float32))  # nothing shared: as it is


def test_the_vessel_band_ranks_eyes_by_their_vessels_not_by_a_layout_that_decides_the_plain_retrieval(eyes):
    """Outputs = eye 3's low-frequency layout, strong, + a weak trace of their own eye's vessels: plain
    retrieval finds eye 3 for every output; in the vessel band each finds its own. The band of a smooth
    image (a constant, a gentle gradient) is nothing."""
    keys = sorted(eyes)
    layout = cv2.GaussianBlur(eyes["3"], (0, 0), 12)
    layout = layout - vessel_band(layout)  # eye 3's low-frequency layout, nothing at vessel scale
    fakes = {key: layout + 0.2 * vessel_band(eyes[key]) for key in keys}
    assert retrieval(fakes, eyes).own_first == [False, False, False, True]
    banded = vessel_band_retrieval(fakes, eyes)
    assert banded.accuracy == 1.0 and banded.mean_excess > 0.3
    assert np.abs(vessel_band(np.full((64, 64), 0.7))).max() < 1e-6
    ramp = np.tile(np.linspace(0.2, 0.4, 64, dtype=np.float32), (64, 1))
    assert np.abs(vessel_band(ramp)[16:48, 16:48]).max() < 1e-4
    assert vessel_band(eyes["0"]).dtype == np.float32


def test_the_vessel_band_score_is_not_decided_by_the_field_edge_or_an_eyes_layout_contrast(eyes):
    """An output that is only an eye's field of view (a bright disc, no vessels) draws a ring in the band
    along the field's edge; inside the eroded field it has nothing, so it is own-first for none. An eye whose
    angiogram has a strong layout on top of the same vessels is found as well as without it."""
    from ffasynth.data.registration import field_of_view

    keys = sorted(eyes)
    discs = {key: field_of_view(eyes[key]).astype(np.float32) for key in keys}
    assert np.abs(vessel_band(discs["0"])).max() > 0.1  # the ring along the field's edge
    found = vessel_band_retrieval(discs, eyes)
    assert found.accuracy == 0.0 and np.nanmax(np.abs(found.similarity)) < 0.05
    ramp = np.tile(np.linspace(0.0, 3.0, 96, dtype=np.float32), (96, 1))
    steep = dict(eyes, **{"2": eyes["2"] + ramp})  # eye 2's angiogram under a strong gradient
    fovs = {key: field_of_view(eyes[key]) for key in keys}
    fakes = {key: vessel_band(eyes[key]) for key in keys}
    both = vessel_band_retrieval(fakes, steep, fovs=fovs)
    assert both.own_first == [True] * 4 and both.similarity[2, 2] > 0.9
    # banding the outputs only, eye 2's gradient enters the correlation's denominator and loses it its own
    assert retrieval(fakes, steep, fovs=fovs).own_first == [True, True, False, True]


def test_chance_counts_only_the_items_that_are_scored(eyes):
    """An item alone in its group has no other candidate: it is left out of the accuracy, so of the chance too."""
    groups = {"0": "early", "1": "early", "2": "early", "3": "late"}
    result = retrieval(eyes, eyes, groups)
    assert len(result.own_first) == 3 and result.chance == pytest.approx(1 / 3)
