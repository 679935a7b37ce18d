"""The run-folder helper: run.json read / update, the train/test split rule, the newest complete checkpoint."""

import json
import os

import pytest

from ffasynth import run_folder
from ffasynth.errors import FFASynthError


def test_info_of_a_folder_without_run_json_is_one_clear_error(tmp_path):
    with pytest.raises(FFASynthError, match=r"is not an ffasynth run folder \(no run.json\)") as caught:
        run_folder.info(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


def test_update_info_keeps_other_keys_and_replaces_the_file_atomically(tmp_path, monkeypatch):
    assert run_folder.update_info(tmp_path, kind="stage2", data="/d") == {"kind": "stage2", "data": "/d"}
    updated = run_folder.update_info(tmp_path, data="/other", stage1_run="/runs/s1")
    assert updated == {"kind": "stage2", "data": "/other", "stage1_run": "/runs/s1"}
    assert run_folder.info(tmp_path) == updated

    # a write that fails half-way leaves the old run.json whole and no temporary file behind
    def broken(path, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        run_folder.update_info(tmp_path, decoder_psnr={"db": 1.0})
    assert json.loads((tmp_path / "run.json").read_text()) == updated
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


@pytest.mark.parametrize(
    ("folders", "split", "expected"),
    [
        (["train", "test"], "train", "train"),
        (["train", "test"], "test", "test"),
        (["train", "val"], "test", "val"),
        (["train", "valid"], "test", "valid"),
        (["train", "test", "val"], "test", "test"),  # test wins over val
        (["train"], "test", "train"),  # no held-out split: the training pairs
        ([], "train", "."),  # a folder of pairs without splits is all training data
        ([], "test", "."),
        (["test"], "train", "."),  # no train/: the folder itself, never the held-out split
    ],
)
def test_split_dir_rule(tmp_path, folders, split, expected):
    for name in folders:
        (tmp_path / name).mkdir()
    (tmp_path / "validation.txt").write_text("a file named like a split is not one")
    assert run_folder.split_dir(tmp_path, split) == (tmp_path if expected == "." else tmp_path / expected)


def test_split_dir_refuses_an_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split must be one of train, test"):
        run_folder.split_dir(tmp_path, "held-out")


def _checkpoint(run_dir, step, complete=True):
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)  # numeric order: step 10 is newer than step 9
    _checkpoint(tmp_path, 9)
    _checkpoint(tmp_path, 11, complete=False)  # killed before state.json: not loadable
    (tmp_path / "checkpoints" / ".step-000012.abc.tmp").mkdir()  # a save in progress
    (tmp_path / "checkpoints" / "step-000013").write_text("a file, not a checkpoint")
    assert run_folder.latest_checkpoint(tmp_path).name == "step-000010"
    assert [p.name for p in run_folder.complete_checkpoints(tmp_path)] == ["step-000002", "step-000009", "step-000010"]


@pytest.mark.parametrize("partial", [False, True])
def test_latest_checkpoint_of_a_run_without_one_is_one_clear_error(tmp_path, partial):
    if partial:
        _checkpoint(tmp_path, 1, complete=False)
    with pytest.raises(FFASynthError, match=r"has no complete checkpoint yet \(checkpoints/step-\*/state.json\)"):
        run_folder.latest_checkpoint(tmp_path)


def test_training_photos_are_recorded_by_content_and_gathered_along_a_runs_lineage(tmp_path):
    import hashlib

    photos = []
    for name, content in (("a.png", b"first eye"), ("b.png", b"second eye"), ("copy.png", b"first eye")):
        (tmp_path / name).write_bytes(content)
        photos.append(tmp_path / name)
    stage1, stage2, distill = (tmp_path / name for name in ("s1", "s2", "d"))
    for run in (stage1, stage2, distill):
        run.mkdir()
    run_folder.update_info(stage1, kind="stage1")
    run_folder.record_photos(stage1, photos[:2])
    digests = {hashlib.sha256(b"first eye").hexdigest(), hashlib.sha256(b"second eye").hexdigest()}
    assert run_folder.trained_photos(stage1) == digests
    run_folder.record_photos(stage2, photos[2:])  # a copy is the same photo: recognised by content, not name
    assert run_folder.trained_photos(stage2) == {hashlib.sha256(b"first eye").hexdigest()}
    run_folder.update_info(stage2, kind="stage2", stage1_run=str(stage1))
    (tmp_path / "c.png").write_bytes(b"third eye")
    run_folder.record_photos(stage2, [tmp_path / "c.png"])  # a resume on other data: the record is replaced
    run_folder.update_info(distill, kind="distill", teacher_run=str(stage2))  # records nothing itself
    assert run_folder.lineage_photos(distill) == digests | {hashlib.sha256(b"third eye").hexdigest()}
    assert run_folder.trained_photos(distill) is None
    empty = tmp_path / "old"
    empty.mkdir()
    run_folder.update_info(empty, kind="stage1")
    assert run_folder.lineage_photos(empty) is None  # a run from before the record
