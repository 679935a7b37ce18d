"""Does the stage-1 U-Net use its conditioning photo? The conditioning-gain probe of issue 20, and
the data checks that explain its answer.

Probe: on N fixed training crops, at fixed timesteps t, with the same noise for every variant,
stage 1's loss (v-prediction in the tiny preset: ‖U([z_t ⊕ c_lat], t, c_tok) − v‖²) with c = the true
photo, other eyes' photos (shuffled along the batch), or the null condition (zeros, what
conditioning dropout trains); the code is training's own (training/conditioning_gain.py, logged
as cond_gain every stage1.cond_gain_every steps), here per t at every checkpoint of a run.
  gain = loss(shuffled) − loss(true)   (> 0: the photo is used; ≈ 0: it is ignored)
gain_concat / gain_clip shuffle one path only (the other keeps the true photo).

Subcommands (run from the repository root; every one prints a table and writes JSON under --out):
  phantoms --out DIR [--eyes N]          write a phantom set (train/ test/) to compare against
  data --data DIR [--vae RUN]            registration of each pair: Pearson correlation, inside the FOV,
                                         of the photo's and the FFA's Frangi vessel maps at shift 0 vs the
                                         best shift (whole image, and median per 128² crop); the within-crop
                                         R² of FFA ← photo (ridge, leave-one-eye-out; shuffled photos as the
                                         control); with --vae: VAE reconstruction PSNR of photos and FFAs,
                                         latent mean/std (source vs target vs noisy target), and the R² of
                                         the target latent from the source latent vs from the photo's pixels
  vae --data DIR --out RUN [--steps S]   stage 0 with the tiny preset (the VAE the runs below use)
  run --data DIR --vae RUN --out RUN [--steps S] [--set key=value ...]
                                         stage 1 (tiny preset + overrides), then the probe at every
                                         checkpoint (gain vs steps); one change per run, same seed
  probe --run RUN [--data DIR]           the probe on an existing stage-1 run (e.g. held-out test eyes)

Example (issue 20; under `nice -n 15` on 2 shared cores a 150-step run took 7.5 min when the
machine was free and stopped at 51 steps in 9 min when it was not; the probe takes ~1-2 min):
  PY="nice -n 15 .venv/bin/python benchmarks/probe_conditioning.py"; UWF=../shared/data/uwf-slo-ffa
  $PY data --data $UWF                      # raw shared pairs: are they registered?
  ffasynth data register $UWF/train --out /tmp/probe/uwf-aligned/train   # the package's affine registration
  $PY data --data /tmp/probe/uwf-aligned    # the same check after it
  $PY vae --data $UWF --out /tmp/probe/vae-uwf --steps 100
  $PY run --data $UWF --vae /tmp/probe/vae-uwf --out /tmp/probe/s1-raw --steps 150 --set stage1.max_minutes=9
  $PY run --data /tmp/probe/uwf-aligned --vae /tmp/probe/vae-uwf --out /tmp/probe/s1-aligned --steps 150
What it found (tiny preset, seed 0, 24 crops, raw weights; measured with the script's earlier copy of
the probe: sampled target latents, each crop given the next other eye's photo rather than a shift of
the batch): the shared UWF pairs are not registered (best whole-image shift 43-60 px down, ~20 px
left, plus ~6-10° shear/rotation; Frangi vessel correlation per 128² crop, median: 0.02 raw vs 0.31
after registration; phantoms 0.79-0.95 whole image). Gain at t=950/700/400: raw pairs, step 50:
-0.002/-0.012/-0.004; registered pairs, step 50: +0.001/+0.005/+0.002, step 150: +0.022/+0.008/+0.004
(concat path +0.019; CLIP path ≈ 0 everywhere).
Only public functions of the package are used (config, stages, run folders, dataset, conditioning).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ffasynth.config import load_config
from ffasynth.data.io import read_image
from ffasynth.data.pair_check import load_pairs
from ffasynth.data.transforms import fov_mask
from ffasynth.models.conditioning import encode_latents
from ffasynth.training.run import load_stage1_run, load_training_data
from ffasynth.training.stage1 import Stage1Task
from ffasynth.training.stages import train_stage1, train_vae

TIMESTEPS = (950, 700, 400)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe_crops(data: Path, config, count: int) -> dict:
    """`count` fixed random training crops (epochs 1000+, not the ones a short run starts with)."""
    dataset = load_training_data(data, config)
    n = len(dataset)
    items = [dataset[(i % n, 1000 + i // n)] for i in range(count)]
    return torch.utils.data.default_collate(items)


def other_eye_order(ids: list[str]) -> torch.Tensor:
    """For each crop, the index of the next crop from another eye (the shuffled condition). An
    aligned set's ids carry the phase ("3-early"): the eye is the part before it."""
    ids = [i.removesuffix("-early").removesuffix("-late") for i in ids]
    order = []
    for i, eye in enumerate(ids):
        j = next((k % len(ids) for k in range(i + 1, i + len(ids)) if ids[k % len(ids)] != eye), (i + 1) % len(ids))
        order.append(j)
    return torch.tensor(order)


def conditioning_gain(loaded, batch: dict, timesteps=TIMESTEPS) -> dict:
    """Stage 1's own loss per variant and t, same noise (`Stage1Task.conditioning_losses`, what training
    logs as cond_gain): {t: {"true", "shuffled", "null", "concat_shuffled", ..., "gain", ...}}."""
    config = loaded.config
    task = Stage1Task(
        loaded.components, loaded.conditioner, config.stage1, config.model.num_phases, config.model.clip_view
    )
    return task.conditioning_losses(batch, timesteps)


def format_gain(step, result: dict) -> str:
    nan = float("nan")  # a path that is off has no gain of its own
    cells = [
        f"t={t}: {r['true']:.3f}/{r['shuffled']:.3f}/{r['null']:.3f} gain {r['gain']:+.3f} "
        f"(concat {r.get('gain_concat', nan):+.3f}, clip {r.get('gain_clip', nan):+.3f})"
        for t, r in result.items()
    ]
    return f"step {step:>5}  " + " | ".join(cells)


def probe_run(run_dir: Path, data: Path | None, count: int, ema: bool) -> list[dict]:
    """The probe at every kept checkpoint of a stage-1 run (true/shuffled/null loss and gains)."""
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    rows, batch = [], None
    for folder in checkpoints:
        loaded = load_stage1_run(run_dir, ema=ema, checkpoint=folder)
        if batch is None:
            source_data = data or Path(json.loads((run_dir / "run.json").read_text())["data"])
            batch = probe_crops(source_data, loaded.config, count)
        step = int(folder.name.split("-")[-1])
        result = conditioning_gain(loaded, batch)
        print(format_gain(step, result), flush=True)
        rows.append({"step": step, "ema": ema, **{str(t): r for t, r in result.items()}})
    (run_dir / "probe.json").write_text(json.dumps(rows, indent=1))
    return rows


# --- data checks -------------------------------------------------------------------------------


def blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) image, reflected at the edges."""
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(image[:, None], (radius,) * 4, mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))[:, 0]


def masked_corr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a[mask > 0], b[mask > 0]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


def xcorr(a: torch.Tensor, b: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Σ_x a(x)·b(x + s) for every shift s in ±max_shift (zero outside), via FFT: (2m+1, 2m+1)."""
    height, width = a.shape[-2:]
    size = (height + max_shift, width + max_shift)
    spectrum = torch.fft.rfft2(a.double(), size).conj() * torch.fft.rfft2(b.double(), size)
    full = torch.fft.irfft2(spectrum, size)
    rows = torch.cat([full[-max_shift:], full[: max_shift + 1]]) if max_shift else full[:1]
    return torch.cat([rows[:, -max_shift:], rows[:, : max_shift + 1]], dim=1) if max_shift else rows[:, :1]


def shifted_corr(vessels, ffa, mask, max_shift: int) -> tuple[float, float, tuple[int, int]]:
    """(corr at shift 0, best corr, best (dy, dx)): Pearson correlation, inside the mask, of the
    photo's map with the FFA's map moved by every shift within ±max_shift."""
    vessels, ffa, mask = vessels[0], ffa[0], mask[0]
    a = (vessels - vessels[mask > 0].mean()) * mask
    a = a / a.norm()
    count = mask.sum()
    sum_b, sum_b2 = xcorr(mask, ffa, max_shift), xcorr(mask, ffa**2, max_shift)
    spread = (sum_b2 - sum_b**2 / count).clamp_min(1e-12).sqrt()
    corr = (xcorr(a, ffa, max_shift) / spread).float()  # Σ a·(b − mean b) = Σ a·b as Σ a = 0
    flat = int(corr.argmax())
    best = (flat // corr.shape[1] - max_shift, flat % corr.shape[1] - max_shift)
    return float(corr[max_shift, max_shift]), float(corr.max()), best


def vesselness(image: torch.Tensor, dark: bool) -> torch.Tensor:
    """(C, H, W) in [0, 1] → (1, H, W) Frangi vesselness (the registration module's, on the green
    channel of a photo), blurred by σ = 2 px so a 1-2 px misalignment costs little."""
    from ffasynth.data.registration import field_of_view, to_numpy, vessel_channel, vessel_map

    array = to_numpy(image)
    ridges = torch.from_numpy(vessel_map(vessel_channel(array), field_of_view(array), dark_vessels=dark))[None]
    return blur(ridges, 2.0)


def registration_report(data: Path, crop: int = 128, max_shift: int = 160) -> list[dict]:
    """Per pair: photo vessel map (−high-pass of green) vs FFA high-pass inside the FOV (eroded)."""
    root = data / "train" if (data / "train").is_dir() else data
    rows = []
    for pair in load_pairs(root, "auto", "both"):
        source, target = read_image(pair.source, channels=3), read_image(pair.target, channels=1)
        mask = -F.max_pool2d(-fov_mask(source)[None], 15, 1, 7)[0]  # eroded: no FOV edge in the score
        vessels, ffa = vesselness(source, dark=True), vesselness(target, dark=False)
        whole = shifted_corr(vessels, ffa, mask, max_shift)
        moved = torch.roll(ffa, (-whole[2][0], -whole[2][1]), (-2, -1))  # the FFA moved back by the best shift
        at_zero, at_best = [], []
        height, width = source.shape[-2:]
        for top in range(0, height - crop + 1, crop):
            for left in range(0, width - crop + 1, crop):
                window = (..., slice(top, top + crop), slice(left, left + crop))
                if mask[window].mean() > 0.9:
                    at_zero.append(masked_corr(vessels[window], ffa[window], mask[window]))
                    at_best.append(masked_corr(vessels[window], moved[window], mask[window]))
        row = {
            "pair": pair.name,
            "corr_shift0": round(whole[0], 3),
            "corr_best": round(whole[1], 3),
            "best_shift_yx": whole[2],
            "crops": len(at_zero),
            "crop_corr_median_shift0": round(float(torch.tensor(at_zero).median()), 3) if at_zero else None,
            "crop_corr_median_best_shift": round(float(torch.tensor(at_best).median()), 3) if at_best else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def ridge_r2(features: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, alpha: float = 1.0) -> float:
    """R² of a ridge regression features → targets, leave-one-eye-out (groups = eye)."""
    residual, total = 0.0, 0.0
    for g in groups.unique():
        train, test = groups != g, groups == g
        x, y = features[train], targets[train]
        mean_x, mean_y = x.mean(0), y.mean(0)
        x, y = x - mean_x, y - mean_y
        weights = torch.linalg.solve(x.T @ x + alpha * len(x) * torch.eye(x.shape[1]), x.T @ y)
        prediction = (features[test] - mean_x) @ weights + mean_y
        residual += float(((targets[test] - prediction) ** 2).sum())
        total += float(((targets[test] - targets[test].mean(0)) ** 2).sum())
    return 1.0 - residual / total


def neighbourhood(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) → (B·H·W, C·size²): each latent pixel with its size×size neighbours."""
    patches = F.unfold(x, size, padding=size // 2)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def photo_information(data: Path, count: int, factor: int = 4) -> dict:
    """How much of the FFA crop's structure a linear map of the photo crop explains, on the crops
    training draws: R² of a ridge regression FFA ← photo, both pooled by `factor` (the VAE's
    downsampling) and centred per crop (the structure, not each eye's brightness), 3×3 neighbourhood
    of 3 channels, leave-one-eye-out; other eyes' photos (shuffled) are the control."""
    batch = probe_crops(data, load_config(preset="tiny"), count)
    photo, ffa = F.avg_pool2d(batch["source"], factor), F.avg_pool2d(batch["target"], factor)
    photo, ffa = photo - photo.mean((2, 3), keepdim=True), ffa - ffa.mean((2, 3), keepdim=True)
    eyes = [i.removesuffix("-early").removesuffix("-late") for i in batch["id"]]
    index = {e: i for i, e in enumerate(sorted(set(eyes)))}
    groups = torch.tensor([index[e] for e in eyes]).repeat_interleave(ffa.shape[-2] * ffa.shape[-1])
    y = ffa.permute(0, 2, 3, 1).reshape(-1, 1).double()
    shuffled = photo[other_eye_order(list(batch["id"]))]
    report = {
        "crops": count,
        "r2_ffa_from_photo": round(ridge_r2(neighbourhood(photo, 3).double(), y, groups, 1e-3), 3),
        "r2_ffa_from_shuffled_photo": round(ridge_r2(neighbourhood(shuffled, 3).double(), y, groups, 1e-3), 3),
    }
    print(json.dumps(report), flush=True)
    return report


@torch.no_grad()
def latent_report(data: Path, vae_run: Path, count: int) -> dict:
    """The VAE's reconstruction of photos and FFAs (PSNR inside the FOV), latent mean/std per channel
    (source latents are what conv_in sees beside the noisy target latents), and the within-crop R² of
    the target latent from the source latent vs from the photo's pixels (is the photo in the latent?)."""
    from ffasynth.models.components import training_scheduler
    from ffasynth.models.loading import load_vae

    vae = load_vae(str(vae_run)).eval()
    batch = probe_crops(data, load_config(preset="tiny"), count)
    source, target, mask = batch["source"], batch["target"], batch["mask"]
    report = {"scaling_factor": round(vae.config.scaling_factor, 4)}
    latents = {}
    for name, image in (("source", source), ("target", target)):
        latents[name] = encode_latents(vae, image)
        decoded = vae.decode(latents[name] / vae.config.scaling_factor).sample.clamp(-1, 1)
        decoded = decoded if image.shape[1] == 3 else decoded.mean(1, keepdim=True)
        error = ((decoded - image) ** 2 * mask).sum() / (mask.sum() * image.shape[1])
        report[f"{name}_recon_psnr_fov_db"] = round(float(10 * torch.log10(4.0 / error)), 2)
        report[f"{name}_latent_mean"] = [round(float(v), 2) for v in latents[name].mean((0, 2, 3))]
        report[f"{name}_latent_std"] = [round(float(v), 2) for v in latents[name].std((0, 2, 3))]
    schedule = training_scheduler(1000, "v_prediction")
    noise = torch.randn(latents["target"].shape, generator=torch.Generator().manual_seed(0))
    for t in TIMESTEPS:
        noisy = schedule.add_noise(latents["target"], noise, torch.full((count,), t))
        report[f"noisy_target_std_t{t}"] = round(float(noisy.std()), 2)

    def centred(x):
        return x - x.mean((2, 3), keepdim=True)

    eyes = [i.removesuffix("-early").removesuffix("-late") for i in batch["id"]]
    index = {e: i for i, e in enumerate(sorted(set(eyes)))}
    target_latents = centred(latents["target"])
    groups = torch.tensor([index[e] for e in eyes]).repeat_interleave(target_latents[0, 0].numel())
    y = target_latents.permute(0, 2, 3, 1).reshape(-1, target_latents.shape[1]).double()
    pooled = F.avg_pool2d(source, source.shape[-1] // target_latents.shape[-1])  # photo at latent resolution
    for name, features in (("source_latent", latents["source"]), ("photo_pixels", pooled)):
        x = neighbourhood(centred(features), 3).double()
        report[f"r2_target_latent_from_{name}"] = round(ridge_r2(x, y, groups, 1e-3), 3)
    print(json.dumps(report), flush=True)
    return report


# --- commands ----------------------------------------------------------------------------------


def tiny_config(vae: Path | None, steps: int, every: int, sets: list[str]):
    base = [
        f"stage1.max_steps={steps}",
        f"stage1.save_every={every}",
        "stage1.keep_checkpoints=1000",
        f"stage1.sample_every={steps}",
        f"vae.max_steps={steps}",
        f"vae.save_every={steps}",
        f"vae.sample_every={steps}",
    ]
    if vae is not None:
        base.append(f"model.vae={vae}")
    return load_config(preset="tiny", overrides=base + list(sets))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["phantoms", "data", "vae", "run", "probe"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--vae", type=Path, help="a `ffasynth train vae` run folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="checkpoint (and probe) every this many steps")
    parser.add_argument("--crops", type=int, default=24, help="crops the probe averages over")
    parser.add_argument("--eyes", type=int, default=40, help="phantoms: eyes in train/ (+ 8 in test/)")
    # raw by default: at 0.99 the EMA of a 50-step run is still 60% random init (0.99^50)
    parser.add_argument("--ema", action="store_true", help="probe the EMA weights, not the raw ones")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value (one change per run)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(2)

    if args.command == "phantoms":
        from ffasynth.data.phantom import write_phantom_dataset

        total = args.eyes + 8
        write_phantom_dataset(args.out, n=total, size=256, seed=0, test_fraction=8 / total)
        say(f"wrote {total} phantom eyes to {args.out}")
    elif args.command == "data":
        report = {"registration": registration_report(args.data), "photo_information": photo_information(args.data, 96)}
        if args.vae is not None:
            report["latents"] = latent_report(args.data, args.vae, args.crops)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "data.json").write_text(json.dumps(report, indent=1))
    elif args.command == "vae":
        train_vae(tiny_config(None, args.steps, args.steps, args.set), args.data, args.out, progress=False, say=say)
    elif args.command == "run":
        config = tiny_config(args.vae, args.steps, args.every, args.set)
        result = train_stage1(config, args.data, args.out, progress=False, say=say)
        trained = time.perf_counter() - began
        say(f"trained {result.step} steps in {trained:.0f} s ({' '.join(args.set) or 'defaults'})")
        probe_run(args.out, None, args.crops, ema=args.ema)
    else:
        probe_run(args.run, args.data, args.crops, ema=args.ema)
    say(f"{args.command}: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
