"""Stage 2's latent modes compared end to end: from one stage-1 run, a stage 2 per `stage2.latents`
mode at the same step budget and seed; for each, the decoder's test L1 / PSNR (stage 2's own
reconstruction report: real FFA through E then the tuned D) and, after export, the held-out photos
translated (each phase present, as `ffasynth quickstart` does) and scored against their real
angiograms (PSNR / SSIM / MS-SSIM inside the field of view). Mode "none" = the stage-1 run exported
as it is (the original decoder), the reference.

    python benchmarks/bench_stage2_latents.py --stage1 RUN --data DATA --out DIR --max-steps 150 \\
        [--modes none,encoder,mix,unet,sampler] [--sampler-steps 10] [--translate-steps 20] [key=value ...]

Work is kept under DIR/MODE/ (stage2/, pipeline/, translated/) and reused when complete, so the
modes can be trained and translated in separate invocations (`--no-evaluate`) and a stopped
comparison continues. Prints one JSON object: per mode, decoder and end-to-end figures and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402

MODES = ("none", "encoder", "unet", "mix", "sampler")


def train_mode(args, mode: str) -> dict:
    """Stage 2 in DIR/MODE/stage2 (reused when its reconstruction report exists); its report and seconds."""
    from ffasynth.config import load_config
    from ffasynth.training.stages import train_stage2

    run_dir = args.out / mode / "stage2"
    info_path = run_dir / "run.json"
    if info_path.is_file() and "decoder_psnr" in json.loads(info_path.read_text()):
        return json.loads((args.out / mode / "bench.json").read_text())
    overrides = [
        f"seed={args.seed}",
        f"stage2.latents={mode}",
        f"stage2.sampler_steps={args.sampler_steps}",
        f"stage2.max_steps={args.max_steps}",
        *args.overrides,
    ]
    config = load_config(args.stage1 / "config.yaml", overrides=overrides)
    began = time.perf_counter()
    result, report = train_stage2(config, args.stage1, args.data, run_dir, progress=False, say=log)
    record = {"steps": result.step, "train_seconds": round(time.perf_counter() - began, 1), "decoder": report}
    (args.out / mode / "bench.json").write_text(json.dumps(record, indent=1))
    return record


def translate_mode(args, mode: str) -> Path:
    """Export (the stage-1 run itself for "none") and translate the held-out photos into DIR/MODE/translated."""
    from ffasynth.data.pair_check import load_pairs
    from ffasynth.export import export_run
    from ffasynth.quickstart import sample_held_out
    from ffasynth.translate import load_pipeline

    folder = args.out / mode
    translated = folder / "translated"
    if translated.is_dir() and len(list(translated.glob("*_ffa.png"))) == len(load_pairs(args.data / "test")):
        return translated
    run_dir = args.stage1 if mode == "none" else folder / "stage2"
    pipeline = load_pipeline(export_run(run_dir, folder / "pipeline"), "cpu")
    began = time.perf_counter()
    sample_held_out(pipeline, args.data / "test", translated, args.translate_steps, args.seed, log)
    record_path = folder / "bench.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["translate_seconds"] = round(time.perf_counter() - began, 1)
    record_path.write_text(json.dumps(record, indent=1))
    return translated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", type=Path, required=True, help="the stage-1 run every stage 2 starts from")
    parser.add_argument("--data", type=Path, required=True, help="pairs with train/ and test/ splits")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-steps", type=int, default=150, help="stage-2 steps, the same for every mode")
    parser.add_argument("--sampler-steps", type=int, default=10, help="stage2.sampler_steps (mode sampler)")
    parser.add_argument("--translate-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-translate", action="store_true", help="train only")
    parser.add_argument("--no-evaluate", action="store_true", help="train and translate only")
    parser.add_argument("overrides", nargs="*", help="more config key=value for every stage 2")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown[0]}; choose from {', '.join(MODES)}")
    results: dict[str, dict] = {}
    fakes: dict[str, Path] = {}
    for mode in modes:
        (args.out / mode).mkdir(parents=True, exist_ok=True)
        results[mode] = {} if mode == "none" else train_mode(args, mode)
        if not args.no_translate:
            fakes[mode] = translate_mode(args, mode)
    if fakes and not args.no_evaluate:
        from ffasynth.evaluation.metrics import EvalSettings, evaluate
        from ffasynth.evaluation.outputs import write_evaluation

        test_dir = args.data / "test"
        settings = EvalSettings(metrics=("psnr", "ssim", "ms_ssim"), seed=args.seed)
        evaluation = evaluate(test_dir, fakes, settings, source_dir=test_dir)
        write_evaluation(evaluation, args.out / "report")
        for method in evaluation.methods:
            results[method.name]["end_to_end"] = {m: v["mean"] for m, v in method.summary.items()}
            results[method.name]["images"] = len(method.per_image)
    emit(
        {
            "machine": machine(),
            "stage1": str(args.stage1.resolve()),
            "max_steps": args.max_steps,
            "sampler_steps": args.sampler_steps,
            "translate_steps": args.translate_steps,
            "seed": args.seed,
            "overrides": args.overrides,
            "modes": results,
        }
    )


if __name__ == "__main__":
    main()
