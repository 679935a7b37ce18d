"""`ffasynth translate PIPELINE_DIR INPUT... --out DIR`: photos → synthetic angiograms."""

from __future__ import annotations

from pathlib import Path

import typer
from tqdm.auto import tqdm

from ffasynth.cli.options import settings_from
from ffasynth.translate import TranslateSettings, collect_inputs, load_pipeline, translate_files


def translate(
    pipeline_dir: Path = typer.Argument(..., help="A pipeline folder written by `ffasynth export`."),
    inputs: list[Path] = typer.Argument(..., help="Photo files and/or folders of photos."),
    out: Path = typer.Option(..., "--out", help="Folder for <name>_ffa.png (and <name>_uncertainty.png)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Denoising steps (DPM-Solver++)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed; each image is seeded alike, so results are reproducible."),
    samples: int = typer.Option(
        1, "--samples", min=1, help="Samples per image; > 1 writes their mean and a per-pixel std map."
    ),
    tile_size: int | None = typer.Option(
        None, "--tile-size", help="Tile side in pixels (default: the training crop); 0 = whole image at once."
    ),
    tile_overlap: int | None = typer.Option(None, "--tile-overlap", help="Tile overlap in pixels (default: tile/4)."),
    decode_tile_size: int | None = typer.Option(
        None, "--decode-tile-size", help="VAE decode tile in pixels (default: max(tile, 512)); 0 = whole image."
    ),
    phase: str | None = typer.Option(None, "--phase", help="FFA phase to synthesise: early or late."),
    guidance: float | None = typer.Option(
        None,
        "--guidance",
        help="Image guidance scale; 1 = none (one U-Net pass per step), > 1 = stronger (two). Default: the "
        "pipeline's (stage1.image_guidance_scale when it was exported).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="U-Net/CLIP weights: float32, float16 or bfloat16 (GPU); with float16 the VAE stays float32.",
    ),
    uncertainty_max: float = typer.Option(
        0.2, "--uncertainty-max", min=1e-6, help="Std (in [0, 1] intensity) shown as the brightest colour."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Translate photos into FFA images of the same size (8-bit grey PNG). Large photos run in
    overlapping tiles blended at every step. A file that cannot be read or translated is reported
    in one line and skipped; the exit code is 1 when any failed."""
    options = dict(locals())
    files, problems = collect_inputs(inputs)
    for path, reason in problems:
        typer.secho(f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    pipeline = load_pipeline(pipeline_dir, device, dtype)
    pipeline.set_progress_bar_config(disable=quiet, leave=False, desc="steps")
    settings = settings_from(TranslateSettings, options)
    bar = tqdm(total=len(files), desc="images", unit="image", disable=quiet)

    def done(path: Path, error: str | None, warning: str | None) -> None:
        if error is not None:
            tqdm.write(typer.style(f"skipped {path}: {error}", fg=typer.colors.YELLOW))
        elif warning is not None:
            tqdm.write(typer.style(f"warning: {path}: {warning}", fg=typer.colors.YELLOW))
        bar.update(1)

    report = translate_files(pipeline, files, out, settings, on_done=done)
    bar.close()
    failed = len(report.failed) + len(problems)
    seconds = sum(report.seconds.values())
    typer.echo(
        f"translated {len(report.seconds)} image(s) into {out} in {seconds:.1f}s"
        + (f"; {failed} failed" if failed else "")
    )
    raise typer.Exit(1 if failed else 0)
