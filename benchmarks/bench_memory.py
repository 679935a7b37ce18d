"""Peak memory and time of `translate` on large photos with tiling on: peak RSS on the CPU, peak
CUDA memory on a GPU, for 768², 1536², 3072² and 4096×3072 inputs. Beyond the tile sizes (the denoising
tile, and the VAE decode tile: at least 1024 px) the peak should stay flat (the target: within ±10%), since
only tiles go through the networks.

    python benchmarks/bench_memory.py                        # tiny preset, random weights, CPU
    python benchmarks/bench_memory.py --preset sd15 --device cuda --dtype float16
    python benchmarks/bench_memory.py --pipeline pipelines/mine --sizes 768x768,4096x3072

Each size runs in fresh processes (each its own peak), through `ffasynth.translate.translate_files`,
the function behind `ffasynth translate` (read the file, translate, write the PNG). On the CPU the
peak RSS of one size moves by up to ~100 MiB between identical runs (where the allocator happens to
place the VAE decoder's large temporaries), so each size runs `--repeats` times and the median peak
is what is compared across sizes; every run's peak is printed. Prints one JSON object."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cuda_peak_mib,
    emit,
    log,
    machine,
    peak_rss_mib,
    random_pipeline,
    reset_cuda_peak,
    resolve_device,
    rss_mib,
    run_child,
    timed,
)

from ffasynth.tiling import TileSettings  # noqa: E402

SIZES = "768x768,1536x1536,3072x3072,4096x3072"
SCRIPT = Path(__file__).resolve()


def write_photo(path: Path, width: int, height: int) -> Path:
    """A phantom fundus photo scaled to width×height (PNG)."""
    from PIL import Image

    from ffasynth.data.phantom import make_eye

    photo = Image.fromarray((make_eye(512, seed=2).photo * 255.0 + 0.5).astype(np.uint8))
    photo.resize((width, height), Image.Resampling.BICUBIC).save(path)
    return path


def child(args) -> dict:
    """One translation in this process; memory figures in MiB."""
    from ffasynth.translate import TranslateSettings, load_pipeline, translate_files

    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.pipeline:
        pipeline = load_pipeline(args.pipeline, str(device), args.dtype)
    else:
        pipeline = random_pipeline(args.preset).to(device)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    settings = TranslateSettings(
        steps=args.steps,
        samples=args.samples,
        tile_size=args.tile_size or None,
        decode_tile_size=args.decode_tile_size or None,
    )
    photo = Path(args.photo)
    out = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    loaded_rss = rss_mib()
    reset_cuda_peak(device)
    report, seconds = timed(lambda: translate_files(pipeline, [photo], out, settings), device)
    if report.failed:
        raise SystemExit(f"translate failed: {report.failed[0][1]}")
    from PIL import Image

    width, height = Image.open(photo).size
    return {
        "width": width,
        "height": height,
        "megapixels": width * height / 1e6,
        "seconds": seconds,
        "seconds_per_megapixel": seconds / (width * height / 1e6),
        "rss_after_load_mib": loaded_rss,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": cuda_peak_mib(device),
        "tile_size": settings.tile_size or pipeline.config.tile_size,
        # the VAE decode tile the pipeline resolves (at least DECODE_TILE_MIN): decoder memory grows up to it
        "decode_tile_size": TileSettings.resolve(
            settings.tile_size or pipeline.config.tile_size, decode_size=args.decode_tile_size or None
        ).decode_size,
    }


def summarise(runs: list[dict]) -> dict:
    """One size's runs → one row: median peaks (every run's kept too), the fastest time."""
    row = dict(runs[0])
    for key in ("peak_rss_mib", "peak_cuda_mib", "rss_after_load_mib"):
        values = [run[key] for run in runs]
        row[key] = None if values[0] is None else statistics.median(values)
        if key != "rss_after_load_mib":
            row[f"{key}_runs"] = values
    fastest = min(runs, key=lambda run: run["seconds"])
    row["seconds"], row["seconds_per_megapixel"] = fastest["seconds"], fastest["seconds_per_megapixel"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny", help="random weights in these shapes")
    parser.add_argument("--pipeline", help="an exported pipeline folder instead of random weights")
    parser.add_argument("--sizes", default=SIZES, help=f"WxH,... (default {SIZES})")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (memory does not depend on them)")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=0, help="pixels (default: the model's training crop)")
    parser.add_argument(
        "--decode-tile-size", type=int, default=0, help="VAE decode tile, pixels (default: max(tile, 1024))"
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per size; the median peak counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--photo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = max(1, args.repeats)
    if args.child:
        emit(child(args), one_line=True)
        return
    forwarded = [
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--samples",
        str(args.samples),
        "--tile-size",
        str(args.tile_size),
        "--decode-tile-size",
        str(args.decode_tile_size),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    forwarded += ["--pipeline", args.pipeline] if args.pipeline else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-in-") as folder:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.lower().split("x"))
            photo = write_photo(Path(folder) / f"photo-{width}x{height}.png", width, height)
            log(f"translating {width}x{height}")
            runs = []
            for _ in range(args.repeats):
                runs.append(run_child(SCRIPT, [*forwarded, "--photo", str(photo)]))
                log(f"  peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB, {runs[-1]['seconds']:.1f} s")
            rows.append(summarise(runs))
    key = "peak_cuda_mib" if rows[0]["peak_cuda_mib"] is not None else "peak_rss_mib"
    beyond = [r[key] for r in rows if min(r["width"], r["height"]) > max(r["tile_size"], r["decode_tile_size"])]
    spread = (max(beyond) / min(beyond) - 1.0) * 100 if beyond else None
    emit(
        {
            "benchmark": "memory",
            "machine": machine(),
            "preset": None if args.pipeline else args.preset,
            "pipeline": args.pipeline,
            "steps": args.steps,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "sizes": rows,
            "memory_measure": key,
            "spread_beyond_tile_pct": spread,
            "flat_within_10pct": spread is not None and spread <= 10.0,
        }
    )


if __name__ == "__main__":
    main()
