"""The shared loop: the learning-rate schedule, how the data stream is split across processes, fp16
loss scaling (an overflowed step is skipped by the GradScaler, which lowers its scale, and the run
goes on) and torch.compile (a compiled run's checkpoints hold plain keys)."""

from __future__ import annotations

import accelerate
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ffasynth.config import TrainConfig, load_config
from ffasynth.data.dataset import StreamBatchSampler
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.loop import Task, lr_factor, train
from ffasynth.training.run import load_stage1_run, load_training_data, prepare_run, save_model_folder
from ffasynth.training.stage1 import build_stage1
from tests.helpers import MICRO, BlankDataset


class _Overflowing(Task):
    """A linear layer whose loss is finite but, multiplied by the loss scale, overflows at one step."""

    name = "overflowing"

    def __init__(self, overflow_at: int):
        torch.manual_seed(0)
        self.trainable = {"layer": nn.Linear(2, 1)}
        self.overflow_at = overflow_at
        self.weights_seen: list[torch.Tensor] = []  # the layer's weight as each step began

    def to(self, device, weight_dtype):
        self.trainable["layer"].to(device)

    def loss(self, batch, step, generator, optimizer):
        layer = self.trainable["layer"]
        self.weights_seen.append(layer.weight.detach().clone())
        loss = layer(torch.ones(1, 2)).sum().float() ** 2
        # 1e35 is finite in float32; times the initial scale 2^16 it is inf, so every gradient overflows
        return loss * (1e35 if step == self.overflow_at else 1.0), {}

    def samples(self, batch, generator):
        return [batch["target"]]


# warm-up 4 steps: (s + 1)/4; cosine over steps 4-12: ½(1 + cos(π·(s − 4)/8)), e.g. ½(1 + cos 3π/4) at 10;
# linear: 1 up to step 8 (half of 4-12), then 2(1 − (s − 4)/8), e.g. 0.5 at 10
@pytest.mark.parametrize(
    ("schedule", "factors"),
    [
        ("cosine", {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.85355339, 8: 0.5, 10: 0.14644661, 12: 0.0, 13: 0.0}),
        ("constant", {0: 0.25, 2: 0.75, 3: 1.0, 4: 1.0, 11: 1.0}),
        ("linear", {0: 0.25, 3: 1.0, 4: 1.0, 6: 1.0, 8: 1.0, 9: 0.75, 10: 0.5, 12: 0.0, 13: 0.0}),
    ],
)
def test_learning_rate_warms_up_linearly_then_follows_its_schedule(schedule, factors):
    config = TrainConfig(max_steps=12, lr_warmup_steps=4, lr_schedule=schedule)
    assert {step: lr_factor(step, config) for step in factors} == pytest.approx(factors, abs=1e-7)


class _Linear(Task):
    """One linear layer and a finite loss: the loop's bookkeeping without a model."""

    name = "linear"

    def __init__(self):
        torch.manual_seed(0)
        self.trainable = {"layer": nn.Linear(2, 1)}

    def to(self, device, weight_dtype):
        self.trainable["layer"].to(device)

    def loss(self, batch, step, generator, optimizer):
        return self.trainable["layer"](torch.ones(1, 2)).sum() ** 2, {}

    def samples(self, batch, generator):
        return [batch["target"]]


def test_each_step_trains_at_the_scheduled_learning_rate(tmp_path):
    config = TrainConfig(
        max_steps=6, lr=0.1, lr_warmup_steps=2, lr_schedule="cosine", log_every=1, save_every=100, ema_decay=0.0
    )
    result = train(_Linear(), BlankDataset(), config, tmp_path, progress=False)
    # warm-up 0.05, 0.1; then 0.1·½(1 + cos(π·k/4)) for k = 0..3
    assert [line["lr"] for line in result.losses] == pytest.approx([0.05, 0.1, 0.1, 0.08535534, 0.05, 0.01464466])


def test_processes_read_disjoint_micro_batches_that_cover_every_epoch():
    size, batch_size, world = 12, 2, 3
    streams = [iter(StreamBatchSampler(size, batch_size, seed=7, rank=rank, world=world)) for rank in range(world)]
    # 4 micro-batches per process: 3 processes × 4 × 2 items = 24 positions = epochs 0 and 1
    per_process = [[next(stream) for _ in range(4)] for stream in streams]
    assert all(len(micro_batch) == batch_size for batches in per_process for micro_batch in batches)
    keys = [key for batches in per_process for micro_batch in batches for key in micro_batch]
    # disjoint and covering: every (item, epoch) exactly once
    assert sorted(keys) == sorted((index, epoch) for epoch in (0, 1) for index in range(size))
    # a process resuming at micro-batch 2 reads exactly what it would have read
    for rank in range(world):
        offset = 2 * world * batch_size  # the positions every process read in 2 micro-batches
        resumed = iter(StreamBatchSampler(size, batch_size, seed=7, rank=rank, world=world, offset=offset))
        assert [next(resumed), next(resumed)] == per_process[rank][2:]


def _with_cpu_grad_scaler(monkeypatch) -> list:
    """accelerate gives CPUs no GradScaler: every Accelerator made from now has the real CPU GradScaler, as
    on a GPU; returns the list their scalers are added to."""
    scalers = []

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
            self.native_amp = True
            scalers.append(self.scaler)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    return scalers


def test_an_fp16_gradient_overflow_is_skipped_by_the_scaler_and_training_goes_on(tmp_path, monkeypatch):
    scalers = _with_cpu_grad_scaler(monkeypatch)
    config = TrainConfig(
        max_steps=4, mixed_precision="fp16", lr=0.1, lr_warmup_steps=0, ema_decay=0.0, log_every=1, save_every=100
    )
    task = _Overflowing(overflow_at=1)
    result = train(task, BlankDataset(), config, tmp_path, progress=False)
    assert result.step == 4 and result.skipped_steps == 1
    assert scalers[0].get_scale() == 2.0**15  # halved once by the overflow (backoff 0.5), no growth yet
    before = task.weights_seen
    assert not torch.equal(before[0], before[1])  # step 0 updated the weights
    assert torch.equal(before[1], before[2])  # step 1 overflowed: skipped, weights untouched
    assert not torch.equal(before[2], before[3])  # step 2 unscaled and stepped again
    assert [line["skipped"] for line in result.losses] == [0, 1, 1, 1]


class _TwoOptimizers(Task):
    """Stage 2's shape: the generator's loss also reaches the discriminator's weights (here with gradients that
    overflow fp16's scaled range); those gradients are discarded, and must not count against the update."""

    name = "two-optimizers"

    def __init__(self):
        torch.manual_seed(0)
        self.trainable = {"generator": nn.Linear(2, 1), "discriminator": nn.Linear(2, 1)}

    def optimizer_groups(self):
        return {"generator": ["generator"], "discriminator": ["discriminator"]}

    def to(self, device, weight_dtype):
        for module in self.trainable.values():
            module.to(device)

    def loss(self, batch, step, generator, optimizer):
        ones = torch.ones(1, 2)
        judged = self.trainable["discriminator"](ones).sum()
        if optimizer == "discriminator":  # small losses: their own scaled gradients fit in float16
            return 0.01 * judged**2, {}
        return 0.01 * self.trainable["generator"](ones).sum() ** 2 + 1e35 * judged, {}  # 1e35 · 2^16: inf

    def samples(self, batch, generator):
        return [batch["target"]]


def test_an_overflow_in_another_optimizers_discarded_gradients_does_not_cut_the_loss_scale(tmp_path, monkeypatch):
    """accelerate unscales every optimizer at clipping: the discriminator's gradients from the generator's loss
    halved the scale at every step (and could mark the step skipped), though that update never used them."""
    scalers = _with_cpu_grad_scaler(monkeypatch)
    config = TrainConfig(
        max_steps=3, mixed_precision="fp16", lr=0.1, lr_warmup_steps=0, ema_decay=0.0, log_every=1, save_every=100
    )
    result = train(_TwoOptimizers(), BlankDataset(), config, tmp_path, progress=False)
    assert result.step == 3 and result.skipped_steps == 0
    assert scalers[0].get_scale() == 2.0**16


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=3, size=40, seed=4)


@pytest.mark.slow
def test_a_compiled_run_writes_plain_checkpoints_that_load_and_resume(pairs, tmp_path, monkeypatch):
    # the eager backend runs TorchDynamo's wrapper (what adds "_orig_mod.") without inductor's C++ build
    compile_eagerly = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compile_eagerly(module, backend="eager"))
    train_keys = ["data.crop_size=32", "stage1.save_every=2", "stage1.sample_every=100", "stage1.sample_steps=1"]
    run_dir = tmp_path / "run"
    for steps, resume in ((2, False), (3, True)):
        config = load_config(
            preset="tiny", overrides=MICRO + train_keys + ["stage1.compile=true", f"stage1.max_steps={steps}"]
        )
        dataset = load_training_data(pairs, config)
        prepare_run(run_dir, config, "stage1", pairs, resume)
        task = build_stage1(config)
        save_model_folder(run_dir, task.components)
        result = train(task, dataset, config.stage1, run_dir, config.seed, resume=resume, progress=False)
        assert result.step == steps
    folder = ckpt.latest_checkpoint(run_dir)
    assert folder.name == "step-000003"
    for name in ("unet", "unet.ema"):
        keys = load_file(str(folder / f"{name}.safetensors")).keys()
        assert "conv_in.weight" in keys and not [k for k in keys if "_orig_mod" in k], name
    loaded = load_stage1_run(run_dir, ema=False)
    saved = load_file(str(folder / "unet.safetensors"))
    state = loaded.components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_a_resumed_fp16_run_keeps_the_loss_scale_it_had_reached(tmp_path, monkeypatch):
    """The step-1 overflow halves the scale to 2^15; the step-2 checkpoint must hold it, so that step 3's
    gradient (7e33: finite at 2^15, inf at 2^16) steps in the resumed run as in the uninterrupted one."""
    scalers = _with_cpu_grad_scaler(monkeypatch)

    class Scaled(_Overflowing):
        def loss(self, batch, step, generator, optimizer):
            layer = self.trainable["layer"]
            return (layer.weight.sum() + layer.bias.sum()) * {1: 1e35, 3: 7e33}.get(step, 1.0), {}

    def config(steps):
        return TrainConfig(
            max_steps=steps, mixed_precision="fp16", lr=0.1, lr_warmup_steps=0, ema_decay=0.0, log_every=1,
            save_every=2, max_grad_norm=0.0,
        )  # fmt: skip

    whole = train(Scaled(0), BlankDataset(), config(5), tmp_path / "whole", progress=False)
    train(Scaled(0), BlankDataset(), config(2), tmp_path / "split", progress=False)
    resumed = train(Scaled(0), BlankDataset(), config(5), tmp_path / "split", resume=True, progress=False)
    assert [line["skipped"] for line in whole.losses][2:] == [line["skipped"] for line in resumed.losses] == [1, 1, 1]
    assert scalers[-1].get_scale() == scalers[0].get_scale() == 2.0**15
    final = [load_file(str(tmp_path / run / "checkpoints/step-000005/layer.safetensors")) for run in ("whole", "split")]
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])


def test_a_resume_trains_on_with_the_learning_rate_it_is_given(tmp_path):
    """The loop's own advice on a run that diverged is a lower learning rate and --resume: the optimizer's
    saved state must not bring the old rate back."""
    first = TrainConfig(max_steps=2, lr=0.1, lr_warmup_steps=0, ema_decay=0.0, log_every=1, save_every=2)
    train(_Overflowing(overflow_at=-1), BlankDataset(), first, tmp_path, progress=False)
    lower = TrainConfig(max_steps=4, lr=0.001, lr_warmup_steps=0, ema_decay=0.0, log_every=1, save_every=2)
    resumed = train(_Overflowing(overflow_at=-1), BlankDataset(), lower, tmp_path, resume=True, progress=False)
    assert [line["lr"] for line in resumed.losses] == pytest.approx([0.001, 0.001])


def test_a_resume_drops_log_lines_past_its_checkpoint_and_a_line_cut_short(tmp_path):
    """A full disk can cut the last metrics.jsonl line short: a resume (and export's model card) reads past it."""
    from ffasynth.export import _training_metrics
    from ffasynth.training.loop import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "loss": 0.5}\n\n{"step": 2}\n{"step": 3, "lo')
    assert [line["step"] for line in _training_metrics(tmp_path)] == [0, 1, 2]
    _truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 0}\n{"step": 1, "loss": 0.5}\n'


def test_a_second_trainer_on_a_run_still_training_is_refused_in_one_line(tmp_path):
    """Nothing stopped a second `train --resume` on a run being trained: it removed the checkpoint the first
    was writing (its save then failed) and the two would prune each other's checkpoints. The first process
    holds a lock on the run folder while it trains; a second is refused before touching anything."""
    from ffasynth import run_folder
    from ffasynth.errors import FFASynthError

    config = TrainConfig(max_steps=2, lr_warmup_steps=0, ema_decay=0.0, log_every=1, save_every=1)
    with run_folder.training_lock(tmp_path / "run"):  # another process training there (a lock of its own)
        with pytest.raises(FFASynthError, match="is being trained by another process"):
            train(_Overflowing(overflow_at=-1), BlankDataset(), config, tmp_path / "run", progress=False)
        assert not (tmp_path / "run" / "checkpoints").exists()
    assert train(_Overflowing(overflow_at=-1), BlankDataset(), config, tmp_path / "run", progress=False).step == 2
    # a multi-process run's other processes take no lock: the first one's is free beside them
    with run_folder.training_lock(tmp_path / "run", held=False), run_folder.training_lock(tmp_path / "run"):
        pass


class _NanAtMicroBatch(_Linear):
    """_Linear whose loss is NaN at one (step, micro-batch): micro-batches are counted by the calls."""

    name = "nan-at"

    def __init__(self, step: int, micro: int, accumulation: int):
        super().__init__()
        self.bad, self.accumulation, self.calls = (step, micro), accumulation, 0

    def loss(self, batch, step, generator, optimizer):
        micro, self.calls = self.calls % self.accumulation, self.calls + 1
        loss, parts = super().loss(batch, step, generator, optimizer)
        return (loss * float("nan") if (step, micro) == self.bad else loss), parts


def test_a_step_skipped_at_a_later_micro_batch_logs_no_loss_and_the_skip_count_is_the_total_at_its_step(tmp_path):
    config = TrainConfig(max_steps=3, gradient_accumulation=2, lr=0.0, lr_warmup_steps=0, save_every=100, log_every=1)
    result = train(_NanAtMicroBatch(step=1, micro=1, accumulation=2), BlankDataset(), config, tmp_path, progress=False)
    loss = (_Linear().trainable["layer"](torch.ones(1, 2)).sum() ** 2).item()  # lr 0: the same every step
    assert [line.get("loss/main") for line in result.losses] == pytest.approx([loss, None, loss])
    # one line for the three steps: the skip count at its step (1), not the window's mean of the running total
    config = TrainConfig(max_steps=3, gradient_accumulation=2, lr=0.0, lr_warmup_steps=0, save_every=100, log_every=3)
    result = train(_NanAtMicroBatch(1, 1, 2), BlankDataset(), config, tmp_path / "window", progress=False)
    assert result.losses[0]["skipped"] == 1 and result.losses[0]["loss/main"] == pytest.approx(loss)


def test_accelerates_own_accumulation_setting_does_not_shrink_the_gradients(tmp_path, monkeypatch):
    config = TrainConfig(max_steps=2, lr=0.01, lr_warmup_steps=0, save_every=100, log_every=1, max_grad_norm=1e6)
    plain = train(_Linear(), BlankDataset(), config, tmp_path / "plain", progress=False)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # as `accelerate launch` sets it
    launched = train(_Linear(), BlankDataset(), config, tmp_path / "launched", progress=False)
    norms = [[line["grad_norm/main"] for line in run.losses] for run in (plain, launched)]
    assert norms[0] == pytest.approx(norms[1]) and norms[0][0] > 0


class _KeyedDataset:
    """Ten items that say which (index, epoch) they are."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        return {"target": torch.zeros(1, 8, 8), "key": torch.tensor(key)}


class _Reading(_Linear):
    """_Linear that records the (index, epoch) keys of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.keys: list[tuple[int, int]] = []

    def loss(self, batch, step, generator, optimizer):
        self.keys += [tuple(key) for key in batch["key"].tolist()]
        return super().loss(batch, step, generator, optimizer)


def test_a_resume_with_another_batch_size_reads_on_from_where_the_stream_stopped(tmp_path):
    config = TrainConfig(max_steps=3, batch_size=4, lr_warmup_steps=0, save_every=3, log_every=1)
    first = _Reading()
    train(first, _KeyedDataset(), config, tmp_path, progress=False)
    resumed = _Reading()
    smaller = TrainConfig(max_steps=9, batch_size=2, lr_warmup_steps=0, save_every=100)  # positions 6-11 reread
    train(resumed, _KeyedDataset(), smaller, tmp_path, progress=False, resume=True)
    stream = StreamBatchSampler(10, 1, seed=0)  # the loop's default seed; position p is its micro-batch p
    assert first.keys == [stream.batch(p)[0] for p in range(12)]
    assert resumed.keys == [stream.batch(p)[0] for p in range(12, 24)]  # 6 steps of 2: positions 12-23
