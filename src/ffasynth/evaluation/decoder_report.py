"""How well a VAE decoder reconstructs real angiograms, before and after stage 2 fine-tunes it:
x vs D(E(x)) over whole FFA images of a data folder's test split, L1 and PSNR on the [0, 1] scale
(PSNR by the paired metrics of `evaluation.metrics`). Stored in the run's run.json as "decoder_psnr".

It runs where the decoder is (the training device), in tiles (`tiling.tiled_encode` / `tiled_decode`):
a native-size angiogram (~12 MP) never goes through the VAE whole. Stage 2 calls it in its first
process only, on `stage2.report_images` images."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ffasynth import run_folder
from ffasynth.config import DataConfig
from ffasynth.data.io import read_image
from ffasynth.data.pair_check import load_pairs
from ffasynth.data.pairs import Pair
from ffasynth.data.transforms import normalise, pad_to
from ffasynth.errors import ImageReadError, PairError
from ffasynth.evaluation.metrics import paired_scores
from ffasynth.models.architecture import downsampling_factor
from ffasynth.models.conditioning import encode_latents, from_vae_output
from ffasynth.models.decoder import Decoder
from ffasynth.tiling import tiled_decode, tiled_encode
from ffasynth.training import checkpoint as ckpt

# PSNR of a perfect reconstruction is infinite; capped here (= an MSE floor of 1e-12) so run.json stays JSON
MAX_DB = 120.0


@torch.no_grad()
def decoder_errors(
    vae: AutoencoderKL, decoder: Decoder | None, images: list[torch.Tensor], tile: int | None = None
) -> dict[str, float]:
    """Mean L1 and mean PSNR (dB) of x vs D(E(x)), both on the [0, 1] intensity scale, over whole FFA
    images (1, H, W) in [-1, 1], padded to the VAE's multiple; `decoder` None = the VAE's own decoder.
    tile: encode and decode in tiles of this many pixels, the encode overlapping by half (as the pipeline's
    source encode, `tiled_encode`; until 2026-12-05 a quarter), the decode by a quarter (an image no larger
    is one piece: the untiled result); None = whole images. Runs on the VAE's device."""
    factor = downsampling_factor(vae.config)
    device = next(vae.parameters()).device if isinstance(vae, torch.nn.Module) else torch.device("cpu")
    decode = decoder if decoder is not None else (lambda z: vae.decode(z / vae.config.scaling_factor).sample)
    l1, psnr = [], []
    for image in images:
        image = image.to(device)
        size = [-(-side // factor) * factor for side in image.shape[-2:]]
        padded = pad_to(image, *size)[None]
        if tile is None:
            decoded = decode(encode_latents(vae, padded))
        else:
            latents = tiled_encode(lambda x: encode_latents(vae, x), padded, tile, None, factor)
            latent_tile = max(1, tile // factor)
            decoded = tiled_decode(decode, latents, latent_tile, latent_tile // 4, factor)
        inside = pad_to(torch.ones_like(image, dtype=torch.bool), *size)  # where the padding put the image
        grey = (from_vae_output(decoded.float()).clamp(-1, 1)[0][inside].view_as(image)[None] + 1) / 2
        real = (image[None] + 1) / 2
        l1.append((grey - real).abs().mean().item())
        psnr.append(min(paired_scores(real[0], grey[0], metrics=("psnr",))["psnr"], MAX_DB))
    return {"l1": sum(l1) / len(l1), "db": sum(psnr) / len(psnr)}


def first_angiograms(pairs: list[Pair], count: int, max_pixels: int | None = None) -> list[torch.Tensor]:
    """The targets of the first `count` pairs that read, (1, H, W) in [-1, 1]: only those are decoded
    (a large test split is not), and an unreadable file is passed over rather than ending the report."""
    images = []
    for pair in pairs:
        if len(images) == count:
            break
        try:
            images.append(normalise(read_image(pair.target, channels=1, max_pixels=max_pixels)))
        except ImageReadError:
            continue
    return images


def reconstruction_report(
    run_dir: Path,
    data_dir: Path,
    data: DataConfig,
    original_vae: AutoencoderKL,
    decoder: Decoder,
    max_images: int = 4,
    tile: int | None = None,
) -> dict:
    """Decoder L1 and PSNR of up to `max_images` real FFA of DATA's test split (its training pairs when
    it has none; "split" says which) with the original VAE vs the fine-tuned `decoder`, whose weights
    are taken from the run's newest complete checkpoint (its EMA copy when kept); on the decoder's
    device, in float32, in tiles of `tile` pixels (None: whole images). Stored in run.json."""
    folder = run_folder.split_dir(data_dir, "test")
    split = "train" if folder == run_folder.split_dir(data_dir, "train") else "test"
    images = first_angiograms(load_pairs(folder, data.layout, data.phase, data.max_pixels), max_images, data.max_pixels)
    if not images:
        raise PairError(f"{folder}: no readable angiogram for the decoder reconstruction report")
    device = next(decoder.parameters()).device
    original_vae = original_vae.to(device).float()
    tuned = copy.deepcopy(decoder).float()
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        ckpt.load_weights(latest, "decoder", tuned, ema=True)
    # the encoder is frozen in stage 2: the original VAE's encoder gives the fine-tuned decoder its latents
    before = decoder_errors(original_vae, None, images, tile)
    after = decoder_errors(original_vae, tuned.eval(), images, tile)
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
