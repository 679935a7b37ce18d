"""The clinical experiment's statistics against independent computations (scikit-learn, scipy), its
grouping of one eye's images, and the modes' shared eyes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from sklearn.metrics import balanced_accuracy_score

from ffasynth.errors import FFASynthError, PairError
from ffasynth.evaluation.clinical import (
    ClinicalSettings,
    _train_one,
    build_classifier,
    load_labelled,
    paired_eyes,
    resolve_modes,
)
from ffasynth.evaluation.clinical_stats import (
    classification_metrics,
    corrected_interval,
    make_folds,
    paired_difference,
    verdict,
)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_is_scikit_learns_on_random_folds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        y_true = rng.integers(0, 3, 12)
        probabilities = rng.dirichlet(np.ones(3), 12)
        expected = balanced_accuracy_score(y_true, probabilities.argmax(1))
        assert classification_metrics(y_true, probabilities, 3)["balanced_accuracy"] == pytest.approx(expected)


def test_the_corrected_interval_widens_the_plain_one_by_the_test_to_train_ratio():
    values = [0.5, 0.6, 0.7, 0.55, 0.65]
    plain = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert [corrected_interval(values, 0.0)[k] for k in ("low", "high")] == pytest.approx(plain)
    # with n_test / n_train = 1/4 the variance of the mean is (1/5 + 1/4)σ² instead of σ²/5: 1.5× the width
    corrected = corrected_interval(values, 0.25)
    assert corrected["high"] - corrected["low"] == pytest.approx((plain[1] - plain[0]) * 1.5)
    assert corrected["mean"] == pytest.approx(0.6)
    assert np.isnan(corrected_interval([0.7, float("nan")], 0.25)["low"])  # one defined fold: no interval


def test_a_paired_difference_is_scipys_paired_t_test_without_the_correction_and_wider_with_it():
    a, b = [0.70, 0.65, 0.80, 0.72, 0.68], [0.60, 0.66, 0.70, 0.61, 0.64]
    plain = paired_difference(a, b, 0.0)
    assert plain["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue) and plain["folds"] == 5
    corrected = paired_difference(a, b, 0.25)
    assert corrected["p"] > plain["p"] and corrected["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert verdict(plain) == "better" and verdict(paired_difference(b, a, 0.0)) == "worse"
    assert verdict(paired_difference([0.6, 0.7, 0.5], [0.65, 0.6, 0.55], 0.25)) == "no clear difference"
    assert paired_difference([0.7, float("nan"), 0.6], [0.5, 0.5, 0.5], 0.0)["folds"] == 2  # undefined: left out
    # two folds that both differ by exactly +1/6 (discrete accuracies): no interval, no p, no "better"
    alike = paired_difference([0.25, 0.25], [1 / 12, 1 / 12], 1.0)
    assert alike["mean"] == pytest.approx(1 / 6) and np.isnan(alike["low"]) and np.isnan(alike["p"])
    assert alike["verdict"] == "cannot tell (too few folds, or every fold alike)"


def _class_folders(root, per_class=6):
    for label in ("normal", "brvo"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (16, 16), 20 * i).save(root / label / f"{i}.png")
    return root


def test_groups_csv_keeps_one_eyes_images_in_one_fold_and_a_bad_file_is_refused(tmp_path):
    root = _class_folders(tmp_path / "data")
    rows = ["id,group"] + [f"{label}/{i},{label}-eye{i // 2}" for label in ("normal", "brvo") for i in range(6)]
    (root / "groups.csv").write_text("\n".join(rows) + "\n")
    eyes = load_labelled(root)
    assert len({eye.group for eye in eyes}) == 6  # 12 images of 6 eyes
    labels = np.array([eye.label == "brvo" for eye in eyes], dtype=int)
    for seed in range(5):
        for train, test in make_folds(labels, [e.group for e in eyes], folds=3, seed=seed):
            assert not {eyes[i].group for i in train} & {eyes[i].group for i in test}
    with pytest.raises(FFASynthError, match="number of eyes \\(groups\\): 3"):
        make_folds(labels, [e.group for e in eyes], folds=4, seed=0)  # 6 images per class, but 3 eyes
    assert resolve_modes("all", eyes, folds=3)[0] == ["real-only"]
    with pytest.raises(FFASynthError, match="real-only: a class has 3 eyes \\(groups\\)"):
        resolve_modes("all", eyes, folds=4)  # counted by eye, not by image
    (root / "groups.csv").write_text("id,group\nnormal/99,a\n")
    with pytest.raises(PairError, match="1 ids are not examples"):
        load_labelled(root)
    (root / "groups.csv").write_text("image,eye\nnormal/1,a\n")
    with pytest.raises(PairError, match="needs the columns id,group"):
        load_labelled(root)


def test_modes_compared_run_on_the_eyes_every_one_of_them_can_use(tmp_path):
    root = _class_folders(tmp_path / "data", per_class=3)
    eyes = load_labelled(root)
    for eye in eyes[:-1]:
        eye.images["source"] = eye.images["real"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    eyes[0].images["source"] = tmp_path / "bad.png"
    kept, left = paired_eyes(eyes, ["real-only", "source+real"])
    assert kept == eyes[1:-1] and len(left) == 2
    assert left[0].startswith(eyes[0].id) and "bad.png" in left[0] and left[1] == f"{eyes[-1].id} (no source image)"
    assert paired_eyes(eyes, ["real-only"])[0] == eyes  # one mode: every eye with its input


def test_a_class_absent_from_a_training_fold_still_gets_its_weight():
    torch.manual_seed(0)
    model = build_classifier("resnet10t", [1], num_classes=3)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])  # class 2 (the highest) absent
    _train_one(model, x, y, 3, ClinicalSettings(epochs=1, batch_size=4), seed=0)  # the weight had 2 entries
    assert model(x).shape == (4, 3)


def test_images_of_one_eye_are_found_and_written_as_groups_for_the_folds(tmp_path):
    """Two phases of one phantom eye share their vessel tree (100+ agreeing keypoints); different eyes reach
    about 10. `data groups` writes groups.csv, which `clinical` then reads; it never overwrites one."""
    import shutil

    from typer.testing import CliRunner

    from ffasynth.cli import app
    from ffasynth.data.phantom import write_phantom_dataset

    phantoms = write_phantom_dataset(tmp_path / "phantoms", n=4, size=256, seed=3)
    data = tmp_path / "labelled"
    placed = {"normal/a": "1.1", "normal/b": "1.2", "normal/c": "2.1", "brvo/d": "3.1", "brvo/e": "3.2"}
    placed |= {"brvo/f": "4.1", "brvo/g": "2.2"}  # g: eye 2 again, in another class
    for key, name in placed.items():
        (data / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(phantoms / f"{name}.png", data / f"{key}.png")
    result = CliRunner().invoke(app, ["data", "groups", str(data)])
    assert result.exit_code == 0, result.output
    assert "4 of 7 images in 2 groups of one eye" in result.output
    groups = {eye.id: eye.group for eye in load_labelled(data)}
    assert groups["normal/a"] == groups["normal/b"] and groups["brvo/d"] == groups["brvo/e"]
    assert len({groups[key] for key in ("normal/a", "normal/c", "brvo/d", "brvo/f", "brvo/g")}) == 5
    again = CliRunner().invoke(app, ["data", "groups", str(data)])
    assert again.exit_code != 0 and "exists" in str(again.exception)
    across = CliRunner().invoke(
        app, ["data", "groups", str(data), "--across-classes", "--out", str(tmp_path / "x.csv")]
    )
    assert "brvo/g ~ normal/c" in across.output and "6 of 7 images in 3 groups" in across.output
