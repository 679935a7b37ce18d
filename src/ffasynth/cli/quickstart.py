"""`ffasynth quickstart` and `ffasynth serve`."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth.app import ServeSettings
from ffasynth.app import serve as serve_page
from ffasynth.cli.options import SEED, in_range
from ffasynth.files import check_output_folder
from ffasynth.translate import library_bars_off, resolve_device

# ffasynth.quickstart trains, exports and evaluates: it imports diffusers, transformers and accelerate
# (seconds), so `quickstart` imports it when it runs, and `ffasynth --help` does not wait for it.


def quickstart(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for data, runs, pipeline, outputs and report."),
    minutes: float = typer.Option(
        5.0,
        "--minutes",
        callback=in_range(0.2),
        help="Wall-clock budget for the whole job (CPU: about this long).",
    ),
    data: Path | None = typer.Option(None, "--data", help="Your folder of pairs (default: generated phantom pairs)."),
    seed: int = typer.Option(0, "--seed", callback=SEED, help="Seed for data, training and sampling."),
    steps: int | None = typer.Option(
        None,
        "--steps",
        callback=in_range(1),
        help="Denoising steps when translating the held-out photos. Default: the pipeline's (4 for the tiny preset).",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    decoder: bool | None = typer.Option(
        None,
        "--decoder/--no-decoder",
        help="Train stage 2 (the VAE decoder). Default: on from random weights (model.base=none), off when "
        "fine-tuning the base, whose decoder is kept (on a few real pairs stage 2 blurred the vessels).",
    ),
    overrides: list[str] | None = typer.Argument(None, help="Config fields as key=value (tiny preset)."),
) -> None:
    """The main job end to end with the tiny preset: (phantom) data → U-Net fine-tuned from the shipped base
    (from random weights, model.base=none: VAE → U-Net → decoder) → export → translate held-out photos →
    evaluate → HTML report. Needs no weights, no GPU, no internet."""
    from ffasynth.quickstart import quickstart as run

    check_output_folder(out, [data])
    if quiet:  # the libraries' own bars too
        library_bars_off()
    result = run(out, minutes, data, seed, steps, not quiet, typer.echo, overrides, decoder)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items() if isinstance(v, float))
    typer.echo(f"\nfinished in {result.minutes:.1f} min; held-out {shown}")
    typer.echo(f"report: {result.report.resolve()}  (open it in a browser)")
    typer.echo(f"pipeline: {result.pipeline.resolve()}  (try: ffasynth serve {result.pipeline})")
    typer.echo("your own registered pairs, same tiny model on CPU:")
    typer.echo("  ffasynth quickstart --data /path/to/pairs --out my-run --minutes 30")
    typer.echo("SD1.5 on a GPU (put the weights where configs/sd15.yaml points, or use hub ids with internet):")
    typer.echo("  ffasynth train stage1 --config configs/sd15.yaml --data DATA --out runs/stage1")
    typer.echo("  ffasynth train stage2 --config configs/sd15.yaml --from runs/stage1 --data DATA --out runs/stage2")
    typer.echo("  ffasynth export runs/stage2 pipelines/sd15 && ffasynth translate pipelines/sd15 PHOTOS --out out")


def serve(
    pipeline: Path = typer.Argument(..., help="An exported pipeline folder (`ffasynth export`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default is this machine only."),
    port: int = typer.Option(7860, "--port", callback=in_range(1, 65535)),
    max_upload_mb: int = typer.Option(20, "--max-upload-mb", callback=in_range(1), help="Largest upload accepted."),
    max_pixels: int = typer.Option(
        25_000_000, "--max-pixels", callback=in_range(1), help="Largest image (pixels) accepted."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """A web page for clinicians: upload a photo, see the synthetic angiogram (slider or side by side),
    the uncertainty map with several samples, and download it. Images are labelled synthetic."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host} exposes the page to your network", fg=typer.colors.YELLOW, err=True)
    resolve_device(device)  # a wrong word or an absent GPU: one line before the pipeline is read
    settings = ServeSettings(max_upload_mb=max_upload_mb, max_pixels=max_pixels, device=device)
    ready = f"serving {pipeline} on http://{host}:{port} (Ctrl-C to stop)"
    serve_page(pipeline, host, port, settings, on_ready=lambda: typer.echo(ready))
