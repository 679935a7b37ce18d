"""`ffasynth train ...`: stage 0 (VAE), stage 1 (U-Net)."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth.config import Config, load_config

app = typer.Typer(
    help="Train the model: `vae` (stage 0, when no pretrained VAE), `stage1` (U-Net).", no_args_is_help=True
)

DATA = typer.Option(..., "--data", help="Folder of registered pairs (its train/ subfolder is used when present).")
OUT = typer.Option(..., "--out", help="Run folder to write (config, checkpoints, samples, logs).")
CONFIG = typer.Option(None, "--config", help="YAML config file (see `configs/`).")
PRESET = typer.Option(None, "--preset", help="tiny (CPU, seconds) or sd15 (the paper's scale).")
RESUME = typer.Option(False, "--resume", help="Continue from the run's newest complete checkpoint and config.")
MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps in total.")
BATCH = typer.Option(None, "--batch-size", help="Crops per step (per process).")
RESOLUTION = typer.Option(None, "--resolution", help="Crop size in pixels (data.crop_size).")
SAVE_EVERY = typer.Option(None, "--save-every", help="Checkpoint every N steps.")
SEED = typer.Option(None, "--seed", help="Seed for crops, noise and initialisation.")
OVERRIDES = typer.Argument(None, help="Any config field as key=value, e.g. stage1.lr=1e-4 model.use_clip=false.")
QUIET = typer.Option(False, "--quiet", help="No progress bar.")


def resolve_config(
    section: str,
    out: Path,
    config_file: Path | None,
    preset: str | None,
    resume: bool,
    flags: dict,
    overrides: list[str] | None,
) -> Config:
    """Defaults ← preset ← --config (or, with --resume, the run's saved config) ← flags ← key=value."""
    saved = out / "config.yaml"
    base = saved if resume and saved.is_file() and config_file is None else config_file
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    extra = [e.replace("train.", f"{section}.") for e in extra]
    return load_config(base, preset, extra + list(overrides or []))


def _flags(max_steps, batch_size, resolution, save_every, seed) -> dict:
    return {
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "data.crop_size": resolution,
        "train.save_every": save_every,
        "seed": seed,
    }


def _say(message: str) -> None:
    typer.secho(
        message, err=message.startswith("warning"), fg=typer.colors.YELLOW if message.startswith("warning") else None
    )


@app.command("vae")
def train_vae(
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
    """Stage 0: train a VAE on source and target crops (L1 + small KL). Writes RUN/vae/ for `--vae RUN`."""
    from ffasynth.training.stages import run_vae

    flags = _flags(max_steps, batch_size, resolution, save_every, seed)
    config = resolve_config("vae", out, config_file, preset, resume, flags, overrides)
    run_vae(config, data, out, resume, not quiet, _say)


@app.command("stage1")
def train_stage1(
    data: Path = DATA,
    out: Path = OUT,
    config_file: Path | None = CONFIG,
    preset: str | None = PRESET,
    vae: str | None = typer.Option(None, "--vae", help="A `train vae` run or diffusers VAE folder (model.vae)."),
    resume: bool = RESUME,
    max_steps: int | None = MAX_STEPS,
    batch_size: int | None = BATCH,
    resolution: int | None = RESOLUTION,
    save_every: int | None = SAVE_EVERY,
    seed: int | None = SEED,
    quiet: bool = QUIET,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Stage 1: train the denoising U-Net on FFA latents, conditioned on the photo (CLIP tokens and/or
    the concatenated source latent), with offset noise. VAE and CLIP stay frozen."""
    from ffasynth.training.stages import run_stage1

    flags = _flags(max_steps, batch_size, resolution, save_every, seed)
    if vae is not None:
        flags["model.vae"] = str(Path(vae).resolve()) if Path(vae).exists() else vae
    config = resolve_config("stage1", out, config_file, preset, resume, flags, overrides)
    run_stage1(config, data, out, resume, not quiet, _say)


@app.command("stage2")
def train_stage2(
    from_run: Path = typer.Option(
        ..., "--from", help="The stage-1 run whose U-Net latents the decoder learns to decode."
    ),
    data: Path = DATA,
    out: Path = OUT,
    config_file: Path | None = CONFIG,
    resume: bool = RESUME,
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the stage-1 U-Net's raw weights, not its EMA."),
    max_steps: int | None = MAX_STEPS,
    batch_size: int | None = BATCH,
    resolution: int | None = RESOLUTION,
    save_every: int | None = SAVE_EVERY,
    seed: int | None = SEED,
    quiet: bool = QUIET,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Stage 2: fine-tune only the VAE decoder (L1 + LPIPS + PatchGAN with adaptive weight) on real FFA
    crops, decoding what the frozen stage-1 model samples for their photos (stage2.latents=sampler; also
    encoder, unet or mix). Reports the decoder's reconstruction PSNR on the test images before and after."""
    from ffasynth.training.stages import run_stage2

    saved = out / "config.yaml"
    base = config_file or (saved if resume and saved.is_file() else from_run / "config.yaml")
    flags = _flags(max_steps, batch_size, resolution, save_every, seed)
    config = resolve_config("stage2", out, base, None, False, flags, overrides)
    run_stage2(config, from_run, data, out, resume, not quiet, _say, ema=not no_ema)
