"""Seconds per image: diffusers' StableDiffusionInstructPix2PixPipeline against FFASynthesisPipeline,
on the same U-Net weights (random, in the preset's shapes) and the same photo; and, on a tiny model
trained on phantoms, whether 20 DPM-Solver++ steps match 100 DDIM steps in quality.

    python benchmarks/bench_sampling.py                      # sd15 shapes, 512², CPU: 1 and 3 steps, projected
    python benchmarks/bench_sampling.py --preset tiny --steps full
    python benchmarks/bench_sampling.py --skip-quality       # timing only
    python benchmarks/bench_sampling.py --preset tiny --guidance 3   # ours at the tiny preset's exported default

Timing model: each side's time at k steps is T(k) = a + b·k (a: encode, decode, set-up; b: one
step, i.e. its U-Net passes plus the scheduler). `--steps full` runs every side at its real step
count; otherwise both sides run at the same two reduced counts (`--steps 1,3`), a and b are solved
from them, and T at the real step count is projected. U-Net passes are counted with a forward hook
(one pass = one image through the U-Net; InstructPix2Pix batches its 3 a step in one call).

Prints one JSON object."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine, random_pipeline, resolve_device, timed  # noqa: E402
from diffusers import LCMScheduler  # noqa: E402

from ffasynth.models.components import add_guidance_embedding  # noqa: E402

IP2P_DEFAULT_STEPS = 100  # StableDiffusionInstructPix2PixPipeline.__call__ defaults
OURS_DEFAULT_STEPS = 20
LCM_STEPS = 4  # a distilled (LCM) pipeline's default


class PassCounter:
    """Counts U-Net calls and the images they carry."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.images = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.images += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.images = 0


def ip2p_pipeline(ours):
    """diffusers' InstructPix2Pix over the same VAE and U-Net, with the Euler-ancestral scheduler its
    published checkpoint uses; prompts are given as embeddings (our CLIP image tokens), so no text model."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=ours.vae,
        text_encoder=None,
        tokenizer=None,
        unet=ours.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(ours.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def side_runners(ours, photo: Image.Image, device: torch.device, guidance: float = 1.0):
    """name → (real step count, run(k) at k steps); ours at image guidance `guidance` (1 = one pass a step)."""
    ip2p = ip2p_pipeline(ours)
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float()[None].to(device) / 127.5 - 1.0
    tokens = ours.conditioner().tokens(pixels).to(ours.unet.dtype)  # (1, 1, 768): same cross-attention input

    def run_ip2p(steps: int):
        return ip2p(
            prompt_embeds=tokens,
            negative_prompt_embeds=torch.zeros_like(tokens),
            image=photo,
            num_inference_steps=steps,
            generator=torch.Generator(device).manual_seed(0),
            output_type="np",
        )

    def run_ip2p_single(steps: int):  # the same pipeline without guidance: one pass a step
        return ip2p(
            prompt_embeds=tokens,
            image=photo,
            num_inference_steps=steps,
            guidance_scale=1.0,
            image_guidance_scale=1.0,
            generator=torch.Generator(device).manual_seed(0),
            output_type="np",
        )

    def run_ours(steps: int):
        # default 1: the sd15 default, no guidance, one pass a step (tiny-preset pipelines export 3)
        return ours(
            photo,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            image_guidance_scale=guidance,
            output_type="np",
        )

    return {
        "diffusers_ip2p_defaults": (IP2P_DEFAULT_STEPS, run_ip2p),
        "diffusers_ip2p_20_steps": (OURS_DEFAULT_STEPS, run_ip2p),
        "diffusers_ip2p_20_steps_no_guidance": (OURS_DEFAULT_STEPS, run_ip2p_single),
        "ffasynth_defaults": (OURS_DEFAULT_STEPS, run_ours),
    }


def measure(run, real_steps: int, reduced: list[int] | None, counter: PassCounter, device, repeats: int = 1) -> dict:
    """Seconds per image at real_steps, measured (reduced=None) or projected from two reduced counts;
    each count's time is the fastest of `repeats` runs (interleaved), the usual guard against noise."""
    counts = [real_steps] if reduced is None else reduced
    seconds, passes = [float("inf")] * len(counts), [(0, 0)] * len(counts)
    for _ in range(repeats):
        for index, steps in enumerate(counts):
            counter.reset()
            _, elapsed = timed(lambda steps=steps: run(steps), device)
            seconds[index] = min(seconds[index], elapsed)
            passes[index] = (counter.images, counter.calls)
            log(f"    {steps} steps: {elapsed:.2f} s, {counter.images} U-Net passes in {counter.calls} calls")
    images_per_step = passes[-1][0] / counts[-1]
    result = {
        "steps": real_steps,
        "measured": [{"steps": k, "seconds": s} for k, s in zip(counts, seconds, strict=True)],
    }
    if reduced is None:
        result.update(seconds_per_image=seconds[0], projected=False)
        per_step = None
    else:
        (k1, t1), (k2, t2) = zip(counts, seconds, strict=True)
        per_step = (t2 - t1) / (k2 - k1)
        fixed = t1 - per_step * k1
        result.update(seconds_per_image=fixed + per_step * real_steps, projected=True, fixed_seconds=fixed)
    result.update(
        unet_passes_per_step=images_per_step,
        unet_passes_per_image=round(images_per_step * real_steps),
        unet_calls_per_image=round(passes[-1][1] / counts[-1] * real_steps),
        seconds_per_step=per_step if per_step is not None else None,
    )
    if per_step is not None:
        result["seconds_per_unet_pass"] = per_step / images_per_step
    return result


def reproject(result: dict, real_steps: int) -> dict:
    """A reduced-count measurement projected to another real step count."""
    per_step, per_image = result["seconds_per_step"], result["unet_passes_per_step"]
    calls = result["unet_calls_per_image"] / result["steps"]
    return {
        **result,
        "steps": real_steps,
        "seconds_per_image": result["fixed_seconds"] + per_step * real_steps,
        "unet_passes_per_image": round(per_image * real_steps),
        "unet_calls_per_image": round(calls * real_steps),
    }


def timing(args, device: torch.device) -> dict:
    from ffasynth.data.phantom import make_eye

    size = args.size or (512 if args.preset == "sd15" else 128)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    log(f"building a random {args.preset} pipeline ({args.dtype}, {device})")
    ours = random_pipeline(args.preset, ["model.num_phases=0", "model.attention=sdpa"]).to(device)
    if dtype != torch.float32:
        ours.to(dtype=dtype)
    photo = Image.fromarray((make_eye(size, seed=1).photo * 255.0 + 0.5).astype(np.uint8))
    runners = side_runners(ours, photo, device, args.guidance)
    counter = PassCounter(ours.unet)
    reduced = None if args.steps == "full" else sorted({int(s) for s in args.steps.split(",")})
    if reduced is not None and len(reduced) != 2:
        raise SystemExit("--steps takes 'full' or two step counts, e.g. 1,3")
    for _, run in list(runners.values())[::3]:  # warm-up: allocator, kernels, lazy imports
        run(1)
    sides, measured = {}, {}
    for name, (real_steps, run) in runners.items():
        if args.sides and name not in args.sides:
            continue
        log(f"  {name} ({real_steps} steps)")
        if reduced is not None and run in measured:  # same runner at the same reduced counts: project again
            sides[name] = reproject(measured[run], real_steps)
            continue
        sides[name] = measured[run] = measure(run, real_steps, reduced, counter, device, args.repeats)
    # a distilled student's shape (`ffasynth train distill`): the guidance scale as an input (guidance 3 in one
    # pass a step), LCMScheduler, its 4 default steps; the same U-Net cost per pass plus one small linear layer
    add_guidance_embedding(ours.unet)
    ours.register_to_config(guidance_input=True)  # what export records for a distill run
    dpm_only = ("solver_order", "algorithm_type")
    ours.scheduler = LCMScheduler.from_config({k: v for k, v in ours.scheduler.config.items() if k not in dpm_only})

    def run_lcm(steps: int):
        generator = torch.Generator().manual_seed(0)
        return ours(photo, num_inference_steps=steps, generator=generator, image_guidance_scale=3.0, output_type="np")

    if not args.sides or "ffasynth_lcm_student" in args.sides:
        log(f"  ffasynth_lcm_student ({LCM_STEPS} steps, guidance 3 folded in)")
        run_lcm(1)
        sides["ffasynth_lcm_student"] = measure(run_lcm, LCM_STEPS, reduced, counter, device, args.repeats)

    def ratio(numerator: str, denominator: str, key: str = "seconds_per_image") -> float | None:
        if numerator not in sides or denominator not in sides:
            return None  # a side left out with --sides
        return sides[numerator][key] / sides[denominator][key]

    return {
        "preset": args.preset,
        "size": size,
        "device": str(device),
        "dtype": args.dtype,
        "ffasynth_image_guidance_scale": args.guidance,
        "unet_parameters": sum(p.numel() for p in ours.unet.parameters()),
        "tiles": 1,
        "sides": sides,
        "ratio_vs_diffusers_defaults": ratio("diffusers_ip2p_defaults", "ffasynth_defaults"),
        "ratio_vs_diffusers_20_steps": ratio("diffusers_ip2p_20_steps", "ffasynth_defaults"),
        "pass_ratio_vs_diffusers_defaults": ratio(
            "diffusers_ip2p_defaults", "ffasynth_defaults", "unet_passes_per_image"
        ),
        "lcm_ratio_vs_diffusers_defaults": ratio("diffusers_ip2p_defaults", "ffasynth_lcm_student"),
        "lcm_ratio_vs_ffasynth_defaults": ratio("ffasynth_defaults", "ffasynth_lcm_student"),
    }


def trained_tiny(args) -> tuple[Path, Path]:
    """(pipeline folder, held-out pairs) given, or from a quickstart run on phantoms."""
    if args.quality_pipeline:
        return Path(args.quality_pipeline), Path(args.quality_data)
    from ffasynth.quickstart import quickstart

    out = Path(args.quality_out or tempfile.mkdtemp(prefix="bench-sampling-"))
    log(f"training a tiny model on phantoms for the quality check ({args.quality_minutes} min) in {out}")
    result = quickstart(out, minutes=args.quality_minutes, progress=False, say=log)
    return result.pipeline, out / "data" / "test"


def quality(args) -> dict:
    """PSNR/SSIM against the real FFA of held-out pairs: 20 DPM-Solver++ steps vs 100 DDIM steps, same noise."""
    from diffusers import DDIMScheduler

    from ffasynth.data.io import read_image
    from ffasynth.data.pair_check import load_pairs
    from ffasynth.evaluation.metrics import paired_scores
    from ffasynth.translate import load_pipeline

    pipeline_dir, test_dir = trained_tiny(args)
    pipe = load_pipeline(pipeline_dir, "cpu")
    pipe.set_progress_bar_config(disable=True)
    solvers = {
        "dpmsolver++_20": (pipe.scheduler, OURS_DEFAULT_STEPS),
        "ddim_100": (DDIMScheduler.from_config(pipe.scheduler.config), IP2P_DEFAULT_STEPS),
    }
    scores = {name: [] for name in solvers}
    between = []
    pairs = load_pairs(test_dir)
    for pair in pairs:
        photo, real = read_image(pair.source, channels=3), read_image(pair.target, channels=1)
        phase = pair.phase if pipe.config.num_phases else None
        outputs = {}
        for name, (scheduler, steps) in solvers.items():
            pipe.scheduler = scheduler
            image = pipe(
                photo,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                image_guidance_scale=args.guidance,
                phase=phase,
                output_type="pt",
            ).images[0]
            outputs[name] = image
            scores[name].append(paired_scores(real, image, metrics=("psnr", "ssim")))
        between.append(paired_scores(outputs["ddim_100"], outputs["dpmsolver++_20"], metrics=("psnr",))["psnr"])
    summary = {
        name: {metric: float(np.mean([s[metric] for s in values])) for metric in ("psnr", "ssim")}
        for name, values in scores.items()
    }
    return {
        "pipeline": str(pipeline_dir),
        "pairs": len(pairs),
        "image_guidance_scale": args.guidance,
        **summary,
        "psnr_difference_db": summary["dpmsolver++_20"]["psnr"] - summary["ddim_100"]["psnr"],
        "ssim_difference": summary["dpmsolver++_20"]["ssim"] - summary["ddim_100"]["ssim"],
        "psnr_between_samplers_db": float(np.mean(between)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--size", type=int, default=None, help="photo side in px (default 512 sd15, 128 tiny)")
    parser.add_argument(
        "--steps",
        default=None,
        help="'full', or two reduced step counts (default: full on a GPU or the tiny preset, else 1,3)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="runs per step count; the fastest counts")
    parser.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="our image guidance scale, timing and quality (1 = one pass a step, the sd15 default; "
        "3 = the tiny preset's exported default, two passes a step in one batch)",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--sides",
        nargs="*",
        help="time only these sides (diffusers_ip2p_defaults, diffusers_ip2p_20_steps, "
        "diffusers_ip2p_20_steps_no_guidance, ffasynth_defaults, ffasynth_lcm_student); ratios need both of theirs",
    )
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--quality-pipeline", help="an exported tiny pipeline trained on phantoms")
    parser.add_argument("--quality-data", help="its held-out pairs (with --quality-pipeline)")
    parser.add_argument("--quality-minutes", type=float, default=5.0, help="training budget when none is given")
    parser.add_argument("--quality-out", help="where to train it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quality_pipeline and not args.quality_data:
        parser.error("--quality-pipeline needs --quality-data (its held-out pairs)")
    device = resolve_device(args.device)
    if args.steps is None:
        args.steps = "full" if device.type == "cuda" or args.preset == "tiny" else "1,3"
    torch.manual_seed(0)
    result = {"benchmark": "sampling", "machine": machine()}
    if not args.skip_timing:
        result["timing"] = timing(args, device)
    if not args.skip_quality:
        result["quality"] = quality(args)
    emit(result)


if __name__ == "__main__":
    main()
