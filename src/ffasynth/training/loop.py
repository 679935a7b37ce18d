"""The training loop every stage shares (VAE stage 0, stage 1, stage 2, the pix2pix baseline).

A stage is a `Task`: its trainable modules, how to compute each optimizer's loss on a batch, what
to draw in sample grids and, optionally, figures it measures on a fixed batch (`diagnostics`). The
loop owns the rest: accelerate (devices, DDP, mixed precision), AdamW with warm-up, gradient
accumulation and clipping, EMA, atomic checkpoints and exact resume, non-finite-loss guarding;
what it logs and draws goes through `training.progress`.

Under DDP (several processes) every process reads different micro-batches, gradients are all-reduced
once per optimizer step (the other micro-batches run under no_sync), all processes agree to skip a
step before that all-reduce, and only the main process writes logs, samples and checkpoints.

Every random draw a task makes comes from `generator`, seeded by (seed, step, micro-batch,
optimizer, process), and the data stream is addressed by position: a resumed run repeats the
uninterrupted run's numbers exactly, with no RNG state to save.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import accelerate
import torch
from accelerate.state import AcceleratorState
from torch import nn

from ffasynth import run_folder
from ffasynth.config import TrainConfig
from ffasynth.data.dataset import StreamBatchSampler, loader_workers, training_loader
from ffasynth.errors import FFASynthError
from ffasynth.files import atomic_write_text
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.optimizers import build_optimizer, ema_device
from ffasynth.training.progress import RunLog, metrics_line


class TrainingError(FFASynthError):
    """A run cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is intact."""


class Task:
    """What a training stage defines. Subclasses set `trainable` (name → module) before training."""

    name = "task"
    trainable: dict[str, nn.Module]
    ema_names: tuple[str, ...] = ()
    diagnostics_every: int = 0  # steps between diagnostics() calls; 0 = never
    diagnostic_items: int = 0  # how many of the dataset's first items (epoch-0 crops) they look at

    def optimizer_groups(self) -> dict[str, list[str]]:
        """optimizer name → the trainable modules it updates; stepped in this order each step."""
        return {"main": list(self.trainable)}

    def learning_rates(self, base_lr: float) -> dict[str, float]:
        return {name: base_lr for name in self.optimizer_groups()}

    def updates(self, optimizer: str, step: int) -> bool:
        """Whether `optimizer` takes a step at `step` (stage 2's discriminator: not before disc_start, so that
        neither weight decay nor Adam's step count moves before it has anything to learn)."""
        return True

    def to(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move every module; frozen ones may use weight_dtype (fp16/bf16 under mixed precision)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        raise FFASynthError(f"gradient checkpointing is not available for {self.name}")

    def loss(self, batch: dict, step: int, generator: torch.Generator, optimizer: str) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def samples(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Columns of a sample grid, each (B, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    def diagnostics(self, probe: dict, step: int) -> dict[str, float]:
        """Figures logged beside the losses (e.g. stage 1's conditioning gain) on the fixed `probe` batch;
        the main process alone calls it, under no_grad, with `trainable` holding the raw modules. It must
        not draw from the training generators or change the weights."""
        return {}

    def finish(self, run_dir: Path) -> None:
        """Called once after the last step (e.g. to export a model folder)."""


@dataclass
class TrainResult:
    step: int
    losses: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    checkpoint: Path | None = None


def step_generator(seed: int, step: int, micro: int, optimizer: int, rank: int, device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{optimizer}/{rank}".encode()).hexdigest()
    return torch.Generator(device=device).manual_seed(int(digest[:15], 16))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then constant, cosine decay to 0 at max_steps, or linear: 1 for the first half
    of the steps after warm-up, then linearly to 0 at max_steps (pix2pix's 100 + 100 epochs)."""
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    progress = min(1.0, (step - config.lr_warmup_steps) / max(1, config.max_steps - config.lr_warmup_steps))
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return min(1.0, 2.0 * (1.0 - progress))
    return 1.0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _accelerator(mixed_precision: str):
    """accelerate's Accelerator, joined to every process torchrun (or accelerate launch) started."""
    # accelerate keeps the first mixed precision process-wide; a later stage in this process may differ
    AcceleratorState._reset_state()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # without a GPU, accelerate joins the processes only when told they run on CPUs; else each trains alone
    cpu = launched > 1 and not torch.accelerator.is_available()
    # the loop accumulates itself: accelerate's own (`accelerate launch --gradient_accumulation_steps`, an
    # environment variable the plain argument yields to) would divide every loss once more
    one = accelerate.utils.GradientAccumulationPlugin(num_steps=1)
    accelerator = accelerate.Accelerator(mixed_precision=mixed_precision, cpu=cpu, gradient_accumulation_plugin=one)
    if accelerator.num_processes != launched:
        raise FFASynthError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate joined {accelerator.num_processes}; "
            "check the launcher's settings (accelerate config) so the processes do not train unconnected copies"
        )
    return accelerator


def _no_sync(accelerator, modules) -> contextlib.ExitStack:
    """DDP's no_sync on every module: backward accumulates gradients locally, with no all-reduce."""
    stack = contextlib.ExitStack()
    for module in modules:
        stack.enter_context(accelerator.no_sync(module))
    return stack


def _every_process(accelerator, ok: bool) -> bool:
    """True when `ok` holds on every process (one all-reduce of a 0/1 flag)."""
    failed = torch.tensor([0 if ok else 1], device=accelerator.device)
    return int(accelerator.reduce(failed, reduction="sum").item()) == 0


def _accumulate(accelerator, task: Task, name: str, micro_batches: list[dict], draw: tuple, logs: dict) -> bool:
    """Gradients of optimizer `name`'s loss summed over the micro-batches (each loss / their count);
    draw = (seed, step, optimizer index). Returns False, on every process alike, when any process
    had a non-finite loss. DDP all-reduces once, in the last backward (no_sync before it)."""
    seed, step, index = draw
    count, finite_here, finite, parts_sum = len(micro_batches), True, True, {}
    for micro, batch in enumerate(micro_batches):
        last = micro == count - 1
        with contextlib.nullcontext() if last else _no_sync(accelerator, task.trainable.values()):
            generator = step_generator(seed, step, micro, index, accelerator.process_index, accelerator.device)
            with accelerator.autocast():
                loss, parts = task.loss(batch, step, generator, name)
            finite_here = finite_here and bool(torch.isfinite(loss).all())
            if last:  # agreed before the all-reduce: a process that skipped it would leave the others waiting
                finite = _every_process(accelerator, finite_here)
            if finite_here and finite:
                accelerator.backward(loss / count)
                for key, value in {f"loss/{name}": loss.item(), **parts}.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / count
            elif last and accelerator.num_processes > 1 and loss.requires_grad:
                # DDP's forward awaits this backward (else the next one all-reduces out of turn): run it
                # empty on every process; its gradients are discarded with the step
                accelerator.backward(loss.nan_to_num() * 0.0)
    if finite:  # a skipped step logs no loss (not the share of the micro-batches before the bad one)
        for key, value in parts_sum.items():
            logs[key] = logs.get(key, 0.0) + value
    return finite


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank or torn one (a write cut short by a full disk)."""
    try:
        return int((metrics_line(line) or {})["step"])
    except (KeyError, TypeError, ValueError):
        return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from (they will be logged again)."""
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _build_optimizers(task: Task, config: TrainConfig, accelerator) -> tuple[dict, dict, dict]:
    """(raw modules, optimizers, EMAs): the task on the device, one optimizer per optimizer group over the
    raw modules, their EMAs; then the trainable modules and optimizers wrapped by accelerate (DDP)
    and, with config.compile, torch.compile. Checkpoints, EMA and samples use the raw modules."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    task.to(accelerator.device, weight_dtype)
    if config.gradient_checkpointing:
        task.enable_gradient_checkpointing()
    if config.channels_last:  # before the optimizers are built, so they hold the converted parameters
        for module in task.trainable.values():
            module.to(memory_format=torch.channels_last)
    rates, device = task.learning_rates(config.lr), accelerator.device
    optimizers = {
        name: build_optimizer(
            [p for m in modules for p in task.trainable[m].parameters() if p.requires_grad], rates[name], config, device
        )
        for name, modules in task.optimizer_groups().items()
    }
    raw, where = dict(task.trainable), ema_device(config, device)
    kept = task.ema_names if config.ema_decay > 0 else ()
    emas = {n: ckpt.ExponentialMovingAverage(raw[n], config.ema_decay, where) for n in kept}
    for name in raw:
        module = torch.compile(raw[name]) if config.compile else raw[name]
        task.trainable[name] = accelerator.prepare(module)
    return raw, {name: accelerator.prepare(opt) for name, opt in optimizers.items()}, emas


def _resume(run_dir: Path, accelerator, raw: dict, emas: dict, optimizers: dict) -> tuple[int, dict]:
    """(first step, the loop's saved counters) from RUN's newest sound checkpoint (ckpt.resume_point),
    its weights, EMAs, optimizer and fp16 loss-scale states loaded, the optimizers' hyper-parameters kept as
    configured (a resume may lower the learning rate); (0, {}) without one. Partial checkpoints and log lines
    past it go; damaged newer checkpoints are set aside (renamed, kept) with a warning."""
    start, state = 0, {}
    hyper = ("lr", "betas", "weight_decay")
    configured = {n: [{k: g[k] for k in hyper if k in g} for g in opt.param_groups] for n, opt in optimizers.items()}
    if accelerator.is_main_process:
        ckpt.remove_partial_checkpoints(run_dir)
    point = ckpt.resume_point(run_dir, ckpt.expected_files(raw, emas, optimizers))
    accelerator.wait_for_everyone()  # every process has chosen before the main one renames what it skipped
    if accelerator.is_main_process:
        for warning in point.set_aside_skipped():
            accelerator.print(warning)
    accelerator.wait_for_everyone()
    if point.folder is not None:
        state = ckpt.load_checkpoint(point.folder, raw, emas, optimizers)
        start = state["step"]
        accelerator.print(f"resuming {run_dir} from {point.folder.name}")
        for name, optimizer in optimizers.items():
            for group, settings in zip(optimizer.param_groups, configured[name], strict=True):
                if group.get("initial_lr", settings["lr"]) != settings["lr"]:
                    accelerator.print(f"{name}: learning rate {settings['lr']:g} (was {group['initial_lr']:g})")
                group.update(settings, initial_lr=settings["lr"])  # lr_factor scales initial_lr each step
        scale = state.pop("grad_scaler", None)  # the fp16 loss scale it had reached
        if accelerator.scaler is not None and scale is not None:
            accelerator.scaler.load_state_dict(scale)
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    return start, state


def _train_step(accelerator, task: Task, optimizers: dict, groups: dict, micro_batches: list, draw, config) -> tuple:
    """(finite, logs) of one step: each optimizer in turn accumulates its loss's gradients over the
    micro-batches, clips them and steps. finite is False (on every process alike) when a loss, or the
    gradient norm without a GradScaler, was not finite, or the fp16 GradScaler skipped the update
    (overflow; it lowers its scale): the optimizers after it do not step. draw = (seed, step)."""
    logs: dict[str, float] = {}
    try:
        for index, (name, optimizer) in enumerate(optimizers.items()):
            if not task.updates(name, draw[1]):
                continue
            for each in optimizers.values():
                each.zero_grad(set_to_none=True)
            if not _accumulate(accelerator, task, name, micro_batches, (*draw, index), logs):
                return False, logs
            # the loss may reach other optimizers' weights (stage 2's generator loss, the discriminator): those
            # gradients are not this step's, and accelerate unscales every optimizer, so a GradScaler would
            # count an overflow in them against this update
            for other, each in optimizers.items():
                if other != name:
                    each.zero_grad(set_to_none=True)
            if config.max_grad_norm > 0:
                params = [p for m in groups[name] for p in task.trainable[m].parameters() if p.requires_grad]
                norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                if torch.isfinite(torch.as_tensor(norm)):
                    logs[f"grad_norm/{name}"] = float(norm)
                elif accelerator.scaler is None:  # nothing else would keep the non-finite update out
                    return False, logs
            optimizer.step()
            if optimizer.step_was_skipped:
                return False, logs
        return True, logs
    finally:
        for each in optimizers.values():
            each.zero_grad(set_to_none=True)


def _save_checkpoint(run_dir: Path, step: int, raw, emas, optimizers, state: dict, config, accelerator) -> Path | None:
    """RUN/checkpoints/step-N by the main process while the others wait; returns its path there."""
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        counters = {k: v for k, v in state.items() if k != "step"}
        if accelerator.scaler is not None:
            counters["grad_scaler"] = accelerator.scaler.state_dict()
        try:
            path = ckpt.save_checkpoint(run_dir, step, raw, emas, optimizers, counters, config.keep_checkpoints)
        except OSError as error:  # disk full, quota, permissions: the previous checkpoint is untouched
            previous = ckpt.latest_checkpoint(run_dir) or "none"
            raise TrainingError(
                f"could not write the step-{step} checkpoint in {run_dir / 'checkpoints'} "
                f"({error.strerror or error}); the previous one ({previous}) is intact; free space and --resume"
            ) from None
    accelerator.wait_for_everyone()
    return path


@contextlib.contextmanager
def _raw_modules(task: Task, raw: dict):
    """task.trainable holds the raw modules inside, under no_grad: for what the main process alone runs
    (samples, diagnostics), so no DDP forward runs that the other processes would not join."""
    prepared = dict(task.trainable)
    task.trainable.update(raw)
    try:
        with torch.no_grad():
            yield
    finally:
        task.trainable.update(prepared)


def _first_items(dataset, count: int, device) -> dict | None:
    """The dataset's first `count` items (epoch-0 crops) as one batch on the device; None for none."""
    items = [dataset[(i, 0)] for i in range(min(count, len(dataset)))]
    return _to_device(torch.utils.data.default_collate(items), device) if items else None


def train(task: Task, dataset, config: TrainConfig, run_dir: str | Path, *args, **kwargs) -> TrainResult:
    """Train `task` on `dataset` in RUN up to config.max_steps (or its time budget); resume=True goes
    on from RUN's newest complete checkpoint. Every process of a multi-process launch calls it; the first
    holds RUN's training lock meanwhile (run_folder.training_lock)."""
    with run_folder.training_lock(run_dir, held=int(os.environ.get("RANK", "0")) == 0):
        return _train(task, dataset, config, run_dir, *args, **kwargs)


def _train(
    task: Task,
    dataset,
    config: TrainConfig,
    run_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    sample_items: int = 4,
) -> TrainResult:
    run_dir = Path(run_dir)
    accelerator = _accelerator(config.mixed_precision)
    device = accelerator.device
    groups = task.optimizer_groups()
    raw, optimizers, emas = _build_optimizers(task, config, accelerator)
    start, state = _resume(run_dir, accelerator, raw, emas, optimizers) if resume else (0, {})
    per_step = config.gradient_accumulation * config.batch_size * accelerator.num_processes  # stream positions
    # a checkpoint from before stream_position was saved: read with these settings (a resume kept them)
    state = {"skipped_steps": 0, "bad_in_a_row": 0, "stream_position": start * per_step, **state}
    if start >= config.max_steps:
        accelerator.print(f"{run_dir} already has {start} steps (max_steps={config.max_steps}); nothing to do")
        if accelerator.is_main_process:
            task.finish(run_dir)
        accelerator.wait_for_everyone()
        return TrainResult(start, checkpoint=ckpt.latest_checkpoint(run_dir))

    # Data: this process's micro-batches, addressed by stream position (StreamBatchSampler)
    rank, world, offset = accelerator.process_index, accelerator.num_processes, state["stream_position"]
    sampler = StreamBatchSampler(len(dataset), config.batch_size, seed, rank=rank, world=world, offset=offset)
    # first the fixed batches, read here, so the loader's workers start with those images' caches made
    preview = _first_items(dataset, sample_items, device)
    probe = _first_items(dataset, task.diagnostic_items, device) if task.diagnostics_every else None
    if probe is not None and len(dataset) < 2:  # the conditioning gain gives each item another item's photo
        accelerator.print(f"{task.name}: one training pair: the conditioning gain is not measured")
        probe = None
    workers = loader_workers(config.num_workers, device.type == "cuda")
    loader_seed = seed * 65_537 + accelerator.process_index  # worker RNGs differ per process
    stream = iter(training_loader(dataset, sampler, workers, device.type == "cuda", loader_seed))

    log = RunLog(run_dir, config, task.name, start, progress, accelerator)
    result = TrainResult(start, skipped_steps=state["skipped_steps"])
    deadline = time.perf_counter() + 60.0 * config.max_minutes if config.max_minutes else None
    for step in range(start, config.max_steps):
        done = step + 1

        # Learning rate: linear warm-up, then constant or cosine decay (lr_factor) of each group's own
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_factor(step, config)

        # Forward, backward and optimizer step, each optimizer in turn
        micro_batches = [_to_device(next(stream), device) for _ in range(config.gradient_accumulation)]
        state["stream_position"] += per_step
        finite, logs = _train_step(accelerator, task, optimizers, groups, micro_batches, (seed, step), config)

        # EMA of the updated weights; a non-finite step updated nothing, max_bad_steps in a row stop the run
        if finite:
            state["bad_in_a_row"] = 0
            for name, ema in emas.items():
                ema.update(raw[name])
        else:
            state["bad_in_a_row"] += 1
            state["skipped_steps"] = result.skipped_steps = state["skipped_steps"] + 1
            if state["bad_in_a_row"] >= config.max_bad_steps:
                raise TrainingError(
                    f"{task.name}: the loss was not finite for {state['bad_in_a_row']} steps in a row at step "
                    f"{step}; stopped (last good checkpoint: {ckpt.latest_checkpoint(run_dir) or 'none'}); "
                    "try a lower learning rate"
                )

        # A time budget ends the run as max_steps would (log, sample, checkpoint); all processes agree
        out_of_time = deadline is not None and not _every_process(accelerator, time.perf_counter() <= deadline)
        last = done == config.max_steps or out_of_time

        # Diagnostics: the task's own figures on a fixed batch (main process, raw modules), logged this step
        diagnose = probe is not None and done % task.diagnostics_every == 0
        if diagnose and accelerator.is_main_process:
            with _raw_modules(task, raw):
                logs.update(task.diagnostics(probe, done))

        # Log
        logs.update(step=done, lr=next(iter(optimizers.values())).param_groups[0]["lr"], skipped=state["skipped_steps"])
        summary = log.step(logs, write=done % config.log_every == 0 or last or diagnose)
        if summary is not None:
            result.losses.append(summary)

        # Sample grid
        if (done % config.sample_every == 0 or last) and accelerator.is_main_process:
            with _raw_modules(task, raw):
                log.samples(task.samples(preview, step_generator(seed, done, 0, 99, 0, device)), done)

        # Save checkpoint
        if done % config.save_every == 0 or last:
            result.checkpoint = _save_checkpoint(run_dir, done, raw, emas, optimizers, state, config, accelerator)

        result.step = done
        if out_of_time:
            accelerator.print(f"{task.name}: time budget of {config.max_minutes:g} min reached at step {done}")
            break

    log.close()
    for name in raw:
        task.trainable[name] = raw[name]
    if accelerator.is_main_process:
        task.finish(run_dir)
    accelerator.wait_for_everyone()  # every process returns once the run's outputs exist
    return result
