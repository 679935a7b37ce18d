"""The memory levers of issue 23, each checked where it acts: the optimizer a stage builds
(`<stage>.optimizer`: AdamW or bitsandbytes' 8-bit AdamW), where the EMA lives (`<stage>.ema_device`),
stage 2's frozen U-Net and CLIP dtype (`stage2.frozen_dtype`), its decoder's gradient checkpointing, and
its frozen U-Net run once a batch on only the items drawn for it. (LoRA: tests/test_lora.py.)"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from ffasynth.config import load_config
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import ConfigError
from ffasynth.models.conditioning import encode_latents
from ffasynth.training import loop
from ffasynth.training.checkpoint import ExponentialMovingAverage
from ffasynth.training.optimizers import build_optimizer, ema_device
from ffasynth.training.run import load_stage1_run
from ffasynth.training.stage1 import build_stage1
from ffasynth.training.stage2 import Stage2Task
from tests.helpers import STAGE2, micro_config, train_micro_stage1

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


class FakeAdamW8bit(torch.optim.AdamW):
    """Stands in for bitsandbytes.optim.AdamW8bit (the same constructor), recording what it was given."""

    def __init__(self, params, **settings):
        super().__init__(params, **settings)
        self.settings = settings


def _fake_bitsandbytes(monkeypatch) -> None:
    module = types.ModuleType("bitsandbytes")
    module.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)


def test_adamw_is_the_default_with_the_stage_betas_and_weight_decay():
    config = load_config(preset="tiny", overrides=["stage1.adam_beta1=0.8", "stage1.weight_decay=0.03"]).stage1
    optimizer = build_optimizer([nn.Parameter(torch.zeros(3))], 1e-3, config, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["betas"] == (0.8, 0.999) and optimizer.defaults["weight_decay"] == 0.03


def test_adamw8bit_is_bitsandbytes_on_a_cuda_device(monkeypatch):
    _fake_bitsandbytes(monkeypatch)
    config = load_config(preset="tiny", overrides=["stage2.optimizer=adamw8bit", "stage2.adam_beta2=0.99"]).stage2
    optimizer = build_optimizer([nn.Parameter(torch.zeros(3))], 2e-4, config, CUDA)
    assert isinstance(optimizer, FakeAdamW8bit)
    assert optimizer.settings == {"lr": 2e-4, "betas": (0.9, 0.99), "weight_decay": config.weight_decay}


def test_adamw8bit_without_bitsandbytes_or_cuda_is_one_line_naming_the_option(monkeypatch):
    config = load_config(preset="tiny", overrides=["stage1.optimizer=adamw8bit"]).stage1
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match=r"^stage1\.optimizer=adamw8bit needs a CUDA GPU \(this run is on cpu\)"):
        build_optimizer(params, 1e-3, config, torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    with pytest.raises(ConfigError, match=r"^stage1\.optimizer=adamw8bit needs bitsandbytes, which is not installed"):
        build_optimizer(params, 1e-3, config, CUDA)


def test_the_training_loop_builds_the_configured_optimizer(tmp_path):
    pairs = write_phantom_dataset(tmp_path / "pairs", n=2, size=40, seed=2)
    with pytest.raises(ConfigError, match=r"stage1\.optimizer=adamw8bit needs a CUDA GPU"):
        train_micro_stage1(pairs, tmp_path / "run", 1, extra=["stage1.optimizer=adamw8bit"])


def test_ema_device_is_host_memory_or_beside_the_weights():
    for choice, wanted in (("cpu", torch.device("cpu")), ("same", CUDA)):
        config = load_config(preset="tiny", overrides=[f"stage1.ema_device={choice}"]).stage1
        assert ema_device(config, CUDA) == wanted


def test_the_ema_is_float32_on_its_device_and_follows_its_formula():
    module = nn.Linear(3, 2).to(torch.bfloat16)
    module.bias.requires_grad_(False)
    ema = ExponentialMovingAverage(module, 0.9, torch.device("cpu"))
    assert set(ema.shadow) == {"weight"} and ema.shadow["weight"].dtype == torch.float32
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    decay = min(0.9, 2 / 11)  # warm-up: min(decay, (1 + n)/(10 + n)) at n = 1
    assert torch.allclose(ema.shadow["weight"], decay * start + (1 - decay) * module.weight.float())


def test_the_loop_puts_each_ema_where_ema_device_says(monkeypatch):
    # no second device on a CPU machine: "cpu" is routed to the meta device here, so where the shadows
    # end up shows that the loop asks ema_device with the stage's config
    monkeypatch.setattr(
        loop, "ema_device", lambda config, device: torch.device("meta" if config.ema_device == "cpu" else device.type)
    )
    for choice, wanted in (("cpu", "meta"), ("same", "cpu")):
        config = micro_config(f"stage1.ema_device={choice}", "stage1.ema_decay=0.9")
        _, _, emas = loop._build_optimizers(build_stage1(config), config.stage1, loop._accelerator("no"))
        assert {t.device.type for ema in emas.values() for t in ema.shadow.values()} == {wanted}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_ema_stays_in_host_memory():
    config = micro_config("stage1.ema_device=cpu", "stage1.ema_decay=0.9")
    raw, _, emas = loop._build_optimizers(build_stage1(config), config.stage1, loop._accelerator("no"))
    assert next(raw["unet"].parameters()).is_cuda
    emas["unet"].update(raw["unet"])
    assert all(not t.is_cuda for ema in emas.values() for t in ema.shadow.values())


# --- stage 2 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    pairs = write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=48, seed=5)
    run = tmp_path_factory.mktemp("runs") / "s1"
    train_micro_stage1(pairs, run, 1)
    return run


def _stage2(run, *overrides, weight_dtype=torch.float32) -> Stage2Task:
    config = load_config(run / "config.yaml", overrides=STAGE2 + list(overrides))
    task = Stage2Task(load_stage1_run(run), config.stage2, None)
    task.to(torch.device("cpu"), weight_dtype)
    return task


def _batch(items: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "source": torch.rand(items, 3, 32, 32, generator=generator) * 2 - 1,
        "target": torch.rand(items, 1, 32, 32, generator=generator) * 2 - 1,
        "phase": list(range(items)),
        "id": [f"{i}" for i in range(items)],
    }


def _dtypes(module: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize(
    ("frozen", "weight_dtype", "wanted"),
    [
        ("bf16", torch.float32, torch.bfloat16),
        ("same", torch.float32, torch.float32),
        ("same", torch.float16, torch.float16),
    ],
)
def test_stage2_keeps_the_frozen_unet_and_clip_in_frozen_dtype_and_the_decoder_float32(
    stage1_run, frozen, weight_dtype, wanted
):
    task = _stage2(stage1_run, f"stage2.frozen_dtype={frozen}", weight_dtype=weight_dtype)
    components = task.stage1.components
    assert _dtypes(components.unet) == _dtypes(components.image_encoder) == {wanted}
    assert _dtypes(task.decoder) == _dtypes(components.vae.encoder) == {torch.float32}


def test_a_bf16_frozen_unet_still_gives_the_decoder_float32_latents(stage1_run):
    task = _stage2(stage1_run, "stage2.frozen_dtype=bf16", "stage2.sampler_steps=2")
    for mode in ("unet", "sampler"):
        latents = task.latents(_batch(2), torch.Generator().manual_seed(0), mode)
        assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_stage2_gradient_checkpointing_keeps_few_decoder_activations_for_backward(stage1_run):
    """What autograd saves for backward during the decoder's forward (its activation memory): with
    checkpointing only each block's input; backward recomputes the rest and still reaches every layer."""

    def saved_values(checkpointing: bool) -> int:
        task = _stage2(stage1_run, "stage2.latents=encoder")
        if checkpointing:
            task.enable_gradient_checkpointing()
        latents = task.latents(_batch(2), torch.Generator().manual_seed(0))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            decoded = task.decoder(latents)
        decoded.square().mean().backward()
        assert all(p.grad is not None for p in task.decoder.parameters())
        return sum(sizes)

    with_checkpointing, without = saved_values(True), saved_values(False)
    assert with_checkpointing < 0.3 * without, (with_checkpointing, without)


class CountingUNet(nn.Module):
    """Wraps the frozen U-Net, recording how many items each call gets."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.items = unet, unet.config, []

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, model_input, *args, **kwargs):
        self.items.append(model_input.shape[0])
        return self.unet(model_input, *args, **kwargs)


def test_the_frozen_unet_sees_only_the_items_drawn_for_it(stage1_run):
    task = _stage2(stage1_run, "stage2.latents=mix")
    components = task.stage1.components
    components.unet = CountingUNet(components.unet)
    batch, seed = _batch(6), 0
    draws = torch.rand(6, generator=torch.Generator().manual_seed(seed)) < 0.5  # mix's first draw
    assert 0 < int(draws.sum()) < 6
    latents = task.latents(batch, torch.Generator().manual_seed(seed))
    assert components.unet.items == [int(draws.sum())]
    encoded = encode_latents(components.vae, batch["target"])
    assert torch.equal(latents[~draws], encoded[~draws])  # the others: the target's own latent
    assert (latents[draws] - encoded[draws]).abs().amax(dim=(1, 2, 3)).min() > 1e-3

    # the U-Net's item matches a batch of that item alone: the rows and their draws stay together
    row = int(draws.nonzero()[0])
    components.unet.items.clear()
    alone = task.latents(batch, torch.Generator().manual_seed(seed), "unet")
    assert components.unet.items == [6] and torch.allclose(alone[row], latents[row], atol=1e-5)


def test_the_frozen_unet_runs_once_a_batch_for_both_optimizers(stage1_run):
    task = _stage2(stage1_run, "stage2.latents=sampler", "stage2.sampler_steps=2", "stage2.disc_start=0")
    components = task.stage1.components
    components.unet = CountingUNet(components.unet)
    batch = _batch(2)
    for optimizer in ("decoder", "discriminator"):
        task.loss(batch, 5, torch.Generator().manual_seed(0), optimizer)
    assert len(components.unet.items) == 2  # sampler_steps passes, for the decoder's loss only


# --- the memory estimate (benchmarks/bench_sd15_memory.py) --------------------------------------


@pytest.mark.slow
def test_the_sd15_memory_estimate_counts_lora_8bit_adamw_and_a_host_ema(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_sd15_memory as bench

    # 8-bit AdamW: one byte a moment plus a float32 absmax per 256-value block; small tensors stay float32
    big, small = nn.Parameter(torch.empty(5000, device="meta")), nn.Parameter(torch.empty(100, device="meta"))
    assert bench.optimizer_bytes([big, small], "adamw8bit") == 2 * 5000 + 2 * 4 * 20 + 8 * 100
    assert bench.optimizer_bytes([big, small], "adamw") == 8 * 5100

    full, lora = bench.static_gib(1, True, 2), bench.static_gib(1, True, 2, lora=True)
    plain, _, _ = bench.sd15_modules()
    settings = load_config(bench.LORA_CONFIG).stage1.lora
    targeted = [
        m
        for n, m in plain.named_modules()
        if isinstance(m, nn.Linear) and any(n.endswith(t) for t in settings.target_modules)
    ]
    whole = sum(p.numel() for p in [*plain.conv_in.parameters(), *plain.class_embedding.parameters()])
    adapters = sum(settings.rank * (m.in_features + m.out_features) for m in targeted)
    assert lora["trainable_params_m"] * 1e6 == pytest.approx(adapters + whole, abs=1)
    # with LoRA the U-Net's own weights are frozen, in bf16: 2 bytes each more in the frozen part
    unet_frozen = full["trainable_params_m"] * 1e6 - whole
    assert lora["frozen_gib"] == pytest.approx(full["frozen_gib"] + 2 * unet_frozen / 2**30)
    assert lora["trainable_gib"] == pytest.approx(20 * (adapters + whole) / 2**30)

    host = bench.static_gib(1, True, 2, ema_on_cpu=True)
    values = full["trainable_params_m"] * 1e6
    assert host["trainable_gib"] == pytest.approx(full["trainable_gib"] - 4 * values / 2**30)
    assert host["ema_host_gib"] == pytest.approx(4 * values / 2**30)
    # stage 2: a bf16 frozen U-Net and CLIP take half their float32 bytes; the VAE encoder stays float32
    fp32, bf16 = bench.static_gib(2, False, 4), bench.static_gib(2, False, 2)
    halved = (sum(p.numel() for p in plain.parameters()) + bench.count(bench.sd15_modules()[2])) * 2 / 2**30
    assert fp32["frozen_gib"] - bf16["frozen_gib"] == pytest.approx(halved)
