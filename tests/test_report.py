"""Pairing real and generated images, the generic report writer, and `ffasynth evaluate` end to end."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.data.io import read_image, save_image
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import FFASynthError
from ffasynth.evaluation.metrics import EvalSettings, evaluate
from ffasynth.evaluation.outputs import write_evaluation
from ffasynth.evaluation.pairing import match
from ffasynth.evaluation.report import Cell, Report
from tests.fake_weights import write_torchvision

runner = CliRunner()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("href", "src") and value]


def assert_offline(folder: Path) -> list[str]:
    """Every href/src in report.html is an embedded data URI or a file inside the report folder."""
    parser = _Links()
    parser.feed((folder / "report.html").read_text())
    for link in parser.links:
        if link.startswith("data:"):
            continue
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc, f"external link {link}"
        target = (folder / unquote(parsed.path)).resolve()
        assert target.is_file() and target.is_relative_to(folder.resolve()), f"broken link {link}"
    return parser.links


@pytest.fixture(scope="module")
def uwf(tmp_path_factory):
    """A uwf folder (N.png photo, N.1/N.2.png FFA) at 48 px: 3 eyes."""
    return write_phantom_dataset(tmp_path_factory.mktemp("uwf"), n=3, size=48, seed=2)


def test_pairing_by_name_survives_extensions_suffix_and_missing_partners(uwf, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copyfile(uwf / "1.1.png", fake / "1.1_ffa.png")
    save_image(read_image(uwf / "1.2.png"), fake / "1.2.jpg")
    save_image(read_image(uwf / "2.1.png"), fake / "2.1.bmp")
    save_image(read_image(uwf / "2.1.png"), fake / "9.1_ffa.png")  # no real partner
    save_image(torch.zeros(1, 48, 48), fake / "2.1_uncertainty.png")  # a translate side output
    pairing = match(uwf, fake)
    assert pairing.mode == "name"
    assert {p.key: p.fake.name for p in pairing.pairs} == {"1.1": "1.1_ffa.png", "1.2": "1.2.jpg", "2.1": "2.1.bmp"}
    assert all(p.source == uwf / f"{p.key.split('.')[0]}.png" for p in pairing.pairs)  # N.png is the source of N.k
    # the same folder named as the sources (what quickstart does): still the photos, never the angiogram itself
    assert all(p.source == uwf / f"{p.key.split('.')[0]}.png" for p in match(uwf, fake, source_dir=uwf).pairs)
    assert pairing.missing_fake == ["2.2", "3.1", "3.2"] and pairing.unmatched_fake == ["9.1"]
    assert "3 pairs" in pairing.summary()


def test_pairing_by_photo_id_and_by_manifest(uwf, tmp_path):
    by_photo = tmp_path / "by_photo"
    by_photo.mkdir()
    shutil.copyfile(uwf / "3.1.png", by_photo / "3_ffa.png")  # generated from the photo 3.png
    pairing = match(uwf, by_photo, "name")
    assert sorted(p.key for p in pairing.pairs) == ["3.1", "3.2"] and pairing.notes
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    shutil.copyfile(uwf / "2.2.png", manifest / "anything.png")
    (manifest / "pairs.csv").write_text(f"real,fake\n{uwf / '2.2.png'},anything.png\n{uwf / '1.1.png'},gone.png\n")
    pairing = match(uwf, manifest)  # auto picks the manifest
    assert pairing.mode == "manifest" and [(p.key, p.fake.name) for p in pairing.pairs] == [("2.2", "anything.png")]
    assert any("gone.png" in note for note in pairing.notes) and "1.1" in pairing.missing_fake
    with pytest.raises(FFASynthError, match="pairs.csv"):
        match(uwf, by_photo, "manifest")


def test_generic_report_marks_best_and_works_offline(uwf, tmp_path):
    figure = tmp_path / "roc.bmp"  # a format browsers may not show: converted to PNG
    save_image(read_image(uwf / "1.png"), figure)
    report = Report("Clinical experiment", intro="Cross-validated.")
    report.add_table(
        "Scores",
        ["mode", "AUC ↑", "loss ↓"],
        [
            ["real", Cell(0.9, "0.90 ± 0.02"), 0.3],
            ["synthetic", Cell(0.8, "0.80 ± 0.05"), 0.2],
            ["none", "-", math.nan],
        ],
        best={"AUC ↑": "max", "loss ↓": "min"},
        note="mean ± std over 5 folds",
    )
    report.add_figures("Curves", [("ROC <fold 1>", figure)])
    report.add_grid(
        "Examples", ["source", "real"], [("1.1", [uwf / "1.png", uwf / "1.1.png"]), ("2.1", [None, uwf / "2.1.png"])]
    )
    report.add_text("Notes", "first paragraph\n\nsecond & last")
    paths = report.write(tmp_path / "out")
    html = paths["html"].read_text()
    assert "<td class='best'>0.90 ± 0.02 ★</td>" in html and "<td class='best'>0.2 ★</td>" in html
    assert "ROC &lt;fold 1&gt;" in html and "second &amp; last" in html and "<script" not in html
    links = assert_offline(tmp_path / "out")
    assert sum(link.endswith(".png") for link in links) == 2 * 4  # figure + 3 grid images, each thumb + full size
    assert not any(link.endswith(".bmp") for link in links)
    markdown = paths["markdown"].read_text()
    assert "| real | **0.90 ± 0.02** | 0.3 |" in markdown and "| synthetic | 0.80 ± 0.05 | **0.2** |" in markdown
    with pytest.raises(ValueError, match="best"):
        Report("x").add_table("t", ["a"], [[1]], best={"b": "max"})


@pytest.fixture(scope="module")
def two_methods(uwf, tmp_path_factory):
    """'copy' = the real FFA as <key>_ffa.png; 'noisy' = noisy copies, one missing."""
    root = tmp_path_factory.mktemp("methods")
    for name, sigma in (("copy", 0.0), ("noisy", 0.1)):
        (root / name).mkdir()
        for index, path in enumerate(sorted(uwf.glob("*.*.png"))):
            if name == "noisy" and index == 0:
                continue
            image = read_image(path)
            image = (image + sigma * torch.randn(image.shape, generator=torch.Generator().manual_seed(index))).clamp(
                0, 1
            )
            save_image(image, root / name / f"{path.stem}_ffa.png")
    return root


def test_write_evaluation_two_methods(uwf, two_methods, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    write_torchvision(weights, "alexnet")  # LPIPS runs; the Inception file is missing → FID/KID skipped
    fakes = {"copy": two_methods / "copy", "noisy": two_methods / "noisy"}
    evaluation = evaluate(uwf, fakes, EvalSettings(weights_dir=str(weights), fov_mask=False))
    paths = write_evaluation(evaluation, tmp_path / "report")
    data = json.loads(paths["metrics.json"].read_text())
    assert data["methods"]["copy"]["summary"]["psnr"]["mean"] == "inf"  # JSON has no infinity
    assert data["methods"]["noisy"]["pairing"]["missing_fake"] == ["1.1"]
    assert set(data["skipped"]) == {"fid", "kid"} and "weights-inception" in data["skipped"]["fid"]
    assert data["software"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert data["config"]["fov_mask"] is False
    with paths["metrics.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 + 5 and {r["method"] for r in rows} == {"copy", "noisy"}
    assert all(r["psnr"] == "inf" for r in rows if r["method"] == "copy")
    links = assert_offline(tmp_path / "report")
    # 6 rows x (source, real, 2 methods x (generated, difference)) and 6 rows x (real regions, 2 methods x
    # (vessels, regions)), each less noisy's missing 1.1; thumb + full size
    assert len(links) == 2 * ((6 * 6 - 2) + (6 * 5 - 2))
    summary = paths["summary.md"].read_text()
    assert "| **inf** | **1 ± 0** |" in summary.split("| copy | 6 | ")[1].splitlines()[0]
    html = paths["report.html"].read_text()
    assert "FID, KID: FID/KID (torch-fidelity Inception-v3) needs weights-inception" in html
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    with pytest.raises(FFASynthError, match="not an earlier ffasynth report"):
        write_evaluation(evaluation, tmp_path / "other")
    write_evaluation(evaluation, tmp_path / "report")  # an earlier report is replaced


def test_cli_evaluate_reports_skips_in_one_line(uwf, two_methods, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--real",
            str(uwf),
            "--fake",
            f"noisy={two_methods / 'noisy'}",
            "--out",
            str(out),
            "--weights-dir",
            str(tmp_path / "none"),
            "--metrics",
            "psnr,ssim,lpips,fid",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "skipped lpips: LPIPS-Alex (torchvision AlexNet) needs alexnet-owt-7be5be79.pth" in result.output
    assert "skipped fid: " in result.output and (out / "report.html").is_file()
    assert "1 real without generated" in result.output
    result = runner.invoke(app, ["evaluate", "--real", str(uwf), "--fake", str(tmp_path / "nope"), "--out", str(out)])
    assert result.exit_code != 0 and "is not a folder" in str(result.exception)


def test_each_pair_gets_its_own_image_folder_whatever_its_name():
    """Keys that differ only in characters a folder name drops (`Müller_OD`, `Möller_OD`) wrote into one
    folder, so the second row's images replaced the first's and both rows showed the same eye."""
    from ffasynth.evaluation.outputs import _file_name

    keys = ["Müller_OD", "Möller_OD", "M_ller_OD", "train/7", "train_7", "a b", "a  b", "7.1", "sub/7.1"]
    names = [_file_name(key) for key in keys]
    assert len(set(names)) == len(keys), names
    assert _file_name("7.1") == "7.1" and _file_name("M_ller_OD") == "M_ller_OD"  # plain keys keep their name
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)


def test_a_zero_spread_left_as_float_round_off_is_shown_as_zero():
    """KID's std over subsets that all hold every image is 0 by design; it showed as ± 3.4e-16."""
    from types import SimpleNamespace

    from ffasynth.evaluation.outputs import summary_table

    method = SimpleNamespace(
        name="m", per_image=[{}], summary={"psnr": {"mean": 20.0, "std": 1e-15}},
        distribution={"kid": -0.0003519, "kid_std": 3.4e-16}, n_features={"real": 6, "fake": 6},
    )  # fmt: skip
    evaluation = SimpleNamespace(methods=[method], settings=SimpleNamespace(metrics=("psnr", "kid")), skipped={})
    _, rows, _ = summary_table(evaluation)
    assert [cell.text for cell in rows[0][2:4]] == ["20 ± 0", "-0.0003519 ± 0"]
