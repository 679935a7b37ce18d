"""`ffasynth translate PIPELINE_DIR INPUT... --out DIR`: photos → synthetic angiograms."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from tqdm.auto import tqdm

from ffasynth.cli.options import SEED, in_range, one_of, settings_from
from ffasynth.data.dataset import PHASES
from ffasynth.files import check_not_replaced, check_output_folder, removed_if_left_empty
from ffasynth.tiling import check_tile_settings
from ffasynth.translate import (
    TranslateSettings,
    collect_inputs,
    load_pipeline,
    output_file,
    output_names,
    resolve_device,
    translate_files,
)


def translate(
    pipeline_dir: Path = typer.Argument(..., help="A pipeline folder written by `ffasynth export`."),
    inputs: list[Path] = typer.Argument(..., help="Photo files and/or folders of photos."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Folder for <name>_ffa.png (and <name>_uncertainty.png); not an input's folder. Inputs sharing a "
        "name (a.jpg, a.png) keep their suffix (a.jpg_ffa.png), with a note.",
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        callback=in_range(1),
        help="Denoising steps. Default: the pipeline's (20; 4 for the tiny preset and for an LCM student).",
    ),
    seed: int = typer.Option(
        0, "--seed", callback=SEED, help="Noise seed (0 to 2^32-1); each image is seeded alike, so results repeat."
    ),
    samples: int = typer.Option(
        1, "--samples", callback=in_range(1), help="Samples per image; > 1 writes their mean and a per-pixel std map."
    ),
    tile_size: int | None = typer.Option(
        None,
        "--tile-size",
        callback=in_range(0),
        help="Tile side in pixels, a multiple of the model's downsampling (default: the training crop); 0 = whole "
        "image at once.",
    ),
    tile_overlap: int | None = typer.Option(
        None,
        "--tile-overlap",
        callback=in_range(0),
        help="Tile overlap in pixels, up to half the tile (default: tile/4).",
    ),
    decode_tile_size: int | None = typer.Option(
        None,
        "--decode-tile-size",
        callback=in_range(0),
        help="VAE decode tile in pixels (default: max(tile, 1024)); 0 = whole image.",
    ),
    phase: str | None = typer.Option(
        None, "--phase", callback=one_of(*PHASES), help="FFA phase to synthesise: early or late."
    ),
    guidance: float | None = typer.Option(
        None,
        "--guidance",
        callback=in_range(1),
        help="Image guidance scale; 1 = none (one U-Net pass per step), > 1 = stronger (two). Default: the "
        "pipeline's (stage1.image_guidance_scale when it was exported).",
    ),
    start_strength: float = typer.Option(
        1.0,
        "--start-strength",
        callback=in_range(0, 1, above=True),
        help="1 = start from pure noise; s < 1 = from the photo's latent noised to the fraction s of the "
        "schedule (the first steps skipped: fewer U-Net passes).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="U-Net/CLIP weights: float32, float16 or bfloat16 (GPU); with float16 the VAE stays float32.",
    ),
    uncertainty_max: float = typer.Option(
        0.2,
        "--uncertainty-max",
        callback=in_range(0, above=True),
        help="Std (in [0, 1] intensity) shown as the brightest colour.",
    ),
    decoder: str = typer.Option(
        "vae",
        "--decoder",
        callback=one_of("vae", "preview"),
        help="vae, or preview: the tiny preview decoder of a distilled pipeline (fast, softer).",
    ),
    outside_field: str = typer.Option(
        "model",
        "--outside-field",
        callback=one_of("model", "black"),
        help="model: the model's output everywhere (default); black: 0 outside the photo's field of view, "
        "as a real angiogram looks.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace outputs of an earlier run in --out (refused without it)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Translate photos into FFA images of the same size (8-bit grey PNG). Large photos run in
    overlapping tiles blended at every step. A file that cannot be read or translated is reported
    in one line and skipped; the exit code is 1 when any failed."""
    options = dict(locals())
    resolve_device(device)  # a wrong word or an absent GPU: one line before the pipeline is read
    check_output_folder(out, [*inputs, pipeline_dir])
    files, problems = collect_inputs(inputs)
    for path, reason in problems:
        typer.secho(f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    names, notes = output_names(files)
    for note in notes:
        typer.echo(f"note: {note}")
    kinds = ("ffa", "uncertainty")[: 1 + (samples > 1)]
    check_not_replaced(out, [output_file(name, kind) for name in names.values() for kind in kinds], overwrite)
    pipeline = load_pipeline(pipeline_dir, device, dtype)
    flags = ("--tile-size", "--tile-overlap", "--decode-tile-size")
    tile = pipeline.config.tile_size if tile_size is None else tile_size
    factors = (pipeline.vae_scale_factor, pipeline.unet_scale_factor)
    for note in check_tile_settings(tile, tile_overlap, decode_tile_size, *factors, flags):
        typer.echo(f"note: {note}")
    pipeline.set_progress_bar_config(disable=quiet, leave=False, desc="steps")
    settings = settings_from(TranslateSettings, options)
    bar = tqdm(total=len(files), desc="images", unit="image", disable=quiet)

    def done(path: Path, error: str | None, warning: str | None) -> None:
        if error is not None or warning is not None:
            # on stderr, above the bars; click drops the colour when stderr is not a terminal
            with tqdm.external_write_mode(file=sys.stderr):
                text = f"skipped {path}: {error}" if error is not None else f"warning: {path}: {warning}"
                typer.secho(text, fg=typer.colors.YELLOW, err=True)
        bar.update(1)

    with removed_if_left_empty(out):
        report = translate_files(pipeline, files, out, settings, on_done=done)
    bar.close()
    failed = len(report.failed) + len(problems)
    seconds = sum(report.seconds.values())
    typer.echo(
        f"translated {len(report.seconds)} image(s) into {out} in {seconds:.1f}s"
        + (f"; {failed} failed" if failed else "")
    )
    raise typer.Exit(1 if failed else 0)
