"""`ffasynth clinical`: does synthetic FFA help a disease classifier? (cross-validated experiment)"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ffasynth import run_folder
from ffasynth.cli.options import SEED, in_range, settings_from
from ffasynth.errors import FFASynthError
from ffasynth.evaluation.agreement import scores_by_class
from ffasynth.evaluation.classifier import FUSIONS
from ffasynth.evaluation.clinical import (
    ALIASES,
    MODES,
    ClinicalSettings,
    attach_synthetic,
    cross_validate,
    load_labelled,
    paired_eyes,
    resolve_modes,
)
from ffasynth.evaluation.clinical_report import METRIC_NAMES, interval_text, write_clinical_report
from ffasynth.evaluation.clinical_stats import paired_difference
from ffasynth.files import check_output_folder
from ffasynth.translate import TranslateSettings, load_pipeline, translate_files

MODE_HELP = (
    "source-only (photos), real-only (real FFA, the upper reference), source+real, source+synthetic "
    "(alias: synthetic; photos + the FFA in --synthetic), or all (every mode the data allows)."
)


def eyes_seen(eyes, pipeline_dir: Path) -> list[str] | None:
    """The ids of the eyes whose photo (by content: sha256) the pipeline was trained on; None when the
    pipeline does not list its training photos (run_folder.record_photos)."""
    from ffasynth.integrity import file_sha256

    trained = run_folder.trained_photos(pipeline_dir)
    if trained is None:
        return None
    return [eye.id for eye in eyes if "source" in eye.images and file_sha256(eye.images["source"]) in trained]


def _generate(eyes, pipeline_dir: Path, folder: Path, steps: int | None, seed: int, console) -> list[str] | None:
    """Synthetic FFA of each eye's photo with an exported pipeline into `folder`, named as `ffasynth translate`
    names them (`<photo name>_ffa.png`; attach_synthetic matches them back by that name). Returns the eyes the
    pipeline was trained on (`eyes_seen`), said in a warning."""
    photos = [eye.images["source"] for eye in eyes if "source" in eye.images]
    if not photos:
        raise FFASynthError("--pipeline needs photos: the labelled data has angiograms only (no source images)")
    pipe = load_pipeline(pipeline_dir)
    trained_on = eyes_seen(eyes, pipeline_dir)
    if trained_on is None:
        console.print(
            f"{pipeline_dir} does not list the photos it was trained on (exported before that record): make sure "
            "it never saw these eyes, or their synthetic angiograms are not held out"
        )
    elif trained_on:
        shown = ", ".join(trained_on[:3]) + (" ..." if len(trained_on) > 3 else "")
        typer.secho(
            f"warning: {pipeline_dir} was trained on {len(trained_on)} of these eyes' photos ({shown}): their "
            "synthetic angiograms carry their real ones and are not held out; train the pipeline on other eyes",
            fg=typer.colors.YELLOW,
            err=True,
        )
    report = translate_files(pipe, photos, folder, TranslateSettings(steps=steps, seed=seed))
    for path, reason in report.failed:
        console.print(f"could not translate {path}: {reason}")
    console.print(f"generated {len(report.written)} synthetic angiograms into {folder}")
    return trained_on


def clinical(
    data: Path = typer.Option(
        ..., "--data", help="Labelled data: pairs with labels.csv / a label column, or class folders of FFA images."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json and the ROC / confusion-matrix PNGs."),
    mode: str = typer.Option("all", "--mode", help=MODE_HELP),
    pipeline: Path | None = typer.Option(
        None,
        "--pipeline",
        help="An exported pipeline: generate the synthetic FFA of every photo into OUT/synthetic (train it on "
        "other eyes than --data's: an eye it trained on is not held out).",
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        callback=in_range(1),
        help="Denoising steps when generating with --pipeline (default: the pipeline's: 20, 4 for the tiny preset).",
    ),
    synthetic: Path | None = typer.Option(
        None,
        "--synthetic",
        help="Folder of generated FFA named by eye id (`train/7.png`, `7_ffa.png`) or as `ffasynth translate` "
        "names each photo's output; an eye whose name could be another's gets none.",
    ),
    fusion: str = typer.Option("stack", "--fusion", help="Two inputs: stack (channels) or two-branch (backbones)."),
    backbone: str = typer.Option("resnet10t", "--backbone", help="timm model name."),
    backbone_weights: Path | None = typer.Option(
        None, "--backbone-weights", help="Pretrained backbone weights (.safetensors); random init without."
    ),
    folds: int = typer.Option(
        5,
        "--folds",
        callback=in_range(2),
        help="Cross-validation folds (stratified; grouped by eye for pairs, by DATA/groups.csv id,group if given).",
    ),
    repeats: int = typer.Option(
        1, "--repeats", callback=in_range(1), help="Cross-validations with other splits (narrower intervals)."
    ),
    epochs: int = typer.Option(15, "--epochs", callback=in_range(1), help="Training epochs per fold."),
    image_size: int = typer.Option(
        128, "--image-size", callback=in_range(16), help="Images are resized to this square side."
    ),
    batch_size: int = typer.Option(16, "--batch-size", callback=in_range(2), help="Images per step."),
    lr: float = typer.Option(
        1e-3, "--lr", callback=in_range(0, above=True), help="Peak learning rate (AdamW, one-cycle schedule)."
    ),
    seed: int = typer.Option(0, "--seed", callback=SEED, help="Seed for folds, initialisation and augmentation."),
) -> None:
    """Cross-validated disease classification on photos, real FFA and/or synthetic FFA.

    Reports accuracy, balanced accuracy, macro-F1 and one-vs-rest AUC (mean and 95% interval over folds) per
    mode, run on the same eyes and folds, and each mode's difference from source-only fold by fold; writes
    OUT/metrics.json, OUT/confusion_<mode>.png and OUT/roc_<mode>.png.
    """
    options = dict(locals())
    if fusion not in FUSIONS:
        raise FFASynthError(f"unknown --fusion {fusion!r}; choose {' or '.join(FUSIONS)}")
    check_output_folder(out, [data, synthetic, pipeline, backbone_weights])
    eyes = load_labelled(data)
    console = Console(stderr=True)
    context = {}
    if pipeline is not None:
        if synthetic is not None:
            raise FFASynthError("give --pipeline (generate) or --synthetic (already generated), not both")
        synthetic = out / "synthetic"
        # the eyes whose photo the pipeline trained on (None: it does not say), in metrics.json
        context["generator_trained_on"] = _generate(eyes, pipeline, synthetic, steps, seed, console)
    if synthetic is not None:
        missing = attach_synthetic(eyes, synthetic)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            console.print(f"{len(missing)} of {len(eyes)} eyes have no image in {synthetic}: {shown}")
    needs_synthetic = "synthetic" in MODES.get(ALIASES.get(mode, mode), ())
    if needs_synthetic and synthetic is None:
        raise FFASynthError(f"--mode {mode} needs --synthetic DIR (the generated angiograms)")
    modes, skipped_modes = resolve_modes(mode, eyes, folds)
    for name, reason in skipped_modes.items():
        console.print(f"skipping mode {name}: {reason}")
    if len(modes) > 1:  # compared fold by fold: the same eyes in every mode
        eyes, left = paired_eyes(eyes, modes)
        if left:
            shown = ", ".join(left[:3]) + (" ..." if len(left) > 3 else "")
            console.print(f"{len(left)} eyes left out of every mode, which are compared on the same eyes: {shown}")
    if backbone_weights is None:
        typer.secho(
            f"warning: no --backbone-weights: {backbone} starts from random weights; scores are lower than "
            "with a pretrained backbone",
            fg=typer.colors.YELLOW,
            err=True,
        )
    weights = str(backbone_weights) if backbone_weights else None
    results = []
    with Progress(console=console, transient=True) as progress:
        for name in modes:
            task = progress.add_task(f"{name}: folds", total=folds)
            report = lambda done, total, task=task: progress.update(task, completed=done, total=total)  # noqa: E731
            settings = settings_from(ClinicalSettings, options, mode=name, weights=weights)
            results.append(cross_validate(eyes, settings, progress=report))
    pairs = [(e.label, e.images["real"], e.images["synthetic"]) for e in eyes if {"real", "synthetic"} <= set(e.images)]
    agreement = scores_by_class(pairs) if pairs else None  # vessels and regions of synthetic vs real, per class
    path = write_clinical_report(
        results,
        out,
        skipped_modes,
        agreement,
        differences(results),
        data=str(data),
        synthetic=str(synthetic) if synthetic else None,
        **context,
    )
    runs = f"{folds}-fold cross-validation{f' × {repeats}' if repeats > 1 else ''}"
    table = Table(title=f"{data.name}: {runs} ({backbone}), mean [95% interval]")
    for column in ("mode", "examples", *METRIC_NAMES.values()):
        table.add_column(column)
    for result in results:
        summary = result.summary()
        table.add_row(result.settings.mode, str(len(result.ids)), *(interval_text(summary[k]) for k in METRIC_NAMES))
    Console().print(table)
    for name, difference in differences(results).items():
        accuracy = difference["accuracy"]
        typer.echo(f"{name} − source-only, accuracy {interval_text(accuracy, signed=True)} ({accuracy['folds']} folds)")
    typer.echo(f"wrote {path} and the figures beside it")


def differences(results) -> dict[str, dict[str, dict]]:
    """Each mode's paired difference from source-only per metric (clinical_stats.paired_difference), for the
    modes that ran on source-only's eyes; {} without source-only."""
    reference = next((r for r in results if r.settings.mode == "source-only"), None)
    if reference is None:
        return {}
    return {
        result.settings.mode: {
            metric: paired_difference(result.scores(metric), reference.scores(metric), reference.test_fraction)
            for metric in METRIC_NAMES
        }
        for result in results
        if result is not reference and result.ids == reference.ids
    }
