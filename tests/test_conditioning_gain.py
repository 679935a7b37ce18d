"""The conditioning gain (training/conditioning_gain.py, issue 20): stage 1's loss on a fixed batch
with shuffled photos minus with the true ones, logged while stage 1 trains.

Stand-in U-Nets whose use of the photo is known exactly: one that ignores it (gain 0), and ones that
recognise each photo by one path only (the concat latent or the CLIP token) and answer that photo's
exact velocity (loss 0 with the true photo, so the gain is positive on that path and 0 on the other)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ffasynth.config import load_config
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import ConfigError
from ffasynth.models.conditioning import encode_latents
from ffasynth.training.conditioning_gain import gain_line, probe_timesteps, shuffle_order
from ffasynth.training.progress import RunLog
from ffasynth.training.stage1 import build_stage1
from ffasynth.training.stages import train_stage1
from tests.helpers import MICRO_STAGE1, micro_config, seeded

GAIN_KEYS = ("cond_loss_true", "cond_gain", "cond_gain_concat", "cond_gain_clip", "cond_gain_null")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=48, seed=5)  # 8 pairs (2 phases)


def _probe(count: int = 4) -> dict:
    """Four different random photos (two eyes, two phases each) and FFA-like targets."""
    source = torch.rand(count, 3, 32, 32, generator=seeded(1)) * 2 - 1
    target = source.mean(dim=1, keepdim=True).neg()
    eyes = [f"{i // 2}-{('early', 'late')[i % 2]}" for i in range(count)]
    return {"source": source, "target": target, "phase": torch.arange(count) % 2, "id": eyes}


class PhotoMemory(nn.Module):
    """Recognises each probe photo by one conditioning path ("concat": the source latent in conv_in's
    last channels; "clip": the cross-attention token) and returns the exact velocity
    v = √ᾱ ε − √(1−ᾱ) z0 for that photo's target latent z0, with ε = (z_t − √ᾱ z0)/√(1−ᾱ)."""

    def __init__(self, scheduler, keys: torch.Tensor, answers: torch.Tensor, path: str):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # for the dtype the caller reads
        self.scheduler, self.keys, self.answers, self.path = scheduler, keys.flatten(1), answers, path

    def forward(self, model_input, t, encoder_hidden_states=None, class_labels=None):
        channels = self.answers.shape[1]
        noisy = model_input[:, :channels]
        key = model_input[:, channels:] if self.path == "concat" else encoder_hidden_states
        z0 = self.answers[torch.cdist(key.flatten(1), self.keys).argmin(dim=1)]
        alpha = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = (noisy - alpha.sqrt() * z0) / (1 - alpha).sqrt()
        return SimpleNamespace(sample=alpha.sqrt() * noise - (1 - alpha).sqrt() * z0)


def _memory_task(path: str):
    task = build_stage1(micro_config("data.crop_size=32", "model.clip_tokens=patches"))
    probe = _probe()
    vae, conditioner = task.components.vae, task.conditioner
    with torch.no_grad():
        source = probe["source"]
        keys = conditioner.source_latents(vae, source) if path == "concat" else conditioner.tokens(source)
        answers = encode_latents(vae, probe["target"])  # the probe's target latent: the posterior mode
    task.trainable["unet"] = PhotoMemory(task.components.scheduler, keys, answers, path)
    return task, probe


@pytest.mark.parametrize("path, other", [("concat", "clip"), ("clip", "concat")])
def test_a_unet_that_reads_the_photo_on_one_path_gains_on_that_path_only(path, other):
    task, probe = _memory_task(path)
    figures = task.diagnostics(probe, step=1)
    assert figures["cond_loss_true"] < 1e-6  # it knows every photo's answer
    # ~3e-3 here (the random VAE's latents of the four photos differ little); rounding is ~1e-16
    assert figures[f"cond_gain_{path}"] > 1e-4 and figures["cond_gain"] > 1e-4 and figures["cond_gain_null"] > 1e-4
    assert figures[f"cond_gain_{other}"] == 0.0  # shuffling the path it does not read changes nothing


def test_a_unet_that_ignores_the_photo_gains_nothing():
    task = build_stage1(micro_config("data.crop_size=32", "model.use_clip=false"))
    conv_in = task.components.unet.conv_in
    latent_channels = task.components.vae.config.latent_channels
    with torch.no_grad():
        conv_in.weight[:, latent_channels:] = 0.0  # the source latent's channels: read as nothing
    figures = task.diagnostics(_probe(), step=1)
    assert set(figures) == {"cond_loss_true", "cond_gain", "cond_gain_concat", "cond_gain_null"}  # no CLIP path
    assert figures["cond_loss_true"] > 0.01
    for key in ("cond_gain", "cond_gain_concat", "cond_gain_null"):
        assert abs(figures[key]) < 1e-7, (key, figures[key])
    with torch.no_grad():  # the same U-Net reading the source latent: the probe sees it
        conv_in.weight[:, latent_channels:] = torch.randn(conv_in.weight[:, latent_channels:].shape, generator=seeded())
    assert abs(task.diagnostics(_probe(), step=1)["cond_gain"]) > 1e-5


def test_the_shuffle_gives_every_crop_another_eyes_photo():
    for eyes in (["a", "a", "b", "b", "c", "c", "d", "d"], ["a", "b", "c"], ["a", "a", "a"], ["a", "a", "b"]):
        order = shuffle_order(eyes).tolist()
        assert sorted(order) == list(range(len(eyes)))  # a permutation: every photo used once
        assert all(order[i] != i for i in range(len(eyes)))  # a derangement: no crop keeps its own
        if len(set(eyes)) > 1 and eyes != ["a", "a", "b"]:  # (no shift of a, a, b avoids a repeat)
            assert all(eyes[order[i]] != eyes[i] for i in range(len(eyes)))
    assert probe_timesteps(1000) == [400, 700, 950] and probe_timesteps(10) == [4, 7, 9]


def test_the_probe_repeats_exactly_and_leaves_training_untouched():
    task = build_stage1(micro_config("data.crop_size=32"))
    unet = task.components.unet
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    rng = torch.get_rng_state()
    first, second = task.diagnostics(_probe(), step=1), task.diagnostics(_probe(), step=2)
    assert first == second
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global generator
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    assert unet.training  # back in training mode


def test_stage1_logs_the_gain_at_its_cadence_without_changing_the_training(pairs, tmp_path):
    logged, said = {}, {}
    for every in (2, 0):
        overrides = ["stage1.max_steps=5", "stage1.sample_every=100", f"stage1.cond_gain_every={every}", "seed=3"]
        overrides += ["stage1.log_every=3"]  # a gain is written at its own step, between the regular lines
        config = load_config(preset="tiny", overrides=MICRO_STAGE1 + overrides)
        said[every] = []
        train_stage1(config, pairs, tmp_path / str(every), progress=False, say=said[every].append)
        lines = (tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()
        logged[every] = [json.loads(line) for line in lines]
    assert [line["step"] for line in logged[2]] == [2, 3, 4, 5] and [line["step"] for line in logged[0]] == [3, 5]
    measured = [line for line in logged[2] if "cond_gain" in line]
    assert [line["step"] for line in measured] == [2, 4]
    for line in measured:
        assert all(math.isfinite(line[key]) for key in GAIN_KEYS), line
    assert not any("cond_gain" in line for line in logged[0])
    assert said[2][-1].startswith("conditioning gain at step 4: ")
    assert not any("conditioning gain" in line for line in said[0])
    # the probe draws from its own generator and changes no weight: the run is the one without it
    for name in ("unet", "unet.ema"):
        a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-000005" / f"{name}.safetensors")) for run in "20")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_figure_measured_once_is_logged_as_it_is_beside_the_window_means(tmp_path):
    config = load_config(preset="tiny").stage1
    process = SimpleNamespace(is_main_process=True, is_local_main_process=True, num_processes=1)
    log = RunLog(tmp_path, config, "stage1", 0, False, process)
    log.step({"loss/main": 1.0, "lr": 1e-3, "step": 1}, write=False)
    log.step({"loss/main": 3.0, "lr": 1e-3, "step": 2}, write=False)
    summary = log.step({"loss/main": 2.0, "lr": 1e-3, "cond_gain": 0.5, "step": 3}, write=True)
    log.close()
    assert summary["loss/main"] == 2.0 and summary["cond_gain"] == 0.5  # not 0.5 / 3
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["cond_gain"] == 0.5


def test_the_last_gain_is_said_with_a_warning_when_the_photo_is_not_used():
    said = gain_line(
        [
            {"step": 100, "cond_gain": 0.2, "cond_loss_true": 0.5, "cond_gain_concat": 0.2, "cond_gain_null": 0.3},
            {"step": 200, "loss/main": 0.3},
            {"step": 300, "cond_gain": 0.001, "cond_loss_true": 0.25, "cond_gain_concat": 0.001, "cond_gain_null": 0.0},
        ]
    )
    assert said.startswith("conditioning gain at step 300: +0.0010") and "+0.4% of 0.2500" in said
    assert "not using the photo" in said and "ffasynth data register" in said
    fine = gain_line([{"step": 100, "cond_gain": 0.1, "cond_loss_true": 0.5, "cond_gain_null": 0.2}])
    assert "+20.0%" in fine and "warning" not in fine
    assert gain_line([{"step": 10, "loss/main": 0.4}]) is None


@pytest.mark.parametrize("value, accepted", [("-1", False), ("0", True), ("25", True), ("null", True)])
def test_cond_gain_every_must_be_zero_or_more(value, accepted):
    overrides = [f"stage1.cond_gain_every={value}"]
    if accepted:
        config = load_config(preset="tiny", overrides=overrides)
        every = build_stage1(micro_config(*overrides)).diagnostics_every
        assert every == (config.stage1.sample_every if value == "null" else int(value))
        return
    with pytest.raises(ConfigError) as raised:
        load_config(preset="tiny", overrides=overrides)
    assert "stage1.cond_gain_every" in str(raised.value) and "\n" not in str(raised.value)


def test_a_one_pair_run_trains_without_the_gain_instead_of_failing_at_its_first_measurement(tmp_path, capfd):
    """The gain gives each probe item another item's photo: with one training pair there is none, which is
    said once at the start; the run must not stop at step `cond_gain_every` with nothing saved."""
    one = write_phantom_dataset(tmp_path / "one", n=1, size=48, seed=5)
    overrides = ["stage1.max_steps=3", "stage1.cond_gain_every=2", "stage1.save_every=100", "data.phase=early"]
    config = load_config(preset="tiny", overrides=MICRO_STAGE1 + overrides)
    result = train_stage1(config, one, tmp_path / "run", progress=False)
    assert result.step == 3 and result.checkpoint is not None
    assert "one training pair: the conditioning gain is not measured" in "".join(capfd.readouterr())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("cond_gain" in line for line in lines)
