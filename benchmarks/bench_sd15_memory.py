"""How much accelerator memory SD1.5 training needs at 512² and 768², estimated on a machine without one.

    python benchmarks/bench_sd15_memory.py                 # CPU: measures 256² and 384², extrapolates
    python benchmarks/bench_sd15_memory.py --sizes 512 768 # where memory allows
    python benchmarks/bench_sd15_memory.py --stages 1 --plans lora   # only stage 1 with LoRA

Two parts, printed separately so each can be checked:
- static bytes, counted exactly from the SD1.5-shaped modules (built on the meta device, no memory):
  per trainable value 4 (float32 weight) + 4 (gradient) + the optimizer's moments (AdamW: 8; 8-bit AdamW:
  2, plus a float32 absmax per 256-value block of each moment, and 8 for tensors under 4,096 values, which
  bitsandbytes keeps in float32) + 4 for the EMA when it stays on the device; frozen parts in their dtype
  (with LoRA the U-Net's own weights are frozen too, in bf16; configs/sd15-lora.yaml's adapters);
- activation bytes of one training forward + backward (batch 1), measured as the rise of this
  process's peak RSS over the static part, at small sizes in fresh processes, fitted as a + b·pixels
  and extrapolated to each target. Activations grow with the pixel count (convolutions, and SDPA's fused
  attention keeps no N² matrix), which the fit's sizes check. Under bf16 autocast the intercept holds
  autocast's bf16 copy of float32 weights (full fine-tuning: the whole U-Net; LoRA: none, its base is bf16).

A CUDA device adds its context and allocator slack; `OVERHEAD_GIB` stands for it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, log, machine, run_child  # noqa: E402

SCRIPT = Path(__file__).resolve()
GIB = 2**30
OVERHEAD_GIB = 1.5  # CUDA context (~0.5 GiB) + caching-allocator fragmentation, a common allowance
CARDS_GIB = {"24 GB": 24e9 / GIB, "40 GB": 40e9 / GIB, "80 GB": 80e9 / GIB}
LORA_CONFIG = SCRIPT.parents[1] / "configs" / "sd15-lora.yaml"
EIGHT_BIT_MIN, EIGHT_BIT_BLOCK = 4096, 256  # bitsandbytes: smaller tensors stay float32; one absmax per block


@functools.cache  # the meta-device modules are only read; building them takes seconds
def sd15_modules(device: str = "meta", lora: bool = False):
    """The SD1.5 U-Net (8-channel conv_in, phase embedding; with configs/sd15-lora.yaml's adapters when
    `lora`), VAE and CLIP ViT-L/14 vision tower."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from ffasynth.config import load_config
    from ffasynth.models.architecture import clip_config, unet_config, vae_config
    from ffasynth.models.components import add_phase_embedding
    from ffasynth.models.lora import add_lora

    model = load_config(preset="sd15").model
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(model, in_channels=2 * model.latent_channels))
        add_phase_embedding(unet, model.num_phases)
        if lora:
            add_lora(unet, load_config(LORA_CONFIG).stage1.lora)
        vae = AutoencoderKL(**vae_config(model))
        clip = CLIPVisionModelWithProjection(clip_config(model))
    return unet, vae, clip


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


LPIPS_VGG_PARAMS = 14_714_688  # torchvision's VGG16 convolutions (LPIPS keeps them; frozen, float32)


def optimizer_bytes(params: list[torch.nn.Parameter], optimizer: str) -> int:
    """The optimizer's two moments: float32 (AdamW), or one byte each plus a float32 absmax per block."""
    if optimizer == "adamw":
        return sum(8 * p.numel() for p in params)
    small = sum(p.numel() for p in params if p.numel() < EIGHT_BIT_MIN)
    large = [p.numel() for p in params if p.numel() >= EIGHT_BIT_MIN]
    blocks = sum(-(-n // EIGHT_BIT_BLOCK) for n in large)
    return 8 * small + 2 * sum(large) + 2 * 4 * blocks


def static_gib(
    stage: int, ema: bool, frozen_bytes: int, lora: bool = False, optimizer: str = "adamw", ema_on_cpu: bool = False
) -> dict:
    """Exact weight-side memory on the device: trainable fp32 weights + grads + optimizer [+ EMA], frozen
    parts (stage 1: VAE, CLIP and, with LoRA, the U-Net's own weights; stage 2: U-Net and CLIP) at
    `frozen_bytes`; stage 2's VAE encoder stays float32, as does LPIPS-VGG (apart: lpips_gib)."""
    from ffasynth.config import load_config
    from ffasynth.models.discriminator import NLayerDiscriminator

    unet, vae, clip = sd15_modules(lora=lora)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    if stage == 1:
        trainable = [p for p in unet.parameters() if p.requires_grad]
        frozen_params = count(unet) - sum(p.numel() for p in trainable) + count(vae) + count(clip)
        frozen, lpips_gib = frozen_params * frozen_bytes, 0.0
    else:  # stage 2: decoder + PatchGAN train; U-Net, encoder and CLIP frozen
        settings = load_config(preset="sd15").stage2
        with torch.device("meta"):
            disc = NLayerDiscriminator(
                in_channels=1, base_channels=settings.disc_channels, n_layers=settings.disc_layers
            )
        trainable = decoder + list(disc.parameters())
        encoder = count(vae) - sum(p.numel() for p in decoder)
        frozen_params = count(unet) + count(clip) + encoder
        frozen = (count(unet) + count(clip)) * frozen_bytes + encoder * 4
        lpips_gib = LPIPS_VGG_PARAMS * 4 / GIB
    values = sum(p.numel() for p in trainable)
    on_device = 8 * values + optimizer_bytes(trainable, optimizer) + (4 * values if ema and not ema_on_cpu else 0)
    return {
        "trainable_params_m": values / 1e6,
        "frozen_params_m": frozen_params / 1e6,
        "trainable_gib": on_device / GIB,
        "frozen_gib": frozen / GIB,
        "lpips_gib": lpips_gib,
        "ema_host_gib": 4 * values / GIB if ema and ema_on_cpu else 0.0,
    }


def child(args) -> dict:
    """One forward + backward at `size` px in this fresh process; the peak RSS rise is activations."""
    torch.manual_seed(0)
    size, dtype = args.size, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet, vae, _ = sd15_modules("cpu", lora=args.lora)
    latent = size // 8
    if args.stage == 1:
        module = unet.train()
        if args.lora:  # as Stage1Task.to: the frozen base in the training dtype, what learns in float32
            unet.to(dtype)
            for p in unet.parameters():
                p.data = p.data.float() if p.requires_grad else p.data
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
        if p.requires_grad:
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


# The rows: stage 1 as (plan, optimizer, EMA), stage 2 as the frozen U-Net/CLIP dtype (its bytes a value).
# Activations depend only on the stage, the plan and checkpointing: one fit serves each plan's rows.
STAGE1_ROWS = [
    ("full", "adamw", "device"),
    ("full", "adamw", "off"),
    ("full", "adamw", "cpu"),
    ("full", "adamw8bit", "device"),
    ("full", "adamw8bit", "cpu"),
    ("lora", "adamw", "device"),
]
STAGE2_FROZEN = {"fp32": 4, "bf16": 2}


def measure(stage: int, plan: str, dtype: str, checkpointing: bool, sizes: list[int]) -> list[dict]:
    points = []
    for size in sizes:
        flags = ["--stage", str(stage), "--size", str(size), "--dtype", dtype]
        flags += (["--checkpointing"] if checkpointing else []) + (["--lora"] if plan == "lora" else [])
        log(f"stage {stage} ({plan}), {dtype}, checkpointing {checkpointing}, {size}²")
        points.append(run_child(SCRIPT, flags))
        log(f"  activations {points[-1]['activation_mib']:.0f} MiB")
    return points


def row(stage: int, settings: dict, weights: dict, points: list[dict], target: int) -> dict:
    """One table row: its settings, the static parts, the activations fitted to `target`, the total."""
    intercept, slope = fit(points)
    activation = (intercept + slope * target**2) / 1024
    total = weights["trainable_gib"] + weights["frozen_gib"] + weights["lpips_gib"] + activation + OVERHEAD_GIB
    return {
        "stage": stage,
        "target": target,
        **settings,
        "measured": points,
        "activation_gib": round(activation, 2),
        **{k: round(v, 2) for k, v in weights.items()},
        "total_gib": round(total, 1),
        "fits": {card: fits(total, limit) for card, limit in CARDS_GIB.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384], help="measured crop sizes (px)")
    parser.add_argument("--targets", type=int, nargs="+", default=[512, 768], help="crop sizes to extrapolate to")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--plans", nargs="+", default=["full", "lora"], help="stage 1: full fine-tuning, LoRA")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(args), one_line=True)
        return

    # stage 1 trains in bf16 autocast (sd15.yaml), its frozen parts in bf16; stage 2's decoder in fp32
    rows = []
    for stage in args.stages:
        dtype = "bf16" if stage == 1 else "fp32"
        for plan in args.plans if stage == 1 else ["full"]:
            for checkpointing in (True, False):
                points = measure(stage, plan, dtype, checkpointing, args.sizes)
                if stage == 1:
                    variants = [(o, e) for p, o, e in STAGE1_ROWS if p == plan]
                    for optimizer, ema in variants:
                        weights = static_gib(1, ema != "off", 2, plan == "lora", optimizer, ema == "cpu")
                        settings = {"plan": plan, "optimizer": optimizer, "ema": ema, "frozen_dtype": "bf16"}
                        for target in args.targets:
                            settings["gradient_checkpointing"] = checkpointing
                            rows.append(row(1, dict(settings), weights, points, target))
                else:
                    for frozen_dtype, frozen_bytes in STAGE2_FROZEN.items():
                        weights = static_gib(2, False, frozen_bytes)
                        settings = {"frozen_dtype": frozen_dtype, "gradient_checkpointing": checkpointing}
                        for target in args.targets:
                            rows.append(row(2, settings, weights, points, target))
    emit({"machine": machine(), "targets": args.targets, "overhead_gib": OVERHEAD_GIB, "rows": rows})


if __name__ == "__main__":
    main()
