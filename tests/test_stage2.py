"""Stage 2: only the decoder learns, every loss term reaches it, PatchGAN geometry, the CLI."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ffasynth.config import load_config
from ffasynth.models.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss, receptive_field
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.run import load_model_run, load_stage1_run
from ffasynth.training.stage2 import Stage2Task, predicted_x0
from tests.helpers import STAGE2, invoke, train_micro_stage1, two_level_vae


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    from ffasynth.data.phantom import write_phantom_dataset

    pairs = write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=48, seed=5, test_fraction=0.25)
    run = tmp_path_factory.mktemp("runs") / "s1"
    train_micro_stage1(pairs, run, 2)
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
    terms = task.reconstruction_terms(task.decoder(latents), batch["target"])
    assert set(terms) == {"rec", "lpips"} and lpips_calls
    for name, term in terms.items():
        grads = torch.autograd.grad(term, list(task.decoder.parameters()), retain_graph=True, allow_unused=True)
        total = sum(g.abs().sum() for g in grads if g is not None)
        assert total > 0, f"{name} gives the decoder no gradient"


def test_the_decoder_loss_holds_the_adaptively_weighted_adversarial_term(stage1_run):
    # from disc_start on, Stage2Task.loss adds w·λ_adv·g with w = ‖∇_last rec‖/(‖∇_last g‖ + 1e-4):
    # at the decoder's last layer the term's gradient is λ_adv times the reconstruction's (up to the 1e-4)
    config = load_config(stage1_run[1] / "config.yaml", overrides=STAGE2 + ["stage2.disc_start=5"])
    task = Stage2Task(load_stage1_run(stage1_run[1]), config.stage2, None)
    task.to(torch.device("cpu"), torch.float32)
    batch = {"source": torch.rand(2, 3, 32, 32) * 2 - 1, "target": torch.rand(2, 1, 32, 32) * 2 - 1, "phase": [0, 1]}
    last = task.decoder.last_layer
    before, _ = task.loss(batch, 4, torch.Generator().manual_seed(0), "decoder")  # the step before disc_start
    with_adversarial, logs = task.loss(batch, 5, torch.Generator().manual_seed(0), "decoder")
    assert with_adversarial.item() - before.item() == pytest.approx(logs["adv_weight"] * logs["g_loss"], rel=1e-4)
    (rec_grad,) = torch.autograd.grad(before, [last])
    (total_grad,) = torch.autograd.grad(with_adversarial, [last], retain_graph=True)
    adversarial_grad = total_grad - rec_grad
    assert adversarial_grad.norm().item() == pytest.approx(config.stage2.adv_weight * rec_grad.norm().item(), rel=1e-3)
    with_adversarial.backward()
    assert all(p.grad is None for p in task.stage1.components.unet.parameters())


def test_stage2_changes_only_the_decoder_and_loads_for_inference(stage1_run, tmp_path):
    pairs, run = stage1_run
    before = load_stage1_run(run)
    out = tmp_path / "s2"
    # latent_reuse 2: steps 1 and 3 sample their latents, step 2 trains on a pooled batch (other tests: 1)
    args = ["--max-steps", 3, "--quiet", *STAGE2, "stage2.latent_reuse=2"]
    result = invoke("train", "stage2", "--from", run, "--data", pairs, "--out", out, *args)
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
    # the photos both runs trained on, by hash, go with the exported pipeline (for `clinical`)
    from ffasynth import run_folder
    from ffasynth.data.pair_check import load_pairs
    from ffasynth.export import export_run
    from ffasynth.integrity import sha256

    training = {sha256(pair.source) for pair in load_pairs(run_folder.split_dir(pairs, "train"))}
    assert run_folder.trained_photos(tmp_path / "s2") == training and len(training) == 3
    assert run_folder.trained_photos(export_run(tmp_path / "s2", tmp_path / "pipeline")) == training


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
    # pixels the decoder pushes past [-1, 1] keep their LPIPS gradient (a plain clamp gave them none)
    grey = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 3 - 1.5).requires_grad_()
    outside = grey.detach().abs() > 1
    task.reconstruction_terms(grey, batch["target"][:1])["lpips"].backward()  # one channel: decoded as it is
    assert grey.grad[outside].abs().sum() > 0


def test_missing_lpips_weights_stop_stage2_in_one_line(stage1_run, tmp_path):
    pairs, run = stage1_run
    no_weights = ["stage2.lpips_weight=1", f"stage2.weights_dir={tmp_path / 'empty'}"]
    result = invoke(
        "train", "stage2", "--from", run, "--data", pairs, "--out", tmp_path / "s2", "--max-steps", 1, *no_weights
    )
    assert result.exit_code != 0
    assert "vgg16-397923af.pth" in str(result.exception) and "\n" not in str(result.exception)


def test_decoder_errors_are_l1_and_psnr_on_the_unit_scale():
    from ffasynth.evaluation.decoder_report import decoder_errors

    vae = two_level_vae()
    # a black angiogram (−1 → 0 on the unit scale) of an odd size (padded to the VAE's multiple)
    images = [torch.full((1, 13, 10), -1.0), torch.full((1, 8, 8), -1.0)]

    def grey(value):  # a "decoder" that outputs `value` everywhere, whatever the latent
        return lambda latents: torch.full((latents.shape[0], 3, latents.shape[2] * 2, latents.shape[3] * 2), value)

    mid = decoder_errors(vae, grey(0.0), images)  # 0.5 everywhere: |0.5 − 0| = 0.5, MSE 0.25
    assert mid["l1"] == pytest.approx(0.5) and mid["db"] == pytest.approx(10 * torch.log10(torch.tensor(4.0)).item())
    exact = decoder_errors(vae, grey(-1.0), images)
    assert exact["l1"] == 0.0 and exact["db"] == pytest.approx(120.0)  # MSE floored at 1e-12


class _IdentityVAE:
    """Encodes an image to itself (scaling 1, 4 pixels per latent as a 3-level VAE): with an identity
    decoder, D(E(x)) is the padded image exactly, wherever the padding put it."""

    dtype = torch.float32
    config = SimpleNamespace(block_out_channels=(8, 8, 8), scaling_factor=1.0)

    def encode(self, image):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: image))


def test_decoder_errors_compare_each_pixel_of_a_padded_image_with_itself():
    from ffasynth.evaluation.decoder_report import decoder_errors

    # 13 × 10 is padded to 16 × 12: 3 rows and 2 columns, split around the image or not
    ramp = torch.linspace(-1, 1, 13 * 10).view(1, 13, 10)
    perfect = decoder_errors(_IdentityVAE(), lambda latents: latents, [ramp])
    assert perfect["l1"] < 1e-6 and perfect["db"] == pytest.approx(120.0)  # top-left crop: L1 0.13, 15 dB


def _stage2(run, *overrides):
    config = load_config(run / "config.yaml", overrides=STAGE2 + list(overrides))
    task = Stage2Task(load_stage1_run(run), config.stage2, None)
    task.to(torch.device("cpu"), torch.float32)
    return task


def test_sampler_latents_are_what_the_exported_pipeline_decodes(stage1_run):
    from ffasynth.export import build_pipeline
    from ffasynth.models.conditioning import decode_latents

    task = _stage2(stage1_run[1], "stage2.latents=sampler", "stage2.sampler_steps=3")
    assert task.stage1.config.stage1.image_guidance_scale > 1  # the guided path is the one compared
    pipe = build_pipeline(task.stage1)
    photo = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = pipe(
        photo, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt", tile_size=0
    ).images[0]
    batch = {"source": photo[None] * 2 - 1, "target": torch.zeros(1, 1, 32, 32), "phase": [0]}  # phase 0: early
    latents = task.latents(batch, torch.Generator().manual_seed(0))
    decoded = (decode_latents(task.stage1.components.vae, latents)[0] + 1) / 2
    assert torch.allclose(decoded, expected, atol=1e-4), (decoded - expected).abs().max()


class StandInUNet(torch.nn.Module):
    """A v-prediction U-Net whose implied x̂0 is known: `conditional` for rows with CLIP tokens, `null`
    for the zero (null) condition. v̂ = (√ᾱ_t·z_t − x̂0)/√(1−ᾱ_t) solves x̂0 = √ᾱ_t·z_t − √(1−ᾱ_t)·v̂."""

    def __init__(self, alphas_cumprod, conditional, null):
        super().__init__()
        self.alphas_cumprod, self.conditional, self.null = alphas_cumprod, conditional, null
        self.config = type("Config", (), {"out_channels": conditional.shape[1]})()
        self.calls = []

    @property
    def dtype(self):
        return torch.float32

    def forward(self, model_input, t, encoder_hidden_states, class_labels=None):
        self.calls.append((int(t), model_input.shape[0]))
        latents = model_input[:, : self.config.out_channels]
        has_condition = encoder_hidden_states.abs().sum((1, 2)).view(-1, 1, 1, 1) > 0
        x0 = torch.where(has_condition, self.conditional, self.null)
        alpha = self.alphas_cumprod[int(t)]
        velocity = (alpha.sqrt() * latents - x0) / (1 - alpha).sqrt()
        return type("Output", (), {"sample": velocity})()


def test_sampler_latents_follow_the_solver_and_the_guidance_sum(stage1_run):
    task = _stage2(stage1_run[1], "stage2.sampler_steps=4")
    components = task.stage1.components
    assert components.scheduler.config.prediction_type == "v_prediction"
    scale = task.stage1.config.stage1.image_guidance_scale
    size = 32 // 2 ** (len(components.vae.config.block_out_channels) - 1)  # the latent of a 32² crop
    conditional, null = torch.randn(1, 4, size, size), torch.randn(1, 4, size, size)
    components.unet = StandInUNet(components.scheduler.alphas_cumprod, conditional, null)
    batch = {"source": torch.rand(2, 3, 32, 32) * 2 - 1, "target": torch.zeros(2, 1, 32, 32), "phase": [0, 1]}
    latents = task.latents(batch, torch.Generator().manual_seed(0), mode="sampler")
    # every step's x̂0 is null + s·(conditional − null): a DPM-Solver++ run ending at σ = 0 returns it
    wanted = null + scale * (conditional - null)
    assert torch.allclose(latents, wanted.expand(2, -1, -1, -1), atol=1e-4)
    steps = [t for t, _ in components.unet.calls]
    assert len(steps) == 4 and steps == sorted(set(steps), reverse=True)
    assert all(rows == 4 for _, rows in components.unet.calls)  # conditional + null halves, one pass a step


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["encoder", "unet", "mix", "sampler", "split"])
def test_every_mode_trains_only_the_decoder_and_the_discriminator(stage1_run, tmp_path, mode):
    from ffasynth.training.loop import train
    from ffasynth.training.run import load_training_data, prepare_run

    pairs, run = stage1_run
    config = load_config(
        run / "config.yaml",
        overrides=STAGE2 + [f"stage2.latents={mode}", "stage2.sampler_steps=2", "stage2.max_steps=2"],
    )
    task = Stage2Task(load_stage1_run(run), config.stage2, None)
    frozen = {
        "unet": task.stage1.components.unet,
        "encoder": task.stage1.components.vae.encoder,
        "clip": task.stage1.components.image_encoder,
    }
    before = {name: copy.deepcopy(module.state_dict()) for name, module in frozen.items()}
    learned = {name: copy.deepcopy(module.state_dict()) for name, module in task.trainable.items()}
    prepare_run(tmp_path / "s2", config, "stage2", pairs, False)
    train(task, load_training_data(pairs, config), config.stage2, tmp_path / "s2", config.seed, progress=False)
    for name, module in frozen.items():
        after = module.state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), f"{mode}: stage 2 changed the {name}"
    for name, module in task.trainable.items():
        after = module.state_dict()
        assert any(not torch.equal(learned[name][k], after[k]) for k in after), f"{mode}: the {name} did not learn"


def test_latents_take_the_mode_as_an_argument_and_leave_the_config_alone(stage1_run):
    from ffasynth.models.conditioning import encode_latents

    task = _stage2(stage1_run[1], "stage2.latents=encoder", "stage2.sampler_steps=2")
    batch = {"source": torch.rand(2, 3, 32, 32) * 2 - 1, "target": torch.rand(2, 1, 32, 32) * 2 - 1, "phase": [0, 0]}
    encoded = encode_latents(task.stage1.components.vae, batch["target"])
    assert torch.equal(task.latents(batch, torch.Generator().manual_seed(0)), encoded)
    for mode in ("unet", "sampler"):
        assert not torch.allclose(task.latents(batch, torch.Generator().manual_seed(0), mode), encoded, atol=1e-3)
    columns = task.samples(batch, torch.Generator().manual_seed(0))
    assert len(columns) == 3 and task.config.latents == "encoder"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_sampler_steps_below_one_are_refused_naming_the_key(value):
    from ffasynth.errors import ConfigError

    with pytest.raises(ConfigError, match="stage2.sampler_steps"):
        load_config(preset="tiny", overrides=[f"stage2.sampler_steps={value}"])


def test_more_sampler_steps_than_training_timesteps_are_refused(stage1_run):
    from ffasynth.errors import ConfigError

    with pytest.raises(ConfigError, match="stage2.sampler_steps=1001"):
        _stage2(stage1_run[1], "stage2.sampler_steps=1001")


@pytest.mark.slow
def test_latent_mode_benchmark_trains_translates_and_scores_each_mode(stage1_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pairs, run = stage1_run
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stage2_latents.py"
    command = [sys.executable, str(script), "--stage1", str(run), "--data", str(pairs), "--out", str(tmp_path)]
    command += ["--modes", "none,sampler", "--max-steps", "2", "--sampler-steps", "2", "--translate-steps", "2"]
    done = subprocess.run(command + STAGE2, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    modes = json.loads(done.stdout)["modes"]
    assert modes["sampler"]["steps"] == 2 and "after_l1" in modes["sampler"]["decoder"]
    assert load_config(tmp_path / "sampler" / "stage2" / "config.yaml").stage2.latents == "sampler"
    for mode in ("none", "sampler"):
        # MS-SSIM needs images larger than these 48² phantoms
        assert {"psnr", "ssim"} <= set(modes[mode]["end_to_end"]) and modes[mode]["images"] >= 1


@pytest.mark.parametrize("reuse", [1, 3])
def test_latent_reuse_samples_one_draw_in_k_and_keeps_each_pooled_target_with_its_latents(stage1_run, reuse):
    config = load_config(stage1_run[1] / "config.yaml", overrides=STAGE2 + [f"stage2.latent_reuse={reuse}"])
    task = Stage2Task(load_stage1_run(stage1_run[1]), config.stage2, None)
    sampled = []

    def latents(batch, generator, mode=None):  # the sampler's stand-in: latents that name their batch
        sampled.append(int(batch["target"][0, 0, 0, 0]))
        return torch.full((2, 4, 8, 8), float(sampled[-1]))

    task.latents = latents
    used = []
    for draw in range(10):
        target = torch.full((2, 1, 32, 32), float(draw))
        batch = {"source": torch.zeros(2, 3, 32, 32), "target": target, "phase": [0, 1]}
        task.prepare(batch, torch.Generator().manual_seed(draw))
        tag = int(batch["target"][0, 0, 0, 0])
        assert torch.equal(batch["stage2_latents"], torch.full((2, 4, 8, 8), float(tag)))  # the pair stays a pair
        used.append(tag)
    # one draw in k samples afresh; the others train on one of the last k sampled batches
    expected_fresh = list(range(0, 10, reuse))
    assert sampled == expected_fresh
    for draw, tag in enumerate(used):
        assert tag == draw if draw in expected_fresh else tag in [s for s in sampled if s < draw][-reuse:]
    assert len(set(used)) < 10 if reuse > 1 else used == list(range(10))


def _train_stage2(stage1_run, out, *extra):
    pairs, run = stage1_run
    result = invoke("train", "stage2", "--from", run, "--data", pairs, "--out", out, "--quiet", *STAGE2, *extra)
    assert result.exit_code == 0, result.output
    return ckpt.latest_checkpoint(out)


def test_two_stage2_runs_with_one_config_start_from_the_same_discriminator(stage1_run, tmp_path):
    """The PatchGAN's initial weights come from config.seed, not from whatever the process drew before."""
    weights = []
    for name, disturb in (("a", 1), ("b", 2)):
        torch.manual_seed(disturb)
        folder = _train_stage2(stage1_run, tmp_path / name, "--max-steps", 1)
        weights.append(load_file(str(folder / "discriminator.safetensors")))
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_stage2_run_keeps_the_unet_it_was_tuned_on(stage1_run, tmp_path):
    """--no-ema tunes the decoder for the raw U-Net: run.json records it and every load gives that U-Net; a
    --resume goes on with the pinned U-Net after the stage-1 run trained on."""
    pairs, run = stage1_run
    stage1 = tmp_path / "s1"
    shutil.copytree(run, stage1)
    _train_stage2((pairs, stage1), tmp_path / "s2", "--max-steps", 1, "--no-ema")
    info = json.loads((tmp_path / "s2" / "run.json").read_text())
    assert info["stage1_ema"] is False
    raw = load_stage1_run(stage1, ema=False).components.unet.state_dict()
    loaded = load_model_run(tmp_path / "s2").components.unet.state_dict()
    assert all(torch.equal(raw[key], loaded[key]) for key in raw)

    train_micro_stage1(pairs, stage1, 3, resume=True)  # the stage-1 run trains on: a step-3 checkpoint
    _train_stage2((pairs, stage1), tmp_path / "s2", "--max-steps", 2, "--resume")
    assert json.loads((tmp_path / "s2" / "run.json").read_text())["stage1_checkpoint"] == info["stage1_checkpoint"]


def test_a_resume_into_a_run_of_another_kind_is_refused_before_anything_is_written(stage1_run, tmp_path):
    pairs, run = stage1_run
    stage1 = tmp_path / "s1"
    shutil.copytree(run, stage1)
    before = {path.name: path.read_bytes() for path in (stage1 / "run.json", stage1 / "config.yaml")}
    result = invoke("train", "stage2", "--from", run, "--data", pairs, "--out", stage1, "--resume", *STAGE2)
    assert result.exit_code != 0 and "holds a stage1 run, not a stage2 run" in str(result.exception)
    assert {path.name: path.read_bytes() for path in (stage1 / "run.json", stage1 / "config.yaml")} == before


def test_the_discriminator_is_not_stepped_before_disc_start_and_a_resume_there_goes_on(stage1_run, tmp_path):
    """Before disc_start it has nothing to learn: no weight decay, no Adam steps on a zero loss (its first
    real updates would then skip Adam's bias correction, several times the learning rate); from it, it learns."""
    out = tmp_path / "s2"
    steps = ("stage2.disc_start=2", "stage2.save_every=1", "stage2.weight_decay=0.1")
    first = _train_stage2(stage1_run, out, "--max-steps", 2, *steps)
    initial = load_file(str(first.parent / "step-000001" / "discriminator.safetensors"))
    at_two = load_file(str(first / "discriminator.safetensors"))
    assert all(torch.equal(initial[key], at_two[key]) for key in initial)
    _train_stage2(stage1_run, out, "--max-steps", 3, "--resume", *steps)
    after = load_file(str(ckpt.latest_checkpoint(out) / "discriminator.safetensors"))
    assert not all(torch.equal(initial[key], after[key]) for key in initial)


def test_mix_gives_about_half_the_items_unet_latents_and_the_reconstruction_loss_is_the_one_named(stage1_run):
    from ffasynth.models.conditioning import encode_latents

    task = _stage2(stage1_run[1], "stage2.latents=mix")
    batch = {"source": torch.rand(64, 3, 32, 32) * 2 - 1, "target": torch.rand(64, 1, 32, 32) * 2 - 1}
    batch["phase"] = [0] * 64
    encoded = encode_latents(task.stage1.components.vae, batch["target"])
    mixed = task.latents(batch, torch.Generator().manual_seed(0))
    from_unet = (mixed - encoded).flatten(1).abs().amax(1) > 1e-6
    assert 20 <= int(from_unet.sum()) <= 44  # half of 64 (σ = 4)
    decoded, target = torch.zeros(1, 3, 8, 8), torch.full((1, 1, 8, 8), 0.5)  # the decoder's grey is 0: error 0.5
    for rec_loss, expected in (("l1", 0.5), ("l2", 0.25)):
        task.config.rec_loss = rec_loss
        assert task.reconstruction_terms(decoded, target)["rec"].item() == pytest.approx(expected)


def test_split_latents_reconstruct_the_real_ffas_own_latent_and_show_the_discriminator_the_samples(stage1_run):
    """ "split": L1 against the decode of E(x), which lines up with x pixel for pixel; the adversarial term and the
    discriminator on the decode of the sampler's latents, whose detail is drawn afresh (L1 on them pays for a blur)."""
    from ffasynth.models.conditioning import encode_latents, from_vae_output

    task = _stage2(stage1_run[1], "stage2.latents=split", "stage2.sampler_steps=2", "stage2.disc_start=0")
    draw = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(2, 3, 32, 32, generator=draw) * 2 - 1, "phase": [0, 1]}
    batch["target"] = torch.rand(2, 1, 32, 32, generator=draw) * 2 - 1
    loss, logs = task.loss(batch, 0, torch.Generator().manual_seed(1), "decoder")
    aligned = encode_latents(task.stage1.components.vae, batch["target"]).float()
    assert torch.equal(batch["stage2_aligned"], aligned)
    assert not torch.allclose(batch["stage2_latents"], aligned, atol=1e-3)  # the sampler's, from noise
    with torch.no_grad():
        rec = (from_vae_output(task.decoder(aligned)) - batch["target"]).abs().mean()
        fake = from_vae_output(task.decoder(batch["stage2_latents"]))
        g_loss = -task.discriminator(fake).mean()
    assert logs["rec"] == pytest.approx(rec.item(), rel=1e-5)
    assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    d_loss, d_logs = task.loss(batch, 0, torch.Generator().manual_seed(1), "discriminator")
    with torch.no_grad():
        assert d_logs["d_fake"] == pytest.approx(task.discriminator(fake).mean().item(), rel=1e-5)
    assert torch.isfinite(loss) and torch.isfinite(d_loss)
