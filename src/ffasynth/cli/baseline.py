"""`ffasynth baseline ...`: the pix2pix GAN baseline, trained and applied like ffasynth's own model."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth.cli.train import (
    BATCH,
    CONFIG,
    DATA,
    MAX_STEPS,
    OUT,
    OVERRIDES,
    PRESET,
    QUIET,
    RESOLUTION,
    RESUME,
    SAVE_EVERY,
    SEED,
    _flags,
    _say,
    resolve_config,
)

app = typer.Typer(help="The pix2pix baseline: `train` on the same pairs, `translate` photos.", no_args_is_help=True)


@app.command("train")
def train_pix2pix(
    data: Path = DATA,
    out: Path = OUT,
    config_file: Path | None = CONFIG,
    preset: str | None = PRESET,
    resume: bool = RESUME,
    max_steps: int | None = MAX_STEPS,
    batch_size: int | None = BATCH,
    resolution: int | None = RESOLUTION,
    save_every: int | None = SAVE_EVERY,
    seed: int | None = SEED,
    quiet: bool = QUIET,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train pix2pix (U-Net generator, 70×70 PatchGAN, GAN + 100·L1) on random paired crops, with the
    same data pipeline, loop, checkpoints and --resume as `ffasynth train`. Fields: pix2pix.*"""
    from ffasynth.baselines.training import run_pix2pix

    flags = _flags(max_steps, batch_size, resolution, save_every, seed)
    config = resolve_config("pix2pix", out, config_file, preset, resume, flags, overrides)
    run_pix2pix(config, data, out, resume, not quiet, _say)


@app.command("translate")
def translate_pix2pix(
    run: Path = typer.Argument(..., help="A `ffasynth baseline train` run folder."),
    inputs: list[Path] = typer.Argument(..., help="Photos or folders of photos."),
    out: Path = typer.Option(..., "--out", help="Folder for <name>_ffa.png outputs."),
) -> None:
    """Whole photos at native size (tiled when large) → `<name>_ffa.png`, named as `ffasynth translate`
    names its outputs, so `ffasynth evaluate --fake pix2pix=DIR --fake ffasynth=DIR2` compares both."""
    from ffasynth.baselines.training import translate_folder
    from ffasynth.translate import collect_inputs

    files, problems = collect_inputs(inputs)
    for path, reason in problems:
        typer.secho(f"error: {path}: {reason}", fg=typer.colors.RED, err=True)
    failed = translate_folder(run, files, out, typer.echo)
    if problems or failed or not files:
        raise typer.Exit(1)
