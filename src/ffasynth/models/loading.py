"""Load real weights: an SD1.5 diffusers folder, a hub id, or a single-file .safetensors checkpoint
(U-Net + VAE), a VAE folder or `ffasynth train vae` run, and a CLIP vision encoder.

Safetensors only: pickle files (.ckpt/.bin/.pt) are refused, never unpickled. When something is
missing the error says, in one sentence, which file to put where.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ffasynth.config import ModelConfig
from ffasynth.errors import WeightsNotFoundError

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _hub_error(name: str, what: str, error: Exception) -> WeightsNotFoundError:
    cause = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return WeightsNotFoundError(
        f"could not fetch {what} '{name}' from the Hugging Face Hub ({cause}); on a machine with internet run "
        f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here and point the option at that folder"
    )


def _require(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
        hint = (
            f" (found only pickle files {pickles}, which are not loaded: convert them to safetensors)"
            if pickles
            else ""
        )
        raise WeightsNotFoundError(f"{what}: missing {path}; put the {what} weights there as {name}{hint}")
    return path


def _missing(path: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(f"{path} does not exist: give a diffusers folder, a .safetensors file or a hub id")


def load_unet_and_vae(pretrained: str, model: ModelConfig) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """SD1.5 U-Net and VAE from a diffusers folder (unet/, vae/), a hub id, or a single .safetensors file."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return load_single_file(path, model)
    if path.is_dir():
        for sub in ("unet", "vae"):
            _require(path / sub, "config.json", f"the {sub} of {path}")
            _require(path / sub, WEIGHTS, f"the {sub} of {path}")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
        return unet, vae
    if _is_hub_id(pretrained):
        try:
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", use_safetensors=True)
        except Exception as error:  # network, auth, missing repo: all end in the same advice
            raise _hub_error(pretrained, "the model", error) from None
        return unet, vae
    raise _missing(pretrained)


def load_single_file(path: Path, model: ModelConfig) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """An original-format (CompVis/LDM) SD1.5 checkpoint: keys model.diffusion_model.* and
    first_stage_model.*, converted with diffusers' own key mapping onto the shapes in `model`."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ffasynth.models.components import unet_config, vae_config

    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsNotFoundError(
            f"{path} is a pickle checkpoint, which is not loaded (unsafe); convert it to .safetensors"
        )
    try:
        checkpoint = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsNotFoundError(f"{path} is not a readable .safetensors file ({error})") from None
    conv_in = checkpoint.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None or not any(k.startswith("first_stage_model.") for k in checkpoint):
        raise WeightsNotFoundError(
            f"{path} is not a single-file Stable Diffusion checkpoint "
            "(no model.diffusion_model.* / first_stage_model.* keys)"
        )
    unet_args = unet_config(model, in_channels=conv_in.shape[1])
    vae_args = vae_config(model)
    unet = UNet2DConditionModel(**unet_args)
    vae = AutoencoderKL(**vae_args)
    for name, module, state in (
        ("U-Net", unet, convert_ldm_unet_checkpoint(checkpoint, unet_args)),
        ("VAE", vae, convert_ldm_vae_checkpoint(checkpoint, vae_args)),
    ):
        _strict_load(module, state, f"{path}: the {name}")
    return unet, vae


def load_vae(source: str) -> AutoencoderKL:
    """A diffusers VAE folder, a pipeline folder with vae/, a `ffasynth train vae` run, or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                _require(folder, WEIGHTS, f"the VAE in {folder}")
                return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
        raise WeightsNotFoundError(
            f"{path} holds no VAE: expected config.json + {WEIGHTS} there or in {path / 'vae'} "
            "(a finished `ffasynth train vae` run writes them)"
        )
    if _is_hub_id(source):
        try:
            return AutoencoderKL.from_pretrained(source, use_safetensors=True)
        except Exception:
            try:
                return AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True)
            except Exception as error:
                raise _hub_error(source, "the VAE", error) from None
    raise _missing(source)


def load_image_encoder(source: str) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """CLIP vision tower + projection, e.g. openai/clip-vit-large-patch14 or the image_encoder/ +
    feature_extractor/ of lambdalabs/sd-image-variations-diffusers (the encoder SD image variation uses)."""
    from ffasynth.models.components import clip_processor

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "image_encoder" if (path / "image_encoder" / "config.json").is_file() else path
        _require(folder, "config.json", f"the CLIP image encoder in {folder}")
        _require(folder, "model.safetensors", f"the CLIP image encoder in {folder}")
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True)
        for candidate in (folder, path / "feature_extractor"):
            if (candidate / "preprocessor_config.json").is_file():
                return encoder, CLIPImageProcessor.from_pretrained(candidate)
        return encoder, clip_processor(encoder.config.image_size)
    if _is_hub_id(source):
        errors = []
        for encoder_sub, processor_sub in (("", ""), ("image_encoder", "feature_extractor")):
            try:
                encoder = CLIPVisionModelWithProjection.from_pretrained(
                    source, subfolder=encoder_sub, use_safetensors=True
                )
                return encoder, CLIPImageProcessor.from_pretrained(source, subfolder=processor_sub)
            except Exception as error:
                errors.append(error)
        raise _hub_error(source, "the CLIP image encoder", errors[-1]) from None
    raise _missing(source)


def load_safetensors_into(module: torch.nn.Module, path: Path, what: str) -> None:
    """Strict load of a safetensors state dict, with one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsNotFoundError(f"{what}: missing {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsNotFoundError(f"{path} is corrupt or not a safetensors file ({error})") from None
    _strict_load(module, state, f"{path} for the {what}")


def _strict_load(module: torch.nn.Module, state: dict, what: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise WeightsNotFoundError(f"{what} does not match the model's shapes ({detail[:200]})") from None
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise WeightsNotFoundError(f"{what} does not match the model ({len(bad)} keys differ, e.g. {bad[0]})")


def check_pipeline_folder(folder: Path) -> None:
    """Refuse, in one line naming the file, a pipeline folder whose index or model weights are
    missing, cut short or not safetensors; before diffusers' loader, whose errors span many lines."""
    import json

    from safetensors import SafetensorError, safe_open

    index_path = Path(folder) / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise WeightsNotFoundError(f"{index_path}: not a readable pipeline index ({error})") from None
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[:1] == [None]:
            continue
        component = Path(folder) / name
        if not component.is_dir():
            raise WeightsNotFoundError(f"{component}: missing; the pipeline index lists {name} ({'.'.join(spec)})")
        if not (component / "config.json").is_file():
            continue  # no weights: a scheduler or an image processor
        weights = sorted(component.glob("*.safetensors"))
        if not weights:
            expected = component / ("model.safetensors" if spec[0] == "transformers" else WEIGHTS)
            raise WeightsNotFoundError(f"{expected}: missing (the {name} weights); export the pipeline again")
        for path in weights:
            try:
                with safe_open(str(path), "pt"):
                    pass
            except (SafetensorError, OSError) as error:
                cause = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise WeightsNotFoundError(f"{path}: corrupt or cut short ({cause}); export it again") from None
