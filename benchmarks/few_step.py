"""Issue 24's table: how few U-Net passes give today's quality. One run per data set, same seeds:

- a teacher: `quickstart --minutes M` (the tiny preset from its base: stage 1, stage 2, exported), sampled
  (a) as today: DPM-Solver++ 20 steps, image guidance 3 = 40 U-Net passes; with fewer solver steps;
  (b) with diffusers' InstructPix2Pix defaults on the same U-Net: Euler ancestral, 100 steps, image
      guidance 1.5 (IP2P's text guidance has no counterpart here: 2 passes a step, not 3);
- the same teacher distilled (`ffasynth train distill`, D minutes each): guidance distillation (guidance as an
  input: 1 pass a step, DPM-Solver++), and latent consistency distillation (LCM: 1, 2, 4 steps, 1 pass
  each), the latter also decoded by its tiny preview decoder;
- pix2pix trained for the same M minutes (1 pass).

Data sets: "phantoms" (the demo's: 48 eyes at 256², 6 held out, both phases) and "uwf" (the shared UWF
pairs, registered; train on the aligned training eyes, score on the registered test eyes 7, 8, 10 at
native size). Columns: passes, PSNR, SSIM, MS-SSIM and vessel Dice inside the field of view, own-eye
retrieval, seconds per image on the data set and at 512², training minutes.

The README's figures (2026-12-04):

    .venv/bin/python benchmarks/few_step.py --dataset phantoms --out /tmp/few-phantoms --minutes 5 \
        --distill-minutes 8 --distill distill.batch_size=2 distill.solver_steps=10
    .venv/bin/python benchmarks/few_step.py --dataset uwf --out /tmp/few-uwf --minutes 5 --quick \
        --distill-minutes 8 --distill distill.solver_steps=10

(the guidance distillations ran 4 minutes; a rerun reuses the teacher, finished distillations and measured
rows kept in OUT, so rows can be added or, with --redo, measured again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine  # noqa: E402
from compare_cpu import prepare_data, run_pix2pix  # noqa: E402
from quality_choices import HeldOut  # noqa: E402
from quality_choices import sample as held_out_scores  # noqa: E402

from ffasynth.config import load_config  # noqa: E402
from ffasynth.data.io import read_image  # noqa: E402
from ffasynth.data.phantom import write_phantom_dataset  # noqa: E402
from ffasynth.export import export_run  # noqa: E402
from ffasynth.pipeline import FFASynthesisPipeline  # noqa: E402
from ffasynth.pretrain import default_shared  # noqa: E402
from ffasynth.quickstart import quickstart  # noqa: E402
from ffasynth.training.stages import train_distill  # noqa: E402

DEMO = ["data.crop_size=256", "stage1.batch_size=2"]  # the demo's training crops (quickstart without --data)
# --quick (native-size UWF on CPU: ~2 s a guided step per image) leaves out the slowest and the redundant rows
QUICK_SKIPS = ("InstructPix2Pix", "guidance distilled, DPM-Solver++ 20", "LCM 4 steps, preview")


def prepare(args) -> Path:
    if args.dataset == "phantoms":
        data = args.out / "data"
        if not (data / "test").is_dir():
            write_phantom_dataset(data, n=48, size=256, seed=args.seed, test_fraction=0.125)
        return data
    return prepare_data(args.shared, args.out)


def distil(args, data: Path, method: str) -> tuple[Path, float]:
    """The teacher (the quickstart's stage-2 run) distilled for args.distill_minutes; the exported pipeline."""
    teacher = args.out / "teacher" / "runs" / "stage2"
    run, folder = args.out / f"distill-{method}", args.out / f"distill-{method}-pipeline"
    config = load_config(
        teacher / "config.yaml",
        overrides=[
            f"seed={args.seed}",
            f"distill.method={method}",
            f"distill.max_minutes={args.distill_minutes}",
            "distill.max_steps=1000000",
            *args.distill,
        ],
    )
    done = run / "minutes.json"  # a distillation finished by an earlier run of this script is reused
    if not done.is_file():
        began = time.perf_counter()
        train_distill(config, teacher, data, run, resume=True, progress=False, say=log)
        export_run(run, folder)
        done.write_text(json.dumps((time.perf_counter() - began) / 60))
    return folder, json.loads(done.read_text())


def load(folder: Path) -> FFASynthesisPipeline:
    pipeline = FFASynthesisPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, held: HeldOut, seed: int, photo_512: torch.Tensor, **settings) -> dict:
    """quality_choices' scores of the held-out pairs (20 steps unless told), and the seconds for one 512² photo."""
    scores = held_out_scores(pipeline, held, seed, **settings)
    began = time.perf_counter()
    pipeline(
        photo_512,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **{"num_inference_steps": 20, **settings},
    )
    return scores | {"s_at_512": time.perf_counter() - began}


def score_folder(held: HeldOut, folder: Path) -> dict:
    names = {pair.name: pair.target.with_suffix("").name for pair in held.pairs}  # pix2pix names them by target
    fakes = {name: read_image(folder / f"{stem}_ffa.png", channels=1) for name, stem in names.items()}
    return held.score(fakes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("phantoms", "uwf"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=5.0, help="teacher (quickstart) and pix2pix minutes")
    parser.add_argument("--distill-minutes", type=float, default=4.0, help="minutes of each distillation")
    parser.add_argument("--shared", type=Path, default=default_shared())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distill", nargs="*", default=[], help="distill.* key=value for both distillations")
    parser.add_argument("--no-pix2pix", action="store_true")
    parser.add_argument("--quick", action="store_true", help="leave out the rows QUICK_SKIPS names")
    parser.add_argument("--redo", nargs="*", default=[], help="measure again the kept rows whose names start so")
    args = parser.parse_args()
    args.overrides, args.steps = (DEMO if args.dataset == "phantoms" else []), 20
    data = prepare(args)
    held = HeldOut(data / "test")
    photo_512 = torch.nn.functional.interpolate(read_image(held.pairs[0].source, channels=3)[None], size=(512, 512))[0]

    log("== teacher (quickstart)")
    ready = args.out / "teacher" / "minutes.json"  # a teacher trained by an earlier run of this script is reused
    if not ready.is_file():
        began = time.perf_counter()
        # decoder=True: the teacher is the stage-2 run (from the base, quickstart would otherwise skip stage 2)
        quickstart(args.out / "teacher", args.minutes, data, args.seed, 20, False, log, args.overrides, decoder=True)
        ready.write_text(json.dumps((time.perf_counter() - began) / 60))
    teacher = load(args.out / "teacher" / "pipeline")
    teacher_minutes = json.loads(ready.read_text())
    guidance = teacher.config.image_guidance_scale
    rows = {}

    saved = args.out / "rows.json"  # rows measured by an earlier run of this script are kept (--redo: measure again)
    done = json.loads(saved.read_text()) if saved.is_file() else {}
    done = {name: r for name, r in done.items() if not name.startswith(tuple(args.redo))}

    def row(name: str, pipeline, passes: int, minutes: float, **settings) -> None:
        if args.quick and name.startswith(QUICK_SKIPS):
            return
        if name in done:
            rows[name] = done[name]
            return
        rows[name] = sample(pipeline, held, args.seed, photo_512, **settings) | {"passes": passes, "minutes": minutes}
        log(f"{name}: {rows[name]}")
        saved.write_text(json.dumps({**done, **rows}, indent=1))

    doubled = 2 if guidance > 1 else 1
    row(f"today: DPM-Solver++ 20 steps, guidance {guidance:g}", teacher, 20 * doubled, teacher_minutes)
    for steps in (8, 4, 2):
        row(f"DPM-Solver++ {steps} steps, guidance {guidance:g}", teacher, steps * doubled, teacher_minutes,
            num_inference_steps=steps)  # fmt: skip
    default_scheduler = teacher.scheduler
    teacher.scheduler = EulerAncestralDiscreteScheduler.from_config(default_scheduler.config)
    row("InstructPix2Pix defaults: Euler ancestral 100 steps, image guidance 1.5", teacher, 200, teacher_minutes,
        num_inference_steps=100, image_guidance_scale=1.5)  # fmt: skip
    teacher.scheduler = default_scheduler

    log("== guidance distillation")
    folder, minutes = distil(args, data, "guidance")
    student = load(folder)
    for steps in (20, 8, 4):
        row(f"guidance distilled, DPM-Solver++ {steps} steps", student, steps, minutes, num_inference_steps=steps)

    log("== latent consistency distillation")
    folder, minutes = distil(args, data, "lcm")
    student = load(folder)
    for steps in (4, 2, 1):
        row(f"LCM {steps} step{'s' if steps > 1 else ''}", student, steps, minutes, num_inference_steps=steps)
    for steps in (4, 1):
        row(f"LCM {steps} step{'s' if steps > 1 else ''}, preview decoder", student, steps, minutes,
            num_inference_steps=steps, decoder="preview")  # fmt: skip

    pix2pix = "pix2pix (same minutes as the teacher)"
    if pix2pix in done:
        rows[pix2pix] = done[pix2pix]
    elif not args.no_pix2pix:
        log("== pix2pix")
        run = run_pix2pix(args, data)
        rows[pix2pix] = score_folder(held, run["translated"]) | {
            "passes": 1, "minutes": run["minutes"], "s_per_image": run["s_per_image"], "s_at_512": float("nan")
        }  # fmt: skip
        saved.write_text(json.dumps({**done, **rows}, indent=1))

    record = {"machine": machine(), "dataset": args.dataset, "minutes": args.minutes, "seed": args.seed}
    record |= {"distill_minutes": args.distill_minutes, "distill_overrides": args.distill, "rows": rows}
    (args.out / "few_step.json").write_text(json.dumps(record, indent=1))
    log("| method | U-Net passes | PSNR | SSIM | MS-SSIM | vessel Dice | own eye | s / image | s at 512² | train min |")
    for name, r in rows.items():
        log(
            f"| {name} | {r['passes']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['ms_ssim']:.3f} | "
            f"{r['vessel_dice']:.3f} | {r['own_eye']:.2f} | {r['s_per_image']:.2f} | {r['s_at_512']:.2f} | "
            f"{r['minutes']:.1f} |"
        )
    emit(record)


if __name__ == "__main__":
    main()
