"""`ffasynth weights ...`: make downloaded weights loadable (safetensors only)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Prepare downloaded model weights (convert pickle files to safetensors).", no_args_is_help=True)


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

    folder = convert_clip_checkpoint(source, out)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    typer.echo(f"converted {source} → {folder} ({files})")
    typer.echo(f"use it with: ffasynth train stage1 --config configs/sd15.yaml model.image_encoder={folder} ...")
