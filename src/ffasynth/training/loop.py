"""The training loop every stage shares (VAE stage 0, stage 1, stage 2, the pix2pix baseline).

A stage is a `Task`: its trainable modules, how to compute each optimizer's loss on a batch, and
what to draw in sample grids. The loop owns the rest: accelerate (devices, DDP, mixed precision),
AdamW with warm-up, gradient accumulation and clipping, EMA, atomic checkpoints and exact resume,
non-finite-loss guarding, a progress bar, TensorBoard, metrics.jsonl and sample grids.

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
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ffasynth.config import TrainConfig
from ffasynth.data.dataset import StreamBatchSampler
from ffasynth.errors import FFASynthError
from ffasynth.training import checkpoint as ckpt


class TrainingError(FFASynthError):
    """A run cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is intact."""


class Task:
    """What a training stage defines. Subclasses set `trainable` (name → module) before training."""

    name = "task"
    trainable: dict[str, nn.Module]
    ema_names: tuple[str, ...] = ()

    def optimizer_groups(self) -> dict[str, list[str]]:
        """optimizer name → the trainable modules it updates; stepped in this order each step."""
        return {"main": list(self.trainable)}

    def learning_rates(self, base_lr: float) -> dict[str, float]:
        return {name: base_lr for name in self.optimizer_groups()}

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
    """Linear warm-up to 1, then constant or cosine decay to 0 at max_steps."""
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.lr_warmup_steps) / max(1, config.max_steps - config.lr_warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _accelerator(mixed_precision: str):
    """accelerate's Accelerator, joined to every process torchrun (or accelerate launch) started."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps the first mixed precision process-wide; a later stage in this process may differ
    AcceleratorState._reset_state()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # without a GPU, accelerate joins the processes only when told they run on CPUs; else each trains alone
    cpu = launched > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
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
    count, finite_here, finite = len(micro_batches), True, True
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
                    logs[key] = logs.get(key, 0.0) + float(value) / count
            elif last and accelerator.num_processes > 1 and loss.requires_grad:
                # DDP's forward awaits this backward (else the next one all-reduces out of turn): run it
                # empty on every process; its gradients are discarded with the step
                accelerator.backward(loss.nan_to_num() * 0.0)
    return finite


def _grid(columns: list[torch.Tensor]) -> torch.Tensor:
    """Rows = batch items, columns = the task's images, grey repeated to RGB; in [0, 1]."""
    height = max(c.shape[-2] for c in columns)
    width = max(c.shape[-1] for c in columns)
    cells = []
    for column in columns:
        column = ((column.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1)
        column = column.expand(-1, 3, -1, -1) if column.shape[1] == 1 else column[:, :3]
        column = nn.functional.pad(column, (0, width - column.shape[-1], 0, height - column.shape[-2]))
        cells.append(column)
    rows = [torch.cat([c[i] for c in cells], dim=-1) for i in range(cells[0].shape[0])]
    return torch.cat(rows, dim=-2)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from (they will be logged again)."""
    if path.is_file():
        from ffasynth.files import atomic_write_text

        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(
    task: Task,
    dataset,
    config: TrainConfig,
    run_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    sample_items: int = 4,
) -> TrainResult:
    from safetensors.torch import save_file  # noqa: F401  (checkpoint writer's dependency, fail early)
    from tqdm.auto import tqdm

    from ffasynth.data.io import save_image

    run_dir = Path(run_dir)
    accelerator = _accelerator(config.mixed_precision)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    task.to(device, weight_dtype)
    if config.gradient_checkpointing:
        task.enable_gradient_checkpointing()
    if config.channels_last:  # before the optimizers are built, so they hold the converted parameters
        for module in task.trainable.values():
            module.to(memory_format=torch.channels_last)

    groups = task.optimizer_groups()
    rates = task.learning_rates(config.lr)
    optimizers = {
        name: torch.optim.AdamW(
            [p for m in modules for p in task.trainable[m].parameters() if p.requires_grad],
            lr=rates[name],
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        for name, modules in groups.items()
    }
    raw = dict(task.trainable)  # unwrapped, uncompiled modules: what checkpoints, EMA and samples see
    emas = {n: ckpt.ExponentialMovingAverage(raw[n], config.ema_decay) for n in task.ema_names if config.ema_decay > 0}
    for name in raw:
        module = torch.compile(raw[name]) if config.compile else raw[name]
        task.trainable[name] = accelerator.prepare(module)
    optimizers = {name: accelerator.prepare(opt) for name, opt in optimizers.items()}

    start, state = 0, {"skipped_steps": 0, "bad_in_a_row": 0}
    metrics_file = run_dir / "metrics.jsonl"
    if resume:
        if accelerator.is_main_process:
            ckpt.remove_partial_checkpoints(run_dir)
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            state = ckpt.load_checkpoint(latest, raw, emas, optimizers)
            start = state["step"]
            accelerator.print(f"resuming {run_dir} from {latest.name}")
        if accelerator.is_main_process:
            _truncate_metrics(metrics_file, start)
    if start >= config.max_steps:
        accelerator.print(f"{run_dir} already has {start} steps (max_steps={config.max_steps}); nothing to do")
        if accelerator.is_main_process:
            task.finish(run_dir)
        accelerator.wait_for_everyone()
        return TrainResult(start, checkpoint=ckpt.latest_checkpoint(run_dir))

    sampler = StreamBatchSampler(
        len(dataset),
        config.batch_size,
        seed,
        start=start * config.gradient_accumulation,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda"
    )
    stream = iter(loader)
    preview = _to_device(
        torch.utils.data.default_collate([dataset[(i, 0)] for i in range(min(sample_items, len(dataset)))]), device
    )

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "logs"))
    result = TrainResult(start, skipped_steps=state["skipped_steps"])
    bar = tqdm(
        total=config.max_steps,
        initial=start,
        disable=not (progress and accelerator.is_local_main_process),
        desc=task.name,
    )
    window: list[dict] = []
    tick = began = time.perf_counter()
    deadline = began + 60.0 * config.max_minutes if config.max_minutes else None
    for step in range(start, config.max_steps):
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_factor(step, config)
        micro_batches = [_to_device(next(stream), device) for _ in range(config.gradient_accumulation)]
        logs: dict[str, float] = {}
        finite = True
        for index, (name, optimizer) in enumerate(optimizers.items()):
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            finite = _accumulate(accelerator, task, name, micro_batches, (seed, step, index), logs)
            if not finite:
                break
            # Clip and step; under fp16 the GradScaler skips a step whose gradients overflowed (and lowers its scale)
            params = [p for m in groups[name] for p in task.trainable[m].parameters() if p.requires_grad]
            if config.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                if torch.isfinite(torch.as_tensor(norm)):
                    logs[f"grad_norm/{name}"] = float(norm)
                elif accelerator.scaler is None:  # nothing else would keep the non-finite update out
                    finite = False
                    break
            optimizer.step()
            if optimizer.step_was_skipped:
                finite = False
                break
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        if not finite:
            state["skipped_steps"] += 1
            state["bad_in_a_row"] += 1
            result.skipped_steps = state["skipped_steps"]
            if state["bad_in_a_row"] >= config.max_bad_steps:
                latest = ckpt.latest_checkpoint(run_dir)
                raise TrainingError(
                    f"{task.name}: the loss was not finite for {state['bad_in_a_row']} steps in a row at step {step}; "
                    f"stopped (last good checkpoint: {latest or 'none'}); try a lower learning rate"
                )
        else:
            state["bad_in_a_row"] = 0
            for name, ema in emas.items():
                ema.update(raw[name])
        done = step + 1
        # a time budget ends the run like max_steps would (log, sample, checkpoint); all processes agree
        out_of_time = deadline is not None and bool(
            accelerator.gather(torch.tensor([int(time.perf_counter() > deadline)], device=device)).any()
        )
        last = done == config.max_steps or out_of_time
        logs.update(
            step=done, lr=optimizers[next(iter(optimizers))].param_groups[0]["lr"], skipped=state["skipped_steps"]
        )
        window.append(logs)
        if done % config.log_every == 0 or last:
            elapsed = time.perf_counter() - tick
            images = len(window) * config.batch_size * config.gradient_accumulation * accelerator.num_processes
            summary = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[-1] if k != "step"}
            summary.update(step=done, images_per_s=images / max(elapsed, 1e-9))
            if accelerator.is_main_process:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(summary) + "\n")
                for key, value in summary.items():
                    if key != "step":
                        writer.add_scalar(key, value, done)
            result.losses.append(summary)
            main_loss = next((v for k, v in summary.items() if k.startswith("loss/")), float("nan"))
            bar.set_postfix(loss=f"{main_loss:.4f}", lr=f"{summary['lr']:.2e}", img_s=f"{summary['images_per_s']:.1f}")
            window, tick = [], time.perf_counter()
        bar.update(1)
        sample_now = done % config.sample_every == 0 or last
        if sample_now and accelerator.is_main_process:
            prepared = dict(task.trainable)
            task.trainable.update(raw)  # the main process alone: no DDP forward the others would not join
            with torch.no_grad():
                columns = task.samples(preview, step_generator(seed, done, 0, 99, 0, device))
            task.trainable.update(prepared)
            save_image(_grid(columns), run_dir / "samples" / f"step-{done:06d}.png")
            writer.add_image("samples", _grid(columns), done)
        if done % config.save_every == 0 or last:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                saved = {k: v for k, v in state.items() if k != "step"}
                try:
                    result.checkpoint = ckpt.save_checkpoint(
                        run_dir, done, raw, emas, optimizers, saved, config.keep_checkpoints
                    )
                except OSError as error:  # disk full, quota, permissions: the previous checkpoint is untouched
                    previous = ckpt.latest_checkpoint(run_dir) or "none"
                    raise TrainingError(
                        f"could not write the step-{done} checkpoint in {run_dir / 'checkpoints'} "
                        f"({error.strerror or error}); the previous one ({previous}) is intact; free space and --resume"
                    ) from None
            accelerator.wait_for_everyone()
        result.step = done
        if out_of_time:
            accelerator.print(f"{task.name}: time budget of {config.max_minutes:g} min reached at step {done}")
            break
    bar.close()
    if writer is not None:
        writer.close()
    for name in raw:
        task.trainable[name] = raw[name]
    if accelerator.is_main_process:
        task.finish(run_dir)
    accelerator.wait_for_everyone()  # every process returns once the run's outputs exist
    return result
