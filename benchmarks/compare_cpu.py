"""Issue 20's side-by-side: on the shared UWF test eyes (7, 8, 10; early and late) at native size, each
method trained for the same CPU minutes on the shared training eyes (1-4, registered first; pairs whose
registration is refused left out), scored against the test eyes registered the same way:

- ffasynth from random initialisation (model.base=none: VAE, U-Net, decoder within the budget),
- ffasynth from the base model (model.base: U-Net and decoder fine-tuned within the budget),
- pix2pix (tiny generator, same data pipeline; told the phase, as ffasynth is: pix2pix.num_phases),
- the inverted green channel of the photo (no training: the trivial method).

Reported per method: own-eye retrieval first (is each synthetic FFA closest, by correlation inside the
field of view, to its own eye's real FFA of the same phase? fraction, mean margin over the best other eye
and mean excess over the mean of the others; chance = 1/3; the same with what every output of a phase
shares taken out, `retrieval.centred`, so that a common pattern cannot decide it; with only the outputs'
and the real angiograms' vessel-scale structure, `retrieval.vessel_band_retrieval`, so that the
low-frequency layout cannot; and again over the pairs
whose registration was accepted, where vessels can line up), then PSNR,
SSIM, MS-SSIM and seconds per image. Nothing is fitted to the test eyes.

    .venv/bin/python benchmarks/compare_cpu.py --out /tmp/compare --minutes 6
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402

from ffasynth.baselines.training import generate_folder, train_pix2pix  # noqa: E402
from ffasynth.config import load_config  # noqa: E402
from ffasynth.data.alignment import aligned_pairs, keep_refused, register_folder  # noqa: E402
from ffasynth.data.io import read_image, save_image  # noqa: E402
from ffasynth.data.pair_check import load_pairs  # noqa: E402
from ffasynth.data.transforms import fov_mask  # noqa: E402
from ffasynth.evaluation.metrics import EvalSettings, evaluate  # noqa: E402
from ffasynth.evaluation.retrieval import centred, retrieval, vessel_band_retrieval  # noqa: E402
from ffasynth.pretrain import default_shared  # noqa: E402
from ffasynth.quickstart import quickstart  # noqa: E402

METHODS = ("ffasynth-random", "ffasynth-base", "pix2pix", "inverted-green")


def prepare_data(shared: Path, out: Path) -> Path:
    """OUT/data/train and OUT/data/test: the training and the test eyes, each registered (photo warped
    into its angiogram's frame; a pair whose registration is refused stays as shipped, at the identity).
    The test eyes' registration uses only their own photo and angiogram, never a model: it aligns the
    reference, as a reader would before comparing."""
    data = out / "data"
    for split in ("train", "test"):
        if not (data / split).is_dir():
            rows = register_folder(shared / "uwf-slo-ffa" / split, data / split)
            if split == "test":  # every test eye is scored: a refused one as shipped
                moved = keep_refused(data / split)
                if moved:
                    names = ", ".join(path.name for path in moved)
                    print(f"test set: the refused pairs are scored as shipped, not left out ({names})")
            if split == "train":  # a refused pair is as misaligned as shipped: not trained on (as the base)
                kept = {pair.target.name for pair in aligned_pairs(data / split)}
                for row in rows:
                    if row.aligned_target not in kept:
                        for name in (row.aligned_source, row.aligned_target):
                            (data / split / name).unlink(missing_ok=True)
    return data


def per_phase_copies(outputs: dict[Path, Path], test: Path, folder: Path) -> None:
    """A phase-blind method's one output per photo, named for each of that photo's angiograms."""
    for pair in load_pairs(test):
        name = f"{pair.target.with_suffix('').name}_ffa.png"
        shutil.copyfile(outputs[pair.source], folder / name)


def run_ffasynth(args, data: Path, method: str) -> dict:
    folder = args.out / method
    overrides = ["model.base=none"] if method == "ffasynth-random" else [f"model.base={args.base}"]
    began = time.perf_counter()
    decoder = True if args.decoder else None  # None: quickstart's default (stage 2 only from random weights)
    quickstart(folder, args.minutes, data, args.seed, args.steps, False, log, overrides + args.overrides, decoder)
    return {"translated": folder / "translated", "minutes": round((time.perf_counter() - began) / 60, 1)}


def run_pix2pix(args, data: Path) -> dict:
    folder = args.out / "pix2pix"
    config = load_config(
        preset="tiny",
        overrides=[
            f"seed={args.seed}",
            f"pix2pix.max_minutes={args.minutes}",
            "pix2pix.max_steps=1000000",
            *args.overrides,
        ],
    )
    began = time.perf_counter()
    train_pix2pix(config, data, folder / "run", resume=True, progress=False, say=log)
    raw = folder / "raw"
    pairs = load_pairs(data / "test")
    photos = list(dict.fromkeys(pair.source for pair in pairs))
    # one output per photo and phase (the default pix2pix.num_phases reads the phase), else one per photo
    phases = sorted({pair.phase for pair in pairs}) if config.pix2pix.num_phases else [None]
    translate_began = time.perf_counter()
    for phase in phases:
        generate_folder(folder / "run", photos, raw / (phase or "all"), say=log, phase=phase)
    seconds = (time.perf_counter() - translate_began) / (len(photos) * len(phases))
    translated = folder / "translated"
    translated.mkdir(exist_ok=True)
    for pair in pairs:
        drawn = raw / (pair.phase if phases != [None] else "all") / f"{pair.source.stem}_ffa.png"
        shutil.copyfile(drawn, translated / f"{pair.target.with_suffix('').name}_ffa.png")
    return {"translated": translated, "minutes": round((time.perf_counter() - began) / 60, 1), "s_per_image": seconds}


def _inside(image: np.ndarray) -> np.ndarray:
    """The field of view: the project's brightness threshold, unsmoothed ((C, H, W) or (H, W))."""
    channels = torch.from_numpy(image if image.ndim == 3 else image[None])
    return fov_mask(channels, smooth=1)[0].numpy() > 0.5


def run_inverted_green(args, data: Path) -> dict:
    """1 − green, standardised inside the photo's field, then given the mean and spread of the real
    training FFAs inside theirs (two numbers from the training eyes; nothing from the test eyes)."""
    folder = args.out / "inverted-green"
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train = [read_image(pair.target, channels=1).numpy()[0] for pair in load_pairs(data / "train")]
    values = np.concatenate([image[_inside(image)] for image in train])
    mean, std = float(values.mean()), float(values.std())
    outputs = {}
    began = time.perf_counter()
    for pair in load_pairs(data / "test"):
        if pair.source in outputs:
            continue
        photo = read_image(pair.source, channels=3).numpy()
        inverted, inside = 1.0 - photo[1], _inside(photo)
        z = (inverted - inverted[inside].mean()) / max(float(inverted[inside].std()), 1e-6)
        image = np.where(inside, np.clip(mean + std * z, 0, 1), 0.0).astype(np.float32)
        outputs[pair.source] = save_image(image[None], raw / f"{pair.source.stem}_ffa.png")
    seconds = (time.perf_counter() - began) / max(len(outputs), 1)
    translated = folder / "translated"
    translated.mkdir(exist_ok=True)
    per_phase_copies(outputs, data / "test", translated)
    return {"translated": translated, "minutes": 0.0, "s_per_image": seconds}


def score(data: Path, runs: dict, seed: int) -> dict:
    test = data / "test"
    evaluation = evaluate(
        test, {name: run["translated"] for name, run in runs.items()}, EvalSettings(seed=seed), source_dir=test
    )
    pairs = load_pairs(test)
    reals = {pair.target.with_suffix("").name: read_image(pair.target, channels=1).numpy()[0] for pair in pairs}
    groups = {pair.target.with_suffix("").name: pair.phase for pair in pairs}
    accepted = {Path(pair.target).with_suffix("").name for pair in aligned_pairs(test)}
    rows = {}
    for method in evaluation.methods:
        fakes = {
            key: read_image(runs[method.name]["translated"] / f"{key}_ffa.png", channels=1).numpy()[0] for key in reals
        }
        found = retrieval(fakes, reals, groups)
        centred_found = retrieval(centred(fakes, groups), reals, groups)
        band_found = vessel_band_retrieval(fakes, reals, groups)
        kept = {key for key in reals if key in accepted}
        found_kept = retrieval({k: fakes[k] for k in kept}, {k: reals[k] for k in kept}, groups)
        rows[method.name] = {
            "own_eye": found.accuracy,
            "own_eye_margin": found.mean_margin,
            "own_eye_excess": found.mean_excess,
            # the same with what every output of a phase shares taken out (retrieval.centred)
            "own_eye_centred": centred_found.accuracy,
            "own_eye_centred_excess": centred_found.mean_excess,
            # vessel-scale structure only (retrieval.vessel_band_retrieval): do its vessels lie where this eye's do?
            "own_eye_vessel_band": band_found.accuracy,
            "own_eye_vessel_band_excess": band_found.mean_excess,
            "chance": found.chance,
            "own_eye_registered": found_kept.accuracy,
            "own_eye_registered_margin": found_kept.mean_margin,
            "chance_registered": found_kept.chance,
            "registered_pairs": sorted(kept),
            **{metric: values["mean"] for metric, values in method.summary.items()},
            **{k: v for k, v in runs[method.name].items() if k != "translated"},
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=6.0, help="training minutes per method")
    parser.add_argument("--base", default="tiny", help="model.base for ffasynth-base (tiny or a file)")
    parser.add_argument("--shared", type=Path, default=default_shared())
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--decoder", action="store_true", help="ffasynth: also tune the decoder (stage 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("overrides", nargs="*", help="config key=value for every trained method")
    args = parser.parse_args()
    if not (args.shared / "uwf-slo-ffa" / "test").is_dir():
        sys.exit(f"no shared UWF pairs at {args.shared}/uwf-slo-ffa (set --shared or FFASYNTH_SHARED_DATA)")
    data = prepare_data(args.shared, args.out)
    runs = {}
    for method in args.methods:
        log(f"== {method}")
        if method.startswith("ffasynth"):
            runs[method] = run_ffasynth(args, data, method)
        elif method == "pix2pix":
            runs[method] = run_pix2pix(args, data)
        else:
            runs[method] = run_inverted_green(args, data)
    rows = score(data, runs, args.seed)
    record = {"machine": machine(), "minutes_per_method": args.minutes, "steps": args.steps, "methods": rows}
    (args.out / "compare.json").write_text(json.dumps(record, indent=1, default=str))
    log(
        "| method | own eye (chance {:.2f}) | margin | excess | centred own eye (excess) | vessel band (excess) "
        "| own eye, registered (chance {:.2f}) | PSNR | SSIM "
        "| MS-SSIM | vessel Dice | train min |".format(
            next(iter(rows.values()))["chance"], next(iter(rows.values()))["chance_registered"]
        )
    )
    for name, row in rows.items():
        log(
            f"| {name} | {row['own_eye']:.2f} | {row['own_eye_margin']:+.3f} | {row['own_eye_excess']:+.3f} | "
            f"{row['own_eye_centred']:.2f} ({row['own_eye_centred_excess']:+.3f}) | "
            f"{row['own_eye_vessel_band']:.2f} ({row['own_eye_vessel_band_excess']:+.3f}) | "
            f"{row['own_eye_registered']:.2f} | "
            f"{row.get('psnr', float('nan')):.2f} | "
            f"{row.get('ssim', float('nan')):.3f} | {row.get('ms_ssim', float('nan')):.3f} | "
            f"{row.get('vessel_dice', float('nan')):.3f} | {row['minutes']} |"
        )
    emit(record)


if __name__ == "__main__":
    main()
