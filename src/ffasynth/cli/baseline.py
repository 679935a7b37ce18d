"""`ffasynth baseline ...`: the pix2pix GAN baseline, trained and applied like ffasynth's own model."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth.cli.options import TrainOptions, one_of, say, train_options
from ffasynth.data.dataset import PHASES
from ffasynth.files import check_not_replaced, check_output_folder, removed_if_left_empty
from ffasynth.translate import collect_inputs, output_file, output_names

# The baseline's training and tiling import accelerate and the training loop (seconds); they are
# imported in the verbs that run them, so `ffasynth --help` does not wait for them.

app = typer.Typer(help="The pix2pix baseline: `train` on the same pairs, `translate` photos.", no_args_is_help=True)


@app.command("train")
@train_options()
def train_command(options: TrainOptions) -> None:
    """Train pix2pix (U-Net generator, 70×70 PatchGAN, GAN + 100·L1) on random paired crops, with the
    same data pipeline, loop, checkpoints and --resume as `ffasynth train`. Fields: pix2pix.*"""
    from ffasynth.baselines.training import train_pix2pix

    train_pix2pix(options.config("pix2pix"), options.data, options.out, options.resume, options.progress, say)


@app.command("translate")
def translate_command(
    run: Path = typer.Argument(..., help="A `ffasynth baseline train` run folder."),
    inputs: list[Path] = typer.Argument(..., help="Photos or folders of photos."),
    out: Path = typer.Option(..., "--out", help="Folder for <name>_ffa.png outputs."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace outputs of an earlier run in --out (refused without it)."
    ),
    phase: str | None = typer.Option(
        None, "--phase", callback=one_of(*PHASES), help="FFA phase to draw: early (default) or late."
    ),
) -> None:
    """Whole photos at native size (tiled when large) → `<name>_ffa.png`, named as `ffasynth translate`
    names its outputs, so `ffasynth evaluate --fake pix2pix=DIR --fake ffasynth=DIR2` compares both.
    A run trained with pix2pix.num_phases > 0 (the default) draws the phase named by --phase."""
    from ffasynth.baselines.training import generate_folder

    check_output_folder(out, [*inputs, run])
    files, problems = collect_inputs(inputs)
    check_not_replaced(out, [output_file(name) for name in output_names(files)[0].values()], overwrite)
    for path, reason in problems:
        typer.secho(f"error: {path}: {reason}", fg=typer.colors.RED, err=True)
    with removed_if_left_empty(out):
        failed = generate_folder(run, files, out, typer.echo, phase)
    if problems or failed or not files:
        raise typer.Exit(1)
