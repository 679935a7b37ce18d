"""The benchmark scripts run and their arithmetic is right (their figures are not asserted: timings
on shared machines are noise)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffasynth.config import load_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench_sampling(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_sampling

    return bench_sampling


def test_reduced_step_counts_project_linearly_to_the_real_count(bench_sampling, monkeypatch):
    unet = torch.nn.Identity()
    counter = bench_sampling.PassCounter(unet)

    def run(steps):  # three images through the U-Net per step, in one call
        for _ in range(steps):
            unet(torch.zeros(3, 1))
        return steps

    def timed(fn, device):  # T(k) = 2 s + 0.5 s·k, as if measured
        steps = fn()
        return steps, 2.0 + 0.5 * steps

    monkeypatch.setattr(bench_sampling, "timed", timed)
    result = bench_sampling.measure(run, 100, [1, 3], counter, torch.device("cpu"))
    assert result["projected"] and result["fixed_seconds"] == pytest.approx(2.0)
    assert result["seconds_per_image"] == pytest.approx(52.0)
    assert (result["unet_passes_per_image"], result["unet_calls_per_image"]) == (300, 100)
    assert result["seconds_per_unet_pass"] == pytest.approx(0.5 / 3)
    twenty = bench_sampling.reproject(result, 20)
    assert twenty["seconds_per_image"] == pytest.approx(12.0)
    assert (twenty["unet_passes_per_image"], twenty["unet_calls_per_image"]) == (60, 20)


def _run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_bench_sampling_counts_three_passes_a_step_for_diffusers_and_one_for_ours():
    result = _run("bench_sampling.py", "--preset", "tiny", "--size", "64", "--steps", "1,2", "--skip-quality")
    sides = result["timing"]["sides"]
    assert sides["diffusers_ip2p_defaults"]["unet_passes_per_image"] == 300
    assert sides["diffusers_ip2p_20_steps"]["unet_passes_per_image"] == 60
    assert sides["diffusers_ip2p_20_steps_no_guidance"]["unet_passes_per_image"] == 20
    assert sides["ffasynth_defaults"]["unet_passes_per_image"] == 20
    assert result["timing"]["pass_ratio_vs_diffusers_defaults"] == 15
    lcm = sides["ffasynth_lcm_student"]  # guidance 3 folded into the distilled U-Net: one pass a step, 4 steps
    assert lcm["unet_passes_per_image"] == 4 and lcm["unet_calls_per_image"] == 4
    guided = _run(
        "bench_sampling.py", "--preset", "tiny", "--size", "64", "--steps", "1,2", "--skip-quality", "--guidance", "3"
    )
    assert guided["timing"]["sides"]["ffasynth_defaults"]["unet_passes_per_image"] == 40  # conditional + null
    assert guided["timing"]["pass_ratio_vs_diffusers_defaults"] == 7.5


def test_step_flops_counts_the_forward_and_the_backward_of_a_known_network(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_train

    batch_size, inputs, hidden, outputs = 4, 8, 16, 2
    network = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs))

    class Regression:
        trainable = {"network": network}

        def loss(self, batch, step, generator, optimizer):
            return network(batch["target"]).square().mean(), {}

    flops = bench_train.step_flops(Regression(), {"target": torch.randn(batch_size, inputs)})
    # an (m×k)·(k×n) product is 2mkn FLOPs. Forward: both layers. Backward: both weight gradients,
    # and the input gradient of the second layer only (the batch itself needs none).
    forward = 2 * batch_size * (inputs * hidden + hidden * outputs)
    backward = 2 * batch_size * (inputs * hidden + hidden * outputs) + 2 * batch_size * hidden * outputs
    assert flops == forward + backward
    assert all(p.grad is None for p in network.parameters())  # counting leaves no gradient behind


@pytest.mark.slow
def test_bench_memory_and_bench_train_print_their_figures():
    sizes = ("--sizes", "96x96,160x160,320x256", "--decode-tile-size", "128")  # 160 and 320 beyond both tiles
    memory = _run("bench_memory.py", *sizes, "--steps", "1", "--repeats", "2")
    tile = load_config(preset="tiny").data.crop_size  # 128: the first size fits one tile, the others do not
    assert [(r["width"], r["height"], r["tile_size"], r["decode_tile_size"]) for r in memory["sizes"]] == [
        (96, 96, tile, 128),
        (160, 160, tile, 128),
        (320, 256, tile, 128),
    ]
    for row in memory["sizes"]:  # two fresh processes a size; their median is the row's peak
        assert len(row["peak_rss_mib_runs"]) == 2 and row["peak_rss_mib"] == statistics.median(row["peak_rss_mib_runs"])
        assert row["megapixels"] == row["width"] * row["height"] / 1e6
        assert row["seconds_per_megapixel"] == pytest.approx(row["seconds"] / row["megapixels"])
        assert row["peak_rss_mib"] >= row["rss_after_load_mib"] > 0
    beyond = [r["peak_rss_mib"] for r in memory["sizes"][1:]]  # the spread is over the sizes beyond one tile
    assert memory["spread_beyond_tile_pct"] == pytest.approx((max(beyond) / min(beyond) - 1) * 100)
    assert memory["flat_within_10pct"] == (memory["spread_beyond_tile_pct"] <= 10)
    train = _run("bench_train.py", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--resolution", "64")
    variants = train["variants"]
    assert set(variants) == {"default (sdpa)", "eager attention", "gradient checkpointing", "channels_last"}
    for row in variants.values():  # the derived figures, recomputed from the measured seconds a step
        assert row["steps_timed"] == 2 and row["seconds_per_step"] > 0
        assert row["steps_per_s"] == pytest.approx(1 / row["seconds_per_step"])
        assert row["images_per_s"] == pytest.approx(2 / row["seconds_per_step"])
        assert row["achieved_tflops"] == pytest.approx(row["flops_per_step"] / row["seconds_per_step"] / 1e12)
    # the memory layout changes no arithmetic; checkpointing recomputes the forward: more FLOPs, never fewer
    assert variants["channels_last"]["flops_per_step"] == variants["default (sdpa)"]["flops_per_step"] > 0
    assert variants["gradient checkpointing"]["flops_per_step"] > variants["default (sdpa)"]["flops_per_step"]


def test_sd15_memory_counts_the_sd15_parameters_and_extrapolates_a_line(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_sd15_memory as bench

    # SD1.5's U-Net has 859,520,964 parameters; the 8-channel conv_in adds 320·4·3·3 and the
    # two-phase embedding 2·1280 (counted on the meta device: no memory)
    stage1 = bench.static_gib(1, ema=True, frozen_bytes=2)
    assert stage1["trainable_params_m"] * 1e6 == pytest.approx(859_520_964 + 320 * 4 * 9 + 2 * 1280, abs=1)
    # fp32 weights, gradients, two AdamW moments and the EMA: 20 bytes a parameter
    assert stage1["trainable_gib"] == pytest.approx(stage1["trainable_params_m"] * 1e6 * 20 / 2**30)
    assert bench.static_gib(1, ema=False, frozen_bytes=2)["trainable_gib"] == pytest.approx(
        stage1["trainable_gib"] * 4 / 5
    )
    # stage 2 trains SD's VAE decoder (49,490,179 + post_quant_conv's 20) and a PatchGAN of a few M
    stage2 = bench.static_gib(2, ema=False, frozen_bytes=4)
    discriminator = stage2["trainable_params_m"] * 1e6 - 49_490_199
    assert 1e6 < discriminator < 5e6
    total = stage1["trainable_params_m"] + stage1["frozen_params_m"]
    assert stage2["trainable_params_m"] + stage2["frozen_params_m"] == pytest.approx(total + discriminator / 1e6)
    points = [{"size": s, "activation_mib": 100 + 0.01 * s * s} for s in (256, 384, 512)]
    intercept, slope = bench.fit(points)
    assert intercept == pytest.approx(100) and slope == pytest.approx(0.01)
    assert [bench.fits(t, 22.35) for t in (20.0, 21.0, 23.0)] == ["yes", "tight", "no"]


def test_gpu_check_reads_steady_speed_and_peak_memory_from_a_run_log(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    # the first window holds the warm-up (slow); the steady rate is the median of the rest
    rows = [
        {"step": 5, "loss/main": 1.0, "images_per_s": 0.5, "cuda_peak_gib": 20.0},
        {"step": 10, "loss/main": 0.8, "images_per_s": 4.0, "cuda_peak_gib": 21.5},
        {"step": 15, "loss/main": 0.7, "images_per_s": 6.0, "cuda_peak_gib": 21.0},
        {"step": 20, "loss/main": 0.6, "images_per_s": 5.0, "cuda_peak_gib": 21.5, "cond_gain": 0.01},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = gpu_check.training_figures(tmp_path, images_per_step=2)
    assert figures["steps_per_s"] == 2.5 and figures["cuda_peak_gib"] == 21.5
    assert figures["steps"] == 20 and figures["final_loss"] == 0.6 and figures["cond_gain"] == 0.01
    # the FLOPs behind its utilisation figure: SD1.5's U-Net at 768² (96² latents), ≈2.14 TFLOP a forward
    assert gpu_check.count_unet_flops(smoke=False) == pytest.approx(2.1375e12, rel=1e-3)


def test_demo_ceiling_redraws_each_held_out_angiogram_of_the_written_set(monkeypatch, tmp_path):
    """The ceiling's oracles are the held-out eyes themselves, redrawn: at grain 1 the redrawn angiogram is
    the written one, pixel for pixel (the eye's seed and disease are found), and without grain it differs."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from demo_ceiling import redrawn
    from quality_choices import HeldOut

    from ffasynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", n=8, size=64, seed=3, test_fraction=0.25)
    held = HeldOut(data / "test")
    same, clean = redrawn(held, data, 3), redrawn(held, data, 3, grain=0.0)
    assert sorted(same) == sorted(held.reals) and len(same) == 4  # 2 eyes × 2 phases
    for name, real in held.reals.items():
        assert torch.equal(same[name], real)
        assert not torch.equal(clean[name], real)
    assert not torch.equal(redrawn(held, data, 4)[next(iter(same))], same[next(iter(same))])  # seed matters


def test_uwf_folds_train_on_two_eyes_and_score_the_others_against_every_training_eye(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from uwf_folds import FOLDS, Eyes, score

    from ffasynth.data.phantom import make_eye

    for train, test in FOLDS.values():
        assert sorted(train + test) == ["1", "2", "3", "4"]
    assert {eye for train, _ in FOLDS.values() for eye in train}.isdisjoint({"4"})  # refused: never trained on
    eyes = {str(i): make_eye(96, seed=i) for i in range(1, 5)}
    reals = {f"{i}-{p}": getattr(eye, f"ffa_{p}") for i, eye in eyes.items() for p in ("early", "late")}
    phases = {key: key.split("-")[1] for key in reals}
    eyes = Eyes(reals, phases)
    perfect = score({k: reals[k] for k in ("3-early", "3-late", "4-early", "4-late")}, eyes)
    assert perfect["own_eye"] == 1.0 and perfect["chance"] == pytest.approx(0.25) and perfect["excess"] > 0
    assert perfect["vessel_dice"] == pytest.approx(1.0)
    assert perfect["vessel_band_own_eye"] == 1.0 and perfect["vessel_band_excess"] > 0
    # outputs that copy a training eye's angiogram (a distractor) never find their own eye
    copied = score({"3-early": reals["1-early"], "4-early": reals["2-early"]}, eyes)
    assert copied["own_eye"] == 0.0 and copied["margin"] < 0
    assert copied["vessel_band_own_eye"] == 0.0 and copied["vessel_band_excess"] < 0


def test_gpu_check_stops_a_step_at_the_scripts_budget_and_says_so(monkeypatch, tmp_path):
    """The device kills a command at 600 s with nothing written after: a step still running at --budget is
    stopped by the script itself, so the steps before it keep their figures and this one says why."""
    import sys
    import time

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    monkeypatch.setattr(gpu_check, "BUDGET_END", time.perf_counter() + 1.0)
    began = time.perf_counter()
    with pytest.raises(RuntimeError, match="stopped after 1 s"):
        gpu_check.run([sys.executable, "-c", "import time; time.sleep(30)"], 600, tmp_path / "slow.log")
    assert time.perf_counter() - began < 10
    monkeypatch.setattr(gpu_check, "BUDGET_END", float("inf"))
    seconds, text = gpu_check.run([sys.executable, "-c", "print('done')"], 60, tmp_path / "quick.log")
    assert text.strip() == "done" and seconds < 30


def test_step_profile_counts_each_step_of_the_loop_and_splits_its_device_time(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_profile

    big, small = torch.randn(256, 256), torch.randn(8, 8, 8, 8)

    class Loop:  # stands in for ffasynth.training.loop: the profile counts steps at _train_step's end
        @staticmethod
        def _train_step(batch, after_the_window=False):
            if after_the_window:  # steps past the window (and the run's end: samples, checkpoint) are not in it
                return torch.sigmoid(batch)
            torch.nn.functional.conv2d(small, small)
            return batch @ batch

    original = Loop._train_step
    with step_profile.profiled_steps(Loop, skip=2, active=3, cuda=False) as found:
        for step in range(14):
            Loop._train_step(big, after_the_window=step >= 6)
        torch.sigmoid(big)
    assert Loop._train_step is original  # put back
    summary = step_profile.summarise(found, cuda=False)
    assert summary["steps_profiled"] == 3 and len(found["ends"]) == 14
    # the window: the wall time from the end of step 3 (the profiler's warm-up) to the end of step 6
    assert summary["wall_ms_per_step"] == pytest.approx((found["ends"][5] - found["ends"][2]) * 1e3 / 3, abs=0.01)
    names = {row["name"]: row for row in summary["top_operators"]}
    assert "aten::sigmoid" not in names
    assert names["aten::mm"]["calls_per_step"] == 1.0 and names["aten::convolution"]["calls_per_step"] == 1.0
    # self times: each operator once, so the kinds' shares sum to one and the top table's to at most one
    assert sum(summary["by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(summary["by_kind"]) <= {"matmul", "convolution", "other", "copies and casts"}
    assert sum(row["share"] for row in summary["top_operators"]) <= 1.0 + 1e-3
    assert 0 < summary["device_busy_share"] <= 1.0 + 1e-3
    with step_profile.profiled_steps(Loop, skip=2, active=3, cuda=False) as found:
        Loop._train_step(big)
    with pytest.raises(RuntimeError, match="ran 1 steps; the profile needs 6"):
        step_profile.summarise(found, cuda=False)


def test_step_profile_sums_kernel_time_on_a_gpu_and_names_the_kind_of_each_operator(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_profile

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    class Event:
        def __init__(self, key, device_type, us, count):
            self.key, self.device_type, self.count = key, device_type, count
            self.self_device_time_total, self.self_cpu_time_total = us, 1.0

    events = [  # 2 steps: operators carry the device time of the kernels they launched
        Event("aten::_efficient_attention_forward", cpu, 6000.0, 20),
        Event("aten::cudnn_convolution", cpu, 3000.0, 40),
        Event("aten::_foreach_lerp_", cpu, 1000.0, 2),
        Event("aten::empty", cpu, 0.0, 100),
        Event("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", cuda, 6000.0, 20),
        Event("sm90_xmma_fprop_implicit_gemm", cuda, 3000.0, 40),
        Event("multi_tensor_apply_kernel", cuda, 1000.0, 2),
    ]

    class Profiler:
        def key_averages(self):
            return events

    found = {"profiler": Profiler(), "ends": [0.0, 1.0, 1.02, 1.04], "window": (2, 4)}
    summary = step_profile.summarise(found, cuda=True)
    assert summary["device_ms_per_step"] == 5.0 and summary["wall_ms_per_step"] == pytest.approx(20.0)
    assert summary["device_busy_share"] == pytest.approx(0.25) and summary["kernel_launches_per_step"] == 31
    assert summary["by_kind"] == {"attention": 0.6, "convolution": 0.3, "optimizer and EMA": 0.1}
    assert [row["name"] for row in summary["top_kernels"]][0].startswith("fmha")
    assert [row["name"] for row in summary["top_operators"]] == [e.key for e in events[:3]]  # none at 0 device time
    assert step_profile.kind_of("aten::addmm") == "matmul" and step_profile.kind_of("aten::add_") == "other"
