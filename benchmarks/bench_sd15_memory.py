"""How much accelerator memory SD1.5 training needs at 768², estimated on a machine without one.

    python benchmarks/bench_sd15_memory.py                 # CPU: measures 256² and 384², extrapolates
    python benchmarks/bench_sd15_memory.py --sizes 512 768 # where memory allows

Two parts, printed separately so each can be checked:
- static bytes, counted exactly from the SD1.5-shaped modules (built on the meta device, no memory):
  trainable weights, gradients, AdamW's two moments and the EMA in float32, frozen parts in the
  training dtype;
- activation bytes of one training forward + backward (batch 1), measured as the rise of this
  process's peak RSS over the static part, at small sizes in fresh processes, fitted as a + b·pixels
  and extrapolated to 768². Activations grow with the pixel count (convolutions, and SDPA's fused
  attention keeps no N² matrix), which the fit's two sizes check.

A CUDA device adds its context and allocator slack; `OVERHEAD_GIB` stands for it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine, run_child  # noqa: E402

SCRIPT = Path(__file__).resolve()
GIB = 2**30
OVERHEAD_GIB = 1.5  # CUDA context (~0.5 GiB) + caching-allocator fragmentation, a common allowance
CARDS_GIB = {"24 GB": 24e9 / GIB, "40 GB": 40e9 / GIB, "80 GB": 80e9 / GIB}


def sd15_modules(device: str = "meta"):
    """The SD1.5 U-Net (8-channel conv_in, phase embedding), VAE and CLIP ViT-L/14 vision tower."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from ffasynth.config import load_config
    from ffasynth.models.architecture import clip_config, unet_config, vae_config
    from ffasynth.models.components import add_phase_embedding

    model = load_config(preset="sd15").model
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(model, in_channels=2 * model.latent_channels))
        add_phase_embedding(unet, model.num_phases)
        vae = AutoencoderKL(**vae_config(model))
        clip = CLIPVisionModelWithProjection(clip_config(model))
    return unet, vae, clip


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def static_gib(stage: int, ema: bool, frozen_bytes: int) -> dict:
    """Exact weight-side memory: trainable fp32 weights + grads + AdamW (m, v) [+ EMA], frozen parts."""
    from ffasynth.config import load_config
    from ffasynth.models.discriminator import NLayerDiscriminator

    unet, vae, clip = sd15_modules()
    decoder = count(vae.decoder) + count(vae.post_quant_conv)
    if stage == 1:
        trainable, frozen = count(unet), count(vae) + count(clip)
    else:  # stage 2: decoder + PatchGAN train; U-Net, encoder and CLIP frozen
        settings = load_config(preset="sd15").stage2
        with torch.device("meta"):
            disc = NLayerDiscriminator(
                in_channels=1, base_channels=settings.disc_channels, n_layers=settings.disc_layers
            )
        trainable, frozen = decoder + count(disc), count(unet) + count(vae) - decoder + count(clip)
    copies = 4 + (1 if ema else 0)  # weights, grads, 2 moments, EMA
    return {
        "trainable_params_m": trainable / 1e6,
        "frozen_params_m": frozen / 1e6,
        "trainable_gib": trainable * 4 * copies / GIB,
        "frozen_gib": frozen * frozen_bytes / GIB,
    }


def child(args) -> dict:
    """One forward + backward at `size` px in this fresh process; the peak RSS rise is activations."""
    torch.manual_seed(0)
    size, dtype = args.size, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet, vae, _ = sd15_modules("cpu")
    latent = size // 8
    if args.stage == 1:
        module = unet.train()
        if args.checkpointing:
            unet.enable_gradient_checkpointing()
        inputs = (torch.randn(1, 8, latent, latent), torch.tensor([500]), torch.randn(1, 1, 768))

        def forward():
            return module(inputs[0], inputs[1], encoder_hidden_states=inputs[2], class_labels=torch.tensor([0])).sample
    else:
        import lpips

        from ffasynth.models.decoder import Decoder

        module = Decoder(vae).train()
        if args.checkpointing:
            vae.enable_gradient_checkpointing()
        perceptual = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).requires_grad_(False)
        target = torch.rand(1, 1, size, size) * 2 - 1
        latents = torch.randn(1, 4, latent, latent)

        def forward():
            grey = module(latents).mean(dim=1, keepdim=True)
            return (grey - target).abs().mean() + perceptual(grey.clamp(-1, 1), target).mean()

    for p in module.parameters():  # gradients exist before the peak is measured: they are static memory
        p.grad = torch.zeros_like(p)
    del vae
    base = reset_peak_rss()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        output = forward()
    output.float().mean().backward()
    return {"size": size, "activation_mib": peak_rss_since_reset() - base}


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (Linux: VmHWM via clear_refs) and return the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_since_reset() -> float:
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def fits(total_gib: float, card_gib: float) -> str:
    """ "yes" with a 10% margin for what the estimate misses, "tight" within it, else "no"."""
    return "yes" if total_gib <= 0.9 * card_gib else "tight" if total_gib <= card_gib else "no"


def fit(points: list[dict]) -> tuple[float, float]:
    """Least squares activation_mib = a + b·pixels."""
    xs = [p["size"] ** 2 for p in points]
    ys = [p["activation_mib"] for p in points]
    if len(points) == 1:
        return 0.0, ys[0] / xs[0]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384], help="measured crop sizes (px)")
    parser.add_argument("--target", type=int, default=768, help="crop size to extrapolate to")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(args), one_line=True)
        return

    # stage 1 trains in bf16 (sd15.yaml), its frozen VAE/CLIP in bf16; stage 2 in fp32 throughout
    plans = {1: ("bf16", 2), 2: ("fp32", 4)}
    rows = []
    for stage in args.stages:
        dtype, frozen_bytes = plans[stage]
        for checkpointing in (True, False):
            points = []
            for size in args.sizes:
                flags = ["--stage", str(stage), "--size", str(size), "--dtype", dtype]
                log(f"stage {stage}, {dtype}, checkpointing {checkpointing}, {size}²")
                points.append(run_child(SCRIPT, flags + (["--checkpointing"] if checkpointing else [])))
                log(f"  activations {points[-1]['activation_mib']:.0f} MiB")
            intercept, slope = fit(points)
            activation = (intercept + slope * args.target**2) / 1024
            for ema in (True, False) if stage == 1 else (False,):
                weights = static_gib(stage, ema, frozen_bytes)
                total = weights["trainable_gib"] + weights["frozen_gib"] + activation + OVERHEAD_GIB
                rows.append(
                    {
                        "stage": stage,
                        "dtype": dtype,
                        "gradient_checkpointing": checkpointing,
                        "ema": ema,
                        "measured": points,
                        "activation_gib_at_target": round(activation, 2),
                        **{k: round(v, 2) for k, v in weights.items()},
                        "total_gib": round(total, 1),
                        "fits": {card: fits(total, limit) for card, limit in CARDS_GIB.items()},
                    }
                )
    emit({"machine": machine(), "target": args.target, "overhead_gib": OVERHEAD_GIB, "rows": rows})


if __name__ == "__main__":
    main()
