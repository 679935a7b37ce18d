"""Output paths a user can get wrong, through every verb that writes (issue 22, item 2): `--out` naming
an existing file, a folder nobody may write in, a folder on a full disk, or a folder whose outputs
could land on the inputs; and two inputs whose outputs would share a name.

Each case is handled when: one line names the path with the cause, no traceback, exit code 2, the
inputs are byte-identical afterwards, and nothing half-written is left (outputs complete or absent,
no *.tmp). The CLI cases are marked `corpus` and count in the bad-input tally (conftest.py).

Writing is refused by the kernel only to other users than root; under root (as in CI containers)
the temporary-file calls into the locked folder are refused the same way (`locked` below). A full disk
is an ENOSPC from the atomic writer's fsync, after the file's bytes were written."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from ffasynth import files
from ffasynth.translate import output_names
from tests.corpus import (
    HEIGHT,
    WIDTH,
    cli,
    complete_png,
    exit_problem,
    line_problem,
    no_partial_files,
    write_ffa,
    write_photo,
)
from tests.helpers import MICRO, micro_pipeline

corpus = pytest.mark.corpus
STAGE1 = ["--preset", "tiny", "--max-steps", "1", "--quiet", *MICRO, "data.crop_size=32", "stage1.batch_size=1"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    micro_pipeline("data.crop_size=32").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from ffasynth.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("pairs") / "pairs", n=2, size=40, seed=1)


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots` (or of each root that is a file)."""
    found = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def refused(run, path, words: str) -> str | None:
    """None when the run stopped (exit 2) with one line naming `path` and saying `words`."""
    return line_problem(run.output, str(path), words) or exit_problem(run, 2)


def photos(folder: Path, *names: str) -> list[Path]:
    return [write_photo(folder / name, seed=index) for index, name in enumerate(names, start=1)]


# ---- --out names an existing file: every writing verb refuses it and leaves it as it was


def _verbs_with_out(tmp: Path, pipeline_dir: Path, pairs: Path, out: Path) -> dict[str, list]:
    photo = write_photo(tmp / "in" / "a.png")
    (tmp / "fake").mkdir(exist_ok=True)
    return {
        "translate": ["translate", pipeline_dir, photo, "--out", out, "--quiet"],
        "evaluate": ["evaluate", "--real", pairs, "--fake", tmp / "fake", "--out", out],
        "clinical": ["clinical", "--data", pairs, "--out", out],
        "data-phantom": ["data", "phantom", out, "--n", "1", "--size", "32"],
        "data-register": ["data", "register", pairs, "--out", out],
        "baseline-translate": ["baseline", "translate", tmp / "p2p-run", photo, "--out", out],
        "train-stage1": ["train", "stage1", "--data", pairs, "--out", out, *STAGE1],
        "quickstart": ["quickstart", "--out", out, "--minutes", "1"],
        "export": ["export", tmp / "run", out],
    }


@corpus
@pytest.mark.parametrize(
    "verb",
    ["translate", "evaluate", "clinical", "data-phantom", "data-register", "baseline-translate", "train-stage1",
     "quickstart", "export"],
)  # fmt: skip
def test_out_is_an_existing_file(verb, pipeline_dir, pairs, tmp_path):
    out = tmp_path / "thesis.tex"
    out.write_text("precious")
    before = snapshot(out, pairs)
    run = cli(*_verbs_with_out(tmp_path, pipeline_dir, pairs, out)[verb])
    problem = refused(run, out, "is a file") or no_partial_files(tmp_path)
    assert not problem, problem
    assert snapshot(out, pairs) == before


@corpus
def test_data_check_json_names_a_folder_or_an_input(pairs, tmp_path):
    before = snapshot(pairs)
    folder = cli("data", "check", pairs, "--json", tmp_path)
    image = cli("data", "check", pairs, "--json", pairs / "1.png")
    problem = refused(folder, tmp_path, "is a folder") or refused(image, pairs / "1.png", "not a .json file")
    assert not problem, problem
    assert snapshot(pairs) == before
    index = tmp_path / "pipeline" / "model_index.json"  # another tool's JSON: never replaced by a report
    index.parent.mkdir()
    index.write_text('{"_class_name": "FFASynthesisPipeline"}')
    other = cli("data", "check", pairs, "--json", index)
    assert not refused(other, index, "not an earlier `data check` report"), other.output
    assert index.read_text() == '{"_class_name": "FFASynthesisPipeline"}'
    report = tmp_path / "report.json"
    for _ in range(2):  # an earlier report is replaced
        assert cli("data", "check", pairs, "--json", report).exit_code == 0


@corpus
def test_out_below_a_file(pipeline_dir, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    run = cli("translate", pipeline_dir, write_photo(tmp_path / "a.png"), "--out", blocker / "out", "--quiet")
    problem = refused(run, blocker, "is a file, not a folder")
    assert not problem, problem
    assert blocker.read_text() == "not a folder"


# ---- a folder nobody may write in


@pytest.fixture
def locked(tmp_path, monkeypatch) -> Path:
    """A folder without write permission. Root may write anyway, so for root the temporary-file calls
    into it fail as the kernel fails them for another user (EACCES)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

        def check(where):
            if where is not None and Path(where).resolve().is_relative_to(folder.resolve()):
                raise PermissionError(errno.EACCES, "Permission denied", str(where))

        def mkstemp(*args, dir=None, **kwargs):
            check(dir)
            return real_mkstemp(*args, dir=dir, **kwargs)

        def mkdtemp(*args, dir=None, **kwargs):
            check(dir)
            return real_mkdtemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    yield folder
    folder.chmod(0o755)


@corpus
@pytest.mark.parametrize("verb", ["translate", "evaluate", "data-phantom", "train-stage1", "clinical"])
def test_out_in_a_folder_without_write_permission(verb, locked, pipeline_dir, pairs, tmp_path):
    out = locked / "out"
    before = snapshot(pairs)
    run = cli(*_verbs_with_out(tmp_path, pipeline_dir, pairs, out)[verb])
    problem = refused(run, out, "no permission")
    assert not problem, problem
    assert list(locked.iterdir()) == [] and snapshot(pairs) == before


@corpus
def test_a_report_in_a_folder_without_write_permission_names_that_folder(locked, pairs):
    run = cli("data", "check", pairs, "--json", locked / "a.json")
    problem = refused(run, locked / "a.json", f"no permission to write in {locked}".lower())
    assert not problem, problem
    assert list(locked.iterdir()) == []


# ---- a full disk: the write in progress is removed, the ones before it are whole, one line says so


@pytest.fixture
def disk_full_after(monkeypatch):
    """disk_full_after(n): the atomic writer's fsync fails with ENOSPC once n files were written whole."""

    def arm(whole: int) -> None:
        real = os.fsync
        done = []

        def fsync(fd):
            if len(done) >= whole:
                raise OSError(errno.ENOSPC, "No space left on device")
            done.append(fd)
            real(fd)

        monkeypatch.setattr(files.os, "fsync", fsync)

    return arm


@corpus
def test_translate_on_a_full_disk(pipeline_dir, disk_full_after, tmp_path):
    inputs, out = tmp_path / "photos", tmp_path / "out"
    photos(inputs, "a.png", "b.png", "c.png")
    before = snapshot(inputs)
    disk_full_after(1)
    run = cli("translate", pipeline_dir, inputs, "--out", out, "--steps", "1", "--quiet")
    problem = refused(run, out / "b_ffa.png", "disk is full") or no_partial_files(out)
    problem = problem or complete_png(out / "a_ffa.png", (WIDTH, HEIGHT))
    assert not problem, problem
    assert sorted(p.name for p in out.iterdir()) == ["a_ffa.png"]  # c was not tried after b failed
    assert snapshot(inputs) == before


@corpus
def test_translate_on_a_full_disk_leaves_no_empty_folder(pipeline_dir, disk_full_after, tmp_path):
    disk_full_after(0)
    out = tmp_path / "new" / "out"
    run = cli("translate", pipeline_dir, write_photo(tmp_path / "a.png"), "--out", out, "--steps", "1", "--quiet")
    problem = refused(run, out / "a_ffa.png", "disk is full")
    assert not problem, problem
    assert not (tmp_path / "new").exists()


@corpus
def test_evaluate_on_a_full_disk(disk_full_after, tmp_path):
    real, fake, out = tmp_path / "real", tmp_path / "fake", tmp_path / "report"
    for name in ("1.png", "2.png"):
        write_ffa(real / name, seed=1)
        write_ffa(fake / name, seed=2)
    before = snapshot(real, fake)
    disk_full_after(0)
    run = cli("evaluate", "--real", real, "--fake", fake, "--out", out, "--metrics", "psnr")
    problem = refused(run, out, "disk is full") or no_partial_files(tmp_path)
    assert not problem, problem
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert snapshot(real, fake) == before


@corpus
def test_data_phantom_on_a_full_disk(disk_full_after, tmp_path):
    out = tmp_path / "phantom"
    disk_full_after(1)  # eye 1's photo
    run = cli("data", "phantom", out, "--n", "2", "--size", "32")
    problem = refused(run, out / "1.1.png", "disk is full") or no_partial_files(tmp_path)
    assert not problem, problem
    assert list(tmp_path.iterdir()) == []  # drawn beside OUT and renamed at the end: no partial set left


@corpus
def test_data_check_json_on_a_full_disk(pairs, disk_full_after, tmp_path):
    disk_full_after(0)
    run = cli("data", "check", pairs, "--json", tmp_path / "report.json")
    problem = refused(run, tmp_path / "report.json", "disk is full") or no_partial_files(tmp_path)
    assert not problem, problem
    assert not (tmp_path / "report.json").exists()


@corpus
def test_train_on_a_full_disk(pairs, disk_full_after, tmp_path):
    disk_full_after(0)
    out = tmp_path / "run"
    run = cli("train", "stage1", "--data", pairs, "--out", out, *STAGE1)
    problem = refused(run, out / "config.yaml", "disk is full") or no_partial_files(tmp_path)
    assert not problem, problem
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


# ---- outputs that could land on the inputs


@corpus
@pytest.mark.parametrize("given", ["folder", "file"])
def test_translate_into_the_input_folder(given, pipeline_dir, tmp_path):
    inputs = tmp_path / "photos"
    photos(inputs, "a.png", "a_ffa.png")  # an input named like a.png's output
    before = snapshot(inputs)
    source = inputs if given == "folder" else inputs / "a.png"
    run = cli("translate", pipeline_dir, source, "--out", inputs, "--quiet")
    problem = refused(run, inputs, "among the inputs")
    assert not problem, problem
    assert snapshot(inputs) == before


@corpus
def test_translate_replaces_earlier_outputs_only_when_asked(pipeline_dir, tmp_path):
    """A second run into the same --out (another model, other settings) would replace the first's results, or
    the user's own file of that name, without a word: it is refused unless --overwrite says so."""
    inputs, out = tmp_path / "photos", tmp_path / "out"
    photos(inputs, "a.png", "b.png")
    out.mkdir()
    (out / "b_ffa.png").write_bytes(b"mine")
    run = cli("translate", pipeline_dir, inputs, "--out", out, "--quiet")
    problem = refused(run, out, "already holds b_ffa.png; pass --overwrite")
    assert not problem, problem
    assert sorted(p.name for p in out.iterdir()) == ["b_ffa.png"] and (out / "b_ffa.png").read_bytes() == b"mine"
    again = cli("translate", pipeline_dir, inputs, "--out", out, "--quiet", "--overwrite")
    assert again.exit_code == 0, again.output
    assert not complete_png(out / "b_ffa.png", (WIDTH, HEIGHT)) and not complete_png(out / "a_ffa.png", (WIDTH, HEIGHT))
    baseline = cli("baseline", "translate", tmp_path / "no-run", inputs, "--out", out)  # checked before the run
    problem = refused(baseline, out, "already holds a_ffa.png and 1 more; pass --overwrite")
    assert not problem, problem


@corpus
def test_translate_into_the_pipeline_folder(pipeline_dir, tmp_path):
    before = snapshot(pipeline_dir)
    run = cli("translate", pipeline_dir, write_photo(tmp_path / "a.png"), "--out", pipeline_dir, "--quiet")
    problem = refused(run, pipeline_dir, "input folder")
    assert not problem, problem
    assert snapshot(pipeline_dir) == before


@corpus
def test_baseline_translate_into_the_input_folder(tmp_path):
    inputs = tmp_path / "photos"
    photos(inputs, "a.png")
    before = snapshot(inputs)
    run = cli("baseline", "translate", tmp_path / "p2p-run", inputs, "--out", inputs)
    problem = refused(run, inputs, "among the inputs")
    assert not problem, problem
    assert snapshot(inputs) == before


@corpus
@pytest.mark.parametrize("where", ["real", "fake", "report-above-fake"])
def test_evaluate_report_onto_its_inputs(where, tmp_path):
    real, old_report = tmp_path / "real", tmp_path / "old-report"
    fake = old_report / "generated" if where == "report-above-fake" else tmp_path / "fake"
    for name in ("1.png", "2.png"):
        write_ffa(real / name, seed=1)
        write_ffa(fake / name, seed=2)
    (old_report / "metrics.json").parent.mkdir(exist_ok=True)
    (old_report / "metrics.json").write_text("{}")  # an earlier report, replaced whole when written
    out = {"real": real, "fake": fake, "report-above-fake": old_report}[where]
    before = snapshot(real, fake, old_report)
    run = cli("evaluate", "--real", real, "--fake", fake, "--out", out, "--metrics", "psnr")
    problem = refused(run, out, "input")
    assert not problem, problem
    assert snapshot(real, fake, old_report) == before


@corpus
def test_register_overwrite_of_a_folder_holding_the_inputs(tmp_path):
    from ffasynth.data.phantom import write_phantom_dataset

    out = tmp_path / "aligned"
    data = write_phantom_dataset(out / "raw", n=1, size=64, seed=3)
    before = snapshot(out)
    run = cli("data", "register", data, "--out", out, "--overwrite")
    problem = refused(run, out, "holds the input")
    assert not problem, problem
    assert snapshot(out) == before


@corpus
@pytest.mark.parametrize(
    "verb", ["train-into-data", "train-into-train-split", "stage2-into-stage1", "export-into-the-run", "clinical"]
)
def test_runs_into_their_inputs(verb, tmp_path):
    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=2, size=32, seed=4, test_fraction=0.5)
    stage1 = tmp_path / "stage1"
    (stage1 / "checkpoints").mkdir(parents=True)
    (stage1 / "config.yaml").write_text("preset: tiny\n")
    args, out = {
        "train-into-data": (["train", "stage1", "--data", data, "--out", data, *STAGE1], data),
        "train-into-train-split": (["train", "vae", "--data", data, "--out", data / "train", *STAGE1], data / "train"),
        "stage2-into-stage1": (
            ["train", "stage2", "--from", stage1, "--data", data, "--out", stage1, *STAGE1[2:]],
            stage1,
        ),
        "export-into-the-run": (["export", stage1, stage1], stage1),
        "clinical": (["clinical", "--data", data, "--out", data, "--folds", "2", "--epochs", "1"], data),
    }[verb]
    before = snapshot(data, stage1)
    run = cli(*args)
    problem = refused(run, out, "input folder")
    assert not problem, problem
    assert snapshot(data, stage1) == before


@corpus
def test_data_phantom_into_a_folder_of_other_images(tmp_path):
    data = tmp_path / "my-eyes"
    write_photo(data / "1.png", seed=7)
    write_ffa(data / "1.1.png", seed=7)
    before = snapshot(data)
    run = cli("data", "phantom", data, "--n", "1", "--size", "32")
    problem = refused(run, data, "other files than an earlier phantom set")
    assert not problem, problem
    assert snapshot(data) == before
    again = cli("data", "phantom", tmp_path / "ph", "--n", "1", "--size", "32")
    assert again.exit_code == 0 and cli("data", "phantom", tmp_path / "ph", "--n", "1", "--size", "32").exit_code == 0


# ---- inputs whose outputs would share a name


@corpus
def test_inputs_sharing_a_name_get_their_own_outputs(pipeline_dir, tmp_path):
    """a.jpg and a.png in one folder, 7.png in two folders, a.png in two folders both called x, and
    a.jpg.png (whose stem is a.jpg): every input gets its own output, each named in a note."""
    inputs = [
        *photos(tmp_path / "one", "a.jpg", "a.png", "a.jpg.png"),
        *photos(tmp_path / "left", "7.png"),
        *photos(tmp_path / "right", "7.png"),
        *photos(tmp_path / "p" / "x", "b.png"),
        *photos(tmp_path / "q" / "x", "b.png"),
    ]
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    run = cli("translate", pipeline_dir, *inputs, "--out", out, "--steps", "1", "--quiet")
    assert run.exit_code == 0, run.output
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        ["a.jpg_ffa.png", "a.png_ffa.png", "a.jpg.png_ffa.png", "left_7_ffa.png", "right_7_ffa.png",
         "x_b.png_ffa.png", "x_b.png-2_ffa.png"]
    )  # fmt: skip
    for name in ("a_ffa.png", "7_ffa.png", "b_ffa.png"):
        assert line_problem(run.output, name, "share the output name") is None, run.output
    assert snapshot(tmp_path / "one", tmp_path / "left", tmp_path / "right", tmp_path / "p", tmp_path / "q") == {
        k: v for k, v in before.items() if not k.startswith(str(out))
    }
    assert not no_partial_files(out)


def test_output_names_are_unique_and_depend_only_on_the_inputs():
    """Every set of names a user could give gets distinct outputs, the same ones in every run."""
    names = ["a.jpg", "a.png", "a.jpg.png", "a", "a.png-2", "x_a.png", "b.tif", "B.tif", "b_ffa.png"]
    folders = ["x", "y", "z/x", "w/x"]
    paths = [Path(folder) / name for folder in folders for name in names]
    stems, notes = output_names(paths)
    assert len(set(stems.values())) == len(paths)
    assert output_names(paths) == (stems, notes)
    single, no_notes = output_names([Path("x/a.png"), Path("x/b.png")])
    assert single == {Path("x/a.png"): "a", Path("x/b.png"): "b"} and no_notes == []


def test_a_failed_folder_write_restores_the_earlier_folder(tmp_path, monkeypatch):
    """atomic_folder: the earlier report is put back when the new one cannot be moved in."""
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("earlier")
    real_replace = os.replace

    def replace(source, target):
        if Path(source).name.startswith(".report.") and not Path(source).name.endswith(".old.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="disk is full"):
        files.atomic_folder(report, lambda folder: (folder / "metrics.json").write_text("new"))
    assert (report / "metrics.json").read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_a_folder_write_is_on_disk_before_it_is_visible_and_follows_a_link(tmp_path, monkeypatch):
    """atomic_folder fsyncs every file and folder it wrote before the rename, and the parent after it (a
    checkpoint's files were never synced, yet older checkpoints are pruned right after); an output that is a
    link to a folder elsewhere is written there and the link kept (it was replaced, and the next write failed)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)

    def fill(folder):
        (folder / "sub").mkdir()
        (folder / "a.json").write_text("a")
        (folder / "sub" / "b.bin").write_bytes(b"b")

    out = files.atomic_folder(tmp_path / "ckpt", fill)
    temporary = Path(synced[0]).parent  # the files were synced under the temporary name, before the rename
    assert {Path(p).relative_to(temporary).as_posix() for p in synced[:2]} == {"a.json", "sub/b.bin"}
    assert str(temporary / "sub") in synced and str(temporary) in synced and synced[-1] == str(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "sub"]
    elsewhere, link = tmp_path / "bigdisk" / "out", tmp_path / "out"
    elsewhere.mkdir(parents=True)
    link.symlink_to(elsewhere)
    for text in ("first", "second"):
        files.atomic_folder(link, lambda folder, text=text: (folder / "note.txt").write_text(text))
    assert link.is_symlink() and (link / "note.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigdisk", "ckpt", "out"]
    assert [p.name for p in (tmp_path / "bigdisk").iterdir()] == ["out"]


# ---- damaged run folders, config files that are not YAML, settings that cannot be folders: one line each
@corpus
@pytest.mark.parametrize(
    "case",
    ["damaged-run-json", "run-without-model", "binary-config", "config-below-a-file", "config-in-the-new-out",
     "cache-dir-is-a-file", "bad-max-pixels", "export-over-another-model"],
)  # fmt: skip
def test_run_folders_and_settings_that_cannot_be_used(case, pairs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("preset: tiny\n")
    (run / "run.json").write_text('{"kind": "stage1"' if case == "damaged-run-json" else '{"kind": "stage1"}')
    afile = tmp_path / "afile"
    afile.write_text("")
    other = tmp_path / "sd15"  # a user's own diffusers model folder: export must not replace it
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (other / "NOTES.txt").write_text("mine")
    out = tmp_path / "out"
    train = ["train", "stage1", "--data", pairs, "--out", out, *STAGE1]
    args, name, words = {
        "damaged-run-json": (["export", run, out], "run.json", "is damaged"),
        "run-without-model": (["export", run, out], str(run), "no model/unet/config.json"),
        "binary-config": ([*train, "--config", next(pairs.rglob("*.png"))], "config file", "not a text (yaml) file"),
        "config-below-a-file": ([*train, "--config", afile / "x.yaml"], "config file", "does not exist"),
        "config-in-the-new-out": ([*train, "--config", out / "config.yaml"], "--config", "would be replaced"),
        "cache-dir-is-a-file": ([*train, f"data.cache_dir={afile}"], "data.cache_dir", "cannot be a cache folder"),
        "bad-max-pixels": (["data", "check", pairs], "FFASYNTH_MAX_PIXELS", "not a finite number"),
        "export-over-another-model": (["export", run, other], str(other), "not an ffasynth pipeline folder"),
    }[case]
    if case == "config-in-the-new-out":
        out.mkdir()
        (out / "config.yaml").write_text("# my notes\npreset: tiny\n")
    if case == "bad-max-pixels":
        monkeypatch.setenv("FFASYNTH_MAX_PIXELS", "abc")
    before = snapshot(pairs, run, other, out)
    result = cli(*args)
    problem = line_problem(result.output, name, words) or (None if result.exit_code in (1, 2) else "exit 0")
    assert not problem, f"{problem}\n{result.output[-800:]}"
    assert snapshot(pairs, run, other, out) == before
