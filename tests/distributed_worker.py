"""Stage-1 training through the real loop, under torchrun, recording what each process did.

  torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker PAIRS OUT

Trains OUT/whole (STEPS steps) and OUT/split (half of them; tests/test_distributed.py resumes it with
the CLI), with the patches CLIP projection, 2 micro-batches a step and a NaN loss on the last process
only, in step NAN_STEP's first micro-batch. Each process writes RUN/rank<r>.json: the dataset `index`
of each micro-batch it trained on, the (step, micro-batch) during which each DDP all-reduce ran, how
many modules DDP wrapped, its skipped-step count and a digest of its final U-Net weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ffasynth.config import load_config
from ffasynth.training.loop import train
from ffasynth.training.run import load_training_data, prepare_run, save_model_folder
from ffasynth.training.stage1 import build_stage1
from tests.helpers import MICRO

NAN_STEP = 1
STEPS = 4
OVERRIDES = MICRO + [
    "model.clip_tokens=patches",
    "data.crop_size=32",
    "stage1.batch_size=1",
    "stage1.gradient_accumulation=2",
    "stage1.log_every=1",
    "stage1.save_every=2",
    "stage1.sample_every=100",
    "stage1.cond_gain_every=2",  # the main process measures it alone, with the unwrapped U-Net
    "stage1.sample_steps=1",
    "stage1.lr_warmup_steps=1",
    "seed=3",
]


def _recording(task, rank: int, world: int, record: dict) -> None:
    """Wrap task.loss: note each micro-batch's items, count all-reduces, force NaN where asked."""
    inner = task.loss
    current = {"step": -1, "micro": -1}

    def count_allreduce(state, bucket):
        record["allreduce"].append([current["step"], current["micro"]])
        return default_hooks.allreduce_hook(state, bucket)

    def loss(batch, step, generator, optimizer):
        if record["ddp"] is None:  # before the first DDP forward, as register_comm_hook requires
            wrapped = [m for m in task.trainable.values() if isinstance(m, DistributedDataParallel)]
            for module in wrapped:
                module.register_comm_hook(None, count_allreduce)
            record["ddp"] = len(wrapped)
        current["micro"] = current["micro"] + 1 if current["step"] == step else 0
        current["step"] = step
        record["batches"].append([step, current["micro"], [int(i) for i in batch["index"]]])
        value, parts = inner(batch, step, generator, optimizer)
        if rank == world - 1 and step == NAN_STEP and current["micro"] == 0:
            value = value * float("nan")
        return value, parts

    task.loss = loss


def run(pairs: Path, run_dir: Path, steps: int) -> None:
    config = load_config(preset="tiny", overrides=OVERRIDES + [f"stage1.max_steps={steps}"])
    dataset = load_training_data(pairs, config)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0:
        prepare_run(run_dir, config, "stage1", pairs, resume=False)
    task = build_stage1(config)
    if rank == 0:
        save_model_folder(run_dir, task.components)
    record = {"ddp": None, "batches": [], "allreduce": []}
    _recording(task, rank, world, record)
    result = train(task, dataset, config.stage1, run_dir, config.seed, progress=False)
    digest = hashlib.sha256()
    for key, value in sorted(task.components.unet.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    record.update(step=result.step, skipped=result.skipped_steps, unet=digest.hexdigest(), world=world)
    (run_dir / f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    pairs, out = Path(sys.argv[1]), Path(sys.argv[2])
    run(pairs, out / "whole", STEPS)
    run(pairs, out / "split", STEPS // 2)


if __name__ == "__main__":
    main()
