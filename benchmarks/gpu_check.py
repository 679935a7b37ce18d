"""The SD1.5 path end to end on one GPU, with random weights in SD1.5's exact shapes and file layouts
(no hub is reachable where this runs): the figures the README's GPU section quotes.

    bash benchmarks/gpu_check.sh                 # on a GPU machine; JSON summary on stdout and in $OUT
    python benchmarks/gpu_check.py --smoke       # the same steps at reduced width on a CPU, in ~2 minutes

Steps, each in its own process with its own time limit (one failing is recorded, the rest still run):
 1. weights   write stable-diffusion-v1-5 (unet/, vae/, scheduler/, model_index.json) and
              openai/clip-vit-large-patch14 folders with random values, plus torchvision's VGG-16 file
              for stage 2's LPIPS;
 2. data      phantom UWF pairs (training) and one ~3,000 × 2,400 photo (translation);
 3. stage1    `ffasynth train stage1 --config configs/sd15.yaml` at 768² in bf16 for ~30 steps
              (steps/s, peak CUDA memory, model FLOP utilisation from the U-Net's FLOPs counted on
              the meta device: 3 × forward, recomputation and the frozen VAE/CLIP encodes not counted);
 3b. profile  benchmarks/bench_train.py on the same weights: 5 stage-1 steps under torch.profiler (device
              time by operator, kernel and kind of work; the share of the wall time the GPU was busy),
              the FLOPs of a whole step counted by torch, and steps/s and peak memory at batch 1 and 4;
 4. stage2    `ffasynth train stage2` for a few steps (decoder fine-tuning, fp32, LPIPS-VGG);
 4b. distill  `ffasynth train distill` of the stage-2 model as configs/sd15.yaml sets it (LCM, rank-64 LoRA
              student, bf16, gradient checkpointing) for a few steps (steps/s, peak CUDA memory);
 5. export    `ffasynth export` → a pipeline folder;
 6. translate the 3,000-px photo in bfloat16 and float16;
 7. stage1_lora stage 1 again with LoRA adapters (rank 64);
 8. sampling  benchmarks/bench_sampling.py at full step counts (ours 20 vs InstructPix2Pix 100 × 3);
 9. memory    benchmarks/bench_memory.py on the exported pipeline from 768² to 4096 × 3072.
Prints one JSON object (also written to OUT/gpu_check.json after every step)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/sd15_format.py: the SD1.5 and CLIP layouts
sys.path.insert(0, str(REPO / "benchmarks"))

SD15_UNET = (320, 640, 1280, 1280)
SD15_VAE = (128, 256, 512, 512)
# CLIP ViT-L/14 (openai/clip-vit-large-patch14): vision 1024 wide, 24 layers, 16 heads; text 768, 12, 12
CLIP_L = {
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
}


def plan(smoke: bool) -> dict:
    """What each step runs at: the paper's scale on a GPU, a reduced one for the CPU smoke run."""
    if smoke:
        return {
            "device": "cpu",
            "crop": 64,
            "train_size": 96,
            "photo": (300, 240),
            "stage1_steps": 3,
            "stage2_steps": 2,
            "translate_steps": 2,
            "sampling": ["--preset", "tiny", "--size", "64", "--steps", "1,2", "--repeats", "1"],
            "train_bench": ["--resolution", "64", "--mixed-precision", "no", "--warmup", "1"],
            "batches": (1, 2),
            "memory_sizes": "128x128,256x192",
            "dtypes": ["float32"],
        }
    return {
        "device": "cuda",
        "crop": 768,
        "train_size": 1024,
        "photo": (3000, 2400),
        "stage1_steps": 30,
        "stage2_steps": 10,
        "translate_steps": 20,
        "sampling": ["--preset", "sd15", "--size", "512", "--steps", "full", "--repeats", "1", "--dtype", "float16"],
        "memory_sizes": "768x768,4096x3072",
        "dtypes": ["bfloat16", "float16"],
    }


# --- children: each runs in its own interpreter ------------------------------------------------------


def write_weights(work: Path, smoke: bool) -> dict:
    """SD1.5 and CLIP ViT-L/14 folders in their published layouts, random values (built on the GPU
    where there is one: initialising 1.2 B parameters on the CPU takes longer than training)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tests.fake_weights import write_torchvision
    from tests.sd15_format import (
        CLIP_PREPROCESSOR,
        SD15_MODEL_INDEX,
        SD15_SCHEDULER,
        _save_diffusers_model,
        _write_json,
        sd15_unet_config,
        sd15_vae_config,
        write_openai_clip_folder,
    )
    from transformers import CLIPConfig, CLIPModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd15, clip = work / "stable-diffusion-v1-5", work / "clip-vit-large-patch14"
    torch.manual_seed(0)
    unet_config = sd15_unet_config(channels=(32, 32, 64, 64) if smoke else SD15_UNET)
    vae_config = sd15_vae_config(channels=(32, 32, 64, 64) if smoke else SD15_VAE)
    counts = {}
    for name, cls, config in (("unet", UNet2DConditionModel, unet_config), ("vae", AutoencoderKL, vae_config)):
        with torch.device(device):
            model = cls.from_config(config)
        counts[name] = sum(p.numel() for p in model.parameters())
        _save_diffusers_model(model.cpu(), sd15 / name, config)
        del model
    _write_json(sd15 / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    _write_json(sd15 / "model_index.json", SD15_MODEL_INDEX)
    if smoke:
        write_openai_clip_folder(clip)
    else:
        text = {**CLIP_L["text"], "hidden_act": "quick_gelu", "projection_dim": 768}
        vision = {**CLIP_L["vision"], "hidden_act": "quick_gelu", "image_size": 224, "patch_size": 14}
        with torch.device(device):
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
        counts["clip"] = sum(p.numel() for p in model.parameters())
        model.cpu().save_pretrained(clip, safe_serialization=True)  # config.json + model.safetensors
        _write_json(clip / "preprocessor_config.json", CLIP_PREPROCESSOR)
    (work / "lpips").mkdir(parents=True, exist_ok=True)
    write_torchvision(work / "lpips", "vgg16")
    files = [p for folder in (sd15, clip) for p in folder.rglob("*.safetensors")]
    sizes = {p.relative_to(work).as_posix(): p.stat().st_size for p in files}
    return {"params_m": {k: round(v / 1e6, 1) for k, v in counts.items()}, "file_bytes": sizes}


def write_data(work: Path, smoke: bool) -> dict:
    from PIL import Image

    from ffasynth.data.phantom import write_phantom_dataset

    settings = plan(smoke)
    data = write_phantom_dataset(
        work / "data", n=5, size=settings["train_size"], seed=1, test_fraction=0.2, style="uwf"
    )
    photo = next(p for p in sorted((data / "train").glob("*.png")) if p.stem.isdigit())  # N.png, not N.1.png
    big = Image.open(photo).convert("RGB").resize(settings["photo"], Image.BICUBIC)
    big.save(work / "photo.png")
    return {"pairs": len(list(data.rglob("*.1.png"))), "photo": list(big.size)}


def count_unet_flops(smoke: bool) -> float:
    """FLOPs of one SD1.5 U-Net forward at the crop's latent size (meta device: shapes only)."""
    import torch
    from bench_sd15_memory import sd15_modules
    from torch.utils.flop_counter import FlopCounterMode

    unet, _, _ = sd15_modules("meta")
    side = plan(smoke)["crop"] // 8
    counter = FlopCounterMode(display=False)
    with counter, torch.device("meta"):
        unet(
            torch.randn(1, 8, side, side),
            torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 1, 768),
            class_labels=torch.tensor([0]),
        )
    return float(counter.get_total_flops())


# --- the orchestrator ----------------------------------------------------------------------------


def ffasynth(*args) -> list[str]:
    return [sys.executable, "-m", "ffasynth", *map(str, args)]


BUDGET_END = math.inf  # perf_counter time by which every step must have ended (main sets it from --budget)


def run(command: list[str], timeout: float, log: Path) -> tuple[float, str]:
    """Run one step within `timeout` s and the script's remaining --budget; (seconds, its output). A failure
    or a timeout raises with the output's last line (the steps before it keep their figures)."""
    start = time.perf_counter()
    timeout = max(1.0, min(timeout, BUDGET_END - start))
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"stopped after {timeout:.0f} s (its own limit or the script's --budget)") from None
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"exit {done.returncode}: {last[0][:300]}")
    return time.perf_counter() - start, text


def training_figures(run_dir: Path, images_per_step: int) -> dict:
    """steps/s (median over the logged windows after the first, which holds the warm-up), peak memory."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    rate = statistics.median(r["images_per_s"] for r in steady) / images_per_step
    loss = next(v for k, v in rows[-1].items() if k.startswith("loss/"))
    return {
        "steps": rows[-1]["step"],
        "steps_per_s": round(rate, 3),
        "cuda_peak_gib": round(max(r.get("cuda_peak_gib", 0.0) for r in rows), 2) or None,
        "final_loss": loss,
        "cond_gain": rows[-1].get("cond_gain"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="reduced widths and sizes, on the CPU")
    parser.add_argument("--work", default="/tmp/ffasynth-gpu-check", help="scratch folder (weights, runs)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where gpu_check.json goes")
    parser.add_argument("--only", nargs="*", help="run only these steps (names as in the docstring)")
    parser.add_argument("--deadline", type=float, default=400, help="seconds; steps not begun by then are skipped")
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds; a step still running then is stopped (the device's "
        "commands are killed at 600 s, with everything not yet written)",
    )
    parser.add_argument("--child", choices=["weights", "data"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    if args.child:
        result = {"weights": write_weights, "data": write_data}[args.child](work, args.smoke)
        print(json.dumps(result))
        return

    global BUDGET_END
    BUDGET_END = time.perf_counter() + args.budget
    import torch
    from common import machine

    settings = plan(args.smoke)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke}
    summary["machine"] = machine()
    summary["machine"]["transformers"] = __import__("transformers").__version__
    sd15, clip, lpips = work / "stable-diffusion-v1-5", work / "clip-vit-large-patch14", work / "lpips"
    data, photo = work / "data", work / "photo.png"
    pipeline = work / "pipeline"
    where = [f"model.pretrained={sd15}", f"model.image_encoder={clip}", f"data.crop_size={settings['crop']}"]
    config = REPO / "configs" / "sd15.yaml"
    every = settings["stage1_steps"]
    stage1_overrides = [
        *where,
        f"stage1.max_steps={every}",
        "stage1.gradient_accumulation=1",
        f"stage1.save_every={every}",
        f"stage1.sample_every={every}",
        f"stage1.cond_gain_every={every}",
        "stage1.sample_steps=4",
        "stage1.lr_warmup_steps=1",
        f"stage1.log_every={max(1, every // 6)}",
    ]
    unet_flops = None

    def stage1(name: str, extra: list[str]) -> dict:
        run_dir = work / "runs" / name
        seconds, _ = run(
            ffasynth("train", "stage1", "--config", config, "--data", data, "--out", run_dir, "--quiet")
            + [*stage1_overrides, *extra],
            600,
            out / f"{name}.log",
        )
        figures = training_figures(run_dir, 1)
        if unet_flops and settings["device"] == "cuda":
            peak = 989e12  # dense bf16 tensor-core peak of an H100/H200 (vendor datasheet)
            figures["model_flop_utilisation"] = round(3 * unet_flops * figures["steps_per_s"] / peak, 3)
        return {"wall_s": round(seconds, 1), **figures}

    def translate() -> dict:
        rows = {}
        for dtype in settings["dtypes"]:
            target = work / f"translated-{dtype}"
            seconds, text = run(
                ffasynth("translate", pipeline, photo, "--out", target, "--steps", settings["translate_steps"])
                + ["--device", settings["device"], "--dtype", dtype, "--quiet"],
                300,
                out / f"translate-{dtype}.log",
            )
            compute = re.search(r"in ([0-9.]+)s", text)
            import numpy as np
            from PIL import Image

            result = np.asarray(Image.open(target / "photo_ffa.png"), dtype=np.float32)
            rows[dtype] = {
                "wall_s": round(seconds, 1),
                "seconds_per_image": float(compute.group(1)) if compute else None,
                "size": [result.shape[1], result.shape[0]],
                "output_std": round(float(result.std()), 2),  # 0 would be a blank image
            }
        return rows

    def bench(script: str, flags: list[str], name: str) -> dict:
        _, text = run([sys.executable, str(REPO / "benchmarks" / script), *flags], 600, out / f"{name}.log")
        start = text.rfind("\n{\n")  # the JSON object each script prints last
        return json.loads(text[start + 1 :] if start >= 0 else text[text.find("{") :])

    def profile() -> dict:
        """Stage 1's step on the SD1.5 weights: where its time goes (batch 1), and how it scales with the batch."""
        rows = {}
        for batch in settings["batches"]:
            flags = ["--preset", "sd15", *settings["train_bench"], "--batch-size", batch]
            flags += ["--variants", "default (sdpa)"]
            flags += ["--profile", 5, "--steps", 6] if batch == 1 else ["--steps", 5]
            flags += ["--set", *where[:2], "stage1.gradient_accumulation=1", "stage1.cond_gain_every=0"]
            result = bench("bench_train.py", [str(flag) for flag in flags], f"profile-batch{batch}")
            rows[f"batch_{batch}"] = result["variants"]["default (sdpa)"]
        return rows

    def child(name: str, timeout: float) -> dict:
        """This script's --child NAME in a fresh interpreter; the JSON line it prints last."""
        command = [sys.executable, __file__, "--child", name, "--work", str(work)] + ["--smoke"] * args.smoke
        return json.loads(run(command, timeout, out / f"{name}.log")[1].strip().splitlines()[-1])

    steps = {
        "weights": lambda: child("weights", 600),
        "data": lambda: child("data", 300),
        "stage1": lambda: stage1("stage1", []),
        "profile": profile,
        "stage2": lambda: {
            "wall_s": round(
                run(
                    ffasynth("train", "stage2", "--from", work / "runs" / "stage1", "--data", data)
                    + ["--out", work / "runs" / "stage2", "--quiet", f"stage2.weights_dir={lpips}", *where[2:]]
                    + [f"stage2.max_steps={settings['stage2_steps']}", "stage2.gradient_accumulation=1"]
                    + [f"stage2.save_every={settings['stage2_steps']}", "stage2.disc_start=1", "stage2.log_every=1"]
                    + [f"stage2.sample_every={settings['stage2_steps']}", "stage2.lr_warmup_steps=1"],
                    600,
                    out / "stage2.log",
                )[0],
                1,
            ),
            **training_figures(work / "runs" / "stage2", 1),
        },
        "distill": lambda: {
            "wall_s": round(
                run(
                    ffasynth("train", "distill", "--from", work / "runs" / "stage2", "--data", data)
                    + ["--out", work / "runs" / "distill", "--quiet", *where[2:]]
                    + [
                        f"distill.max_steps={settings['stage2_steps']}",
                        f"distill.save_every={settings['stage2_steps']}",
                    ]
                    + [f"distill.sample_every={settings['stage2_steps']}", "distill.lr_warmup_steps=1"]
                    + ["distill.log_every=1", "distill.batch_size=1"],
                    600,
                    out / "distill.log",
                )[0],
                1,
            ),
            **training_figures(work / "runs" / "distill", 1),
        },
        "export": lambda: {
            "wall_s": round(run(ffasynth("export", work / "runs" / "stage2", pipeline), 300, out / "export.log")[0], 1)
        },
        "translate": translate,
        "stage1_lora": lambda: stage1("stage1-lora", ["stage1.lora.rank=64", f"stage1.max_steps={min(every, 20)}"]),
        "sampling": lambda: bench(
            "bench_sampling.py", [*settings["sampling"], "--device", settings["device"], "--skip-quality"], "sampling"
        ),
        "memory": lambda: bench(
            "bench_memory.py",
            ["--pipeline", str(pipeline), "--sizes", settings["memory_sizes"], "--repeats", "1"]
            + ["--device", settings["device"], "--dtype", settings["dtypes"][-1]],
            "memory",
        ),
    }
    try:
        unet_flops = count_unet_flops(args.smoke)
        summary["unet_forward_tflop"] = round(unet_flops / 1e12, 3)
    except Exception as error:  # noqa: BLE001 — the MFU is then left out, the rest still runs
        summary["unet_forward_tflop"] = f"failed: {error}"
    began = time.perf_counter()
    for name, step in steps.items():
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - began > args.deadline:
            summary[name] = {"skipped": f"past the {args.deadline:.0f}-s deadline"}
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            summary[name] = step()
        except Exception as error:  # noqa: BLE001 — one step failing must not hide the others' figures
            summary[name] = {"error": str(error)[:500]}
        summary[name]["step_s"] = round(time.perf_counter() - start, 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[gpu_check] {name}: {json.dumps(summary[name])[:400]}", file=sys.stderr, flush=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
