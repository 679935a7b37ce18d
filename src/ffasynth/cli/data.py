"""`ffasynth data ...`: inspect pair folders, register unaligned pairs, generate phantom data."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ffasynth.cli.options import SEED, in_range
from ffasynth.data.alignment import REPORT_NAME, RegistrationRow, register_folder
from ffasynth.data.pair_check import check_pairs
from ffasynth.data.pairs import LAYOUTS
from ffasynth.data.phantom import DISEASES, STYLES, write_phantom_dataset
from ffasynth.data.registration import MODELS, RegistrationParams
from ffasynth.errors import FFASynthError, OutputError
from ffasynth.evaluation.clinical import GROUPS_FILE
from ffasynth.evaluation.same_eye import MIN_INLIERS
from ffasynth.files import atomic_folder, atomic_write_text, check_output_file, check_output_folder

app = typer.Typer(help="Inspect, check, register and generate paired photo/FFA data.", no_args_is_help=True)


def _earlier_report(path: Path) -> bool:
    """Whether `path` holds a `data check --json` report (which a new one may replace), not another JSON file."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"root", "layout", "pairs", "problems"} <= set(report)


@app.command("check")
def check(
    folder: Path = typer.Argument(..., help="Folder of pairs (or a CSV manifest)."),
    layout: str = typer.Option("auto", help=f"Pair layout: auto, {', '.join(LAYOUTS)}."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    decode: bool = typer.Option(
        True, help="Decode every image fully (catches truncated files); --no-decode reads headers only."
    ),
    max_pixels: int | None = typer.Option(
        None, callback=in_range(1), help="Refuse images with more pixels (default 64e6, or $FFASYNTH_MAX_PIXELS)."
    ),
) -> None:
    """List the pairs found in FOLDER and every problem (unpaired, unreadable, size mismatch...).

    Exit code 0 when at least one valid pair exists, 1 when none is valid, 2 when FOLDER holds no known layout.
    """
    if json_out is not None:
        check_output_file(json_out, [folder], "--json", suffixes=(".json",))
        if json_out.exists() and not _earlier_report(json_out):
            raise OutputError(f"--json {json_out} exists and is not an earlier `data check` report; it is not replaced")
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
            kind = f"{problem.kind} (kept)" if problem.kept else problem.kind  # a warning: the pair stays
            problems.add_row(kind, problem.path, problem.message)
        console.print(problems)
    console.print(report.summary(), style="bold green" if report.ok and not report.problems else "bold yellow")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report.to_json(), indent=2))
    raise typer.Exit(0 if report.ok else 1)


@app.command("phantom")
def phantom(
    out: Path = typer.Argument(
        ...,
        help="Output folder (uwf layout: N.png, N.1.png, N.2.png, labels.csv): new, empty or an earlier phantom set.",
    ),
    n: int = typer.Option(100, "--n", callback=in_range(1), help="Number of eyes."),
    size: int = typer.Option(256, "--size", callback=in_range(32), help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", callback=SEED, help="Random seed; the same seed gives the same images."),
    diseases: str = typer.Option(",".join(DISEASES), help="Comma-separated labels to draw, balanced."),
    test_fraction: float = typer.Option(
        0.0, callback=in_range(0.0, 0.9), help="Put this fraction in test/, the rest in train/."
    ),
    style: str = typer.Option(
        "standard",
        help="standard: a colour fundus photo, round 45-degree field; uwf: Optos-like ultra-widefield "
        "pseudo-colour (red/green) photo with lids, lashes and a wide elliptical field.",
    ),
) -> None:
    """Generate procedural registered photo/FFA pairs (early and late phase) with disease labels."""
    if style not in STYLES:
        raise typer.BadParameter(f"unknown style {style!r}; choose from {', '.join(STYLES)}", param_hint="--style")
    chosen = tuple(d.strip() for d in diseases.split(",") if d.strip())
    unknown = [d for d in chosen if d not in DISEASES]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown disease {unknown[0] if unknown else '(none)'}; choose from {', '.join(DISEASES)}",
            param_hint="--diseases",
        )
    check_output_folder(out, option="OUT")
    if out.is_dir() and any(out.iterdir()) and not _phantom_set(out):
        message = f"OUT {out} holds other files than an earlier phantom set, which could be overwritten"
        raise FFASynthError(f"{message}; choose a new or empty folder")
    with Progress(transient=True) as progress:
        task = progress.add_task("drawing eyes", total=n)

        def fill(folder: Path) -> None:
            update = lambda done: progress.update(task, completed=done)  # noqa: E731
            write_phantom_dataset(folder, n, size, seed, chosen, test_fraction, progress=update, style=style)

        # drawn beside OUT and renamed into place: an interrupted run leaves no partial set that looks whole
        atomic_folder(out, fill)
    typer.echo(f"wrote {n} {style} phantom pairs ({size}x{size}, early + late FFA) to {out}")


def _phantom_set(folder: Path) -> bool:
    """Only what `data phantom` writes: N.png, N.1.png, N.2.png, N.lesions.json and labels.csv (in train/
    and test/ too)."""
    names = re.compile(r"^\d+(\.[12])?\.png$|^\d+\.lesions\.json$|^labels\.csv$")
    found = [p for p in folder.rglob("*") if p.is_file()]
    inside = all(p.parent in (folder, folder / "train", folder / "test") for p in found)
    return inside and all(names.match(p.name) for p in found) and (folder / "labels.csv").is_file()


@app.command("register")
def register(
    folder: Path = typer.Argument(..., help="Folder of unregistered pairs (any layout `data check` knows)."),
    out: Path = typer.Option(
        ..., "--out", help="Folder for the aligned pairs (uwf layout) and their report (registration.csv, _*/)."
    ),
    model: str = typer.Option("affine", help=f"Transform model: {', '.join(MODELS)}."),
    layout: str = typer.Option("auto", help=f"Pair layout: auto, {', '.join(LAYOUTS)}."),
    source: str | None = typer.Option(
        None, "--source", help="One pair per folder: the source photo's file stem (e.g. cfp); needs --target."
    ),
    target: str | None = typer.Option(
        None, "--target", help="One pair per folder: the angiogram's file stem (e.g. ffa)."
    ),
    min_margin: float = typer.Option(
        RegistrationParams.min_margin,
        callback=in_range(0.0, 1.0),
        help="Refuse a pair whose vessel correlation is not this far above what the mirrored angiogram "
        "(an unrelated eye) reaches.",
    ),
    overwrite: bool = typer.Option(False, help="Replace OUT when it exists and is not empty."),
) -> None:
    """Align each photo onto its angiogram from the vessel tree and write the photo in the
    angiogram's frame (the angiogram unchanged) to OUT, with OUT/registration.csv and one JSON per
    pair (transform, vessel correlations, consistency between phases). A pair whose match is not
    clear keeps the identity when both images have one size (else it is left out), with one warning
    line naming it. A cfp.jpg + ffa.jpg folder is found as the `named` layout.

    Exit code 0 when at least one pair was registered, 1 otherwise.
    """
    if model not in MODELS:
        raise typer.BadParameter(f"unknown model {model!r}; choose one of {', '.join(MODELS)}", param_hint="--model")
    if (source is None) != (target is None):
        raise typer.BadParameter("give both --source and --target, or neither", param_hint="--source/--target")
    check_output_folder(out, [folder], replaces=overwrite)
    params = RegistrationParams(model=model, min_margin=min_margin)
    names = (source, target) if source and target else None
    with Progress(transient=True) as progress:
        task = progress.add_task("registering", total=None)

        def advance(done: int, total: int, row: RegistrationRow) -> None:
            progress.update(task, completed=done, total=total, description=f"registered {row.id}")

        rows = register_folder(folder, out, params, layout, names, overwrite, progress=advance)
    console = Console()
    table = Table(title=f"{folder} → {out}")
    for column in ("id", "phase", "status", "correlation", "mirrored", "consistency", "seconds", "reason"):
        table.add_column(column)
    for row in rows:
        style = "green" if row.status in ("registered", "transferred") else "red"
        table.add_row(
            row.id, row.phase or "-", f"[{style}]{row.status}[/{style}]",
            f"{row.identity_correlation:.2f} → {row.correlation:.2f}", f"{row.null_correlation:.2f}",
            f"{row.consistency_px:.0f} px", f"{row.seconds:.1f}", row.reason,
        )  # fmt: skip
    console.print(table)
    aligned = sum(row.status in ("registered", "transferred") for row in rows)
    console.print(f"{aligned} of {len(rows)} pairs registered; report: {out / REPORT_NAME}")
    raise typer.Exit(0 if aligned else 1)


@app.command("groups")
def groups(
    folder: Path = typer.Argument(..., help="Labelled data, as `clinical --data` takes it (class folders, pairs)."),
    out: Path | None = typer.Option(None, "--out", help="The CSV to write (default FOLDER/groups.csv)."),
    min_inliers: int = typer.Option(
        MIN_INLIERS, "--min-inliers", callback=in_range(3), help="Keypoints that must agree to join two images."
    ),
    across_classes: bool = typer.Option(
        False, "--across-classes", help="Also compare images of different classes (default: within a class)."
    ),
) -> None:
    """Find images that show one eye (keypoint matching) and write groups.csv (id,group) for `clinical`, so
    that one eye's images stay in one fold. Look at the pairs it lists: it joins by vessel pattern, not by
    patient record."""
    from ffasynth.evaluation.clinical import load_labelled
    from ffasynth.evaluation.same_eye import same_eye_groups

    out = folder / GROUPS_FILE if out is None else out
    if out.exists():
        raise OutputError(f"{out} exists: move it away (or give another --out) to write new groups")
    eyes = load_labelled(folder)
    images = {eye.id: eye.images.get("real", eye.images.get("source")) for eye in eyes}
    found, matches = same_eye_groups(images, None if across_classes else {e.id: e.label for e in eyes}, min_inliers)
    sizes = Counter(found.values())
    joined = sorted((group, key) for key, group in found.items() if sizes[group] > 1)
    atomic_write_text(out, "id,group\n" + "".join(f"{key},{group}\n" for group, key in joined))
    for match in matches:
        typer.echo(f"{match.first} ~ {match.second}: {match.inliers} keypoints agree")
    count = len({group for group, _ in joined})
    typer.echo(f"{len(joined)} of {len(images)} images in {count} groups of one eye; wrote {out}")
