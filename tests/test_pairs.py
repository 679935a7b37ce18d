"""Pair discovery and `check_pairs`: layouts, labels, and every planted problem reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffasynth.config import load_config
from ffasynth.data.pair_check import check_pairs, load_pairs
from ffasynth.data.pairs import LAYOUTS, detect_layout, discover_pairs
from ffasynth.errors import ConfigError, PairError


def _write(path, size=(40, 30), colour=True, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    if colour:
        data = np.stack([np.full((h, w), value), rng.integers(0, 80, (h, w)), np.full((h, w), 4)], -1)
    else:
        data = np.repeat(rng.integers(0, 255, (h, w, 1)), 3, -1)
    Image.fromarray(data.astype(np.uint8)).save(path)


def test_real_uwf_folder_has_seven_sources_each_with_both_phases(shared_data):
    report = check_pairs(shared_data / "uwf-slo-ffa")
    assert report.layout == "uwf"
    assert report.problems == []
    assert len(report.sources) == 7
    phases = {}
    for pair in report.pairs:
        phases.setdefault(pair.id, set()).add(pair.phase)
    assert sorted(phases) == sorted(["train/1", "train/2", "train/3", "train/4", "test/7", "test/8", "test/10"])
    assert all(p == {"early", "late"} for p in phases.values())
    assert report.summary().startswith("14 pairs ok, 0 problems")


def test_planted_problems_are_each_reported(tmp_path):
    _write(tmp_path / "1.bmp")
    _write(tmp_path / "1.1.bmp", colour=False)
    _write(tmp_path / "1.2.bmp", colour=False)
    _write(tmp_path / "2.bmp")  # unpaired source
    _write(tmp_path / "3.1.bmp", colour=False)  # unpaired target
    _write(tmp_path / "4.bmp")
    _write(tmp_path / "4.1.bmp", size=(41, 30), colour=False)  # size mismatch
    _write(tmp_path / "5.bmp")
    (tmp_path / "5.1.bmp").write_bytes(b"")  # unreadable target
    _write(tmp_path / "6.bmp")
    _write(tmp_path / "6.1.bmp", colour=True)  # colour where an FFA is expected
    (tmp_path / "notes.txt").write_text("ignored: not an image")

    report = check_pairs(tmp_path)
    assert [(p.id, p.phase) for p in report.pairs] == [("1", "early"), ("1", "late")]
    kinds = {(problem.kind, problem.path.rsplit("/", 1)[-1]) for problem in report.problems}
    assert kinds == {
        ("unpaired-source", "2.bmp"),
        ("unpaired-target", "3.1.bmp"),
        ("size-mismatch", "4.1.bmp"),
        ("unreadable", "5.1.bmp"),
        ("colour-target", "6.1.bmp"),
    }
    assert report.summary().startswith("2 pairs ok, 5 problems")
    assert report.to_json()["n_pairs"] == 2


def test_truncated_file_found_only_when_decoding(tmp_path):
    _write(tmp_path / "1.png")
    _write(tmp_path / "1.1.png", colour=False)
    data = (tmp_path / "1.1.png").read_bytes()
    (tmp_path / "1.1.png").write_bytes(data[: len(data) // 2])
    assert [p.kind for p in check_pairs(tmp_path).problems] == ["unreadable"]
    assert check_pairs(tmp_path, decode=False).problems == []


def test_labels_csv_attaches_labels(phantom_dir):
    pairs = load_pairs(phantom_dir, phase="early")
    assert len(pairs) == 10 and all(p.phase == "early" for p in pairs)
    labels = dict(line.split(",")[:2] for line in (phantom_dir / "labels.csv").read_text().splitlines()[1:])
    assert all(p.label == labels[p.id] for p in pairs)


def test_manifest_layout_with_missing_file(tmp_path):
    _write(tmp_path / "imgs" / "a.png")
    _write(tmp_path / "imgs" / "a_ffa.png", colour=False)
    (tmp_path / "pairs.csv").write_text(
        "source,target,phase,label\nimgs/a.png,imgs/a_ffa.png,late,brvo\nimgs/b.png,imgs/b_ffa.png,,\n"
    )
    report = check_pairs(tmp_path)
    assert report.layout == "manifest"
    assert [(p.id, p.phase, p.label) for p in report.pairs] == [("imgs/a", "late", "brvo")]
    assert sorted(p.kind for p in report.problems) == ["missing-file", "missing-file"]


def test_manifest_without_required_columns_is_refused(tmp_path):
    (tmp_path / "pairs.csv").write_text("photo,angio\na.png,b.png\n")
    with pytest.raises(PairError, match="source,target"):
        check_pairs(tmp_path)


def test_isfahan_roles_follow_content_and_folder_gives_label(tmp_path):
    # abnormal/: plain file is the photo; normal/: the dashed one is the photo (roles swapped)
    _write(tmp_path / "abnormal" / "1.jpg", colour=True)
    _write(tmp_path / "abnormal" / "1-1.jpg", colour=False)
    _write(tmp_path / "normal" / "2-2.jpg", colour=True)
    _write(tmp_path / "normal" / "2.jpg", colour=False)
    _write(tmp_path / "normal" / "3.jpg", colour=True)  # content contradicts the convention
    _write(tmp_path / "normal" / "3-3.jpg", colour=False)
    assert detect_layout(tmp_path) == "isfahan"
    layout, pairs, problems = discover_pairs(tmp_path)
    assert problems == []
    roles = {p.id: (p.source.name, p.target.name, p.label) for p in pairs}
    assert roles == {
        "abnormal/1": ("1.jpg", "1-1.jpg", "abnormal"),
        "normal/2": ("2-2.jpg", "2.jpg", "normal"),
        "normal/3": ("3.jpg", "3-3.jpg", "normal"),
    }


def test_unknown_layout_and_empty_folder_errors(tmp_path):
    _write(tmp_path / "photo.png")
    with pytest.raises(PairError, match="no known pair layout"):
        detect_layout(tmp_path)
    with pytest.raises(PairError, match="no such folder"):
        check_pairs(tmp_path / "nope")
    _write(tmp_path / "7.png")
    _write(tmp_path / "7.1.png", size=(10, 10), colour=False)
    with pytest.raises(PairError, match="no usable pairs"):
        load_pairs(tmp_path)


def test_named_layout_one_pair_per_folder(tmp_path):
    root = tmp_path / "eyes"
    _write(root / "cfp.jpg")
    _write(root / "ffa.jpg", colour=False)
    _write(root / "left" / "cfp.png")
    _write(root / "left" / "FFA.png", colour=False)
    _write(root / "right" / "cfp.jpg")  # no angiogram beside it
    assert detect_layout(root) == "named"
    layout, pairs, problems = discover_pairs(root)
    assert layout == "named"
    assert [(p.id, p.source.name, p.target.name) for p in pairs] == [
        ("eyes", "cfp.jpg", "ffa.jpg"),
        ("left", "cfp.png", "FFA.png"),
    ]
    assert [(p.kind, p.path.rsplit("/", 2)[-2]) for p in problems] == [("unpaired-source", "right")]

    _write(root / "other" / "photo.png")
    _write(root / "other" / "angio.png", colour=False)
    _, pairs, _ = discover_pairs(root, "named", names=("photo", "angio"))
    assert [p.id for p in pairs] == ["other"]
    with pytest.raises(PairError, match="must differ"):
        discover_pairs(root, "named", names=("ffa", "FFA"))


def test_data_layout_named_is_accepted_by_the_config_and_chooses_the_named_layout(tmp_path):
    _write(tmp_path / "7.png")  # a uwf pair at the root: "auto" would find the uwf layout
    _write(tmp_path / "7.1.png", colour=False)
    _write(tmp_path / "left" / "cfp.png")
    _write(tmp_path / "left" / "ffa.png", colour=False)
    assert [p.id for p in load_pairs(tmp_path, load_config().data.layout)] == ["7"]
    config = load_config(overrides=["data.layout=named"])
    assert [p.id for p in load_pairs(tmp_path, config.data.layout, config.data.phase)] == ["left"]


def test_the_config_accepts_exactly_auto_and_the_pair_layouts():
    for layout in ("auto", *LAYOUTS):
        assert load_config(overrides=[f"data.layout={layout}"]).data.layout == layout
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=["data.layout=zigzag"])
    assert str(refused.value) == f"config value data.layout='zigzag' is not one of {['auto', *LAYOUTS]}"


def test_underscore_and_hidden_folders_are_not_data(tmp_path):
    _write(tmp_path / "1.png")
    _write(tmp_path / "1.1.png", colour=False)
    _write(tmp_path / "_checkerboards" / "1.png")  # quality-control images
    _write(tmp_path / ".aligned.x.tmp" / "2.png")  # a temporary folder a kill left behind
    report = check_pairs(tmp_path)
    assert [p.id for p in report.pairs] == ["1"] and report.problems == []


def test_files_claiming_one_id_are_reported_as_ambiguous_and_paired_with_nothing(tmp_path):
    """`3.bmp` and `3.png` are both eye 3's photo: which one is meant is the user's call, never a silent pick."""
    uwf = tmp_path / "uwf"
    for name in ("3.bmp", "3.png", "4.png"):
        _write(uwf / name)
    for name in ("3.1.png", "4.1.png", "4.1.bmp", "4.2.png"):
        _write(uwf / name, colour=False)
    report = check_pairs(uwf, decode=False)
    assert [(p.id, p.phase) for p in report.pairs] == [("4", "late")]  # 4's early angiogram is ambiguous
    ambiguous = sorted(Path(p.path).name for p in report.problems if p.kind == "ambiguous")
    assert ambiguous == ["3.bmp", "3.png", "4.1.bmp", "4.1.png"]
    assert not [p for p in report.problems if p.kind.startswith("unpaired")]  # 3 is not also "unpaired"

    isfahan = tmp_path / "isfahan" / "normal"
    _write(isfahan / "1.jpg", colour=False)
    _write(isfahan / "1.png", colour=False)
    _write(isfahan / "1-1.jpg")
    report = check_pairs(tmp_path / "isfahan", layout="isfahan", decode=False)
    assert report.pairs == [] and sorted(Path(p.path).name for p in report.problems) == ["1.jpg", "1.png"]


def test_a_manifest_id_names_one_photo_and_one_angiogram_per_phase(tmp_path):
    for name in ("eye1.png", "eye1.jpg", "eye2.png"):
        _write(tmp_path / name)
    for name in ("f1.png", "f2.png", "f3.png", "f4.png"):
        _write(tmp_path / name, colour=False)
    (tmp_path / "pairs.csv").write_text(
        "source,target,phase\n"
        "eye1.png,f1.png,early\n"
        "eye1.jpg,f2.png,late\n"  # another photo under the derived id eye1: outputs would overwrite each other
        "eye2.png,f3.png,EARLY\n"
        "eye2.png,f4.png,2\n"
        "eye2.png,f4.png,late\n"  # eye2's late angiogram twice
    )
    report = check_pairs(tmp_path, decode=False)
    assert [(p.id, p.phase) for p in report.pairs] == [("eye1", "early"), ("eye2", "early"), ("eye2", "late")]
    lines = sorted((p.path.rsplit(":", 1)[1], p.message) for p in report.problems)
    assert [line for line, _ in lines] == ["3", "6"]
    assert "another photo" in lines[0][1] and "another late angiogram" in lines[1][1]


@pytest.mark.parametrize("phase", ["venous", "3", "lat"])
def test_a_manifest_phase_outside_early_late_is_reported_not_read_as_early(tmp_path, phase):
    _write(tmp_path / "a.png")
    _write(tmp_path / "b.png", colour=False)
    (tmp_path / "pairs.csv").write_text(f"source,target,phase\na.png,b.png,{phase}\n")
    report = check_pairs(tmp_path, decode=False)
    assert report.pairs == [] and [p.kind for p in report.problems] == ["manifest"]
    assert f"phase {phase!r}" in report.problems[0].message


def test_spreadsheet_csvs_with_a_bom_an_extra_field_or_a_missing_label_are_read(tmp_path):
    _write(tmp_path / "a.png")
    _write(tmp_path / "b.png", colour=False)
    (tmp_path / "pairs.csv").write_text("\ufeffsource,target,label\na.png,b.png,dr,extra\n", encoding="utf-8")
    report = check_pairs(tmp_path, decode=False)
    assert [(p.id, p.label) for p in report.pairs] == [("a", "dr")] and report.problems == []

    uwf = tmp_path / "uwf"
    _write(uwf / "1.png")
    _write(uwf / "1.1.png", colour=False)
    _write(uwf / "2.png")
    _write(uwf / "2.1.png", colour=False)
    (uwf / "labels.csv").write_text("\ufeffid,label\n1\n2,brvo,extra\n", encoding="utf-8")
    assert [(p.id, p.label) for p in check_pairs(uwf, decode=False).pairs] == [("1", None), ("2", "brvo")]


def test_a_manifest_id_that_would_lead_out_of_an_output_folder_is_refused(tmp_path):
    """`data register` writes OUT/<id>.png: an absolute id (or one with '..') wrote outside OUT, over other files."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for name in ("eye1.png", "eye2.png", "eye3.png"):
        _write(data / name)
    _write(elsewhere / "eye4.png")
    for name in ("f1.png", "f2.png", "f3.png", "f4.png"):
        _write(data / name, colour=False)
    (data / "pairs.csv").write_text(
        "source,target,id\n"
        f"eye1.png,f1.png,{elsewhere / 'scan'}\n"
        "eye2.png,f2.png,../scan\n"
        "eye3.png,f3.png,left/eye3\n"  # a relative id with folders stays allowed
        f"{elsewhere / 'eye4.png'},f4.png,\n"  # no id: the photo's name, as it lies outside the manifest's folder
    )
    report = check_pairs(data, decode=False)
    assert [p.id for p in report.pairs] == ["left/eye3", "eye4"]
    assert [p.path.rsplit(":", 1)[1] for p in report.problems] == ["2", "3"]
    assert all("relative name without '..'" in p.message for p in report.problems)


def test_an_unreadable_sub_folder_is_named_not_skipped_and_digits_other_than_1_and_2_are_not_phases(
    tmp_path, monkeypatch
):
    import os

    for name in ("1.png", "2.png", "sub/3.png", "linked/4.png"):
        _write(tmp_path / "data" / name)
    for name in ("1.1.png", "2.3.png", "sub/3.1.png", "linked/4.2.png"):
        _write(tmp_path / "data" / name, colour=False)
    (tmp_path / "data" / "linked").rename(tmp_path / "outside")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "outside")  # a linked folder is read, as rglob read it
    report = check_pairs(tmp_path / "data", decode=False)
    assert [(p.id, p.phase) for p in report.pairs] == [("1", "early"), ("linked/4", "late"), ("sub/3", "early")]
    digit = [p for p in report.problems if p.kind == "unrecognised-name"]
    assert [Path(p.path).name for p in digit] == ["2.3.png"] and "phase digit 3" in digit[0].message

    scandir = os.scandir

    def refused(path="."):  # a folder this user may not list (root may list anything, so it is simulated)
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(PairError, match=r"sub: cannot list this folder \(Permission denied\)"):
        check_pairs(tmp_path / "data", decode=False)


def test_check_reports_a_repeated_image_and_12_bit_data_and_keeps_the_pairs(tmp_path):
    data = tmp_path / "data"
    for split, number in (("train", 1), ("train", 2), ("test", 3)):
        _write(data / split / f"{number}.png", size=(40, 40), value=60 + number)
        _write(data / split / f"{number}.1.png", size=(40, 40), colour=False)
    (data / "test" / "3.png").write_bytes((data / "train" / "1.png").read_bytes())  # a training eye among the test
    twelve = (np.arange(40 * 40).reshape(40, 40) % 4096).astype(np.uint16)  # 12-bit levels in a 16-bit file
    Image.fromarray(twelve).save(data / "train" / "1.1.png")
    report = check_pairs(data)
    assert [p.id for p in report.pairs] == ["test/3", "train/1", "train/2"]  # kept: the data may be meant so
    found = {(p.kind, Path(p.path).relative_to(data).as_posix(), p.kept) for p in report.problems}
    assert found == {("duplicate", "train/1.png", True), ("low-bit", "train/1.1.png", True)}
    assert "test/3.png" in next(p.message for p in report.problems if p.kind == "duplicate")
    assert check_pairs(data, decode=False).problems == []  # headers only: neither is read
