"""Training with 2 processes (torchrun, gloo on CPU), as users run several GPUs.

One launch of tests/distributed_worker.py trains stage 1 through the real loop twice (4 steps; 2
steps) with the patches CLIP projection, 2 micro-batches a step and a NaN loss on one process only;
then `torchrun -m ffasynth train stage1 --resume` continues the 2-step run to 4 steps, and
`torchrun -m ffasynth train stage2 --from` tunes a decoder from the 4-step run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.models.conditioning import SourceConditioner
from ffasynth.training import checkpoint as ckpt
from tests.distributed_worker import NAN_STEP, STEPS

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 2


def test_the_learned_projection_works_inside_a_wrapper_without_weight():
    # DDP and torch.compile wrap the projection in a module that has no `.weight`
    torch.manual_seed(0)
    projection = nn.Linear(8, 4)
    conditioner = SourceConditioner(None, None, cross_attention_dim=4, use_clip=False)
    features = torch.randn(2, 3, 8, dtype=torch.float64)
    tokens = conditioner.project(features, nn.Sequential(projection))
    assert tokens.dtype == torch.float32
    assert torch.equal(tokens, projection(features.float()))


def _launch(args: list[str], timeout: float = 240) -> str:
    """torchrun with 2 processes; a hang (e.g. one process waiting in an all-reduce) fails the test."""
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(PROCESSES), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output = process.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        process.communicate()
        pytest.fail(f"{' '.join(args[:4])} hung for {timeout} s")
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """OUT/whole, OUT/split (resumed by the CLI) and OUT/stage2, each trained by 2 processes."""
    pairs = write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=40, seed=5)  # 8 pairs (2 phases)
    out = tmp_path_factory.mktemp("runs")
    _launch(["-m", "tests.distributed_worker", str(pairs), str(out)])
    resume = ["--data", str(pairs), "--resume", "--max-steps", str(STEPS), "--quiet"]
    said = _launch(["-m", "ffasynth", "train", "stage1", "--out", str(out / "split"), *resume])
    (out / "stage1-output.txt").write_text(said)
    stage2 = ["--data", str(pairs), "--max-steps", "2", "--quiet", "--save-every", "1", "--batch-size", "1"]
    # disc_start=0: the discriminator and the adaptive weight's autograd.grad run under DDP too
    extra = ["stage2.disc_start=0", "stage2.sampler_steps=2", "stage2.log_every=1"]
    said = _launch(
        ["-m", "ffasynth", "train", "stage2", "--from", str(out / "whole"), "--out", str(out / "stage2")]
        + stage2
        + extra
    )
    (out / "stage2-output.txt").write_text(said)
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(PROCESSES)]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged_steps(run_dir: Path) -> list[int]:
    return [line["step"] for line in _metrics(run_dir)]


@pytest.mark.slow
def test_each_process_trains_on_different_items_and_together_they_cover_each_epoch(runs):
    records = _records(runs / "whole")
    assert [r["world"] for r in records] == [PROCESSES] * PROCESSES
    assert all(r["ddp"] == 2 for r in records)  # U-Net and the patches projection, both wrapped by DDP
    # stream position of micro-batch m on process r: m·world + r (batch size 1)
    by_position = {}
    for rank, record in enumerate(records):
        for micro, (_, _, items) in enumerate(record["batches"]):
            by_position[micro * PROCESSES + rank] = items[0]
    stream = [by_position[p] for p in sorted(by_position)]
    assert len(stream) == STEPS * 2 * PROCESSES
    for epoch in range(2):  # 16 positions over 8 pairs: two epochs, each a permutation of all pairs
        assert sorted(stream[epoch * 8 : (epoch + 1) * 8]) == list(range(8))


@pytest.mark.slow
def test_gradients_are_all_reduced_once_per_optimizer_step(runs):
    for record in _records(runs / "whole"):
        calls = record["allreduce"]
        assert calls and all(micro == 1 for _, micro in calls)  # never during the first micro-batch (no_sync)
        per_step = Counter(step for step, _ in calls)
        assert sorted(per_step) == list(range(STEPS)) and len(set(per_step.values())) == 1, per_step


@pytest.mark.slow
def test_a_nan_on_one_process_is_skipped_by_every_process(runs):
    records = _records(runs / "whole")
    assert [(r["step"], r["skipped"]) for r in records] == [(STEPS, 1)] * PROCESSES
    assert records[0]["unet"] == records[1]["unet"]  # the replicas stayed identical
    logged = _metrics(runs / "whole")
    assert [line["skipped"] for line in logged] == [0, 1, 1, 1] and NAN_STEP == 1
    assert "grad_norm/main" not in logged[NAN_STEP]  # no update at the NaN step, on either process


@pytest.mark.slow
def test_one_process_writes_the_checkpoints_and_the_log(runs):
    for run_dir in (runs / "whole", runs / "split"):
        assert _logged_steps(run_dir) == [1, 2, 3, 4]
        assert [line["step"] for line in _metrics(run_dir) if "cond_gain" in line] == [2, 4]
        assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000002", "step-000004"]
        assert not list((run_dir / "checkpoints").glob(".*"))
    assert _logged_steps(runs / "stage2") == [1, 2]
    assert [p.name for p in ckpt.complete_checkpoints(runs / "stage2")] == ["step-000001", "step-000002"]


@pytest.mark.slow
def test_a_resumed_two_process_run_repeats_the_uninterrupted_one(runs):
    whole, split = runs / "whole", runs / "split"
    logged = [_metrics(run_dir) for run_dir in (whole, split)]
    for line in logged[0] + logged[1]:
        line.pop("images_per_s")  # wall-clock speed; every other figure must repeat exactly
    assert logged[0] == logged[1]
    for name in ("unet", "unet.ema", "projection", "optimizer-main"):
        a = load_file(str(whole / "checkpoints" / "step-000004" / f"{name}.safetensors"))
        b = load_file(str(split / "checkpoints" / "step-000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_stage2_trains_from_a_two_process_stage1_run(runs):
    state = json.loads((runs / "stage2" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["skipped_steps"] == 0
    assert all("d_real" in line and "grad_norm/discriminator" in line for line in _metrics(runs / "stage2"))


@pytest.mark.slow
def test_only_the_first_process_reports_and_writes_the_run_folder(runs):
    stage1, stage2 = ((runs / f"stage{n}-output.txt").read_text() for n in (1, 2))
    assert stage1.count("training pairs") == 1 and stage1.count("done:") == 1, stage1[-2000:]
    # the decoder report (computed and written to run.json by the first process only) is said once
    assert stage2.count("dB before") == 1, stage2[-2000:]
    assert json.loads((runs / "stage2" / "run.json").read_text())["decoder_psnr"]["images"] >= 1
