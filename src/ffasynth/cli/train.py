"""`ffasynth train ...`: stage 0 (VAE), stage 1 (U-Net), stage 2 (decoder), distill (fewer passes).
The options they share (--data, --out, --config, --resume, --max-steps ...) are cli/options.py's TRAIN_OPTIONS."""

from __future__ import annotations

from pathlib import Path

import typer

from ffasynth import run_folder
from ffasynth.cli.options import TrainOptions, say, train_options
from ffasynth.errors import FFASynthError
from ffasynth.files import check_output_folder

# The training stages import diffusers, transformers and accelerate (seconds); they are imported in
# the verbs that run them, so `ffasynth --help` and the other verbs do not wait for them.

app = typer.Typer(
    help="Train the model: `vae` (stage 0, when no pretrained VAE), `stage1` (U-Net), `stage2` (decoder), "
    "`distill` (guidance folded in, few-step sampling and a preview decoder, from a trained model).",
    no_args_is_help=True,
)


@app.command("vae")
@train_options()
def vae_command(options: TrainOptions) -> None:
    """Stage 0: train a VAE on source and target crops (L1 + small KL). Writes RUN/vae/ for `--vae RUN`."""
    from ffasynth.training.stages import train_vae

    train_vae(options.config("vae"), options.data, options.out, options.resume, options.progress, say)


@app.command("stage1")
@train_options()
def stage1_command(
    options: TrainOptions,
    vae: str | None = typer.Option(None, "--vae", help="A `train vae` run or diffusers VAE folder (model.vae)."),
) -> None:
    """Stage 1: train the denoising U-Net on FFA latents, conditioned on the photo (CLIP tokens and/or
    the concatenated source latent), with offset noise. VAE and CLIP stay frozen."""
    from ffasynth.training.stages import train_stage1

    if vae is not None:
        vae = str(Path(vae).resolve()) if Path(vae).exists() else vae
    config = options.config("stage1", **{"model.vae": vae})
    train_stage1(config, options.data, options.out, options.resume, options.progress, say)


@app.command("stage2")
@train_options(without=("preset",))  # its starting config is the stage-1 run's, already resolved
def stage2_command(
    options: TrainOptions,
    from_run: Path = typer.Option(
        ..., "--from", help="The stage-1 run whose U-Net latents the decoder learns to decode."
    ),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the stage-1 U-Net's raw weights, not its EMA."),
) -> None:
    """Stage 2: fine-tune only the VAE decoder (L1 + LPIPS + PatchGAN with adaptive weight) on real FFA
    crops, decoding what the frozen stage-1 model samples for their photos (stage2.latents=sampler; also
    encoder, unet or mix). Reports the decoder's reconstruction PSNR on the test images before and after."""
    from ffasynth.training.stages import train_stage2

    check_output_folder(options.out, [from_run])  # the stage-1 run is read, never written
    config = options.config("stage2", start=from_run / "config.yaml")
    train_stage2(config, from_run, options.data, options.out, options.resume, options.progress, say, ema=not no_ema)


@app.command("distill")
@train_options(without=("preset",))  # its starting config is the teacher run's, already resolved
def distill_command(
    options: TrainOptions,
    from_run: Path = typer.Option(..., "--from", help="The stage-1 or stage-2 run to distil (the frozen teacher)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the teacher U-Net's raw weights, not its EMA."),
) -> None:
    """Distil a trained model into a student U-Net that takes the guidance scale as an input (one pass a
    step instead of two) and, with distill.method=lcm (the default), samples in 1-4 steps (latent
    consistency distillation; LCMScheduler); distill.lora.rank > 0 makes it LoRA adapters (SD1.5).
    Also distils the tiny preview decoder (distill.preview_decoder). `ffasynth export` the run."""
    from ffasynth.training.stages import train_distill

    check_output_folder(options.out, [from_run])  # the teacher run is read, never written
    kind = run_folder.info(from_run).get("kind")  # one line when --from is no run folder
    if kind not in ("stage1", "stage2"):
        raise FFASynthError(f"--from {from_run} is a '{kind}' run; distill takes a stage-1 or stage-2 run")
    config = options.config("distill", start=from_run / "config.yaml")
    train_distill(config, from_run, options.data, options.out, options.resume, options.progress, say, ema=not no_ema)
