"""`ffasynth evaluate`: image-quality metrics of generated angiograms, with an offline HTML report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ffasynth.cli.options import SEED, in_range, settings_from
from ffasynth.errors import FFASynthError
from ffasynth.evaluation.metrics import METRICS, EvalSettings, evaluate
from ffasynth.evaluation.outputs import check_report_folder, summary_table, write_evaluation
from ffasynth.evaluation.report import format_value
from ffasynth.translate import resolve_device
from ffasynth.weights import WEIGHTS_ENV


def parse_fakes(values: list[str]) -> dict[str, Path]:
    """`DIR` or `name=DIR` → {name: DIR}; a bare DIR is named after its folder."""
    fakes: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or "/" in name:
            name, folder = Path(value).name or value, value
        if name in fakes:
            raise FFASynthError(f"--fake {value}: the name {name!r} is used twice; write name=DIR")
        if not Path(folder).is_dir():
            raise FFASynthError(f"--fake {value}: {folder} is not a folder")
        fakes[name] = Path(folder)
    return fakes


def evaluate_command(
    real: Path = typer.Option(..., "--real", help="Real angiograms (a uwf pair folder uses only its N.k targets)."),
    fake: list[str] = typer.Option(..., "--fake", help="Generated images: DIR or name=DIR; repeat to compare methods."),
    out: Path = typer.Option(..., "--out", help="Report folder: metrics.json, metrics.csv, report.html, summary.md."),
    source: Path | None = typer.Option(
        None, "--source", help="Source photos for the grid (default: the N.ext photos of a uwf --real folder)."
    ),
    pairs: str = typer.Option(
        "auto", "--pairs", help="Pairing: auto, name (_ffa suffix and extension ignored), manifest, or a real,fake CSV."
    ),
    metrics: str = typer.Option(",".join(METRICS), "--metrics", help="Comma-separated subset of the metrics."),
    fov_mask: bool = typer.Option(
        True, "--fov-mask/--no-fov-mask", help="Score paired metrics only inside the real image's field of view."
    ),
    fov_threshold: float = typer.Option(
        0.04,
        "--fov-threshold",
        callback=in_range(0.0, 1.0),
        help="Field of view: brightness above this after a 7-px blur.",
    ),
    patches: int = typer.Option(
        0, "--patches", callback=in_range(0), help="FID/KID on N random crops per image (0: whole images)."
    ),
    patch_size: int = typer.Option(
        512, "--patch-size", callback=in_range(16), help="Side of the FID/KID crops in pixels."
    ),
    resolution: int | None = typer.Option(
        None, "--resolution", callback=in_range(16), help="Scale every image's shorter side to this many pixels first."
    ),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="LPIPS backbone: alex or vgg."),
    weights_dir: Path | None = typer.Option(
        None, "--weights-dir", help=f"Backbone weights folder (default ${WEIGHTS_ENV}, else the torch hub cache)."
    ),
    seed: int = typer.Option(0, "--seed", callback=SEED, help="Seed of the crops and of the KID subsets."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
) -> None:
    """Compare generated angiograms with real ones: PSNR, SSIM, MS-SSIM, LPIPS on pairs; FID, KID between sets.

    A metric whose backbone weights are missing is skipped with a one-line reason; the rest is computed.
    An unreadable image is left out with a one-line warning. Exit code 1 when no metric could be computed.
    """
    options = dict(locals())
    settings = settings_from(
        EvalSettings,
        options,
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
        weights_dir=str(weights_dir) if weights_dir else None,
        device=str(resolve_device(device)),
    )
    fakes = parse_fakes(fake)
    check_report_folder(out, [real, source, *fakes.values()])  # before minutes of metrics, not after
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("loading backbones", total=None)
        evaluation = evaluate(
            real, fakes, settings, pairs, source, progress=lambda text: bar.update(task, description=text)
        )
        bar.update(task, description="writing the report")
        paths = write_evaluation(evaluation, out)

    table = Table(title=f"{real} vs {', '.join(fakes)}")
    columns, rows, _ = summary_table(evaluation)  # the report's table
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*map(format_value, row))
    Console().print(table)
    reasons: dict[str, list[str]] = {}
    for metric, reason in evaluation.skipped.items():
        reasons.setdefault(reason, []).append(metric)
    for reason, skipped in reasons.items():
        console.print(f"skipped {', '.join(skipped)}: {reason}", style="yellow", soft_wrap=True)
    for method in evaluation.methods:
        console.print(f"{method.name}: {method.pairing.summary()}")
        for warning in method.warnings:
            console.print(f"warning ({method.name}): {warning}", style="yellow", soft_wrap=True)
    for warning in evaluation.warnings:
        console.print(f"warning: {warning}", style="yellow", soft_wrap=True)
    typer.echo(f"wrote {paths['report.html']} (and metrics.json, metrics.csv, summary.md)")
    if all(metric in evaluation.skipped for metric in settings.metrics):
        typer.secho(f"error: no metric could be computed for --fake {', '.join(fake)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
