"""Issue 20: where the demo's held-out SSIM goes. On the demo's phantoms (the held-out eyes of
`write_phantom_dataset(n=48, size=256, seed, test_fraction=0.125)`, both phases), against each real
angiogram, inside its field of view:

- smooth oracle: the same eye drawn without the capillary grain and sensor noise (`make_eye(grain=0)`),
  the texture no method can predict from the photo; what a perfect mean predictor scores;
- second realisation: the same eye with that texture drawn from another seed (`grain_seed`); what a
  perfect *sampler* scores (its texture is its own, not the real one's);
- autoencoder: the real angiogram encoded and decoded by the demo pipeline's VAE (no generated latent
  decodes better through that decoder);
- autoencoder, decoder tuned on real latents: the same after `--tune-seconds` of L1 on the training
  angiograms' own latents (encoder frozen), and the pipeline's samples decoded by that decoder: is the
  decoder or the U-Net's latent what holds the demo back?
- generated: the pipeline's samples at its default steps.

    .venv/bin/python benchmarks/demo_ceiling.py --demo demo-out   # a finished `make demo` / quickstart folder
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402
from quality_choices import HeldOut, ceiling, log_table, sample  # noqa: E402

from ffasynth.data.io import read_image  # noqa: E402
from ffasynth.data.pair_check import load_pairs  # noqa: E402
from ffasynth.data.phantom import dataset_eye_seed, make_eye  # noqa: E402
from ffasynth.models.conditioning import decode_latents, encode_latents  # noqa: E402
from ffasynth.pipeline import FFASynthesisPipeline  # noqa: E402

PHASES = {"early": "ffa_early", "late": "ffa_late"}


def redrawn(held: HeldOut, data: Path, seed: int, **options) -> dict[str, torch.Tensor]:
    """Each held-out angiogram redrawn by make_eye with `options`, quantised to 8 bits as written."""
    labels = dict(row.split(",")[:2] for row in (data / "labels.csv").read_text().splitlines()[1:])
    fakes = {}
    for pair in held.pairs:
        eye_id = pair.source.stem
        size = held.reals[pair.name].shape[-1]
        eye = make_eye(size, dataset_eye_seed(seed, int(eye_id) - 1), labels[f"test/{eye_id}"], **options)
        image = np.round(np.clip(getattr(eye, PHASES[pair.phase]), 0, 1) * 255) / 255
        fakes[pair.name] = torch.from_numpy(image).float()[None]
    return fakes


def tune_decoder(pipeline: FFASynthesisPipeline, train: Path, seconds: float, lr: float, seed: int) -> None:
    """L1 on the training angiograms' own latents for `seconds`: the decoder (and post_quant_conv) only."""
    vae = pipeline.vae
    targets = [read_image(pair.target, channels=1) * 2 - 1 for pair in load_pairs(train)]
    with torch.no_grad():
        latents = [encode_latents(vae, target.repeat(3, 1, 1)[None]) for target in targets]
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator, began, steps = torch.Generator().manual_seed(seed), time.perf_counter(), 0
    vae.train()
    while time.perf_counter() - began < seconds:
        rows = torch.randperm(len(targets), generator=generator)[:4].tolist()
        decoded = decode_latents(vae, torch.cat([latents[i] for i in rows]))
        loss = (decoded - torch.stack([targets[i] for i in rows])).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    vae.eval()
    log(f"decoder tuned on real latents: {steps} steps in {seconds:.0f} s, last L1 {loss.item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished quickstart folder (data/, pipeline/)")
    parser.add_argument("--seed", type=int, default=0, help="the seed the demo's phantoms were written with")
    parser.add_argument("--tune-seconds", type=float, default=90.0)
    parser.add_argument("--tune-lr", type=float, default=2e-4)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = args.demo / "data"
    held = HeldOut(data / "test")
    pipeline = FFASynthesisPipeline.from_pretrained(args.demo / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    rows = {
        "smooth oracle (no photo-independent texture)": held.score(redrawn(held, data, args.seed, grain=0.0)),
        "second realisation (a perfect sampler)": held.score(redrawn(held, data, args.seed, grain_seed=1)),
        "autoencoder (the pipeline's VAE)": ceiling(pipeline, held),
        "generated (pipeline default steps)": sample(pipeline, held, args.seed, num_inference_steps=None),
    }
    tuned = copy.deepcopy(pipeline)
    tune_decoder(tuned, data / "train", args.tune_seconds, args.tune_lr, args.seed)
    rows["autoencoder, decoder tuned on real latents"] = ceiling(tuned, held)
    rows["generated, decoder tuned on real latents"] = sample(tuned, held, args.seed, num_inference_steps=None)
    record = {"machine": machine(), "demo": str(args.demo), "tune_seconds": args.tune_seconds, "rows": rows}
    (args.demo / "ceiling.json").write_text(json.dumps(record, indent=1))
    log_table(rows, "row")
    emit(record)


if __name__ == "__main__":
    main()
