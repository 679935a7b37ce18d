"""One function per training stage, from a resolved config to a finished run folder: what the
`train` verbs, `quickstart` and the base recipe call. `say` receives one-line progress messages; `dataset`
replaces DATA's training pairs (DATA is still recorded, and its test split is stage 2's report set).

Launched as several processes (torchrun, accelerate launch), every process trains, but only the
first (RANK 0) writes the run folder's files and reports: the others would write the same files
at the same time and print every line again."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ffasynth import run_folder
from ffasynth.config import Config
from ffasynth.data.dataset import PairDataset
from ffasynth.data.phantom_stream import with_rehearsal
from ffasynth.evaluation.decoder_report import reconstruction_report
from ffasynth.models import base
from ffasynth.models.architecture import vae_config
from ffasynth.tiling import TileSettings
from ffasynth.training.conditioning_gain import gain_line
from ffasynth.training.distill import DistillTask
from ffasynth.training.loop import TrainResult, train
from ffasynth.training.run import (
    load_model_run,
    load_pinned_stage1,
    load_stage1_run,
    load_teacher,
    load_training_data,
    prepare_run,
    save_model_folder,
)
from ffasynth.training.stage1 import build_stage1, trainable_parameters
from ffasynth.training.stage2 import Stage2Task, record_stage1
from ffasynth.training.vae import VAETask
from ffasynth.weights import build_lpips

Say = Callable[[str], None]  # receives one-line progress messages


def _quiet(message: str) -> None:
    pass


def launch() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun and accelerate launch set them; a process not launched so is (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_first_process() -> bool:
    return launch()[0] == 0


def _start(config: Config, data: Path, out: Path, kind: str, resume: bool, say: Callable, dataset):
    """What every stage begins with: whether this is the first process, its reporter (silent in the
    others), the training pairs (DATA's unless given) and the checked (first process: written) run folder."""
    first = is_first_process()
    say = say if first else _quiet
    dataset = dataset if dataset is not None else load_training_data(data, config, say)
    run_dir = prepare_run(out, config, kind, data, resume, write=first)
    if first and hasattr(dataset, "pairs"):  # which eyes the model saw, for `clinical` (run_folder.record_photos)
        run_folder.record_photos(run_dir, [pair.source for pair in dataset.pairs])
    return first, say, dataset, run_dir


def train_vae(
    config: Config, data: Path, out: Path, resume: bool = False, progress: bool = True, say: Say = _quiet, dataset=None
) -> TrainResult:
    """Stage 0: a VAE on source and target crops; RUN/vae/ is the diffusers folder to pass as --vae."""
    _, say, dataset, run_dir = _start(config, data, out, "vae", resume, say, dataset)
    say(f"{len(dataset)} training pairs from {data}; run folder {run_dir}")
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**vae_config(config.model))
    result = train(VAETask(vae, config.vae, dataset), dataset, config.vae, run_dir, config.seed, resume, progress)
    say(f"done: {result.step} steps; VAE in {run_dir / 'vae'} (latent scaling factor {vae.config.scaling_factor:.4f})")
    return result


def train_stage1(
    config: Config, data: Path, out: Path, resume: bool = False, progress: bool = True, say: Say = _quiet, dataset=None
) -> TrainResult:
    """Stage 1: the U-Net on target latents, conditioned on the source. From a base model with
    `stage1.rehearsal` > 0, DATA's pairs are mixed with the base's procedural pairs (not a given dataset)."""
    from_base = base.resolve(config.model.base) is not None
    rehearse = dataset is None and config.stage1.rehearsal > 0 and from_base
    first, say, dataset, run_dir = _start(config, data, out, "stage1", resume, say, dataset)
    if rehearse:
        pairs = len(dataset)
        dataset = with_rehearsal(dataset, config.stage1.rehearsal, dataset.transform, config.seed, *launch())
        say(f"rehearsal: {len(dataset) - pairs} of each epoch's {len(dataset)} crops are the base's procedural pairs")
    if config.model.pretrained is None and config.model.vae is None and not from_base:
        say(
            "warning: no pretrained VAE (model.pretrained / --vae / model.base): stage 1 runs on a random VAE, so "
            "its latents mean nothing; train one first with `ffasynth train vae`"
        )
    task = build_stage1(config)
    if config.stage1.freeze and not task.components.sources.get("unet"):
        say("stage1.freeze ignored: the U-Net starts from random weights, there is nothing loaded to keep")
    elif config.stage1.freeze:  # 0 where LoRA had frozen them all already
        say(f"stage1.freeze: {task.frozen / 1e6:.2f} M U-Net values kept as loaded ({', '.join(config.stage1.freeze)})")
    if first:
        save_model_folder(run_dir, task.components)
    say(f"{len(dataset)} training pairs; {trainable_parameters(task) / 1e6:.2f} M trainable parameters; run {run_dir}")
    result = train(task, dataset, config.stage1, run_dir, config.seed, resume, progress)
    if result.losses:
        start_loss, end_loss = result.losses[0]["loss/main"], result.losses[-1]["loss/main"]
        say(f"done: {result.step} steps; loss {start_loss:.4f} → {end_loss:.4f}; skipped {result.skipped_steps}")
    if (line := gain_line(result.losses)) is not None:
        say(line)
    return result


def train_stage2(
    config: Config,
    stage1_dir: Path,
    data: Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    say: Callable = _quiet,
    ema: bool = True,
    dataset: PairDataset | None = None,
) -> tuple[TrainResult, dict]:
    """Stage 2: the decoder only; returns the run's result and the before/after decoder PSNR. Resumed, it goes
    on with the U-Net its run.json pins (checkpoint, EMA or raw), whatever the stage-1 run did since."""
    info = run_folder.info(out) if resume and (Path(out) / "run.json").is_file() else {}
    pinned = info.get("kind") == "stage2" and "stage1_run" in info
    stage1 = load_pinned_stage1(Path(out), info, ema) if pinned else load_stage1_run(stage1_dir, ema=ema)
    lpips = None
    if config.stage2.lpips_weight > 0:
        lpips = build_lpips(config.stage2.lpips_net, config.stage2.weights_dir)
    first, say, dataset, run_dir = _start(config, data, out, "stage2", resume, say, dataset)
    if first and not pinned:
        record_stage1(run_dir, stage1)
    torch.manual_seed(config.seed)  # the discriminator's initial weights
    task = Stage2Task(stage1, config.stage2, lpips)
    say(f"{len(dataset)} training pairs; decoding {config.stage2.latents} latents; run {run_dir}")
    result = train(task, dataset, config.stage2, run_dir, config.seed, resume, progress)
    if not first:
        return result, {}
    # on the training device, tiled as translate decodes (its decode tile for a denoising tile of the crop size)
    tile = TileSettings.resolve(config.data.crop_size).decode_size
    report = reconstruction_report(
        run_dir, data, config.data, task.original_vae, task.decoder, config.stage2.report_images, tile
    )
    say(
        f"done: {result.step} steps; decoder reconstruction of {report['images']} {report['split']} FFA images: "
        f"L1 {report['before_l1']:.4f} → {report['after_l1']:.4f}, "
        f"PSNR {report['before_db']:.2f} dB before → {report['after_db']:.2f} dB after"
    )
    return result, report


def train_distill(
    config: Config,
    teacher_dir: Path,
    data: Path,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    say: Callable = _quiet,
    ema: bool = True,
    dataset: PairDataset | None = None,
) -> TrainResult:
    """Distillation: a student U-Net with guidance folded in (and, method lcm, few-step sampling), plus
    the preview decoder, from the frozen model of TEACHER_DIR (a stage-1 or stage-2 run)."""
    saved = Path(out) / "run.json"
    pinned = resume and saved.is_file() and "teacher_run" in run_folder.info(out)
    # resumed: the teacher run.json pins, whatever the teacher run did since
    teacher = load_teacher(Path(out), run_folder.info(out)) if pinned else load_model_run(teacher_dir, ema=ema)
    if teacher.config.stage1.image_guidance_scale > config.distill.guidance_max:
        say(
            f"warning: the teacher's default guidance {teacher.config.stage1.image_guidance_scale} is above "
            f"distill.guidance_max {config.distill.guidance_max}: the student will not have learnt it"
        )
    first, say, dataset, run_dir = _start(config, data, out, "distill", resume, say, dataset)
    if first and not pinned:
        # pin the teacher: the stage-1 checkpoint, or the stage-2 run's decoder checkpoint (its stage-1 one is
        # pinned in its own run.json), and EMA or raw weights
        stage1 = run_folder.info(teacher_dir).get("kind") == "stage1"
        checkpoint = teacher.checkpoint if stage1 else run_folder.latest_checkpoint(teacher_dir)
        run_folder.update_info(
            run_dir,
            teacher_run=str(Path(teacher_dir).resolve()),
            teacher_checkpoint=str(Path(checkpoint).resolve()),
            teacher_ema=ema,
        )
    torch.manual_seed(config.seed)  # the LoRA adapters' and the preview decoder's initial weights
    task = DistillTask(teacher, config.distill)
    trainable = sum(p.numel() for p in task.trainable["unet"].parameters() if p.requires_grad)
    say(
        f"{len(dataset)} training pairs; method {config.distill.method}; {trainable / 1e6:.2f} M trainable "
        f"student parameters{' (LoRA)' if config.distill.lora.rank else ''}; run {run_dir}"
    )
    result = train(task, dataset, config.distill, run_dir, config.seed, resume, progress)
    if result.losses:
        start_loss, end_loss = result.losses[0]["loss/unet"], result.losses[-1]["loss/unet"]
        say(f"done: {result.step} steps; student loss {start_loss:.4f} → {end_loss:.4f}")
    return result
