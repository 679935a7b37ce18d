"""Stage-1 training speed and memory: steps/s and peak memory of the shared training loop, for the
default set-up and with each lever switched (eager attention instead of SDPA, gradient
checkpointing, channels_last, optionally torch.compile), plus FLOPs per step counted on one
forward/backward and, where the device's peak is known, the model FLOP utilisation.

    python benchmarks/bench_train.py                                   # tiny preset on CPU
    python benchmarks/bench_train.py --preset sd15 --resolution 768 --mixed-precision bf16   # on a GPU
    python benchmarks/bench_train.py --compile
    python benchmarks/bench_train.py --variants "default (sdpa)" --profile 5   # + where the step's time goes

Each variant runs in a fresh process (its own peak) on phantom pairs. With --profile N, N steps right
after the warm-up run under torch.profiler (step_profile.py: device time by operator, kernel and kind of
work, and the share of the wall time the device was busy); the timed steps come after them. --set KEY=VALUE
passes config overrides to every variant (e.g. model.pretrained=DIR for the SD1.5 weights' folder).
Prints one JSON object."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cuda_peak_mib,
    emit,
    log,
    machine,
    peak_rss_mib,
    reset_cuda_peak,
    run_child,
)
from step_profile import profiled_steps, summarise  # noqa: E402

SCRIPT = Path(__file__).resolve()
VARIANTS = {
    "default (sdpa)": [],
    "eager attention": ["model.attention=eager"],
    "gradient checkpointing": ["stage1.gradient_checkpointing=true"],
    "channels_last": ["stage1.channels_last=true"],
}
# Dense tensor-core peaks (FLOP/s) for the model FLOP utilisation; other devices: --peak-tflops.
PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "no": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "no": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "no": 156e12},
}


def step_flops(task, batch: dict) -> float:
    """FLOPs of one training step's forward and backward (torch's FLOP counter, matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    generator = torch.Generator(device=batch["target"].device).manual_seed(0)
    with counter:
        loss, _ = task.loss(batch, 0, generator, "main")
        loss.backward()
    for module in task.trainable.values():
        module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def child(args) -> dict:
    from ffasynth.config import load_config
    from ffasynth.training.loop import _to_device, train
    from ffasynth.training.run import load_training_data, prepare_run
    from ffasynth.training.stage1 import build_stage1

    overrides = json.loads(args.overrides)
    window = args.profile + 1 if args.profile else 0  # the profiler's warm-up step and its N steps
    steps = args.warmup + window + args.steps
    config = load_config(
        preset=args.preset,
        overrides=[
            "model.allow_random_init=true",  # timing needs shapes, not weights (sd15: SD1.5's, random)
            f"data.crop_size={args.resolution}",
            f"stage1.batch_size={args.batch_size}",
            f"stage1.max_steps={steps}",
            f"stage1.mixed_precision={args.mixed_precision}",
            "stage1.log_every=1",
            f"stage1.save_every={steps + 1}",
            f"stage1.sample_every={steps + 1}",
            *overrides,
        ],
    )
    dataset = load_training_data(args.data, config)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-")) / "run"
    prepare_run(run_dir, config, "stage1", args.data, resume=False)
    task = build_stage1(config)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    reset_cuda_peak(device)
    profiling = contextlib.nullcontext({})
    if args.profile:
        from ffasynth.training import loop

        profiling = profiled_steps(loop, args.warmup, args.profile, device.type == "cuda")
    with profiling as found:
        result = train(task, dataset, config.stage1, run_dir, config.seed, progress=False, sample_items=1)
    timed_rows = [row for row in result.losses if row["step"] > args.warmup + window]
    per_step = [config.stage1.batch_size / row["images_per_s"] for row in timed_rows]
    seconds = statistics.median(per_step)
    peak_cuda = cuda_peak_mib(device)
    batch = _to_device(torch.utils.data.default_collate([dataset[(i, 0)] for i in range(args.batch_size)]), device)
    flops = None
    if not config.stage1.compile:
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype is not None):
            flops = step_flops(task, batch)
    return {
        "steps_timed": len(per_step),
        "seconds_per_step": seconds,
        "steps_per_s": 1.0 / seconds,
        "images_per_s": config.stage1.batch_size / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": peak_cuda,
        "flops_per_step": flops,
        "achieved_tflops": None if flops is None else flops / seconds / 1e12,
        "final_loss": result.losses[-1]["loss/main"],
        **({"profile": summarise(found, device.type == "cuda")} if args.profile else {}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="crop side (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 tiny, 1 sd15")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the utilisation")
    parser.add_argument("--device", default="auto", help="auto or cpu")
    parser.add_argument("--variants", nargs="*", help=f"run only these (of: {', '.join(VARIANTS)}, torch.compile)")
    parser.add_argument("--profile", type=int, default=0, help="profile N steps after the warm-up (torch.profiler)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every variant")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (768 if args.preset == "sd15" else 128)
    args.batch_size = args.batch_size or (1 if args.preset == "sd15" else 8)
    if args.child:
        emit(child(args), one_line=True)
        return
    from ffasynth.data.phantom import write_phantom_dataset

    variants = dict(VARIANTS)
    if args.compile:
        variants["torch.compile"] = ["stage1.compile=true"]
    if args.variants:
        unknown = [name for name in args.variants if name not in variants]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {list(variants)}")
        variants = {name: variants[name] for name in args.variants}
    info = machine()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    for name, table in PEAKS.items():
        if peak is None and name in info.get("gpu", ""):
            peak = table[args.mixed_precision]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-data-") as folder:
        log(f"writing 8 phantom pairs of {max(args.resolution, 64)}²")
        write_phantom_dataset(folder, n=8, size=max(args.resolution, 64), seed=0)
        common = [
            "--preset",
            args.preset,
            "--resolution",
            str(args.resolution),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--mixed-precision",
            args.mixed_precision,
            "--device",
            args.device,
            "--data",
            folder,
            "--profile",
            str(args.profile),
        ]
        for name, overrides in variants.items():
            log(f"  {name}")
            row = run_child(SCRIPT, [*common, "--overrides", json.dumps([*args.set, *overrides])])
            if peak and row["flops_per_step"]:
                row["model_flop_utilisation"] = row["flops_per_step"] / row["seconds_per_step"] / peak
            log(f"    {row['steps_per_s']:.2f} steps/s, peak RSS {row['peak_rss_mib']:.0f} MiB")
            rows[name] = row
    emit(
        {
            "benchmark": "train",
            "machine": info,
            "stage": "stage1",
            "preset": args.preset,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision,
            "device_peak_flops": peak,
            "variants": rows,
        }
    )


if __name__ == "__main__":
    main()
