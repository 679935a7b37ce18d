"""Data items/s for training crops from large photos, the way before issue 23 and now, next to the
training step rate: when the step consumes items faster than the data path makes them, the GPU starves.

    python benchmarks/bench_data.py                        # 768² crops from 3000×2400 photos, 0 and 2 workers
    python benchmarks/bench_data.py --train                # + tiny-preset stage-1 steps/s at 768² (bench_train.py;
                                                           #   slow on a CPU: its attention at 192² latents)
    python benchmarks/bench_data.py --train --preset sd15 --mixed-precision bf16     # on a GPU

Paths, each through the training DataLoader (`data.dataset.training_loader`, batches of one item):
- "whole-image (before)": each image cached in the process as 16-bit codes, and for every crop the
  whole image converted to float and its field-of-view mask and integral image computed (the
  transform given no mask), as PairDataset did before; in the training process (0 workers).
- "cached, N workers": PairDataset now: decoded once into memory-mapped files with the mask and
  window counts, only the crop converted to float; N loader worker processes (0 = in the training process).

The photos are UWF phantoms (data.phantom, drawn at 768 px) resized to the size asked. The main
process runs torch on one thread (`--threads`), as one core; each worker has one thread, as the
DataLoader sets. Paths are measured in interleaved rounds of `--seconds` each, after a pass over
every pair (decoding, caching), so a busy machine slows all of them alike; a loader's workers fill
their queue (2 batches each) while the others run, a few items against a round's hundreds.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine, run_child  # noqa: E402

from ffasynth.data.dataset import PairDataset, StreamBatchSampler, training_loader  # noqa: E402
from ffasynth.data.io import read_image  # noqa: E402
from ffasynth.data.pair_check import load_pairs  # noqa: E402
from ffasynth.data.phantom import make_eye  # noqa: E402
from ffasynth.data.transforms import PairedTransform, whole_view  # noqa: E402

BENCH_TRAIN = Path(__file__).resolve().parent / "bench_train.py"


def write_photos(folder: Path, eyes: int, width: int, height: int) -> Path:
    """`eyes` UWF phantom pairs (photo, early and late FFA) drawn at 768 px and resized to width x height."""
    for number in range(1, eyes + 1):
        eye = make_eye(768, seed=number, style="uwf")
        for suffix, array in (("", eye.photo), (".1", eye.ffa_early), (".2", eye.ffa_late)):
            levels = (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
            image = Image.fromarray(levels).resize((width, height), Image.BICUBIC)
            image.save(folder / f"{number}{suffix}.png", compress_level=1)
    return folder


class WholeImageCrops(PairDataset):
    """The crop path before issue 23 (see the module's docstring): per-process uint16 codes, the whole
    image in float and its FOV mask and integral image for every crop."""

    def __init__(self, pairs, transform: PairedTransform, seed: int):
        super().__init__(pairs, transform, seed, cache=False)
        self.codes: dict[str, torch.Tensor] = {}
        self.views: dict[str, torch.Tensor] = {}

    def whole(self, path, channels: int) -> torch.Tensor:
        codes = self.codes.get(str(path))
        if codes is None:
            image = read_image(path, channels=channels)
            codes = self.codes[str(path)] = (image * 65535.0).round().to(torch.int32).to(torch.uint16)
        return codes.to(torch.float32) / 65535.0

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        pair = self.pairs[index]
        source, target = self.whole(pair.source, 3), self.whole(pair.target, 1)
        view = self.views.get(str(pair.source))
        if view is None:
            view = self.views[str(pair.source)] = whole_view(source, self.transform.whole_view_size)
        return self.transform(source, target, self.generator(index, epoch), view)


def round_rate(stream, seconds: float, least: int) -> tuple[float, float, int]:
    """(items/s, this process's CPU ms per item, items) pulling from `stream` for about `seconds` (at
    least `least` items). The CPU time is what the training process spends on data: with workers,
    only receiving the batches."""
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while count < least or time.perf_counter() - start < seconds:
        next(stream)
        count += 1
    return count / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / count, count


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.npy")) / 2**20


def measure(args, folder: Path) -> dict:
    pairs = load_pairs(folder, "uwf", "both")
    transform = PairedTransform(crop_size=args.crop)
    paths = {"whole-image (before)": (WholeImageCrops(pairs, transform, 0), 0)}
    for workers in args.workers:
        paths[f"cached, {workers} workers"] = (PairDataset(pairs, transform, seed=0), workers)
    streams, first_pass = {}, {}
    for name, (dataset, workers) in paths.items():
        sampler = StreamBatchSampler(len(dataset), 1, seed=0)
        streams[name] = iter(training_loader(dataset, sampler, workers, pin_memory=False, seed=0))
        start = time.perf_counter()
        for _ in range(len(dataset)):  # one epoch: every image decoded (and cached) once
            next(streams[name])
        first_pass[name] = (time.perf_counter() - start) / len(dataset)
        log(f"  {name}: first pass {first_pass[name]:.2f} s/item")
    rates: dict[str, list[float]] = {name: [] for name in paths}
    main_cpu: dict[str, list[float]] = {name: [] for name in paths}
    for round_number in range(args.rounds):
        for name in paths:
            rate, cpu_ms, count = round_rate(streams[name], args.seconds, least=3)
            rates[name].append(rate)
            main_cpu[name].append(cpu_ms)
            log(f"  round {round_number + 1} {name}: {rate:.2f} items/s, {cpu_ms:.0f} CPU ms/item here ({count} items)")
    old = statistics.median(rates["whole-image (before)"])
    rows = {
        name: {
            "items_per_s": statistics.median(values),
            "rounds": values,
            "main_process_cpu_ms_per_item": statistics.median(main_cpu[name]),
            "first_pass_s_per_item": first_pass[name],
            "vs_before": statistics.median(values) / old,
        }
        for name, values in rates.items()
    }
    old_dataset = paths["whole-image (before)"][0]
    memory = {
        "before_codes_mib_per_process": sum(c.numel() * 2 for c in old_dataset.codes.values()) / 2**20,
        "cache_files_mib_shared": folder_mib(paths[f"cached, {args.workers[-1]} workers"][0].store.folder),
    }
    return {"paths": rows, "memory": memory, "pairs": len(pairs)}


def training_rate(args) -> dict:
    """Stage-1 steps/s at the crop size from bench_train.py's default variant (a fresh process)."""
    options = ["--preset", args.preset, "--resolution", str(args.crop), "--batch-size", str(args.batch_size)]
    options += ["--steps", str(args.train_steps), "--warmup", "1", "--mixed-precision", args.mixed_precision]
    with tempfile.TemporaryDirectory(prefix="bench-data-train-") as data:
        from ffasynth.data.phantom import write_phantom_dataset

        write_phantom_dataset(data, n=8, size=args.crop, seed=0)
        row = run_child(BENCH_TRAIN, [*options, "--data", data, "--overrides", "[]"])
    items = row["steps_per_s"] * args.batch_size
    return {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "steps_per_s": row["steps_per_s"],
        "items_per_s": items,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--crop", type=int, default=768)
    parser.add_argument("--eyes", type=int, default=3, help="phantom eyes (2 pairs each: early, late)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per path per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--train", action="store_true", help="also measure stage-1 steps/s (bench_train.py)")
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after 1 warm-up)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        log(f"writing {args.eyes} phantom eyes at {args.width}x{args.height}")
        write_photos(Path(folder), args.eyes, args.width, args.height)
        result = measure(args, Path(folder))
    log(f"data: {json.dumps({name: round(row['items_per_s'], 2) for name, row in result['paths'].items()})}")
    training = None
    if args.train:
        try:
            training = training_rate(args)
        except RuntimeError as error:  # the data figures still stand
            training = {"error": str(error)}
    if training is not None and "error" not in training:
        log(f"  training: {training['steps_per_s']:.2f} steps/s = {training['items_per_s']:.2f} items/s consumed")
        for row in result["paths"].values():
            row["feeds_training"] = row["items_per_s"] >= training["items_per_s"]
    emit(
        {
            "benchmark": "data",
            "machine": machine(),
            "photo": [args.width, args.height],
            "crop": args.crop,
            "main_threads": args.threads,
            **result,
            "training": training,
        }
    )


if __name__ == "__main__":
    main()
