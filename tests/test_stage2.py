"""Stage 2: only the decoder learns, every loss term reaches it, PatchGAN geometry, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.config import load_config
from ffasynth.models.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss, receptive_field
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.run import load_model_run, load_stage1_run
from ffasynth.training.stage2 import Stage2Task, predicted_x0
from tests.test_training import _run

STAGE2 = [
    "stage2.batch_size=2",
    "stage2.disc_start=0",
    "stage2.lpips_weight=0",
    "stage2.disc_channels=8",
    "stage2.log_every=1",
    "data.crop_size=32",
]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    from ffasynth.data.phantom import write_phantom_dataset

    pairs = write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=48, seed=5, test_fraction=0.25)
    run = tmp_path_factory.mktemp("runs") / "s1"
    _run(pairs, run, 2)
    return pairs, run


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_patchgan_receptive_field_is_the_analytic_one(n_layers):
    field = receptive_field(n_layers)
    assert receptive_field(3) == 70
    disc = NLayerDiscriminator(1, 8, n_layers, norm="none").double()
    image = torch.zeros(1, 1, 160, 160, dtype=torch.double, requires_grad=True)
    logits = disc(image)
    row, col = logits.shape[-2] // 2, logits.shape[-1] // 2
    logits[0, 0, row, col].backward()
    reached = image.grad[0, 0].abs() > 0
    rows, cols = reached.any(1).nonzero().flatten(), reached.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == field and cols.max() - cols.min() + 1 == field


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    out = layer(x)
    rec, adv = (out**2).sum(), 0.1 * out.sum()
    # d rec / dW = 2·out ⊗ x ; d adv / dW = 0.1·1 ⊗ x
    expected = (2 * out.detach().T @ x).norm() / ((0.1 * torch.ones(2, 1) @ x).norm() + 1e-4)
    assert adaptive_weight(rec, adv, layer.weight).item() == pytest.approx(expected.item(), rel=1e-5)
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0


def test_unet_x0_estimate_inverts_the_forward_process(stage1_run):
    loaded = load_stage1_run(stage1_run[1])
    scheduler = loaded.components.scheduler
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 300, 900])
    noisy = scheduler.add_noise(z0, eps, t)
    for prediction_type, target in (("epsilon", eps), ("v_prediction", scheduler.get_velocity(z0, eps, t))):
        scheduler.register_to_config(prediction_type=prediction_type)
        assert torch.allclose(predicted_x0(scheduler, noisy, target, t), z0, atol=1e-4), prediction_type


def test_every_loss_term_moves_the_decoder(stage1_run):
    pairs, run = stage1_run
    loaded = load_stage1_run(run)
    config = load_config(run / "config.yaml", overrides=STAGE2 + ["stage2.lpips_weight=1"])
    lpips_calls = []

    class TinyPerceptual(torch.nn.Module):  # a differentiable stand-in; the real LPIPS has its own test
        def forward(self, a, b):
            lpips_calls.append(1)
            return (torch.nn.functional.avg_pool2d(a, 4) - torch.nn.functional.avg_pool2d(b, 4)).pow(2).mean((1, 2, 3))

    task = Stage2Task(loaded, config.stage2, TinyPerceptual())
    task.to(torch.device("cpu"), torch.float32)
    batch = {"source": torch.rand(2, 3, 32, 32) * 2 - 1, "target": torch.rand(2, 1, 32, 32) * 2 - 1, "phase": [0, 1]}
    latents = task.latents(batch, torch.Generator().manual_seed(0))
    decoded = task.decoder(latents)
    terms = task.reconstruction_terms(decoded, batch["target"])
    terms["adversarial"] = -task.discriminator(decoded.mean(1, keepdim=True)).mean()
    assert set(terms) == {"rec", "lpips", "adversarial"} and lpips_calls
    for name, term in terms.items():
        grads = torch.autograd.grad(term, list(task.decoder.parameters()), retain_graph=True, allow_unused=True)
        total = sum(g.abs().sum() for g in grads if g is not None)
        assert total > 0, f"{name} gives the decoder no gradient"
    loss, logs = task.loss(batch, 5, torch.Generator().manual_seed(0), "decoder")
    assert "g_loss" in logs and logs["adv_weight"] > 0
    loss.backward()
    assert all(p.grad is None for p in loaded.components.unet.parameters())


def test_stage2_changes_only_the_decoder_and_loads_for_inference(stage1_run, tmp_path):
    pairs, run = stage1_run
    before = load_stage1_run(run)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "stage2",
            "--from",
            str(run),
            "--data",
            str(pairs),
            "--out",
            str(tmp_path / "s2"),
            "--max-steps",
            "3",
            "--quiet",
            *STAGE2,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "dB before" in result.output
    info = json.loads((tmp_path / "s2" / "run.json").read_text())
    assert info["kind"] == "stage2" and info["decoder_psnr"]["images"] >= 1
    after = load_model_run(tmp_path / "s2")
    b, a = before.components, after.components
    for name, x, y in (
        ("unet", b.unet, a.unet),
        ("encoder", b.vae.encoder, a.vae.encoder),
        ("quant_conv", b.vae.quant_conv, a.vae.quant_conv),
        ("clip", b.image_encoder, a.image_encoder),
    ):
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx), f"stage 2 changed the {name}"
    assert not torch.equal(b.vae.decoder.conv_out.weight, a.vae.decoder.conv_out.weight)
    # the tiny preset keeps a decoder EMA: inference loads it, not the raw weights
    folder = ckpt.latest_checkpoint(tmp_path / "s2")
    ema, raw = (load_file(str(folder / f"decoder{s}.safetensors")) for s in (".ema", ""))
    assert torch.equal(ema["decoder.conv_out.weight"], a.vae.decoder.conv_out.weight)
    assert not torch.equal(raw["decoder.conv_out.weight"], a.vae.decoder.conv_out.weight)
    assert torch.equal(
        raw["decoder.conv_out.weight"],
        load_model_run(tmp_path / "s2", ema=False).components.vae.decoder.conv_out.weight,
    )


def test_stage2_with_the_real_lpips_gives_the_decoder_perceptual_gradient(stage1_run, tmp_path):
    from ffasynth.weights import build_lpips
    from tests.fake_weights import write_torchvision

    write_torchvision(tmp_path, "alexnet")
    lpips = build_lpips("alex", tmp_path)
    pairs, run = stage1_run
    config = load_config(run / "config.yaml", overrides=STAGE2 + ["stage2.lpips_weight=1", "stage2.lpips_net=alex"])
    task = Stage2Task(load_stage1_run(run), config.stage2, lpips)
    batch = {"source": torch.rand(2, 3, 32, 32) * 2 - 1, "target": torch.rand(2, 1, 32, 32) * 2 - 1, "phase": [0, 0]}
    decoded = task.decoder(task.latents(batch, torch.Generator().manual_seed(0)))
    term = task.reconstruction_terms(decoded, batch["target"])["lpips"]
    grads = torch.autograd.grad(term, list(task.decoder.parameters()), allow_unused=True)
    assert term.item() > 0 and sum(g.abs().sum() for g in grads if g is not None) > 0
    assert not any(p.requires_grad for p in lpips.parameters())  # the metric's own weights stay frozen


def test_missing_lpips_weights_stop_stage2_in_one_line(stage1_run, tmp_path):
    pairs, run = stage1_run
    result = CliRunner().invoke(
        app,
        [
            "train",
            "stage2",
            "--from",
            str(run),
            "--data",
            str(pairs),
            "--out",
            str(tmp_path / "s2"),
            "--max-steps",
            "1",
            "stage2.lpips_weight=1",
            f"stage2.weights_dir={tmp_path / 'empty'}",
        ],
    )
    assert result.exit_code != 0
    assert "vgg16-397923af.pth" in str(result.exception) and "\n" not in str(result.exception)


def test_decoder_errors_are_l1_and_psnr_on_the_unit_scale():
    from diffusers import AutoencoderKL

    from ffasynth.training.stage2 import decoder_errors

    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    # a black angiogram (−1 → 0 on the unit scale) of an odd size (padded to the VAE's multiple)
    images = [torch.full((1, 13, 10), -1.0), torch.full((1, 8, 8), -1.0)]

    def grey(value):  # a "decoder" that outputs `value` everywhere, whatever the latent
        return lambda latents: torch.full((latents.shape[0], 3, latents.shape[2] * 2, latents.shape[3] * 2), value)

    mid = decoder_errors(vae, grey(0.0), images)  # 0.5 everywhere: |0.5 − 0| = 0.5, MSE 0.25
    assert mid["l1"] == pytest.approx(0.5) and mid["db"] == pytest.approx(10 * torch.log10(torch.tensor(4.0)).item())
    exact = decoder_errors(vae, grey(-1.0), images)
    assert exact["l1"] == 0.0 and exact["db"] == pytest.approx(120.0)  # MSE floored at 1e-12
