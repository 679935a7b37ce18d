"""What a training run shows while it trains: metrics.jsonl and TensorBoard (written by the main
process only), a progress bar, and sample grids (RUN/samples/step-N.png)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ffasynth.config import TrainConfig
from ffasynth.data.io import save_image


def sample_grid(columns: list[torch.Tensor]) -> torch.Tensor:
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


def metrics_line(line: str) -> dict | None:
    """One line of metrics.jsonl (RunLog writes them) as a dict; None for a blank line or one cut short (a full
    disk mid-write), which a resume and the model card read past."""
    try:
        logged = json.loads(line)
    except ValueError:
        return None
    return logged if isinstance(logged, dict) else None


class RunLog:
    """metrics.jsonl and TensorBoard (main process only) and the progress bar. Each line holds the
    mean of every value over the steps since the last line that logged it (so a figure measured once,
    such as stage 1's cond_gain, is written as it is), but the value at its step of a running count
    (`TOTALS`: the steps skipped so far), and the images per second."""

    TOTALS = ("skipped",)

    def __init__(self, run_dir: Path, config: TrainConfig, name: str, start: int, progress: bool, accelerator):
        self.run_dir, self.path = run_dir, run_dir / "metrics.jsonl"
        self.main = accelerator.is_main_process
        self.writer = SummaryWriter(str(run_dir / "logs")) if self.main else None
        shown = progress and accelerator.is_local_main_process
        self.bar = tqdm(total=config.max_steps, initial=start, disable=not shown, desc=name)
        self.images_per_step = config.batch_size * config.gradient_accumulation * accelerator.num_processes
        self.window: list[dict] = []
        self.tick = time.perf_counter()
        # on CUDA each line also says the peak memory so far (a stand-in accelerator may have no device)
        device = getattr(accelerator, "device", None)
        self.cuda_device = device if getattr(device, "type", None) == "cuda" else None
        self.shown: dict[str, str] = {}  # the progress bar's figures, kept until they change

    def step(self, logs: dict, write: bool) -> dict | None:
        """Add one step's values; with `write`, log their means (returned) and start a new window."""
        self.window.append(logs)
        summary = None
        if write:
            window, elapsed = self.window, time.perf_counter() - self.tick
            keys = dict.fromkeys(k for w in window for k in w if k != "step")  # first-seen order
            summary = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys}
            summary.update({k: next(w[k] for w in reversed(window) if k in w) for k in self.TOTALS if k in keys})
            summary.update(step=logs["step"], images_per_s=len(window) * self.images_per_step / max(elapsed, 1e-9))
            if self.cuda_device is not None:  # this process's peak tensor memory since the start, GiB
                summary["cuda_peak_gib"] = torch.cuda.max_memory_allocated(self.cuda_device) / 2**30
            if self.main:
                with open(self.path, "a") as f:
                    f.write(json.dumps(summary) + "\n")
                for key, value in summary.items():
                    if key != "step":
                        self.writer.add_scalar(key, value, logs["step"])
            loss = next((v for k, v in summary.items() if k.startswith("loss/")), float("nan"))
            self.shown.update(loss=f"{loss:.4f}", lr=f"{summary['lr']:.2e}", img_s=f"{summary['images_per_s']:.1f}")
            if "cond_gain" in summary:  # stage 1's conditioning gain (training/conditioning_gain.py)
                self.shown["cond_gain"] = f"{summary['cond_gain']:+.4f}"
            self.bar.set_postfix(self.shown)
            self.window, self.tick = [], time.perf_counter()
        self.bar.update(1)
        return summary

    def samples(self, columns: list[torch.Tensor], step: int) -> None:
        """A sample grid (main process) as RUN/samples/step-N.png and in TensorBoard."""
        grid = sample_grid(columns)
        save_image(grid, self.run_dir / "samples" / f"step-{step:06d}.png")
        self.writer.add_image("samples", grid, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
