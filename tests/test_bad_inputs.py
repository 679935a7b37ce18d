"""The bad-input corpus (tests/corpus.py) through every entry point: `data check`, the training
dataset, `train stage1`, `translate`, `evaluate` and the web page's handler.

Each case is handled when: one output line names the file (or option) with the cause, there is
no traceback, the exit code is non-zero exactly where the command cannot go on, the other inputs
are still processed, and no half-written file is left (outputs complete or absent, no *.tmp).
Each entry point runs once over the whole corpus (a module fixture); every case is then its own
pytest case named after it (e.g. `test_data_check[truncated-jpeg-as-photo]`), marked `corpus`;
the terminal summary counts them (see conftest.py). 186 cases, ~17 s on a quiet 2-core CPU."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from ffasynth.config import load_config
from ffasynth.errors import FFASynthError
from ffasynth.training.run import load_training_data
from tests.corpus import (
    BAD_CONFIGS,
    HEIGHT,
    IMAGE_CASES,
    SIZE_MISMATCH,
    WIDTH,
    Run,
    break_pipeline,
    cli,
    complete_png,
    exit_problem,
    kept_or_named,
    line_problem,
    no_partial_files,
    write_case,
    write_ffa,
    write_folder_without_pairs,
    write_pair_folder,
    write_photo,
)
from tests.helpers import MICRO, micro_pipeline

TINY_TRAINING = MICRO + ["data.crop_size=32", "stage1.batch_size=2", "stage1.sample_steps=1", "seed=1"]
pytestmark = pytest.mark.corpus  # every test here is one corpus case

# every image case in every slot of a pair, and in each side of `evaluate`
AS_PAIR = [pytest.param(case, slot, id=f"{case.name}-as-{slot}") for case in IMAGE_CASES for slot in ("photo", "ffa")]
AS_SIDE = [pytest.param(case, side, id=f"{case.name}-as-{side}") for case in IMAGE_CASES for side in ("fake", "real")]
ALONE = [pytest.param(case, id=case.name) for case in IMAGE_CASES]
BROKEN = ["missing", "corrupt"]


@dataclass
class PairFolder:
    folder: Path
    planted: dict[tuple[str, str], str]  # (case name, slot) → the planted file's name


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory) -> PairFolder:
    folder = tmp_path_factory.mktemp("corpus") / "pairs"
    planted = write_pair_folder(folder)
    return PairFolder(folder, {(case.name, slot): name for name, (case, slot, _) in planted.items()})


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    micro_pipeline("data.crop_size=32").save_pretrained(folder)
    return folder


# ---- data check: one run over the pair folder


@dataclass
class DataCheck:
    run: Run
    paired: set[str]  # file names in a pair
    problems: dict[str, str]  # file name → its problem, as the JSON report lists it


@pytest.fixture(scope="module")
def data_check(pair_folder, tmp_path_factory) -> DataCheck:
    report = tmp_path_factory.mktemp("data-check") / "report.json"
    run = cli("data", "check", pair_folder.folder, "--json", report)
    result = json.loads(report.read_text())
    paired = {Path(p[side]).name for p in result["pairs"] for side in ("source", "target")}
    return DataCheck(run, paired, {Path(p["path"]).name: p["message"].lower() for p in result["problems"]})


@pytest.mark.parametrize("case, slot", AS_PAIR)
def test_data_check(pair_folder, data_check, case, slot):
    name = pair_folder.planted[(case.name, slot)]
    problem = kept_or_named(name, case.expected(slot), data_check.paired, data_check.problems, data_check.run.output)
    assert not problem, problem


def test_data_check_size_mismatch(data_check):
    problem = line_problem(data_check.run.output, f"/{SIZE_MISMATCH}", "900.png is 56x40")
    assert not problem, problem


def test_data_check_good_pairs_beside_the_bad_ones(data_check):
    assert {"1.png", "1.1.png", "2.png", "2.1.png"} <= data_check.paired, data_check.paired
    assert data_check.run.exit_code == 0, data_check.run.output


def test_data_check_folder_with_no_pairs(tmp_path):
    empty = write_folder_without_pairs(tmp_path / "no-pairs")
    run = cli("data", "check", empty)
    problem = line_problem(run.output, str(empty), "no known pair layout")
    assert not problem, problem
    assert run.exit_code != 0, "exit code 0"


# ---- the training dataset: loaded once from the pair folder


@dataclass
class TrainingData:
    dataset: object
    used: set[str]  # file names of the pairs it kept
    said: str  # its warnings, one a line


@pytest.fixture(scope="module")
def training_data(pair_folder) -> TrainingData:
    messages: list[str] = []
    dataset = load_training_data(
        pair_folder.folder, load_config(preset="tiny", overrides=TINY_TRAINING), messages.append
    )
    used = {p.source.name for p in dataset.pairs} | {p.target.name for p in dataset.pairs}
    return TrainingData(dataset, used, "\n".join(messages))


@pytest.mark.parametrize("case, slot", AS_PAIR)
def test_training_dataset(pair_folder, training_data, case, slot):
    name, said = pair_folder.planted[(case.name, slot)], training_data.said
    problem = kept_or_named(name, case.expected(slot), training_data.used, said, said)
    assert not problem, problem


def test_training_dataset_size_mismatch(training_data):
    problem = line_problem(training_data.said, f"/{SIZE_MISMATCH}", "56x40")
    assert not problem, problem


def test_training_dataset_every_kept_pair_loads(training_data):
    dataset = training_data.dataset
    items = [dataset[(i, 0)] for i in range(len(dataset))]
    assert len(items) >= 2
    for item in items:
        assert item["source"].shape == (3, 32, 32) and item["target"].shape == (1, 32, 32), item["id"]
        assert item["source"].isfinite().all(), item["id"]


def test_training_dataset_folder_with_no_pairs(tmp_path):
    empty = write_folder_without_pairs(tmp_path / "no-pairs")
    with pytest.raises(FFASynthError) as error:
        load_training_data(empty, load_config(preset="tiny", overrides=TINY_TRAINING))
    assert str(empty) in str(error.value) and "\n" not in str(error.value), f"unclear: {error.value}"


# ---- train stage1: one run over the pair folder

STAGE1 = ["--preset", "tiny", "--max-steps", "1", "--quiet", *TINY_TRAINING]


@pytest.fixture(scope="module")
def stage1_run(pair_folder, tmp_path_factory) -> tuple[Run, Path]:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    return cli("train", "stage1", "--data", pair_folder.folder, "--out", run_dir, *STAGE1), run_dir


@pytest.mark.parametrize("case, slot", AS_PAIR)
def test_train_stage1(pair_folder, stage1_run, case, slot):
    (run, run_dir), name, expected = stage1_run, pair_folder.planted[(case.name, slot)], case.expected(slot)
    if expected is None:
        assert f"/{name}" not in run.output, f"{name} was reported"
    else:
        problem = line_problem(run.output, f"/{name}", expected)
        assert not problem, problem
    finished = (run_dir / "checkpoints" / "step-000001" / "state.json").is_file() and run.exit_code == 0
    assert finished, f"run failed: {run.output}"


def test_train_stage1_leaves_no_half_written_file(stage1_run):
    problem = no_partial_files(stage1_run[1])
    assert not problem, problem


@pytest.mark.parametrize("name, text, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_train_stage1_config(pair_folder, tmp_path, name, text, words):
    config, out = tmp_path / name, tmp_path / "run"
    config.write_text(text)
    run = cli("train", "stage1", "--data", pair_folder.folder, "--out", out, "--config", config, "--quiet")
    problem = line_problem(run.output, "error:", words) or exit_problem(run, 2)
    assert not problem, problem
    assert not out.exists(), f"{out} was written"


def test_train_stage1_folder_with_no_pairs(tmp_path):
    empty = write_folder_without_pairs(tmp_path / "no-pairs")
    run = cli("train", "stage1", "--data", empty, "--out", tmp_path / "run", *STAGE1)
    problem = line_problem(run.output, str(empty), "no known pair layout") or exit_problem(run, 2)
    assert not problem, problem


# ---- translate: one run over a folder of every image case and a good photo


@pytest.fixture(scope="module")
def translated(pipeline_dir, tmp_path_factory) -> tuple[Run, Path]:
    root = tmp_path_factory.mktemp("translate")
    inputs, out = root / "photos", root / "out"
    for case in IMAGE_CASES:
        write_case(case, inputs / case.filename)
    write_photo(inputs / "good.png")
    return cli("translate", pipeline_dir, inputs, "--out", out, "--steps", "1", "--quiet"), out


@pytest.mark.parametrize("case", ALONE)
def test_translate(translated, case):
    (run, out), expected = translated, case.expected("photo")
    output = out / f"{case.name}_ffa.png"
    if case.kind in ("unreadable", "tiny"):
        problem = line_problem(run.output, f"/{case.filename}", expected)
        problem = problem or (f"{output.name} was written" if output.exists() else None)
    else:  # translated; a grey photo with a warning naming it
        problem = complete_png(output, case.size)
        if expected is not None:
            problem = problem or line_problem(run.output, f"/{case.filename}", expected)
        elif f"/{case.filename}" in run.output:
            problem = f"{case.filename} was reported"
    assert not problem, problem


def test_translate_the_good_photo_beside_the_bad_ones(translated):
    run, out = translated
    problem = complete_png(out / "good_ffa.png", (WIDTH, HEIGHT)) or exit_problem(run, 1)
    assert not problem, problem


def test_translate_leaves_no_half_written_file(translated):
    problem = no_partial_files(translated[1])
    assert not problem, problem


def test_translate_folder_with_no_images(pipeline_dir, tmp_path):
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("photos to follow")
    run = cli("translate", pipeline_dir, empty, "--out", tmp_path / "out", "--quiet")
    problem = line_problem(run.output, str(empty), "no image files") or exit_problem(run, 1)
    assert not problem, problem


@pytest.mark.parametrize("how", BROKEN)
def test_translate_pipeline_with_broken_weights(pipeline_dir, tmp_path, how):
    weights = break_pipeline(pipeline_dir, tmp_path / "pipeline", how)
    target = tmp_path / "out"
    run = cli("translate", weights.parents[1], write_photo(tmp_path / "good.png"), "--out", target, "--quiet")
    problem = line_problem(run.output, str(weights), how) or exit_problem(run, 2)
    assert not problem, problem
    assert not target.exists(), f"{target} was written"


# ---- evaluate: one run with every case among the generated images, one with them among the real


@dataclass
class Evaluation:
    run: Run
    scored: set[str]  # image keys with metrics
    out: Path
    real: Path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, Evaluation]:
    runs = {}
    for bad_side in ("fake", "real"):
        root = tmp_path_factory.mktemp(f"{bad_side}-bad")
        real, fake, out = root / "real", root / "fake", root / "report"
        for seed, case in enumerate(IMAGE_CASES):
            write_case(case, (fake if bad_side == "fake" else real) / case.filename)
            size = case.size if case.kind in ("colour", "grey") else (WIDTH, HEIGHT)  # a partner that can be read
            write_ffa((real if bad_side == "fake" else fake) / f"{case.name}.png", seed=seed, size=size)
        write_ffa(real / "good.png", seed=1)
        write_ffa(fake / "good.png", seed=2)
        run = cli("evaluate", "--real", real, "--fake", fake, "--out", out, "--metrics", "psnr,ssim")
        scored = set()
        if (out / "metrics.json").is_file():
            per_image = json.loads((out / "metrics.json").read_text())["methods"]["fake"]["per_image"]
            scored = {row["key"] for row in per_image}
        runs[bad_side] = Evaluation(run, scored, out, real)
    return runs


@pytest.mark.parametrize("case, bad_side", AS_SIDE)
def test_evaluate(evaluated, case, bad_side):
    evaluation, expected = evaluated[bad_side], case.expected("ffa")
    if expected is None:
        assert case.name in evaluation.scored, "not scored"
        assert f"/{case.filename}" not in evaluation.run.output, f"{case.filename} was reported"
    else:  # unreadable files are named with their folder; colour ones by name in one warning
        name = f"{bad_side}/{case.filename}" if case.kind != "colour" else case.filename
        problem = line_problem(evaluation.run.output, name, expected)
        assert not problem, problem
        if case.kind != "colour":
            assert case.name not in evaluation.scored, f"{case.name} was scored"


@pytest.mark.parametrize("bad_side", ["fake", "real"])
def test_evaluate_the_good_pair_beside_the_bad_ones(evaluated, bad_side):
    evaluation = evaluated[bad_side]
    assert "good" in evaluation.scored and (evaluation.out / "report.html").is_file()
    problem = exit_problem(evaluation.run, 0)
    assert not problem, problem


@pytest.mark.parametrize("bad_side", ["fake", "real"])
def test_evaluate_leaves_no_half_written_file(evaluated, bad_side):
    problem = no_partial_files(evaluated[bad_side].out)
    assert not problem, problem


def test_evaluate_with_no_real_generated_pairs(evaluated, tmp_path):
    unmatched = tmp_path / "unmatched"
    write_ffa(unmatched / "someone-else.png")
    run = cli("evaluate", "--real", evaluated["fake"].real, "--fake", unmatched, "--out", tmp_path / "u")
    problem = line_problem(run.output, "--fake", "no metric could be computed") or exit_problem(run, 1)
    assert not problem, problem


def test_evaluate_an_empty_real_folder(tmp_path):
    unmatched, empty = tmp_path / "unmatched", tmp_path / "empty"
    write_ffa(unmatched / "someone-else.png")
    empty.mkdir()
    run = cli("evaluate", "--real", empty, "--fake", unmatched, "--out", tmp_path / "e")
    problem = line_problem(run.output, str(empty), "no images") or exit_problem(run, 2)
    assert not problem, problem


# ---- the web page's handler: every case uploaded once to one page


@dataclass
class Upload:
    outputs: tuple | None  # what the handler returned, or None when it refused
    warned: str  # warnings naming the file, one a line
    refusal: str | None  # the gr.Error's message


@pytest.fixture(scope="module")
def web_page(pipeline_dir, tmp_path_factory) -> tuple[dict[str, Upload], Path, Path]:
    import gradio as gr  # the web page's optional dependency (heavy): imported only where it is used

    from ffasynth.app import ServeSettings, build_app
    from ffasynth.translate import load_pipeline

    root = tmp_path_factory.mktemp("web")
    workdir, uploads = root / "work", root / "uploads"
    workdir.mkdir()
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # as serve sets it: the page reads only files uploaded here
    try:
        page = build_app(load_pipeline(pipeline_dir, "cpu"), workdir, ServeSettings())
    finally:
        os.environ.pop("GRADIO_TEMP_DIR") if previous is None else os.environ.update(GRADIO_TEMP_DIR=previous)
    handle = next(f.fn for f in page.fns.values() if f.name == "handle")
    results = {}
    for case in IMAGE_CASES:
        path = write_case(case, uploads / case.filename)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                # the page's handler yields (outputs..., status): a preview first when it is cheaper, then the result
                outputs, refusal = list(handle(str(path), 1, 0, 1, "early"))[-1][:4], None
            except gr.Error as error:
                outputs, refusal = None, error.message
        warned = "\n".join(str(w.message) for w in caught if case.filename in str(w.message))
        results[case.name] = Upload(outputs, warned, refusal)
    return results, workdir, uploads


@pytest.mark.parametrize("case", ALONE)
def test_web_page(web_page, case):
    results, workdir, uploads = web_page
    upload, expected = results[case.name], case.expected("photo")
    if upload.refusal is not None:
        assert case.kind in ("unreadable", "tiny"), f"refused: {upload.refusal}"
        problem = line_problem(upload.refusal, case.filename, expected)
        assert not problem, problem
        assert "\n" not in upload.refusal, "the message spans lines"
        assert str(uploads) not in upload.refusal, f"the message shows the folder {uploads}"
        return
    assert case.kind not in ("unreadable", "tiny"), "accepted"
    _, grey, _, download = upload.outputs
    assert grey.shape == (case.size[1], case.size[0]) and Path(download).parent == workdir, (
        f"output {grey.shape}, written to {download}"
    )
    if expected is not None:
        problem = line_problem(upload.warned, case.filename, expected)
        assert not problem, problem
    else:
        assert not upload.warned, f"warned: {upload.warned}"


def test_web_page_writes_nothing_outside_its_folder(web_page):
    problem = no_partial_files(web_page[1])
    assert not problem, problem


@pytest.mark.parametrize("how", BROKEN)
def test_web_page_pipeline_with_broken_weights(pipeline_dir, tmp_path, how):
    from ffasynth.app import serve

    weights = break_pipeline(pipeline_dir, tmp_path / "pipeline", how)
    with pytest.raises(FFASynthError) as error:
        serve(weights.parents[1], port=0, block=False).close()
    problem = line_problem(str(error.value), str(weights), how)
    assert not problem, problem
