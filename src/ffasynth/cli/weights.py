"""`ffasynth weights ...`: fetch and check the metric backbones; make downloaded weights loadable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from ffasynth.files import check_output_folder
from ffasynth.weights import KNOWN_WEIGHTS, TRUSTED_LIST, WEIGHTS_ENV, resolve_weights_dir, weights_status
from ffasynth.weights_download import DownloadError, Fetched, OfflineError, by_hand, download

app = typer.Typer(
    help="Fetch and check the metric backbones (FID/KID, LPIPS); convert pickled weights to safetensors.",
    no_args_is_help=True,
)
ALIASES = {"inception": "inception", "alexnet": "alexnet", "alex": "alexnet", "vgg": "vgg16", "vgg16": "vgg16"}
DONE = {
    "downloaded": "downloaded, SHA-256 verified",
    "present": "already present, SHA-256 verified",
    "trusted": "kept: your own file, listed as trusted",
}
DIR_HELP = f"Weights folder (default ${WEIGHTS_ENV}, else the torch hub cache: where evaluate and stage 2 look)."


def _names(which: str) -> list[str]:
    if which == "all":
        return list(KNOWN_WEIGHTS)
    if which not in ALIASES:
        raise typer.BadParameter(f"{which!r}: choose inception, alexnet, vgg or all")
    return [ALIASES[which]]


@app.command("download")
def download_command(
    which: str = typer.Argument(
        "all", help="inception (FID/KID), alexnet (LPIPS in evaluate), vgg (LPIPS in stage 2), or all."
    ),
    weights_dir: Path | None = typer.Option(None, "--dir", help=DIR_HELP),
    mirror: str | None = typer.Option(
        None,
        "--mirror",
        help="Fetch MIRROR/<file name> (a URL or a local folder), not upstream (still hash-checked).",
    ),
    timeout: float = typer.Option(60.0, "--timeout", min=1.0, help="Seconds to wait for the server at each step."),
) -> None:
    """Fetch the backbone files evaluate and stage 2 look for, once, each checked against its pinned SHA-256.

    A verified copy already in the folder is kept. A file is written only whole and verified: a failed,
    cut-short or corrupted transfer leaves nothing behind and says why in one line. Without internet:
    one line naming the files, their addresses and the folder to put them in by hand.
    """
    names = _names(which)
    folder = resolve_weights_dir(weights_dir)
    failures = 0
    for index, name in enumerate(names):
        try:
            fetched = _fetch(name, weights_dir, mirror, timeout)
        except OfflineError as error:
            usable = {s.name for s in weights_status(weights_dir) if s.state in ("upstream", "trusted")}
            missing = [n for n in names[index:] if n not in usable]
            message = f"no connection to {error.host} ({error.reason}): {by_hand(missing, folder)}"
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        except DownloadError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            failures += 1
            continue
        typer.echo(
            f"{fetched.path}: {DONE[fetched.state]} ({fetched.size / 2**20:.1f} MiB) → {KNOWN_WEIGHTS[name].enables}"
        )
    if failures:
        raise typer.Exit(1)


def _fetch(name: str, weights_dir: Path | None, mirror: str | None, timeout: float) -> Fetched:
    """One file with a progress bar on stderr (gone once the file is done)."""
    spec = KNOWN_WEIGHTS[name]
    columns = (TextColumn(spec.filename), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(spec.filename, total=spec.size)
        return download(
            name, weights_dir, mirror, timeout, lambda done, total: bar.update(task, completed=done, total=total)
        )


@app.command("check")
def check_command(weights_dir: Path | None = typer.Option(None, "--dir", help=DIR_HELP)) -> None:
    """List the backbone files present, what each enables, and whether its SHA-256 matches the pin.

    Exit code 1 when a file is damaged (it is never used); a missing file is listed with the command
    that fetches it.
    """
    folder = resolve_weights_dir(weights_dir)
    typer.echo(f"weights folder: {folder}")
    damaged = 0
    for status in weights_status(weights_dir):
        spec = KNOWN_WEIGHTS[status.name]
        pin = (
            "full digest" if len(spec.sha256) == 64 else f"the {len(spec.sha256)}-digit prefix, all upstream publishes"
        )
        if status.state == "upstream":
            line = f"ok       {spec.filename}: SHA-256 matches the pin ({pin}) → {spec.enables}"
        elif status.state == "trusted":
            line = f"trusted  {spec.filename}: your own file, listed in {TRUSTED_LIST} → {spec.enables}"
        elif status.state == "damaged":
            damaged += 1
            line = f"DAMAGED  {status.message}"
        else:
            line = f"missing  {spec.filename} ({spec.enables}): {status.message.removeprefix('missing: ')}"
        typer.echo(line)
    if damaged:
        raise typer.Exit(1)


@app.command("convert-clip")
def convert_clip(
    source: Path = typer.Argument(
        ...,
        help="A CLIP vision encoder kept as pytorch_model.bin: a repository folder with image_encoder/ "
        "(+ feature_extractor/), e.g. a download of lambdalabs/sd-image-variations-diffusers, the "
        "encoder folder itself, or its .bin file.",
    ),
    out: Path = typer.Option(..., "--out", help="New folder to write (model.safetensors, config.json, preprocessor)."),
) -> None:
    """Convert a CLIP image encoder from pytorch_model.bin to model.safetensors, once.

    The .bin is read with torch.load(weights_only=True): tensors only, so a file that would run code
    when unpickled is refused, never executed. OUT is written whole or not at all; point
    model.image_encoder at it.
    """
    # Inside: loading pulls in diffusers + transformers (~9 s here), which every `ffasynth` start would pay.
    from ffasynth.models.loading import convert_clip_checkpoint

    check_output_folder(out, [source])
    folder = convert_clip_checkpoint(source, out)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    typer.echo(f"converted {source} → {folder} ({files})")
    typer.echo(f"use it with: ffasynth train stage1 --config configs/sd15.yaml model.image_encoder={folder} ...")
