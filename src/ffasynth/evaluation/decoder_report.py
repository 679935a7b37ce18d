"""How well a VAE decoder reconstructs real angiograms, before and after stage 2 fine-tunes it:
x vs D(E(x)) over whole FFA images of a data folder's test split, L1 and PSNR on the [0, 1] scale
(PSNR by the paired metrics of `evaluation.metrics`). Stored in the run's run.json as "decoder_psnr"."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ffasynth import run_folder
from ffasynth.config import DataConfig
from ffasynth.data.dataset import PairDataset
from ffasynth.data.pairs import load_pairs
from ffasynth.data.transforms import normalise, pad_to
from ffasynth.evaluation.metrics import paired_scores
from ffasynth.models.architecture import downsampling_factor
from ffasynth.models.conditioning import encode_latents, from_vae_output
from ffasynth.models.decoder import Decoder
from ffasynth.training import checkpoint as ckpt

# PSNR of a perfect reconstruction is infinite; capped here (= an MSE floor of 1e-12) so run.json stays JSON
MAX_DB = 120.0


@torch.no_grad()
def decoder_errors(vae: AutoencoderKL, decoder: Decoder | None, images: list[torch.Tensor]) -> dict[str, float]:
    """Mean L1 and mean PSNR (dB) of x vs D(E(x)), both on the [0, 1] intensity scale, over whole FFA
    images (1, H, W) in [-1, 1], padded to the VAE's multiple; `decoder` None = the VAE's own decoder."""
    factor = downsampling_factor(vae.config)
    l1, psnr = [], []
    for image in images:
        size = [-(-side // factor) * factor for side in image.shape[-2:]]
        latents = encode_latents(vae, pad_to(image, *size)[None])
        decoded = decoder(latents) if decoder is not None else vae.decode(latents / vae.config.scaling_factor).sample
        inside = pad_to(torch.ones_like(image, dtype=torch.bool), *size)  # where the padding put the image
        grey = (from_vae_output(decoded.float()).clamp(-1, 1)[0][inside].view_as(image)[None] + 1) / 2
        real = (image[None] + 1) / 2
        l1.append((grey - real).abs().mean().item())
        psnr.append(min(paired_scores(real[0], grey[0], metrics=("psnr",))["psnr"], MAX_DB))
    return {"l1": sum(l1) / len(l1), "db": sum(psnr) / len(psnr)}


def reconstruction_report(
    run_dir: Path, data_dir: Path, data: DataConfig, original_vae: AutoencoderKL, decoder: Decoder, max_images: int = 16
) -> dict:
    """Decoder L1 and PSNR of up to `max_images` real FFA of DATA's test split (its training pairs when
    it has none; "split" says which) with the original VAE vs the fine-tuned `decoder`, whose weights
    are taken from the run's newest complete checkpoint (its EMA copy when kept). Stored in run.json."""
    folder = run_folder.split_dir(data_dir, "test")
    split = "train" if folder == run_folder.split_dir(data_dir, "train") else "test"
    pairs = load_pairs(folder, data.layout, data.phase, data.max_pixels, decode=True)[:max_images]
    dataset = PairDataset(pairs, cache=False, max_pixels=data.max_pixels)
    images = [normalise(dataset.load(i)[1]) for i in range(len(dataset))]
    original_vae = original_vae.to("cpu").float()
    tuned = copy.deepcopy(decoder).cpu().float()
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        ckpt.load_weights(latest, "decoder", tuned, ema=True)
    # the encoder is frozen in stage 2: the original VAE's encoder gives the fine-tuned decoder its latents
    before = decoder_errors(original_vae, None, images)
    after = decoder_errors(original_vae, tuned.eval(), images)
    report = {
        "split": split,
        "images": len(images),
        "before_db": before["db"],
        "after_db": after["db"],
        "before_l1": before["l1"],
        "after_l1": after["l1"],
    }
    run_folder.update_info(run_dir, decoder_psnr=report)
    return report
