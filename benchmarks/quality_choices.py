"""Issue 20, item 3: the choices that decide quality at CPU scale, one table, same seeds, on the demo's
held-out phantoms (48 eyes, 256², 6 held out, both phases; what `make demo` writes).

Training variants: each fine-tunes the tiny preset from its base for the same CPU minutes (quickstart
with one override: crop size, timestep weighting; prediction type as a pair from random weights, since
the base was trained for v-prediction). Inference variants: the default
run's pipeline sampled with other image-guidance scales, step counts, the mean of N samples, and the
source-started sampler (the photo's latent noised to a fraction of the schedule). A first row gives the
autoencoder's ceiling: the real angiogram encoded and decoded (no generated latent decodes better).

Columns: PSNR, SSIM, MS-SSIM inside the field of view, vessel Dice, own-eye retrieval (is each
synthetic FFA most correlated with its own eye's real FFA of that phase?), seconds per image.

    .venv/bin/python benchmarks/quality_choices.py --out /tmp/choices --minutes 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402

from ffasynth.data.pair_check import load_pairs  # noqa: E402
from ffasynth.data.phantom import write_phantom_dataset  # noqa: E402
from ffasynth.data.transforms import fov_mask  # noqa: E402
from ffasynth.evaluation.metrics import paired_scores, read_grey  # noqa: E402
from ffasynth.evaluation.retrieval import retrieval  # noqa: E402
from ffasynth.evaluation.vessels import vessel_mask, vessel_scores  # noqa: E402
from ffasynth.models.conditioning import decode_latents, encode_latents  # noqa: E402
from ffasynth.pipeline import FFASynthesisPipeline  # noqa: E402
from ffasynth.quickstart import quickstart  # noqa: E402

# The base was trained with v-prediction, so a prediction type is compared from random weights (a pair)
TRAINING = {
    "default": [],
    "min-SNR-5 weighting": ["stage1.snr_gamma=5"],
    "crop 256 (whole eye)": ["data.crop_size=256", "stage1.batch_size=2"],
    "random init, v-prediction": ["model.base=none"],
    "random init, epsilon": ["model.base=none", "stage1.prediction_type=epsilon"],
}
DEFAULT_TRAINING = ["default", "min-SNR-5 weighting", "crop 256 (whole eye)"]
INFERENCE = {
    "guidance 1": {"image_guidance_scale": 1.0},
    "guidance 5": {"image_guidance_scale": 5.0},
    "1 step": {"num_inference_steps": 1},
    "2 steps": {"num_inference_steps": 2},
    "4 steps": {"num_inference_steps": 4},
    "8 steps": {"num_inference_steps": 8},
    "50 steps": {"num_inference_steps": 50},
    "mean of 4 samples": {"num_samples": 4},
    "start from photo, 0.8": {"start_strength": 0.8},
    "start from photo, 0.6": {"start_strength": 0.6},
}


class HeldOut:
    """The held-out pairs, their real angiograms and fields of view, read once."""

    def __init__(self, test: Path):
        self.pairs = load_pairs(test)
        self.reals = {pair.name: read_grey(pair.target)[0] for pair in self.pairs}
        self.masks = {name: fov_mask(real) for name, real in self.reals.items()}

    def score(self, fakes: dict[str, torch.Tensor]) -> dict:
        rows = {"psnr": [], "ssim": [], "ms_ssim": [], "vessel_dice": []}
        for name, fake in fakes.items():
            real, mask = self.reals[name], self.masks[name]
            for key, value in paired_scores(real, fake, mask, ("psnr", "ssim", "ms_ssim")).items():
                rows[key].append(value)
            inside = mask[0].numpy() > 0.5
            rows["vessel_dice"].append(
                vessel_scores(vessel_mask(real[0].numpy(), inside), vessel_mask(fake[0].numpy(), inside), inside)[
                    "vessel_dice"
                ]
            )
        phases = {pair.name: pair.phase for pair in self.pairs}
        found = retrieval(
            {k: v[0].numpy() for k, v in fakes.items()}, {k: self.reals[k][0].numpy() for k in fakes}, phases
        )
        return {key: float(np.nanmean(values)) for key, values in rows.items()} | {"own_eye": found.accuracy}


def ceiling(pipeline: FFASynthesisPipeline, held: HeldOut) -> dict:
    """The real angiograms through the pipeline's VAE: the best any generated latent can decode to."""
    fakes = {}
    with torch.no_grad():
        for name, real in held.reals.items():
            latent = encode_latents(pipeline.vae, real.repeat(3, 1, 1)[None] * 2 - 1)
            fakes[name] = ((decode_latents(pipeline.vae, latent)[0] + 1) / 2).clamp(0, 1)
    return held.score(fakes)


def sample(pipeline: FFASynthesisPipeline, held: HeldOut, seed: int, **settings) -> dict:
    settings = {"num_inference_steps": 20, **settings}
    fakes, began = {}, time.perf_counter()
    for pair in held.pairs:
        generator = torch.Generator().manual_seed(seed)
        output = pipeline(str(pair.source), generator=generator, phase=pair.phase, output_type="pt", **settings)
        fakes[pair.name] = output.images[0].float()
    seconds = (time.perf_counter() - began) / len(held.pairs)
    return held.score(fakes) | {"s_per_image": seconds}


def log_table(rows: dict[str, dict], first: str) -> None:
    """The rows as a Markdown table: HeldOut.score's columns and the seconds per image (NaN where not timed)."""
    log(f"| {first} | PSNR | SSIM | MS-SSIM | vessel Dice | own eye | s / image |")
    for name, row in rows.items():
        log(
            f"| {name} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['ms_ssim']:.3f} | {row['vessel_dice']:.3f} | "
            f"{row['own_eye']:.2f} | {row.get('s_per_image', float('nan')):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=5.0, help="quickstart minutes per training variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--training", nargs="*", default=DEFAULT_TRAINING, choices=list(TRAINING))
    parser.add_argument("--inference", nargs="*", default=list(INFERENCE), choices=list(INFERENCE))
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "test").is_dir():
        write_phantom_dataset(data, n=48, size=256, seed=args.seed, test_fraction=0.125)
    held = HeldOut(data / "test")
    rows, pipelines = {}, {}
    for name in ["default", *[t for t in args.training if t != "default"]]:
        log(f"== training: {name}")
        folder = args.out / name.replace(" ", "-").replace("(", "").replace(")", "")
        began = time.perf_counter()
        quickstart(folder, args.minutes, data, args.seed, 20, False, log, TRAINING[name])
        minutes = (time.perf_counter() - began) / 60
        pipeline = FFASynthesisPipeline.from_pretrained(folder / "pipeline")
        pipeline.set_progress_bar_config(disable=True)
        pipelines[name] = pipeline
        rows[name] = sample(pipeline, held, args.seed) | {"minutes": round(minutes, 1)}
        log(f"{name}: {rows[name]}")
    default = pipelines["default"]
    rows = {"autoencoder ceiling (real FFA encoded, decoded)": ceiling(default, held), **rows}
    guidance = default.config.image_guidance_scale
    for name in args.inference:
        rows[name] = sample(default, held, args.seed, **INFERENCE[name])
        log(f"{name}: {rows[name]}")
    record = {"machine": machine(), "minutes": args.minutes, "seed": args.seed, "default_guidance": guidance}
    record["rows"] = rows
    (args.out / "choices.json").write_text(json.dumps(record, indent=1))
    log_table(rows, "variant")
    emit(record)


if __name__ == "__main__":
    main()
