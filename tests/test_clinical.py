"""The clinical classifier experiment: fold hygiene, metric values, and learning a real signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import FFASynthError
from ffasynth.evaluation.clinical import (
    ClinicalSettings,
    attach_synthetic,
    build_classifier,
    classification_metrics,
    cross_validate,
    load_labelled,
    make_folds,
    recalibrate_batchnorm,
    resolve_modes,
)
from ffasynth.evaluation.plots import plot_confusion, plot_roc
from tests.helpers import micro_pipeline


def test_metrics_on_a_fixed_prediction_set():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]]
    )
    metrics = classification_metrics(y_true, probabilities, 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per class F1: class 0 P=1/2 R=1/2 → 0.5; class 1 P=2/3 R=1 → 0.8; class 2 P=1 R=1/2 → 2/3
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # one-vs-rest AUCs by counting ranked pairs: class 0 → 7/8, class 1 → 1, class 2 → 1
    assert metrics["auc_ovr"] == pytest.approx((7 / 8 + 1 + 1) / 3)


def test_a_class_absent_from_a_fold_is_not_a_zero_in_its_scores():
    """A fold whose truth and predictions hold two of three classes, all right: macro-F1 1 (it was 2/3, the
    absent class counted as F1 0); a fold with one class has no AUC, and the summary leaves it out (one such
    fold made the whole AUC null) and says over how many folds it averaged."""
    from ffasynth.evaluation.clinical import ClinicalResult, ClinicalSettings

    perfect = classification_metrics(np.array([0, 0, 1, 1]), np.eye(3)[[0, 0, 1, 1]], 3)
    assert perfect["macro_f1"] == 1.0 and perfect["auc_ovr"] == 1.0
    wrong = classification_metrics(np.array([0, 0]), np.eye(3)[[0, 2]], 3)  # a false class 2: its F1 is 0
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 0) / 2) and np.isnan(wrong["auc_ovr"])
    folds = [perfect, wrong, {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "auc_ovr": 0.8}]
    result = ClinicalResult(
        ClinicalSettings(), ["a", "b", "c"], folds, np.zeros(1), np.zeros((1, 3)), np.zeros(1), [], []
    )
    summary = result.summary()
    assert summary["auc_ovr"]["mean"] == pytest.approx(0.9) and summary["auc_ovr"]["folds"] == 2
    assert summary["auc_ovr"]["std"] == pytest.approx(np.std([1.0, 0.8], ddof=1))
    assert summary["accuracy"]["folds"] == 3
    assert summary["accuracy"]["std"] == pytest.approx(np.std([1, 0.5, 0.5], ddof=1))


def test_folds_are_stratified_and_never_split_an_eye():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1])
    groups = ["a", "a", "b", "c", "d", "d", "e", "f", "g", "h", "i", "j"]
    splits = make_folds(labels, groups, folds=2, seed=0)
    seen = []
    for train, test in splits:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        assert set(labels[test]) == {0, 1}
        seen.extend(test.tolist())
    assert sorted(seen) == list(range(len(labels)))
    with pytest.raises(FFASynthError, match="--folds"):
        make_folds(labels, groups, folds=9, seed=0)


def test_two_branch_and_stacked_classifiers_take_photo_plus_angiogram():
    x = torch.randn(2, 4, 32, 32)
    for fusion in ("stack", "two-branch"):
        model = build_classifier("resnet10t", [3, 1], num_classes=3, fusion=fusion)
        assert model(x).shape == (2, 3)


def test_batchnorm_recalibration_gives_eval_mode_the_population_statistics():
    torch.manual_seed(0)
    model = build_classifier("resnet10t", [1], num_classes=2)
    x = torch.randn(48, 1, 64, 64) * 3 + 1
    for module in model.modules():  # stale statistics, as after a few fast-moving steps
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(0.5)
    model.train()
    with torch.no_grad():
        batch_statistics = model(x)
        model.eval()
        assert not torch.allclose(model(x), batch_statistics, atol=0.05)
    recalibrate_batchnorm(model.train(), x, batch_size=len(x))
    assert model.training and model.bn1.momentum == 0.1
    model.eval()
    with torch.no_grad():
        # one batch: eval mode now normalises as train mode did (up to the n/(n−1) variance factor, n ≥ 192)
        assert torch.allclose(model(x), batch_statistics, atol=0.01)
    recalibrate_batchnorm(model, x[:13], batch_size=12)  # a last batch of one is merged, not fed alone
    assert model.bn1.num_batches_tracked == 1


# Microaneurysms are bright dots on the dark angiogram: obvious at 64². (Haemorrhages at 64² are
# 2-4 px dark spots on the dark, textured background, like the foveal avascular zone: a weak signal.)
@pytest.fixture(scope="module")
def lesion_phantoms(tmp_path_factory):
    return write_phantom_dataset(
        tmp_path_factory.mktemp("clinical"), n=24, size=64, seed=11, diseases=("normal", "microaneurysms")
    )


@pytest.mark.slow
def test_classifier_learns_an_obvious_lesion_signal(lesion_phantoms, tmp_path):
    eyes = load_labelled(lesion_phantoms)
    assert len(eyes) == 24 and {e.label for e in eyes} == {"normal", "microaneurysms"}
    settings = ClinicalSettings(mode="real-only", folds=3, image_size=64, epochs=12, batch_size=8, lr=3e-3)
    result = cross_validate(eyes, settings)
    summary = result.summary()
    assert summary["accuracy"]["mean"] >= 0.75, summary
    assert summary["auc_ovr"]["mean"] >= 0.8, summary
    assert result.confusion().sum() == 24
    assert plot_roc(result, tmp_path / "roc.png").stat().st_size > 1000
    assert plot_confusion(result, tmp_path / "cm.png").stat().st_size > 1000


def test_synthetic_images_attach_by_name_and_missing_ones_are_listed(lesion_phantoms, tmp_path):
    eyes = load_labelled(lesion_phantoms)
    for eye in eyes[:-2]:
        (tmp_path / f"{eye.id}_ffa.png").write_bytes(eye.images["real"].read_bytes())
    missing = attach_synthetic(eyes, tmp_path)
    assert missing == [eyes[-2].id, eyes[-1].id]
    assert all("synthetic" in e.images for e in eyes[:-2])


def test_class_folder_layout(tmp_path):
    from PIL import Image

    for label in ("normal", "brvo"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("L", (16, 16), 40 * i).save(tmp_path / label / f"{i}.jpg")
    eyes = load_labelled(tmp_path)
    assert len(eyes) == 6 and {e.label for e in eyes} == {"normal", "brvo"}
    assert all(set(e.images) == {"real"} for e in eyes)
    with pytest.raises(FFASynthError, match="source"):
        cross_validate(eyes, ClinicalSettings(mode="source-only", folds=2))
    assert resolve_modes("all", eyes, folds=2)[0] == ["real-only"]
    assert resolve_modes("all", eyes, folds=3)[0] == ["real-only"]
    with pytest.raises(FFASynthError, match="no mode"):
        resolve_modes("all", eyes, folds=4)


def test_modes_the_data_allows(lesion_phantoms):
    eyes = load_labelled(lesion_phantoms)
    modes, skipped = resolve_modes("all", eyes, folds=5)
    assert modes == ["source-only", "real-only", "source+real"] and list(skipped) == ["source+synthetic"]
    assert resolve_modes("synthetic", eyes, folds=5) == (["source+synthetic"], {})
    with pytest.raises(FFASynthError, match="--mode"):
        resolve_modes("photos", eyes, folds=5)


@pytest.mark.slow
def test_clinical_cli_runs_every_mode_the_data_allows(lesion_phantoms, tmp_path):
    import json

    from typer.testing import CliRunner

    from ffasynth.cli import app

    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    for eye in load_labelled(lesion_phantoms)[:-1]:  # one eye without a generated image
        (synthetic / f"{eye.id}_ffa.png").write_bytes(eye.images["real"].read_bytes())
    out = tmp_path / "out"
    arguments = ["clinical", "--data", str(lesion_phantoms), "--out", str(out), "--mode", "all", "--folds", "2"]
    arguments += ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--synthetic", str(synthetic)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "warning: no --backbone-weights" in result.stderr and "1 of 24 eyes have no image" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["modes"]) == ["source-only", "real-only", "source+real", "source+synthetic"]
    assert metrics["settings"]["pretrained_backbone"] is False and metrics["settings"]["folds"] == 2
    assert {"torch", "timm", "scikit-learn", "ffasynth"} <= set(metrics["versions"])
    synthetic_mode = metrics["modes"]["source+synthetic"]
    assert len(synthetic_mode["predictions"]) == 23
    assert "1 eyes left out of every mode" in result.stderr and load_labelled(lesion_phantoms)[-1].id in result.stderr
    for mode, record in metrics["modes"].items():
        assert len(record["folds"]) == 2
        assert set(record["summary"]) == {"accuracy", "balanced_accuracy", "macro_f1", "auc_ovr"}
        assert 0 <= record["summary"]["accuracy"]["mean"] <= 1
        assert sum(map(sum, record["confusion"])) == len(record["predictions"])
        for figure in record["figures"].values():
            assert (out / figure).stat().st_size > 1000, mode
    assert (out / "roc_real-only.png").is_file() and (out / "confusion_source+synthetic.png").is_file()
    page = (out / "report.html").read_text()
    assert "source+synthetic" in page and "Difference from source-only" in page and (out / "summary.md").is_file()
    # every mode on the same 23 eyes (one has no synthetic image) and folds: compared fold by fold
    assert {len(record["predictions"]) for record in metrics["modes"].values()} == {23}
    assert set(metrics["difference_from_source_only"]) == {"real-only", "source+real", "source+synthetic"}
    assert "source+synthetic − source-only, accuracy" in result.output
    agreement = metrics["agreement_by_class"]  # the synthetic images are copies: perfect wherever defined
    assert set(agreement) == {"normal", "microaneurysms"} and sum(c["n"] for c in agreement.values()) == 23
    assert all(
        s["mean"] == (0.0 if "error" in k else 1.0) for c in agreement.values() for k, s in c.items() if k != "n"
    )
    assert "Synthetic against real angiograms, per class" in page


def test_clinical_cli_refuses_a_synthetic_mode_without_images(lesion_phantoms, tmp_path):
    from typer.testing import CliRunner

    from ffasynth.cli import app

    result = CliRunner().invoke(
        app, ["clinical", "--data", str(lesion_phantoms), "--out", str(tmp_path), "--mode", "synthetic"]
    )
    assert isinstance(result.exception, FFASynthError) and "--synthetic" in str(result.exception)


@pytest.mark.slow
def test_clinical_generates_synthetic_ffa_with_a_pipeline(lesion_phantoms, tmp_path):
    from typer.testing import CliRunner

    from ffasynth.cli import app

    micro_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    arguments = [
        "clinical",
        "--data",
        str(lesion_phantoms),
        "--out",
        str(out),
        "--mode",
        "synthetic",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--pipeline",
        str(tmp_path / "pipe"),
        "--steps",
        "1",
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert len(list((out / "synthetic").glob("*_ffa.png"))) == 24
    assert (out / "report.html").is_file()
    assert "does not list the photos it was trained on" in " ".join(result.stderr.split())
    # a pipeline that lists its training photos (run_folder.record_photos): the eyes it saw are named, by content
    import json

    from ffasynth import run_folder

    eyes = load_labelled(lesion_phantoms)
    run_folder.record_photos(tmp_path / "pipe", [eye.images["source"] for eye in eyes[:3]])
    arguments[arguments.index(str(out))] = str(tmp_path / "again")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "was trained on 3 of these eyes' photos" in " ".join(result.stderr.split())
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["settings"]["generator_trained_on"] == [eye.id for eye in eyes[:3]]


def test_backbone_weights_load_into_every_branch_and_a_foreign_or_damaged_file_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    from ffasynth.errors import WeightsNotFoundError
    from ffasynth.evaluation.clinical import build_classifier

    torch.manual_seed(0)
    pretrained = timm.create_model("resnet10t", pretrained=False, num_classes=1000).state_dict()
    save_file(pretrained, tmp_path / "resnet10t.safetensors")
    for in_chans, fusion in (([1], "stack"), ([3, 1], "two-branch")):
        model = build_classifier("resnet10t", in_chans, 4, fusion, tmp_path / "resnet10t.safetensors")
        branches = getattr(model, "branches", [model])
        for branch, channels in zip(branches, in_chans, strict=True):
            assert torch.equal(branch.state_dict()["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])
            first = pretrained["conv1.0.weight"]  # the stem: as it is for RGB, else averaged and repeated
            expected = (
                first if channels == 3 else first.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1) * 3 / channels
            )
            assert torch.allclose(branch.state_dict()["conv1.0.weight"], expected)
    save_file({"conv_in.weight": torch.zeros(4, 8, 3, 3)}, tmp_path / "unet.safetensors")
    with pytest.raises(WeightsNotFoundError, match=r"fit 0 of this backbone's \d+ tensors"):
        build_classifier("resnet10t", [1], 4, "stack", tmp_path / "unet.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "resnet10t.safetensors").read_bytes()[:100])
    with pytest.raises(WeightsNotFoundError, match="not a readable safetensors file"):
        build_classifier("resnet10t", [1], 4, "stack", tmp_path / "cut.safetensors")


def test_synthetic_images_never_go_to_another_eye_on_the_isfahan_layout(tmp_path):
    """isfahan: normal/N-N.jpg and abnormal/N.jpg are photos. Named as translate names them (N-N_ffa.png and
    N_ffa.png in one folder), each eye gets the image of its own photo; the bare 'N' fallback used to give
    every normal eye the abnormal eye N's image. A file only named N is ambiguous: no eye gets it."""
    from PIL import Image

    from ffasynth.translate import output_file, output_stems

    data, rng = tmp_path / "data", np.random.default_rng(0)
    for label in ("normal", "abnormal"):
        (data / label).mkdir(parents=True)
        for n in (1, 2):
            photo, angiogram = (f"{n}-{n}.jpg", f"{n}.jpg") if label == "normal" else (f"{n}.jpg", f"{n}-{n}.jpg")
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(data / label / photo)
            Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8)).save(data / label / angiogram)
    eyes = load_labelled(data)
    assert sorted(e.id for e in eyes) == ["abnormal/1", "abnormal/2", "normal/1", "normal/2"]
    generated = tmp_path / "synthetic"
    generated.mkdir()
    names = output_stems([e.images["source"] for e in eyes])
    made_from = {}
    for eye in eyes:
        path = generated / output_file(names[eye.images["source"]])
        path.write_bytes(b"")
        made_from[path] = eye.images["source"]
    assert attach_synthetic(eyes, generated) == []
    assert all(made_from[e.images["synthetic"]] == e.images["source"] for e in eyes)
    flat = tmp_path / "flat"  # 1.png: translate's name for abnormal/1.jpg; for normal/1 only its id's last part
    flat.mkdir()
    for n in (1, 2):
        (flat / f"{n}.png").write_bytes(b"")
    for eye in eyes:
        eye.images.pop("synthetic")
    missing = attach_synthetic(eyes, flat)
    assert missing == [f"normal/{n} (2 eyes' ids end in {n}: name the file normal/{n}.png)" for n in (1, 2)]
    assert [e.id for e in eyes if "synthetic" in e.images] == ["abnormal/1", "abnormal/2"]
