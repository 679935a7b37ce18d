"""`ffasynth base ...`: the tiny preset's pretrained base model: rebuild it from nothing, or describe one."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth.cli.options import SEED, in_range
from ffasynth.files import check_output_folder
from ffasynth.models import base as base_model

app = typer.Typer(help="The tiny preset's pretrained base model (model.base).", no_args_is_help=True)

# ffasynth.pretrain trains all three stages (diffusers, transformers, accelerate: seconds to import):
# imported when `build` runs, so `ffasynth --help` does not wait for it.


@app.command("build")
def build_command(
    out: Path = typer.Option(..., "--out", help="Folder for the data, the runs, base.safetensors and MODEL_CARD.md."),
    minutes: float = typer.Option(
        60.0, "--minutes", callback=in_range(0, above=True), help="Training budget over the three stages (CPU minutes)."
    ),
    shared: Path | None = typer.Option(
        None, "--shared", help="The shared real images (default $FFASYNTH_SHARED_DATA or ../shared/data)."
    ),
    seed: int = typer.Option(0, "--seed", callback=SEED, help="Seed for the procedural data and training."),
    scale: str = typer.Option("full", "--scale", help="full (the shipped recipe) or mini (a smoke run)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overrides: list[str] | None = typer.Argument(None, help="Config fields as key=value (tiny preset)."),
) -> None:
    """The recipe of the shipped base: procedural UWF-like and standard pairs plus the shared real
    training images (never the test eyes) → VAE → U-Net → decoder → OUT/base.safetensors. To use it,
    point model.base at it, or copy it over src/ffasynth/base/tiny.safetensors to ship it."""
    from ffasynth.pretrain import build_base, default_shared

    shared = shared if shared is not None else default_shared()
    check_output_folder(out, [shared])
    if not shared.is_dir():
        typer.echo(f"note: no shared real images at {shared}: the base learns from procedural pairs only")
        shared = None
    build_base(out, minutes, shared, seed, scale, list(overrides or []), not quiet, typer.echo)


@app.command("info")
def info_command(
    base: str = typer.Argument("tiny", help="`tiny` (the packaged base) or a base .safetensors file."),
) -> None:
    """Where a base came from: its architecture, data, steps and minutes (from the file's header)."""
    path = base_model.resolve(base)
    if path is None:
        typer.echo("model.base=none: random initialisation")
        return
    header = base_model.read_header(path)
    typer.echo(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    for key in ("command", "minutes", "steps", "data", "float16_relative_error_unet", "scaling_factor"):
        if key in header:
            typer.echo(f"  {key}: {header[key]}")
