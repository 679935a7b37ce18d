"""The bad-input corpus (tests/corpus.py) through every entry point: `data check`, the training
dataset, `train stage1`, `translate`, `evaluate` and the web page's handler.

Each case is handled when: one output line names the file (or option) with the cause, there is
no traceback, the exit code is non-zero exactly where the command cannot go on, the other inputs
are still processed, and no half-written file is left (outputs complete or absent, no *.tmp).
Each test records its cases in `corpus.TALLY`, prints its count and asserts all were handled;
the terminal summary prints the total (see conftest.py). The whole file runs in ~15 s on a CPU."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ffasynth.cli import main
from ffasynth.errors import FFASynthError
from tests.corpus import (
    HEIGHT,
    IMAGE_CASES,
    SIZE_MISMATCH,
    TALLY,
    WIDTH,
    break_pipeline,
    write_bad_configs,
    write_case,
    write_ffa,
    write_folder_without_pairs,
    write_pair_folder,
    write_photo,
)
from tests.test_models import MICRO

TINY_TRAINING = MICRO + ["data.crop_size=32", "stage1.batch_size=2", "stage1.sample_steps=1", "seed=1"]


@dataclass
class Run:
    exit_code: int
    output: str  # stdout and stderr


def cli(capsys, *args) -> Run:
    """Run `ffasynth ARGS` through the real entry point (`ffasynth.cli.main`, which prints an
    FFASynthError as one line and exits 2); any other exception is kept as its traceback."""
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["ffasynth", *map(str, args)]
    os.environ["COLUMNS"] = "400"  # rich tables: one row per line
    code, trace = 0, ""
    capsys.readouterr()
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception as error:  # what a user would see as a traceback
        code, trace = 1, "".join(traceback.format_exception(error))
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    captured = capsys.readouterr()
    return Run(code, captured.out + captured.err + trace)


def line_problem(output: str, name: str, words: str) -> str | None:
    """None when one line of `output` names `name` together with `words`; else what is wrong."""
    if "Traceback" in output:
        return "a traceback was printed"
    lines = [line.lower() for line in output.splitlines() if name in line]
    if not lines:
        return f"no line names {name}"
    if not any(words in line for line in lines):
        return f"the lines naming {name} do not say {words!r}: {lines[0][:200]}"
    return None


def no_partial_files(folder: Path) -> str | None:
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []
    return f"half-written files left: {leftovers}" if leftovers else None


def complete_png(path: Path, size: tuple[int, int]) -> str | None:
    from PIL import Image

    if not path.is_file():
        return f"{path.name} was not written"
    with Image.open(path) as image:
        image.load()  # a half-written PNG fails here
        if image.size != size:
            return f"{path.name} is {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}"
    return None


def report(entry: str) -> None:
    print(f"\n{TALLY.line(entry)}")
    assert not TALLY.failures.get(entry), "\n".join(TALLY.failures[entry])


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "pairs"
    return folder, write_pair_folder(folder)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from tests.test_pipeline import micro_pipeline

    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    micro_pipeline("data.crop_size=32").save_pretrained(folder)
    return folder


def test_data_check(pair_folder, tmp_path, capsys):
    folder, planted = pair_folder
    run = cli(capsys, "data", "check", folder, "--json", tmp_path / "report.json")
    result = json.loads((tmp_path / "report.json").read_text())
    paired = {Path(p[side]).name for p in result["pairs"] for side in ("source", "target")}
    problems = {Path(p["path"]).name: p["message"].lower() for p in result["problems"]}
    entry = "data check"
    for name, (case, slot, _) in planted.items():
        expected = case.expected(slot)
        if expected is None:
            problem = None if name in paired and name not in problems else f"{name} was not accepted as a pair"
        else:
            problem = line_problem(run.output, f"/{name}", expected)
            problem = problem or (f"{name} is still paired" if name in paired else None)
        TALLY.record(entry, f"{case.name} as {slot}", problem)
    TALLY.record(entry, "size mismatch", line_problem(run.output, f"/{SIZE_MISMATCH}", "900.png is 56x40"))
    others = {"1.png", "1.1.png", "2.png", "2.1.png"} <= paired and run.exit_code == 0
    TALLY.record(entry, "good pairs beside the bad ones", None if others else f"exit {run.exit_code}, {paired}")
    empty = write_folder_without_pairs(tmp_path / "no-pairs")
    run = cli(capsys, "data", "check", empty)
    problem = line_problem(run.output, str(empty), "no known pair layout")
    TALLY.record(entry, "folder with no pairs", problem or (None if run.exit_code != 0 else "exit code 0"))
    report(entry)


def test_training_dataset(pair_folder, tmp_path):
    from ffasynth.config import load_config
    from ffasynth.training.run import load_training_data

    folder, planted = pair_folder
    config = load_config(preset="tiny", overrides=TINY_TRAINING)
    messages: list[str] = []
    dataset = load_training_data(folder, config, say=messages.append)
    used = {p.source.name for p in dataset.pairs} | {p.target.name for p in dataset.pairs}
    said = "\n".join(messages)
    entry = "training dataset"
    for name, (case, slot, _) in planted.items():
        expected = case.expected(slot)
        if expected is None:
            problem = None if name in used and name not in said else f"{name} was left out"
        else:
            problem = line_problem(said, f"/{name}", expected) or (f"{name} is used" if name in used else None)
        TALLY.record(entry, f"{case.name} as {slot}", problem)
    TALLY.record(entry, "size mismatch", line_problem(said, f"/{SIZE_MISMATCH}", "56x40"))
    items = [dataset[(i, 0)] for i in range(len(dataset))]
    good = all(
        item["source"].shape == (3, 32, 32) and item["target"].shape == (1, 32, 32) and item["source"].isfinite().all()
        for item in items
    )
    TALLY.record(entry, "every kept pair loads", None if good and len(items) >= 2 else "an item is malformed")
    empty = write_folder_without_pairs(tmp_path / "no-pairs")
    try:
        load_training_data(empty, config)
        problem = "no error for a folder without pairs"
    except FFASynthError as error:
        problem = None if str(empty) in str(error) and "\n" not in str(error) else f"unclear: {error}"
    TALLY.record(entry, "folder with no pairs", problem)
    report(entry)


def test_train_stage1(pair_folder, tmp_path, capsys):
    folder, planted = pair_folder
    common = ["--preset", "tiny", "--max-steps", "1", "--quiet", *TINY_TRAINING]
    run_dir = tmp_path / "run"
    run = cli(capsys, "train", "stage1", "--data", folder, "--out", run_dir, *common)
    entry = "train stage1"
    finished = (run_dir / "checkpoints" / "step-000001" / "state.json").is_file() and run.exit_code == 0
    for name, (case, slot, _) in planted.items():
        expected = case.expected(slot)
        if expected is None:
            problem = f"{name} was reported" if f"/{name}" in run.output else None
        else:
            problem = line_problem(run.output, f"/{name}", expected)
        TALLY.record(entry, f"{case.name} as {slot}", problem or (None if finished else f"run failed: {run.output}"))
    TALLY.record(entry, "no half-written file", no_partial_files(run_dir))
    for config, words in write_bad_configs(tmp_path / "configs"):
        out = tmp_path / f"run-{config.stem}"
        run = cli(capsys, "train", "stage1", "--data", folder, "--out", out, "--config", config, "--quiet")
        problem = line_problem(run.output, "error:", words) or (None if run.exit_code == 2 else f"exit {run.exit_code}")
        TALLY.record(entry, f"config {config.name}", problem or (f"{out} was written" if out.exists() else None))
    empty = write_folder_without_pairs(tmp_path / "no-pairs")
    run = cli(capsys, "train", "stage1", "--data", empty, "--out", tmp_path / "run-empty", *common)
    problem = line_problem(run.output, str(empty), "no known pair layout")
    TALLY.record(entry, "folder with no pairs", problem or (None if run.exit_code == 2 else f"exit {run.exit_code}"))
    report(entry)


def test_translate(pipeline_dir, tmp_path, capsys):
    inputs, out = tmp_path / "photos", tmp_path / "out"
    for case in IMAGE_CASES:
        write_case(case, inputs / case.filename)
    write_photo(inputs / "good.png")
    run = cli(capsys, "translate", pipeline_dir, inputs, "--out", out, "--steps", "1", "--quiet")
    entry = "translate"
    for case in IMAGE_CASES:
        expected, output = case.expected("photo"), out / f"{case.name}_ffa.png"
        if case.kind in ("unreadable", "tiny"):
            problem = line_problem(run.output, f"/{case.filename}", expected) or (
                f"{output.name} was written" if output.exists() else None
            )
        else:  # translated; a grey photo with a warning naming it
            problem = complete_png(output, case.size)
            if expected is not None:
                problem = problem or line_problem(run.output, f"/{case.filename}", expected)
            elif f"/{case.filename}" in run.output:
                problem = f"{case.filename} was reported"
        TALLY.record(entry, case.name, problem)
    good = complete_png(out / "good_ffa.png", (WIDTH, HEIGHT))
    TALLY.record(entry, "the good photo beside the bad ones", good or (None if run.exit_code == 1 else "exit code"))
    TALLY.record(entry, "no half-written file", no_partial_files(out))
    empty = tmp_path / "no-images"
    (empty / "notes.txt").parent.mkdir()
    (empty / "notes.txt").write_text("photos to follow")
    run = cli(capsys, "translate", pipeline_dir, empty, "--out", tmp_path / "out-empty", "--quiet")
    problem = line_problem(run.output, str(empty), "no image files")
    TALLY.record(entry, "folder with no images", problem or (None if run.exit_code == 1 else "exit code 0"))
    for how in ("missing", "corrupt"):
        weights = break_pipeline(pipeline_dir, tmp_path / f"pipeline-{how}", how)
        target = tmp_path / f"out-{how}"
        run = cli(capsys, "translate", weights.parents[1], inputs / "good.png", "--out", target, "--quiet")
        problem = line_problem(run.output, str(weights), how if how == "missing" else "corrupt")
        problem = problem or (None if run.exit_code == 2 and not target.exists() else f"exit {run.exit_code}")
        TALLY.record(entry, f"pipeline with {how} weights", problem)
    report(entry)


def test_evaluate(tmp_path, capsys):
    entry = "evaluate"
    for bad_side in ("fake", "real"):
        real, fake, out = (
            tmp_path / f"{bad_side}-bad" / "real",
            tmp_path / f"{bad_side}-bad" / "fake",
            tmp_path / bad_side,
        )
        for seed, case in enumerate(IMAGE_CASES):
            write_case(case, (fake if bad_side == "fake" else real) / case.filename)
            size = case.size if case.kind in ("colour", "grey") else (WIDTH, HEIGHT)  # a partner that can be read
            write_ffa((real if bad_side == "fake" else fake) / f"{case.name}.png", seed=seed, size=size)
        write_ffa(real / "good.png", seed=1)
        write_ffa(fake / "good.png", seed=2)
        run = cli(capsys, "evaluate", "--real", real, "--fake", fake, "--out", out, "--metrics", "psnr,ssim")
        scored = set()
        if (out / "metrics.json").is_file():
            per_image = json.loads((out / "metrics.json").read_text())["methods"]["fake"]["per_image"]
            scored = {row["key"] for row in per_image}
        for case in IMAGE_CASES:
            expected = case.expected("ffa")
            if expected is None:
                problem = None if case.name in scored and f"/{case.filename}" not in run.output else "not scored"
            else:  # unreadable files are named with their folder; colour ones by name in one warning
                name = f"{bad_side}/{case.filename}" if case.kind != "colour" else case.filename
                problem = line_problem(run.output, name, expected)
                if case.kind != "colour" and case.name in scored:
                    problem = problem or f"{case.name} was scored"
            TALLY.record(entry, f"{case.name} as {bad_side}", problem)
        good = "good" in scored and run.exit_code == 0 and (out / "report.html").is_file()
        TALLY.record(entry, f"good pair beside bad {bad_side}s", None if good else f"exit {run.exit_code}")
        TALLY.record(entry, f"no half-written file ({bad_side})", no_partial_files(out))
    unmatched = tmp_path / "unmatched"
    write_ffa(unmatched / "someone-else.png")
    run = cli(
        capsys, "evaluate", "--real", tmp_path / "fake-bad" / "real", "--fake", unmatched, "--out", tmp_path / "u"
    )
    problem = line_problem(run.output, "--fake", "no metric could be computed")
    TALLY.record(entry, "no real/generated pairs", problem or (None if run.exit_code == 1 else "exit code 0"))
    empty = write_folder_without_pairs(tmp_path / "no-ffa") / "empty"
    empty.mkdir()
    run = cli(capsys, "evaluate", "--real", empty, "--fake", unmatched, "--out", tmp_path / "e")
    problem = line_problem(run.output, str(empty), "no images")
    TALLY.record(entry, "empty real folder", problem or (None if run.exit_code == 2 else f"exit {run.exit_code}"))
    report(entry)


def test_web_page_handler(pipeline_dir, tmp_path):
    import gradio as gr

    from ffasynth.app import ServeSettings, build_app, serve
    from ffasynth.translate import load_pipeline

    workdir = tmp_path / "work"
    workdir.mkdir()
    page = build_app(load_pipeline(pipeline_dir, "cpu"), workdir, ServeSettings())
    handle = next(f.fn for f in page.fns.values() if f.name == "handle")
    uploads = tmp_path / "uploads"
    entry = "web page"
    for case in IMAGE_CASES:
        path = write_case(case, uploads / case.filename)
        expected = case.expected("photo")
        problem = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, grey, _, download = handle(str(path), 1, 0, 1, "early")
            said = "\n".join(str(w.message) for w in caught if case.filename in str(w.message))
            if case.kind in ("unreadable", "tiny"):
                problem = "accepted"
            elif grey.shape != (case.size[1], case.size[0]) or Path(download).parent != workdir:
                problem = f"output {grey.shape}, written to {download}"
            elif expected is not None:
                problem = line_problem(said, case.filename, expected)
            elif said:
                problem = f"warned: {said}"
        except gr.Error as error:
            problem = None if case.kind in ("unreadable", "tiny") else f"refused: {error.message}"
            problem = problem or line_problem(error.message, case.filename, expected)
            problem = problem or ("the message spans lines" if "\n" in error.message else None)
            problem = problem or (f"the message shows the folder {uploads}" if str(uploads) in error.message else None)
        TALLY.record(entry, case.name, problem)
    TALLY.record(entry, "nothing written outside its folder", no_partial_files(workdir))
    for how in ("missing", "corrupt"):
        weights = break_pipeline(pipeline_dir, tmp_path / f"pipeline-{how}", how)
        try:
            serve(weights.parents[1], port=0, block=False).close()
            problem = "served a broken pipeline"
        except FFASynthError as error:
            problem = line_problem(str(error), str(weights), how if how == "missing" else "corrupt")
        TALLY.record(entry, f"pipeline with {how} weights", problem)
    report(entry)


def test_grey_photo_is_translated_with_a_warning_not_silently(pipeline_dir, tmp_path):
    from ffasynth.translate import read_photo

    grey = write_ffa(tmp_path / "angiogram.png")
    image, warning = read_photo(grey)
    assert image.shape == (3, HEIGHT, WIDTH) and torch.equal(image[0], image[2]) and "grey" in warning
    colour = write_photo(tmp_path / "photo.png")
    image, warning = read_photo(colour)
    assert warning is None and not np.allclose(image[0].numpy(), image[2].numpy())


def test_no_pickle_is_loaded_anywhere_in_the_package():
    """Every torch.load passes weights_only=True; no pickle-family import, unsafe YAML or pickled numpy."""
    import ast

    import ffasynth

    unsafe = []
    for path in sorted(Path(ffasynth.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "marshal") for n in names):
                    unsafe.append(f"{where} imports {names}")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            call = f"{owner}.{node.func.attr}"
            if call == "torch.load" and keywords.get("weights_only") != "True":
                unsafe.append(f"{where} torch.load without weights_only=True")
            if call in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.hub.load"):
                unsafe.append(f"{where} {call}")
            if call in ("np.load", "numpy.load") and keywords.get("allow_pickle", "False") != "False":
                unsafe.append(f"{where} np.load with allow_pickle")
    assert not unsafe, unsafe
