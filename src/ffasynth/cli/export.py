"""`ffasynth export RUN_DIR OUT_DIR`: a training run → a pipeline folder with a model card."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth.files import check_output_folder

# ffasynth.export rebuilds models with diffusers and transformers (seconds to import): imported when
# the verb runs, so `ffasynth --help` does not wait for it.


def export(
    run_dir: Path = typer.Argument(
        ..., help="A stage-1 run, a stage-2 run (its stage-1 model with the fine-tuned decoder), or a distill run."
    ),
    out_dir: Path = typer.Argument(..., help="Pipeline folder to write (replaced if it holds an earlier export)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Export the EMA weights (default) or the raw ones."),
    lora: str = typer.Option(
        "merge",
        "--lora",
        help="A LoRA run's adapters: 'merge' them into the U-Net (a plain pipeline folder) or keep them "
        "'separate' in OUT_DIR/unet_lora/ (FFASynthesisPipeline.from_pretrained loads them).",
    ),
) -> None:
    """Write OUT_DIR as a diffusers pipeline folder (safetensors only) with a README.md model card:
    what the model was trained on, its configuration, steps and training metrics. Load it with
    `FFASynthesisPipeline.from_pretrained(OUT_DIR)` or use it with `ffasynth translate`."""
    check_output_folder(out_dir, [run_dir], "OUT_DIR", replaces=True)  # before seconds of imports and loading
    from ffasynth.export import export_run

    folder = export_run(run_dir, out_dir, ema=ema, lora=lora)
    typer.echo(f"exported {run_dir} → {folder}")
