"""Load real weights: an SD1.5 diffusers folder, a hub id, or a single-file .safetensors checkpoint
(U-Net + VAE), a VAE folder or `ffasynth train vae` run, and a CLIP vision encoder.

Safetensors only: pickle files (.ckpt/.bin/.pt) are refused, never unpickled; the one way in for a
CLIP encoder kept as pytorch_model.bin is `convert_clip_checkpoint` (`ffasynth weights convert-clip`),
which reads tensors only. When something is missing the error says, in one sentence, which file to
put where.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import urllib.parse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, PretrainedConfig

from ffasynth.config import ModelConfig
from ffasynth.errors import WeightsNotFoundError
from ffasynth.files import atomic_folder
from ffasynth.models.architecture import clip_processor, unet_config, vae_config
from ffasynth.models.folders import DIFFUSERS_WEIGHTS as WEIGHTS
from ffasynth.models.folders import PICKLE_SUFFIXES, check_base_folder, check_model_folder, header_shapes


def _is_hub_id(name: str) -> bool:
    """owner/name that is no local path; a missing `models/x.safetensors` is a missing file, not a repository."""
    if Path(name).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}:
        return False
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


@functools.cache
def hub_unreachable() -> str | None:
    """None when the Hub's host answers within 3 s; else why not, and from then on hub ids are looked up in the
    local Hugging Face cache only (huggingface_hub's offline mode): at once, not after 5 retries over 30 s."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return "offline mode (HF_HUB_OFFLINE)"
    host = urllib.parse.urlsplit(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return None
    except OSError as error:
        hub.HF_HUB_OFFLINE = True  # read at each call (huggingface_hub.constants.is_offline_mode)
        return f"no connection to {host}: {error.strerror or error}"


def _hub_error(name: str, what: str, error: Exception) -> WeightsNotFoundError:
    cause = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    if unreachable := hub_unreachable():
        cause = f"{unreachable}, and not in the local Hugging Face cache"
    if Path(name).parent.is_dir():  # `weights/sd15` with weights/ here: most likely a local path gone wrong
        return WeightsNotFoundError(
            f"{name} does not exist (relative to {Path.cwd()}), and as a Hugging Face Hub id it could not be "
            f"fetched either ({cause}): give the downloaded folder, a .safetensors file or a hub id"
        )
    return WeightsNotFoundError(
        f"could not fetch {what} '{name}' from the Hugging Face Hub ({cause}); on a machine with internet run "
        f"`hf download {name} --local-dir DIR`, copy DIR here and point the option at that folder"
    )


def _require(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        pickles = [n for n in present if Path(n).suffix in PICKLE_SUFFIXES]
        variants = [n for n in present if n != name and n.endswith(".safetensors") and n.startswith(name.split(".")[0])]
        hint = ""
        if variants:  # e.g. a download of the fp16 variant only: diffusion_pytorch_model.fp16.safetensors
            hint = f" (found {variants[0]}: rename it to {name}, or download the full-precision files)"
        elif pickles:
            hint = f" (found only pickle files {pickles}, which are not loaded: convert them to safetensors)"
        raise WeightsNotFoundError(f"{what}: missing {path}; put that file there{hint}")
    return path


def _missing(path: str) -> WeightsNotFoundError:
    where = f" (relative to {Path.cwd()})" if not Path(path).expanduser().is_absolute() else ""
    return WeightsNotFoundError(
        f"{path} does not exist{where}: give a diffusers folder, a .safetensors file or a hub id"
    )


def load_unet_and_vae(pretrained: str, model: ModelConfig) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """SD1.5 U-Net and VAE from a diffusers folder (unet/, vae/), a hub id, or a single .safetensors file."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return load_single_file(path, model)
    if path.is_dir():
        single = sorted(path.glob("*.safetensors"))
        if single and not (path / "unet").is_dir():  # the single file's folder given instead of the file
            raise WeightsNotFoundError(
                f"{path} is not a diffusers folder (no unet/, vae/) but holds {single[0].name}: give that file, "
                f"model.pretrained={single[0]}"
            )
        for sub in ("unet", "vae"):
            _require(path / sub, "config.json", f"the {sub} of {path}")
            _require(path / sub, WEIGHTS, f"the {sub} of {path}")
        check_base_folder(path)  # its index, links and shapes, before diffusers reads a tensor
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
        return unet, vae
    if _is_hub_id(pretrained):
        hub_unreachable()
        try:
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", use_safetensors=True)
        except Exception as error:  # network, auth, missing repo: all end in the same advice
            raise _hub_error(pretrained, "the model", error) from None
        return unet, vae
    raise _missing(pretrained)


LDM_PARTS = ("model.diffusion_model.", "first_stage_model.")  # a single file's U-Net and VAE keys


def load_single_file(path: Path, model: ModelConfig) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """An original-format (CompVis/LDM) SD1.5 checkpoint: keys model.diffusion_model.* and
    first_stage_model.*, converted with diffusers' own key mapping onto the shapes in `model`."""
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsNotFoundError(
            f"{path} is a pickle checkpoint, which is not loaded (unsafe); convert it to .safetensors"
        )
    try:  # the U-Net's and VAE's tensors alone: the text encoder (and an EMA copy) stay on disk
        with safe_open(str(path), framework="pt") as file:
            checkpoint = {k: file.get_tensor(k) for k in file.keys() if k.startswith(LDM_PARTS)}  # noqa: SIM118
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
    with torch.device("meta"):  # shapes only: the file's values are assigned, not copied over random ones
        unet = UNet2DConditionModel(**unet_args)
        vae = AutoencoderKL(**vae_args)
    for name, module, state in (
        ("U-Net", unet, convert_ldm_unet_checkpoint(checkpoint, unet_args)),
        ("VAE", vae, convert_ldm_vae_checkpoint(checkpoint, vae_args)),
    ):
        _strict_load(module, state, f"{path}: the {name}", assign=True)
    return unet, vae


def load_vae(source: str) -> AutoencoderKL:
    """A diffusers VAE folder, a pipeline folder with vae/, a `ffasynth train vae` run, or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                _require(folder, WEIGHTS, f"the VAE in {folder}")
                check_model_folder(folder, "AutoencoderKL")
                return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
        raise WeightsNotFoundError(
            f"{path} holds no VAE: expected config.json + {WEIGHTS} there or in {path / 'vae'} "
            "(a finished `ffasynth train vae` run writes them)"
        )
    if path.is_file():  # a VAE is a folder (config + weights), not one file
        raise WeightsNotFoundError(f"{path} is a file: give the VAE's folder (config.json + {WEIGHTS}) or a hub id")
    if _is_hub_id(source):
        hub_unreachable()
        try:
            return AutoencoderKL.from_pretrained(source, use_safetensors=True)
        except Exception:
            try:
                return AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True)
            except Exception as error:
                raise _hub_error(source, "the VAE", error) from None
    raise _missing(source)


CLIP_WEIGHTS = "model.safetensors"
CONVERT_CLIP = "ffasynth weights convert-clip"


def load_image_encoder(source: str) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """CLIP vision tower + projection: a folder or hub id holding a whole CLIPModel
    (openai/clip-vit-large-patch14: its vision_model.* and visual_projection, 768-d, the embedding SD
    image variation uses; the text tower is not read) or a CLIPVisionModelWithProjection, directly or
    in image_encoder/ (+ feature_extractor/). An encoder kept only as pytorch_model.bin is refused,
    naming `ffasynth weights convert-clip`, which converts it once."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "image_encoder" if (path / "image_encoder" / "config.json").is_file() else path
        _require(folder, "config.json", f"the CLIP image encoder in {folder}")
        has_safetensors = any((folder / name).is_file() for name in (CLIP_WEIGHTS, CLIP_WEIGHTS + ".index.json"))
        if not has_safetensors and (folder / "pytorch_model.bin").is_file():
            raise WeightsNotFoundError(
                f"the CLIP image encoder in {folder} is only a pickle file (pytorch_model.bin), which is not "
                f"loaded (unpickling can run code): convert it once with `{CONVERT_CLIP} {path} --out DIR` "
                "and set model.image_encoder=DIR"
            )
        if not has_safetensors:
            _require(folder, CLIP_WEIGHTS, f"the CLIP image encoder in {folder}")
        header_shapes(_clip_weight_files(folder), "fetch it again")  # a cut-short download: one line, first
        try:
            encoder = _clip_vision_model(str(folder), "", str(folder))
            for candidate in (folder, path / "feature_extractor"):
                if (candidate / "preprocessor_config.json").is_file():
                    return encoder, CLIPImageProcessor.from_pretrained(candidate)
        except (OSError, ValueError, SafetensorError) as error:  # a damaged config.json or preprocessor file
            raise WeightsNotFoundError(
                f"the CLIP image encoder in {folder} cannot be read ({_first_line(error)}); fetch it again"
            ) from None
        return encoder, clip_processor(encoder.config.image_size)
    if _is_hub_id(source):
        hub_unreachable()
        errors = []
        for encoder_sub, processor_sub in (("", ""), ("image_encoder", "feature_extractor")):
            try:
                encoder = _clip_vision_model(source, encoder_sub, f"{source}/{encoder_sub}".rstrip("/"))
                return encoder, CLIPImageProcessor.from_pretrained(source, subfolder=processor_sub)
            except WeightsNotFoundError:
                raise
            except Exception as error:
                errors.append(error)
        # transformers' words when the repository answered but holds no model.safetensors (not when offline)
        if any(f"does not appear to have a file named {CLIP_WEIGHTS}" in str(error) for error in errors):
            raise WeightsNotFoundError(
                f"'{source}' holds its CLIP image encoder only as a pickle file (pytorch_model.bin), which is "
                f"not loaded: run `hf download {source} --local-dir DIR`, then "
                f"`{CONVERT_CLIP} DIR --out CLIPDIR` and set model.image_encoder=CLIPDIR "
                "(or use openai/clip-vit-large-patch14, which has model.safetensors)"
            ) from None
        raise _hub_error(source, "the CLIP image encoder", errors[-1]) from None
    raise _missing(source)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _clip_weight_files(folder: Path) -> set[Path]:
    """model.safetensors, or the shards its index names (file names only: nothing outside the folder)."""
    index = folder / (CLIP_WEIGHTS + ".index.json")
    if not index.is_file():
        return {folder / CLIP_WEIGHTS}
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightsNotFoundError(f"{index} is not a readable shard index ({error}); fetch it again") from None
    if not all(isinstance(name, str) and Path(name).name == name for name in names):
        raise WeightsNotFoundError(f"{index} names files outside {folder}; fetch it again")
    return {folder / name for name in names}


def clip_vision_config(source: str, subfolder: str = "") -> CLIPVisionConfig:
    """The vision config of a CLIPVisionModelWithProjection or of a whole CLIPModel. A CLIPModel keeps
    the projection width at its top level (its visual_projection is hidden → projection_dim); some
    vision_config dicts lack it, and transformers then builds its default 512-d projection."""
    raw, _ = PretrainedConfig.get_config_dict(source, subfolder=subfolder)
    config = CLIPVisionConfig.from_pretrained(source, subfolder=subfolder)
    if raw.get("model_type") == "clip" and raw.get("projection_dim"):
        config.projection_dim = raw["projection_dim"]
    return config


def _clip_vision_model(source: str, subfolder: str, where: str) -> CLIPVisionModelWithProjection:
    """Safetensors only; vision weights that are missing or of another shape are refused, never left
    at random values (keys of a text tower are ignored)."""
    config = clip_vision_config(source, subfolder)
    encoder, info = CLIPVisionModelWithProjection.from_pretrained(
        source,
        subfolder=subfolder,
        config=config,
        use_safetensors=True,
        dtype=torch.float32,  # as the U-Net and VAE load: an fp16 file stays fp16 otherwise (transformers 5)
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below in one line, not as a multi-line table
    )
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", [])]
    bad = list(info.get("missing_keys", [])) + [str(k) for k in mismatched]
    if bad:
        raise WeightsNotFoundError(
            f"the CLIP image encoder in {where} does not match its config.json ({len(bad)} vision weights "
            f"missing or of another shape, e.g. {sorted(bad)[0]})"
        )
    return encoder


def convert_clip_checkpoint(source: str | Path, out: str | Path) -> Path:
    """A CLIP vision encoder kept as pytorch_model.bin (e.g. lambdalabs/sd-image-variations-diffusers'
    image_encoder/) → `out` with model.safetensors + config.json + preprocessor_config.json, which
    load_image_encoder reads. `source` is the repository folder, its image_encoder/, or the .bin.

    The .bin is read with torch.load(weights_only=True): tensors and plain containers only, so a
    pickle that would run code is refused, not executed. `out` is written whole or not at all."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if source.is_file():
        folder, weights = source.parent, source
    else:
        folder = source / "image_encoder" if (source / "image_encoder" / "config.json").is_file() else source
        weights = _require(folder, "pytorch_model.bin", f"the CLIP image encoder in {folder}")
    _require(folder, "config.json", f"the CLIP image encoder in {folder}")
    if out.exists() and any(out.iterdir()):
        raise WeightsNotFoundError(f"{out} already exists and is not empty: give a new folder for --out")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, OSError...: any failure refuses the file
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # torch's message opens with a paragraph on its defaults; the line that names the culprit is later
        cause = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])[:160]
        raise WeightsNotFoundError(
            f"{weights} is not a plain tensor state dict, refused without running it ({cause})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsNotFoundError(f"{weights} holds {type(state).__name__}, not a state dict of tensors")
    try:
        config = clip_vision_config(str(folder))
    except (OSError, ValueError) as error:
        raise WeightsNotFoundError(f"{folder / 'config.json'} cannot be read ({_first_line(error)})") from None
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    encoder = CLIPVisionModelWithProjection(config).to(floats[0] if floats else torch.float32)
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise WeightsNotFoundError(f"{weights} does not match {folder / 'config.json'} ({detail[:400]})") from None
    # unexpected keys are a text tower (a whole CLIPModel) or buffers older transformers saved (position_ids)
    if result.missing_keys:
        raise WeightsNotFoundError(
            f"{weights} lacks {len(result.missing_keys)} weights of the encoder {folder / 'config.json'} "
            f"describes (e.g. {result.missing_keys[0]})"
        )
    preprocessor = next(
        (p for p in (folder, folder.parent / "feature_extractor") if (p / "preprocessor_config.json").is_file()), None
    )

    def fill(tmp: Path) -> None:
        encoder.save_pretrained(tmp, safe_serialization=True)
        if preprocessor is not None:
            shutil.copyfile(preprocessor / "preprocessor_config.json", tmp / "preprocessor_config.json")
        else:  # no processor shipped: OpenAI CLIP's resize/crop/normalisation at the encoder's input size
            clip_processor(config.image_size).save_pretrained(tmp)

    return atomic_folder(out, fill)


def load_safetensors_into(module: torch.nn.Module, path: Path, what: str) -> None:
    """Strict load of a safetensors state dict, with one-line errors."""
    if not path.is_file():
        raise WeightsNotFoundError(f"{what}: missing {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsNotFoundError(f"{path} is corrupt or not a safetensors file ({error})") from None
    _strict_load(module, state, f"{path} for the {what}")


def _strict_load(module: torch.nn.Module, state: dict, what: str, assign: bool = False) -> None:
    """state into module, every key matched; assign=True for a module built on the meta device: the
    tensors become its parameters, in float32 as a copy into float32 parameters would make them."""
    if assign:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = module.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as error:  # shape mismatches
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise WeightsNotFoundError(f"{what} does not match the model's shapes ({detail[:400]})") from None
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise WeightsNotFoundError(f"{what} does not match the model ({len(bad)} keys differ, e.g. {bad[0]})")
    unset = [name for name, value in module.state_dict(keep_vars=True).items() if value.is_meta]
    if unset:  # a buffer the file does not hold would stay without a value
        raise WeightsNotFoundError(f"{what} leaves {len(unset)} values unset, e.g. {unset[0]}")
