"""`ffasynth data ...`: inspect pair folders and generate phantom data."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ffasynth.data.pairs import LAYOUTS, check_pairs
from ffasynth.data.phantom import DISEASES, write_phantom_dataset
from ffasynth.files import atomic_write_text

app = typer.Typer(help="Inspect, check and generate paired photo/FFA data.", no_args_is_help=True)


@app.command("check")
def check(
    folder: Path = typer.Argument(..., help="Folder of pairs (or a CSV manifest)."),
    layout: str = typer.Option("auto", help=f"Pair layout: auto, {', '.join(LAYOUTS)}."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    decode: bool = typer.Option(
        True, help="Decode every image fully (catches truncated files); --no-decode reads headers only."
    ),
    max_pixels: int | None = typer.Option(
        None, help="Refuse images with more pixels (default 64e6, or $FFASYNTH_MAX_PIXELS)."
    ),
) -> None:
    """List the pairs found in FOLDER and every problem (unpaired, unreadable, size mismatch...).

    Exit code 0 when at least one valid pair exists, 1 otherwise.
    """
    report = check_pairs(folder, layout, decode=decode, max_pixels=max_pixels)
    console = Console()
    table = Table(title=f"{folder} ({report.layout} layout)")
    for column in ("id", "phase", "label", "size (WxH)", "source", "target"):
        table.add_column(column)
    for pair in report.pairs:
        size = report.sizes.get(str(pair.source))
        table.add_row(
            pair.id,
            pair.phase or "-",
            pair.label or "-",
            f"{size[0]}x{size[1]}" if size else "?",
            pair.source.name,
            pair.target.name,
        )
    console.print(table)
    if report.problems:
        problems = Table(title="Problems", title_style="bold red")
        for column in ("kind", "file", "problem"):
            problems.add_column(column)
        for problem in report.problems:
            problems.add_row(problem.kind, problem.path, problem.message)
        console.print(problems)
    console.print(report.summary(), style="bold green" if report.ok and not report.problems else "bold yellow")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report.to_json(), indent=2))
    raise typer.Exit(0 if report.ok else 1)


@app.command("phantom")
def phantom(
    out: Path = typer.Argument(..., help="Output folder (uwf layout: N.png, N.1.png, N.2.png, labels.csv)."),
    n: int = typer.Option(100, "--n", min=1, help="Number of eyes."),
    size: int = typer.Option(256, "--size", min=32, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same images."),
    diseases: str = typer.Option(",".join(DISEASES), help="Comma-separated labels to draw, balanced."),
    test_fraction: float = typer.Option(0.0, min=0.0, max=0.9, help="Put this fraction in test/, the rest in train/."),
) -> None:
    """Generate procedural registered photo/FFA pairs (early and late phase) with disease labels."""
    chosen = tuple(d.strip() for d in diseases.split(",") if d.strip())
    unknown = [d for d in chosen if d not in DISEASES]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown disease {unknown[0] if unknown else '(none)'}; choose from {', '.join(DISEASES)}",
            param_hint="--diseases",
        )
    with Progress(transient=True) as progress:
        task = progress.add_task("drawing eyes", total=n)
        write_phantom_dataset(
            out, n, size, seed, chosen, test_fraction, progress=lambda done: progress.update(task, completed=done)
        )
    typer.echo(f"wrote {n} phantom pairs ({size}x{size}, early + late FFA) to {out}")
