"""Faults during training (SIGKILL at random moments, disk full) and safe loading (no pickle)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ffasynth.config import load_config
from ffasynth.errors import FFASynthError
from ffasynth.models import loading
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.loop import TrainingError
from tests.helpers import MICRO, MICRO_STAGE1, train_micro_stage1

FAST = MICRO_STAGE1 + ["stage1.save_every=1", "stage1.keep_checkpoints=2"]  # a checkpoint every step, two kept
FAST += ["stage1.sample_every=1000", "stage1.sample_steps=1"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from ffasynth.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=3, size=40, seed=2)


def _command(pairs, run, steps, resume):
    return [
        sys.executable,
        "-m",
        "ffasynth",
        "train",
        "stage1",
        "--data",
        str(pairs),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--max-steps",
        str(steps),
        "--quiet",
        *(["--resume"] if resume else []),
        *FAST,
    ]


def _environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _newest_step(run):
    latest = ckpt.latest_checkpoint(run)
    return int(latest.name.split("-")[1]) if latest else 0


def _assert_loadable(folder):
    state = json.loads((folder / "state.json").read_text())
    for name in ("unet", "unet.ema", "optimizer-main"):
        assert load_file(str(folder / f"{name}.safetensors"))
    return state["step"]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpoint_and_ends_identical(pairs, tmp_path):
    steps, kills, rng = 40, 0, random.Random(7)
    subprocess.run(
        _command(pairs, tmp_path / "reference", steps, False), env=_environment(), check=True, capture_output=True
    )
    run = tmp_path / "killed"
    history = []
    while kills < 10 and _newest_step(run) < steps - 1:
        before = _newest_step(run)
        process = subprocess.Popen(
            _command(pairs, run, steps, kills > 0),
            env=_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while _newest_step(run) <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until this attempt has made progress, then kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.15))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        newest = ckpt.latest_checkpoint(run)
        assert newest is not None and _assert_loadable(newest) >= before  # progress never goes backwards
        history.append(_newest_step(run))
    assert kills >= 10, history
    subprocess.run(_command(pairs, run, steps, True), env=_environment(), check=True, capture_output=True)
    final = ckpt.latest_checkpoint(run)
    assert final.name == f"step-{steps:06d}"
    assert not list((run / "checkpoints").glob(".*.tmp"))
    reference = load_file(str(tmp_path / "reference" / "checkpoints" / final.name / "unet.safetensors"))
    resumed = load_file(str(final / "unet.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), f"weights differ after kills at {history}"
    losses = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == list(range(1, steps + 1))  # each step logged once despite the kills
    print(f"\nkilled {kills} times; newest checkpoint after each kill: {history}")


# as the OS reports it, and as safetensors' Rust writer does (its own exception class, the OS error in the text)
FULL_DISK = {
    "oserror": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "safetensors": lambda: SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    ),
}


@pytest.mark.parametrize("raised", sorted(FULL_DISK))
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(pairs, tmp_path, monkeypatch, raised):
    from ffasynth.training import checkpoint as module

    real_save, calls = module.save_file, []

    def failing_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint (3 files each) runs out of space half-way
            raise FULL_DISK[raised]()
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(module, "save_file", failing_save)
    with pytest.raises(TrainingError, match="No space left on device.*step-000001.*is intact"):
        train_micro_stage1(pairs, tmp_path / "run", 4, extra=["stage1.save_every=1", "stage1.sample_steps=1"] + MICRO)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step-000001"]
    assert _assert_loadable(ckpt.latest_checkpoint(tmp_path / "run")) == 1
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_named_like_a_checkpoint_is_refused_unexecuted(pairs, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": _Exploit(marker)})
    train_micro_stage1(pairs, tmp_path / "run", 1, extra=["stage1.sample_steps=1"])
    planted = tmp_path / "run" / "checkpoints" / "step-000005"
    planted.mkdir()
    for name in ("unet.safetensors", "unet.ema.safetensors", "optimizer-main.safetensors"):
        (planted / name).write_bytes(payload)
    (planted / "optimizer-main.json").write_text("{}")
    (planted / "state.json").write_text(json.dumps({"step": 5, "ema_updates": {"unet": 5}}))
    # its headers are not safetensors: skipped with a warning, set aside unread, the run resumes from step 1
    train_micro_stage1(pairs, tmp_path / "run", 2, resume=True, extra=["stage1.sample_steps=1"])
    said = capsys.readouterr().out
    assert "skipped damaged checkpoint(s) step-000005" in said and "resuming from step-000001" in said, said
    planted = planted.with_name("step-000005.damaged")
    evil = tmp_path / "sd15.ckpt"
    evil.write_bytes(payload)
    with pytest.raises(FFASynthError, match="pickle"):
        loading.load_unet_and_vae(str(evil), load_config(preset="tiny", overrides=MICRO).model)
    with pytest.raises(FFASynthError):
        loading.load_safetensors_into(torch.nn.Linear(1, 1), planted / "unet.safetensors", "unet")
    assert not marker.exists(), "the pickle was executed"
