"""`ffasynth train distill`: guidance folded into the U-Net, latent consistency distillation, the preview
decoder; their maths against diffusers' own (LCM pipeline and scheduler), and the run → export → pipeline
path on the micro model and on SD1.5-format weights (LoRA student)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from diffusers.pipelines.latent_consistency_models import LatentConsistencyModelPipeline
from safetensors.torch import load_file

from ffasynth.config import load_config
from ffasynth.errors import ConfigError, FFASynthError
from ffasynth.models.components import add_guidance_embedding, make_student, training_scheduler
from ffasynth.models.conditioning import guidance_features, guided_prediction
from ffasynth.models.folders import check_pipeline_folder
from ffasynth.models.lora import has_lora
from ffasynth.models.preview_decoder import PreviewDecoder, distill_loss
from ffasynth.pipeline import FFASynthesisPipeline
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.distill import DistillTask, boundary_scalings, split_prediction
from ffasynth.training.run import load_model_run
from tests.corpus import cli, line_problem
from tests.helpers import MICRO, invoke, micro_config, micro_pipeline, seeded, train_micro_stage1

DISTILL = ["distill.batch_size=2", "distill.log_every=1", "distill.save_every=2", "data.crop_size=32"]


def test_guidance_features_are_lcms_w_embedding_of_w_minus_one():
    scales = torch.tensor([1.0, 1.5, 3.0, 7.5])
    ours = guidance_features(scales, 256)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scales - 1.0, embedding_dim=256)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-3)  # float32 angles up to 6500 rad
    assert torch.equal(ours[0, :128], torch.zeros(128)) and torch.equal(ours[0, 128:], torch.ones(128))


def _unet() -> UNet2DConditionModel:
    return micro_pipeline().unet


def test_the_guidance_input_starts_at_zero_and_reloads_with_the_unet(tmp_path):
    unet = _unet()
    latents, tokens = torch.randn(2, 8, 8, 8), torch.randn(2, 1, 32)
    labels = torch.tensor([0, 1])
    before = unet(latents, 10, encoder_hidden_states=tokens, class_labels=labels).sample
    add_guidance_embedding(unet)
    assert unet.config.time_cond_proj_dim == 256
    for scale in (1.0, 4.0):
        after = guided_prediction(unet, latents[:, :4], 10, tokens, latents[:, 4:], labels, scale, fold=True)
        torch.testing.assert_close(after, before)  # zero-initialised: the scale changes nothing yet
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.1)
    one = guided_prediction(unet, latents[:, :4], 10, tokens, latents[:, 4:], labels, 1.0, fold=True)
    four = guided_prediction(unet, latents[:, :4], 10, tokens, latents[:, 4:], labels, 4.0, fold=True)
    assert (one - four).abs().mean() > 1e-3  # once trained, the scale is an input
    unet.save_pretrained(tmp_path / "unet")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    reloaded = guided_prediction(again, latents[:, :4], 10, tokens, latents[:, 4:], labels, 4.0, fold=True)
    torch.testing.assert_close(reloaded, four)


class CountingUNet(torch.nn.Module):
    """Records each call's batch size; output = the input's first 4 channels times (1 + guidance input's mean)."""

    def __init__(self, folded: int | None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.config = {"time_cond_proj_dim": folded}
        self.calls = []

    def forward(self, sample, t, encoder_hidden_states, class_labels=None, timestep_cond=None):
        self.calls.append(sample.shape[0])
        out = sample[:, :4] * self.weight
        if timestep_cond is not None:
            out = out * (1 + timestep_cond.mean(dim=1).view(-1, 1, 1, 1))
        return type("Output", (), {"sample": out})()


def test_a_folded_unet_is_one_pass_of_the_batch_and_a_plain_one_two_when_guided():
    latents, tokens, source = torch.randn(3, 4, 4, 4), torch.randn(3, 1, 8), torch.randn(3, 4, 4, 4)
    plain, folded = CountingUNet(None), CountingUNet(256)
    guided_prediction(plain, latents, 5, tokens, source, None, 3.0, fold=True)  # nothing to fold: two halves
    guided_prediction(folded, latents, 5, tokens, source, None, 3.0, fold=True)
    assert plain.calls == [6] and folded.calls == [3]
    guided_prediction(folded, latents, 5, tokens, source, None, 3.0)  # as the teacher (and stage 1) run it
    assert folded.calls == [3, 6]


def test_a_guidance_per_row_is_the_scalar_guidance_of_each_row():
    pipe = micro_pipeline()
    latents, tokens, source = torch.randn(3, 4, 8, 8), torch.randn(3, 1, 32), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    labels = torch.tensor([0, 1, 1])
    rows = guided_prediction(pipe.unet, latents, t, tokens, source, labels, torch.tensor([1.0, 2.0, 5.0]))
    for i, scale in enumerate((1.0, 2.0, 5.0)):
        one = guided_prediction(pipe.unet, latents[i : i + 1], t[i : i + 1], tokens[i : i + 1], source[i : i + 1],
                                labels[i : i + 1], scale)  # fmt: skip
        torch.testing.assert_close(rows[i : i + 1], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [0, 19, 499, 999])
def test_the_boundary_condition_is_lcm_schedulers(t):
    scheduler = LCMScheduler.from_config(training_scheduler().config)
    c_skip, c_out = boundary_scalings(torch.tensor([t]))
    want_skip, want_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    assert abs(float(c_skip) - want_skip) < 1e-6 and abs(float(c_out) - want_out) < 1e-6
    if t == 0:
        assert float(c_skip) == 1.0 and float(c_out) == 0.0  # f(z, 0) = z


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_split_prediction_recovers_the_clean_latent_and_the_noise(prediction_type):
    scheduler = training_scheduler(prediction_type=prediction_type)
    x0, eps = torch.randn(4, 4, 6, 6), torch.randn(4, 4, 6, 6)
    t = torch.tensor([0, 100, 600, 999])
    noisy = scheduler.add_noise(x0, eps, t)
    output = scheduler.get_velocity(x0, eps, t) if prediction_type == "v_prediction" else eps
    alphas = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    got_x0, got_eps = split_prediction(output, noisy, alphas, prediction_type)
    torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    from ffasynth.data.phantom import write_phantom_dataset

    pairs = write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=48, seed=5, test_fraction=0.25)
    run = tmp_path_factory.mktemp("runs") / "s1"
    train_micro_stage1(pairs, run, 2, extra=["stage1.image_guidance_scale=3"])
    return pairs, run


def _task(stage1_run, *overrides):
    _, run = stage1_run
    teacher = load_model_run(run)
    config = load_config(run / "config.yaml", overrides=[*DISTILL, *overrides])
    return DistillTask(teacher, config.distill), teacher


def _batch(pairs, n=2):
    torch.manual_seed(0)
    return {
        "source": torch.rand(n, 3, 32, 32) * 2 - 1,
        "target": torch.rand(n, 1, 32, 32) * 2 - 1,
        "phase": torch.tensor([0, 1][:n]),
        "id": ["1", "2"][:n],
    }


def test_guidance_distillation_starts_at_zero_loss_where_guidance_is_one(stage1_run):
    """The student is the teacher plus a zero guidance input: at w = 1 (no guidance) they agree exactly, so
    the loss is 0; at w = 3 the teacher's guided prediction differs and the loss is not (same conditioning)."""
    for low, high, zero in ((1.0, 1.0, True), (3.0, 3.0, False)):
        task, _ = _task(stage1_run, "distill.method=guidance", f"distill.guidance_min={low}",
                        f"distill.guidance_max={high}")  # fmt: skip
        task.to(torch.device("cpu"), torch.float32)
        loss, _ = task.loss(_batch(stage1_run[0]), 0, seeded(0), "unet")
        assert (float(loss) < 1e-10) == zero, float(loss)


def test_an_lcm_step_trains_the_student_and_its_preview_and_leaves_the_teacher(stage1_run):
    task, teacher = _task(stage1_run)
    task.to(torch.device("cpu"), torch.float32)
    frozen = {k: v.clone() for k, v in teacher.components.unet.state_dict().items()}
    assert task.trainable["unet"] is not teacher.components.unet  # rank 0: a whole copy
    for name in ("unet", "preview"):
        loss, _ = task.loss(_batch(stage1_run[0]), 0, seeded(0), name)
        loss.backward()
        grads = [p.grad for p in task.trainable[name].parameters() if p.requires_grad]
        assert torch.isfinite(loss) and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(torch.equal(v, teacher.components.unet.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in teacher.components.unet.parameters())


def test_the_lcm_target_is_one_ddim_step_of_the_teacher_on_the_solver_grid(stage1_run, monkeypatch):
    """With a teacher that predicts the true v of (z0, ε), its DDIM step from t must land exactly on
    √ᾱ_s z0 + √(1−ᾱ_s) ε (diffusers' add_noise at s), with t = n·k − 1 on the grid and s = max(t − k, 0);
    the student's consistency function is called at (z_s, s) for the target and at (z_t, t) with gradient."""
    import ffasynth.training.distill as distill

    task, teacher = _task(stage1_run, "distill.solver_steps=10")  # k = 100
    task.to(torch.device("cpu"), torch.float32)
    scheduler = teacher.components.scheduler
    assert task.prediction_type == "v_prediction"
    batch = _batch(stage1_run[0], n=2)
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    batch["distill_latents"] = z0
    monkeypatch.setattr(distill, "offset_noise", lambda latents, strength, generator: noise)
    monkeypatch.setattr(task, "_teacher", lambda z, t, condition, scales: scheduler.get_velocity(z0, noise, t))
    calls = []

    def consistency(unet, latents, t, condition, scales):
        calls.append((latents.detach().clone(), t.clone(), torch.is_grad_enabled()))
        return latents * 1.0

    monkeypatch.setattr(task, "_consistency", consistency)
    for seed in range(6):
        calls.clear()
        task.loss(batch, 0, seeded(seed), "unet")
        (earlier, s, target_grad), (noisy, t, live_grad) = calls
        assert not target_grad and live_grad
        assert torch.all((t + 1) % 100 == 0) and torch.all(t <= 999) and torch.equal(s, (t - 100).clamp(min=0))
        torch.testing.assert_close(noisy, scheduler.add_noise(z0, noise, t))
        torch.testing.assert_close(earlier, scheduler.add_noise(z0, noise, s), rtol=1e-4, atol=1e-4)


def test_distill_run_exports_an_lcm_pipeline_that_makes_one_pass_a_step(stage1_run, tmp_path):
    pairs, run = stage1_run
    out = invoke("train", "distill", "--from", run, "--data", pairs, "--out", tmp_path / "d", "--max-steps", 2,
                 "--quiet", *DISTILL)  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "method lcm" in out.output and "student loss" in out.output
    out = invoke("export", tmp_path / "d", tmp_path / "pipe")
    assert out.exit_code == 0, out.output
    check_pipeline_folder(tmp_path / "pipe")
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "latent consistency" in card and "num_inference_steps=4" in card
    pipe = FFASynthesisPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.config.num_inference_steps == 4
    assert isinstance(pipe.preview_decoder, PreviewDecoder)
    # the exported student is the distill run's last checkpoint, EMA weights, read here straight from the file
    saved = load_file(str(tmp_path / "d" / "checkpoints" / "step-000002" / "unet.ema.safetensors"))
    exported = pipe.unet.state_dict()
    assert "time_embedding.cond_proj.weight" in saved and saved.keys() <= exported.keys()
    for key, value in saved.items():
        torch.testing.assert_close(exported[key], value, msg=key)
    assert pipe.config.guidance_input and pipe.max_steps == 50
    with pytest.raises(FFASynthError, match="from 1 to 50"):
        pipe(torch.rand(3, 32, 32), num_inference_steps=60)
    batches = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs_out: batches.append(args[0].shape[0]))
    photo = torch.rand(3, 40, 48)
    full = pipe(photo, output_type="pt", generator=seeded(0), phase="late", tile_size=0)
    assert batches == [1, 1, 1, 1]  # 4 steps by default, guidance 3 folded in: one pass of one sample each
    preview = pipe(photo, output_type="pt", generator=seeded(0), phase="late", num_inference_steps=1,
                   decoder="preview")  # fmt: skip
    assert full.images[0].shape == preview.images[0].shape == (1, 40, 48)
    assert float(preview.images[0].min()) >= 0.0 and float(preview.images[0].max()) <= 1.0


def test_distill_refusals_are_one_line(stage1_run, tmp_path):
    pairs, run = stage1_run
    out = cli("train", "distill", "--from", pairs, "--data", pairs, "--out", tmp_path / "d", "--quiet")
    assert out.exit_code == 2 and line_problem(out.output, str(pairs), "not an ffasynth run folder") is None
    out = cli("train", "distill", "--from", tmp_path / "d0", "--data", pairs, "--out", tmp_path / "d", "--quiet")
    assert out.exit_code == 2
    with pytest.raises(ConfigError, match="distill.guidance_min"):
        load_config(overrides=MICRO + ["distill.guidance_min=6"])
    with pytest.raises(ConfigError, match="distill.lora.rank"):
        load_config(overrides=MICRO + ["distill.lora.rank=-1"])
    with pytest.raises(FFASynthError, match="preview decoder"):
        micro_pipeline()(torch.rand(3, 32, 32), num_inference_steps=1, decoder="preview")


def test_a_lora_student_is_adapters_over_the_teacher_which_runs_with_them_off():
    config = micro_config("distill.lora.rank=4", "distill.lora.target_modules=[to_q,to_v,conv1]")
    unet = _unet()
    latents, tokens = torch.randn(2, 8, 8, 8), torch.randn(2, 1, 32)
    before = unet(latents, 10, encoder_hidden_states=tokens, class_labels=torch.tensor([0, 1])).sample
    student = make_student(unet, config.distill)
    assert student is unet and has_lora(unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "cond_proj" in n for n in trainable)
    assert any("cond_proj" in n for n in trainable)
    for parameter in unet.parameters():  # "train" the adapters
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)
    moved = guided_prediction(unet, latents[:, :4], 10, tokens, latents[:, 4:], torch.tensor([0, 1]), 3.0, fold=True)
    assert (moved - before).abs().mean() > 1e-4
    unet.disable_adapters()
    teacher = guided_prediction(unet, latents[:, :4], 10, tokens, latents[:, 4:], torch.tensor([0, 1]), 1.0)
    unet.enable_adapters()
    torch.testing.assert_close(teacher, before)


@pytest.mark.parametrize("dark", [False, True])
def test_the_preview_decoder_learns_the_vae_decoder(dark):
    """A stand-in decoder's images, and (dark) FFA-like ones: a background near −1 with sparse bright
    structure, where a saturating output layer once collapsed to a constant image."""
    torch.manual_seed(0)
    preview = PreviewDecoder(latent_channels=4, scale_factor=4, channels=16)
    latents = torch.randn(4, 4, 6, 6)
    decoded = torch.nn.functional.interpolate(latents[:, :1], scale_factor=4).tanh()  # a stand-in decoder
    if dark:
        decoded = torch.where(decoded > 0.8, decoded, torch.full_like(decoded, -0.97))
    assert preview(latents).shape == (4, 1, 24, 24)
    optimizer = torch.optim.Adam(preview.parameters(), lr=1e-3)
    first = float(distill_loss(preview, latents, decoded))
    for _ in range(200):
        optimizer.zero_grad()
        distill_loss(preview, latents, decoded).backward()
        optimizer.step()
    assert float(distill_loss(preview, latents, decoded)) < 0.3 * first
    out = preview(latents).detach()  # not a constant image (a tanh output layer gave std 0.002, r = −0.02 here)
    assert float(out.std()) > 0.2 * float(decoded.std())
    assert float(torch.corrcoef(torch.stack([out.flatten(), decoded.flatten()]))[0, 1]) > 0.3
    with pytest.raises(FFASynthError, match="power-of-two"):
        PreviewDecoder(4, 6, 16)


def test_the_distill_checkpoint_holds_student_and_preview(stage1_run, tmp_path):
    pairs, run = stage1_run
    settings = ["distill.method=guidance", "distill.preview_decoder=false", *DISTILL]
    out = invoke("train", "distill", "--from", run, "--data", pairs, "--out", tmp_path / "d", "--max-steps", 2,
                 "--quiet", "--resume", *settings)  # fmt: skip
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "d" / "run.json").read_text())["teacher_run"] == str(run.resolve())  # fresh: pinned
    folder = tmp_path / "d" / "checkpoints" / "step-000002"
    assert (folder / "unet.safetensors").is_file() and not (folder / "preview.safetensors").exists()
    unet = load_model_run(tmp_path / "d").components.unet
    ckpt.load_weights(folder, "unet", unet, ema=True)
    assert unet.config.time_cond_proj_dim == 256
    out = invoke("export", tmp_path / "d", tmp_path / "pipe")
    pipe = FFASynthesisPipeline.from_pretrained(tmp_path / "pipe")
    settings = load_config(tmp_path / "d" / "config.yaml").stage1
    assert pipe.preview_decoder is None and pipe.config.num_inference_steps == settings.inference_steps == 4
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_a_lora_student_exports_merged_as_the_adapters_compute_and_resume_keeps_its_teacher(stage1_run, tmp_path):
    """Two steps at a large learning rate move the adapters; the exported (merged) U-Net computes what the
    checkpoint's unmerged adapters over the teacher compute, folded guidance included. A resumed run reads
    the teacher run.json pins, not the teacher run's newest checkpoint."""
    pairs, run = stage1_run
    lora = ["distill.lora.rank=4", "distill.lr=0.05", "distill.lr_warmup_steps=0", "distill.ema_decay=0"]
    out = invoke("train", "distill", "--from", run, "--data", pairs, "--out", tmp_path / "d", "--max-steps", 2,
                 "--quiet", *DISTILL, *lora)  # fmt: skip
    assert out.exit_code == 0 and "(LoRA)" in out.output, out.output
    assert invoke("export", tmp_path / "d", tmp_path / "pipe").exit_code == 0
    pipe = FFASynthesisPipeline.from_pretrained(tmp_path / "pipe")
    assert not has_lora(pipe.unet)

    teacher = load_model_run(run).components.unet
    reference = make_student(teacher, load_config(tmp_path / "d" / "config.yaml").distill)
    weights = load_file(str(tmp_path / "d" / "checkpoints" / "step-000002" / "unet.safetensors"))
    reference.load_state_dict(weights)
    latents, tokens, labels = torch.randn(2, 8, 8, 8), torch.randn(2, 1, 32), torch.tensor([0, 1])
    args = (latents[:, :4], 500, tokens, latents[:, 4:], labels, 3.0)
    want = guided_prediction(reference, *args, fold=True)
    torch.testing.assert_close(guided_prediction(pipe.unet, *args, fold=True), want, rtol=1e-4, atol=1e-4)
    reference.disable_adapters()
    assert (guided_prediction(reference, *args) - want).abs().mean() > 1e-3  # the adapters learnt something

    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert Path(info["teacher_checkpoint"]).name == "step-000002" and info["teacher_ema"] is True
    info["teacher_checkpoint"] = str(Path(info["teacher_checkpoint"]).parent / "step-000001")  # pin another
    (tmp_path / "d" / "run.json").write_text(json.dumps(info))
    out = invoke("train", "distill", "--from", run, "--data", pairs, "--out", tmp_path / "d", "--max-steps", 3,
                 "--quiet", "--resume", *DISTILL, *lora)  # fmt: skip
    assert out.exit_code != 0 and "step-000001" in str(out.exception)  # it looked for the pinned one


def test_a_lora_student_under_mixed_precision_samples_outside_the_loops_autocast(stage1_run):
    """Its frozen weights are bf16 and what learns (adapters, cond_proj) float32: the sample grid runs outside
    the loop's autocast (under torch.compile accelerate patches only the compiled wrapper), so it needs its own."""
    task, _ = _task(stage1_run, "distill.lora.rank=4")
    task.to(torch.device("cpu"), torch.bfloat16)
    unet = task.trainable["unet"]
    assert unet.conv_in.weight.dtype == torch.bfloat16 and unet.time_embedding.cond_proj.weight.dtype == torch.float32
    columns = task.samples(_batch(stage1_run[0]), torch.Generator().manual_seed(0))
    assert all(column.dtype == torch.float32 and torch.isfinite(column).all() for column in columns)
