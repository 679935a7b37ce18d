"""The shared training loop through stage 0 and stage 1: exact resume, atomic checkpoints,
non-finite losses, the CLI, and what stage 1's loss regresses (ε or v, min-SNR weighted)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from ffasynth.config import load_config
from ffasynth.data.phantom import write_phantom_dataset
from ffasynth.errors import FFASynthError
from ffasynth.training import checkpoint as ckpt
from ffasynth.training.loop import Task, TrainingError, train
from ffasynth.training.run import load_stage1_run, load_training_data
from ffasynth.training.stage1 import build_stage1
from tests.helpers import MICRO, invoke, micro_config, train_micro_stage1


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("pairs"), n=4, size=48, seed=5)


def _losses(run_dir):
    return [json.loads(line)["loss/main"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_repeats_the_uninterrupted_run_exactly(pairs, tmp_path):
    whole = train_micro_stage1(pairs, tmp_path / "whole", 7)
    train_micro_stage1(pairs, tmp_path / "split", 4)  # stops after step 4; newest checkpoint = step 4
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "split")] == ["step-000003", "step-000004"]
    # a kill after step 4's checkpoint but before the next leaves only complete checkpoints behind
    (tmp_path / "split" / "checkpoints" / ".step-000006.abc.tmp").mkdir()
    resumed = train_micro_stage1(pairs, tmp_path / "split", 7, resume=True)
    assert resumed.step == whole.step == 7
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    for name in ("unet.safetensors", "unet.ema.safetensors", "optimizer-main.safetensors"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000007" / name))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step-000007" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # keep_checkpoints=2 pruned the older ones
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "whole")] == ["step-000006", "step-000007"]


def test_a_checkpoint_cut_mid_write_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000010").mkdir(parents=True)
    (root / "step-000010" / "state.json").write_text("{}")
    (root / "step-000020").mkdir()  # renamed folders always hold state.json; this one lacks it
    (root / ".step-000030.x1.tmp").mkdir()
    (root / "notes").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000010"


def test_finished_run_loads_back_for_inference(pairs, tmp_path):
    train_micro_stage1(pairs, tmp_path / "run", 3)
    loaded = load_stage1_run(tmp_path / "run")
    assert loaded.ema and loaded.checkpoint.name == "step-000003"
    weights = load_file(str(loaded.checkpoint / "unet.ema.safetensors"))
    state = loaded.components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert loaded.components.unet.config.in_channels == 8
    raw = load_stage1_run(tmp_path / "run", ema=False)
    assert not torch.equal(raw.components.unet.conv_in.weight, loaded.components.unet.conv_in.weight)


def test_existing_run_is_not_overwritten_without_resume(pairs, tmp_path):
    train_micro_stage1(pairs, tmp_path / "run", 3)
    with pytest.raises(Exception, match="--resume"):
        train_micro_stage1(pairs, tmp_path / "run", 3)


def test_a_resume_on_other_data_is_refused_before_anything_is_written(pairs, tmp_path):
    """run.json (and so the model card) names the data a run learnt from: a --resume on another folder would
    train on it unnoticed and relabel the run; a data folder moved away may be given anew."""
    import shutil

    train_micro_stage1(pairs, tmp_path / "run", 3)
    other = tmp_path / "other"
    shutil.copytree(pairs, other)
    saved = (tmp_path / "run" / "run.json").read_text()
    with pytest.raises(FFASynthError, match=f"was trained on {pairs.resolve()}, not {other.resolve()}"):
        train_micro_stage1(other, tmp_path / "run", 4, resume=True)
    assert (tmp_path / "run" / "run.json").read_text() == saved
    moved = tmp_path / "moved"
    pairs_copy = tmp_path / "pairs-copy"
    shutil.copytree(pairs, pairs_copy)
    train_micro_stage1(pairs_copy, tmp_path / "run2", 3)
    pairs_copy.rename(moved)
    assert train_micro_stage1(moved, tmp_path / "run2", 4, resume=True).step == 4


class _Exploding(Task):
    name = "exploding"

    def __init__(self, bad_from: int):
        self.layer = torch.nn.Linear(2, 1)
        self.trainable = {"layer": self.layer}
        self.bad_from = bad_from

    def to(self, device, weight_dtype):
        self.layer.to(device)

    def loss(self, batch, step, generator, optimizer):
        loss = self.trainable["layer"](torch.ones(1, 2)).sum() ** 2
        return (loss * float("nan") if step >= self.bad_from else loss), {}

    def samples(self, batch, generator):
        return [batch["target"]]


def test_non_finite_losses_are_skipped_then_stop_the_run(pairs, tmp_path):
    config = load_config(
        preset="tiny",
        overrides=[
            "data.crop_size=32",
            "stage1.save_every=2",
            "stage1.max_bad_steps=3",
            "stage1.max_steps=20",
            "stage1.batch_size=1",
        ],
    )
    dataset = load_training_data(pairs, config)
    with pytest.raises(TrainingError, match="not finite for 3 steps"):
        train(_Exploding(bad_from=4), dataset, config.stage1, tmp_path, progress=False)
    # steps 5-6 were skipped (weights untouched, counted) before step 7 made it three in a row
    good, latest = ckpt.complete_checkpoints(tmp_path)
    assert (good.name, latest.name) == ("step-000004", "step-000006")
    assert json.loads((latest / "state.json").read_text())["skipped_steps"] == 2
    assert torch.equal(
        load_file(str(good / "layer.safetensors"))["weight"], load_file(str(latest / "layer.safetensors"))["weight"]
    )


@torch.no_grad()
def _unit_variance_scale(vae, pairs, run_dir):
    """1/std of z ~ q(z|x) over the run's first 32 training crops, photos and FFAs (grey as 3 channels),
    in closed form: Var z = Var μ + E σ² over every latent element (law of total variance)."""
    dataset = load_training_data(pairs, load_config(run_dir / "config.yaml"))
    items = [dataset[(i, 0)] for i in range(min(32, len(dataset)))]
    photos = torch.stack([item["source"] for item in items])
    angiograms = torch.stack([item["target"] for item in items]).repeat(1, 3, 1, 1)
    posterior = vae.eval().encode(torch.cat([photos, angiograms])).latent_dist
    return float(1 / (posterior.mean.var(unbiased=False) + posterior.var.mean()).sqrt())


def test_train_cli_runs_vae_then_stage1_and_refuses_bad_values(pairs, tmp_path):
    tiny = MICRO + ["data.crop_size=32", "vae.batch_size=2", "stage1.batch_size=2"]
    vae_run = ["train", "vae", "--data", pairs, "--out", tmp_path / "vae", "--preset", "tiny", "--quiet"]
    result = invoke(*vae_run, "--max-steps", 2, *tiny)
    assert result.exit_code == 0, result.output
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "vae")  # its scale: from sampled z, so within 3%
    assert vae.config.scaling_factor == pytest.approx(_unit_variance_scale(vae, pairs, tmp_path / "vae"), rel=0.03)
    stage1 = ["train", "stage1", "--data", pairs, "--out", tmp_path / "s1", "--quiet"]
    result = invoke(*stage1, "--preset", "tiny", "--vae", tmp_path / "vae", "--max-steps", 2, *tiny)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s1" / "samples" / "step-000002.png").is_file()
    saved = load_config(tmp_path / "s1" / "config.yaml")
    assert saved.stage1.max_steps == 2 and saved.model.vae == str((tmp_path / "vae").resolve())
    result = invoke(*stage1, "--resume", "--max-steps", 3)
    assert result.exit_code == 0, result.output
    assert ckpt.latest_checkpoint(tmp_path / "s1").name == "step-000003"
    shutil.rmtree(tmp_path / "s1")
    for bad, key in (("stage1.offset_noise_strength=-1", "offset_noise_strength"), ("stage1.nope=1", "stage1.nope")):
        result = invoke("train", "stage1", "--data", pairs, "--out", tmp_path / "s1", bad)
        assert result.exit_code != 0 and key in str(result.exception), result.output


def test_a_time_budget_ends_the_run_with_a_checkpoint(pairs, tmp_path):
    result = train_micro_stage1(
        pairs, tmp_path / "run", 50, extra=["stage1.max_minutes=0.00001", "stage1.save_every=100"]
    )
    assert result.step == 1 and ckpt.latest_checkpoint(tmp_path / "run").name == "step-000001"
    assert (tmp_path / "run" / "samples" / "step-000001.png").is_file()


def test_channels_last_training_matches_the_default_layout_and_saves_loadable_weights(pairs, tmp_path):
    default = train_micro_stage1(pairs, tmp_path / "nchw", 3)
    nhwc = train_micro_stage1(pairs, tmp_path / "nhwc", 3, extra=["stage1.channels_last=true"])
    assert nhwc.step == default.step == 3
    assert _losses(tmp_path / "nhwc") == pytest.approx(_losses(tmp_path / "nchw"), rel=1e-4, abs=1e-6)
    a = load_file(str(tmp_path / "nchw" / "checkpoints" / "step-000003" / "unet.safetensors"))
    b = load_file(str(tmp_path / "nhwc" / "checkpoints" / "step-000003" / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    loaded = load_stage1_run(tmp_path / "nhwc")
    assert loaded.components.unet.conv_in.weight.is_contiguous()


def _stage1_loss(prediction_type: str, snr_gamma=None, error: float = 0.0, batch_size: int = 2):
    """Stage 1's loss on a random batch with a U-Net whose output is replaced by the target computed
    here from what the loss drew (z0, ε' and t, as given to add_noise), plus `error` everywhere.
    Returns the loss and the ᾱ_t of the drawn timesteps."""
    overrides = [f"stage1.prediction_type={prediction_type}", "stage1.conditioning_dropout=0", "data.crop_size=32"]
    if snr_gamma is not None:
        overrides.append(f"stage1.snr_gamma={snr_gamma}")
    task = build_stage1(micro_config(*overrides))
    scheduler = task.components.scheduler
    drawn = {}
    add_noise = scheduler.add_noise

    def record(latents, noise, timesteps):
        drawn.update(x0=latents, noise=noise, alphas=scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1))
        return add_noise(latents, noise, timesteps)

    def predict(module, args, output):
        alpha, sigma = drawn["alphas"].sqrt(), (1 - drawn["alphas"]).sqrt()
        wanted = alpha * drawn["noise"] - sigma * drawn["x0"] if prediction_type == "v_prediction" else drawn["noise"]
        return type(output)(sample=wanted + error)

    scheduler.add_noise = record
    task.components.unet.register_forward_hook(predict)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "source": torch.rand(batch_size, 3, 32, 32, generator=generator) * 2 - 1,
        "target": torch.rand(batch_size, 1, 32, 32, generator=generator) * 2 - 1,
        "phase": [0] * batch_size,
    }
    loss, _ = task.loss(batch, 0, torch.Generator().manual_seed(1), "main")
    return loss.item(), drawn["alphas"].flatten()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stage1_regresses_the_noise_or_the_velocity_alpha_eps_minus_sigma_x0(prediction_type):
    # the U-Net that predicts ε' (epsilon) or v = √ᾱ·ε' − √(1−ᾱ)·z0 (v_prediction) exactly has zero loss,
    # and an error of 0.1 everywhere costs 0.1² (a mean squared error)
    assert _stage1_loss(prediction_type)[0] == pytest.approx(0.0, abs=1e-10)
    assert _stage1_loss(prediction_type, error=0.1)[0] == pytest.approx(0.01, rel=1e-4)


def test_min_snr_weighting_of_the_v_prediction_loss():
    # with a unit error everywhere the loss is the mean weight; for v-prediction min(SNR, γ)/(SNR + 1)
    # with SNR = ᾱ/(1−ᾱ) is min(ᾱ, γ·(1−ᾱ)): ᾱ where SNR ≤ γ (noisy steps), γ·(1−ᾱ) above
    gamma = 1.0
    loss, alphas = _stage1_loss("v_prediction", snr_gamma=gamma, error=1.0, batch_size=8)
    clipped = alphas > gamma / (1 + gamma)  # SNR > γ
    assert clipped.any() and not clipped.all()  # both branches drawn
    assert loss == pytest.approx(torch.minimum(alphas, gamma * (1 - alphas)).mean().item(), rel=1e-4)
    unweighted, _ = _stage1_loss("v_prediction", error=1.0, batch_size=8)
    assert unweighted == pytest.approx(1.0, rel=1e-4)


def test_min_snr_weighting_of_the_epsilon_loss():
    # for ε-prediction the weight is min(SNR, γ)/SNR = min(1, γ·(1−ᾱ)/ᾱ): 1 on the noisy steps, below 1
    # (down-weighted) where SNR > γ, i.e. ᾱ > γ/(1+γ)
    gamma = 1.0
    loss, alphas = _stage1_loss("epsilon", snr_gamma=gamma, error=1.0, batch_size=8)
    clipped = alphas > gamma / (1 + gamma)
    assert clipped.any() and not clipped.all()
    expected = torch.where(clipped, gamma * (1 - alphas) / alphas, torch.ones_like(alphas))
    assert loss == pytest.approx(expected.mean().item(), rel=1e-4)
    assert loss < 1.0


def test_stage1_drops_the_condition_at_its_rate_and_draws_timesteps_over_the_whole_schedule():
    """conditioning_dropout p: a fraction p of the samples get the null condition (keep is False), not 1 − p;
    timesteps are uniform over [0, num_train_timesteps)."""
    task = build_stage1(micro_config("stage1.conditioning_dropout=0.2", "data.crop_size=32"))
    kept, timesteps = [], []
    condition = task._condition

    def record_condition(batch, keep):
        kept.append(keep)
        tokens, source_latents = condition(batch, keep)
        for both in (tokens, source_latents):  # the null condition is zero in both paths, the kept one is not
            zero = both.flatten(1).abs().amax(1) == 0
            assert torch.equal(zero, ~keep)
        return tokens, source_latents

    def record_loss(unet, latents, noise, drawn, *args):
        timesteps.append(drawn)
        return torch.zeros(latents.shape[0])

    task._condition, task._denoising_loss = record_condition, record_loss
    generator = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(64, 3, 32, 32), "target": torch.zeros(64, 1, 32, 32), "phase": [0] * 64}
    for step in range(16):
        task.loss(batch, step, generator, "main")
    dropped = 1 - torch.cat(kept).float().mean().item()
    assert dropped == pytest.approx(0.2, abs=0.03)  # 1024 draws: σ ≈ 0.0125
    drawn, total = torch.cat(timesteps), task.components.scheduler.config.num_train_timesteps
    assert drawn.min() >= 0 and drawn.max() < total
    assert drawn.float().mean().item() == pytest.approx((total - 1) / 2, rel=0.05)
    assert (drawn >= 0.9 * total).float().mean().item() == pytest.approx(0.1, abs=0.03)
