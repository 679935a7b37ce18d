"""A weights folder is untrusted input. Before anything in it is imported or loaded, a pipeline folder
(`ffasynth export`'s output, read by translate, serve, clinical and FFASynthesisPipeline.from_pretrained)
and an SD1.5 base folder (model.pretrained) are checked, each refusal one line naming the key or file:

- model_index.json names only this pipeline's components, each with its library and class, and
  settings of the right kind (diffusers' loader imports whatever library an index names: `["os",
  "system"]` would import os); a base folder's index must name the U-Net and VAE classes we build,
  and its other components (text encoder, tokenizer, safety checker...) are accepted, never imported;
- no symlink leads out of the folder (except into a Hugging Face cache's blobs/, where
  `hf download` keeps the files a snapshot links to);
- no pickle weights (.bin/.pt/.pth/.ckpt/.pkl), no code (.py), no weights file nobody reads;
- each model's safetensors header parses, and its tensor names and shapes are those its config.json
  describes: the model is built from the config on the meta device (no memory, no values) and the
  two are compared before a tensor is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ffasynth.errors import WeightsNotFoundError
from ffasynth.integrity import DamagedFileError, safetensors_header
from ffasynth.models.lora import ADAPTER_FOLDER
from ffasynth.models.lora import WEIGHTS as LORA_WEIGHTS
from ffasynth.models.preview_decoder import PreviewDecoder

PIPELINE_CLASS = "FFASynthesisPipeline"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
WEIGHT_SUFFIXES = {".safetensors", ".onnx", ".msgpack", ".h5", ".gguf", ".npz", ".npy"}
# the swappable SD-family samplers, and the LCM sampler of a distilled (`train distill`) pipeline
SCHEDULERS = {scheduler.name for scheduler in KarrasDiffusionSchedulers} | {"LCMScheduler"}

# The components and settings of ffasynth.pipeline.FFASynthesisPipeline (a test keeps them equal to its
# __init__): component → (library, classes allowed, required).
COMPONENTS = {
    "vae": ("diffusers", {"AutoencoderKL"}, True),
    "unet": ("diffusers", {"UNet2DConditionModel"}, True),
    "scheduler": ("diffusers", SCHEDULERS, True),
    "image_encoder": ("transformers", {"CLIPVisionModelWithProjection"}, False),
    "image_processor": ("transformers", {"CLIPImageProcessor", "CLIPImageProcessorFast"}, False),
    "projection": ("ffasynth.pipeline", {"TokenProjection"}, False),
    "preview_decoder": ("ffasynth.models.preview_decoder", {"PreviewDecoder"}, False),
}
SETTINGS = {
    "use_clip": bool,
    "use_concat": bool,
    "clip_tokens": ("embed", "patches"),
    "num_phases": int,
    "prediction_type": ("epsilon", "v_prediction"),
    "tile_size": int,
    "image_guidance_scale": float,
    "clip_view": ("whole", "tile"),
    "num_inference_steps": int,
    "guidance_input": bool,
    "fov_threshold": float,
}
# float settings with bounds, [low, high), and what the number is (NaN is outside any)
RANGES = {"fov_threshold": (0.0, 1.0, "an image brightness")}
# LoRA adapters exported apart from the U-Net (peft's settings in the file's header): read by diffusers'
# LoRA loader, so only the header is checked here
ADAPTERS = {ADAPTER_FOLDER: LORA_WEIGHTS}
PRIVATE_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_ignore_files"}
BASE_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}  # what a base folder gives us
MODEL_CLASSES = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "PreviewDecoder": PreviewDecoder,
}


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightsNotFoundError(f"{path}: not a readable {what} ({error})") from None
    if not isinstance(value, dict):
        raise WeightsNotFoundError(f"{path}: not a {what} (a JSON object is expected)")
    return value


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_entry(spec) -> bool:
    return isinstance(spec, list) and len(spec) == 2 and all(s is None or isinstance(s, str) for s in spec)


def _setting_problem(name: str, value) -> str | None:
    kind = SETTINGS[name]
    if isinstance(kind, tuple):
        return None if value in kind else f"one of {', '.join(kind)}"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and name in RANGES:  # fov_threshold: NaN or >= 1 would black out every output, < 0 none of it
            low, high, what = RANGES[name]
            if not (low <= value < high):
                return f"a number in [{low:g}, {high:g}) ({what})"
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    return None if ok else f"a {kind.__name__}"


def check_model_index(index_path: Path) -> dict[str, tuple[str, str]]:
    """The components a pipeline index names {name: (library, class)}, after checking every key of it
    against FFASynthesisPipeline's components and settings; nothing is imported."""
    index = _read_json(index_path, "pipeline index")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise WeightsNotFoundError(
            f"{index_path}: _class_name is {_shown(index.get('_class_name'))}, not {PIPELINE_CLASS!r}: "
            "not an ffasynth pipeline"
        )
    components = {}
    for key, value in index.items():
        where = f"{index_path}: {key}"
        if key.startswith("_"):
            if key not in PRIVATE_KEYS:
                raise WeightsNotFoundError(f"{where}: an unknown key (known: {', '.join(sorted(PRIVATE_KEYS))})")
        elif key in COMPONENTS:
            library, classes, required = COMPONENTS[key]
            if value == [None, None] and not required:
                continue
            if not _is_entry(value) or value[0] != library or value[1] not in classes:
                allowed = f'["{library}", CLASS] with CLASS one of {", ".join(sorted(classes))}'
                raise WeightsNotFoundError(f"{where} is {_shown(value)}; this pipeline loads it only as {allowed}")
            components[key] = (value[0], value[1])
        elif key in SETTINGS:
            expected = _setting_problem(key, value)
            if expected:
                raise WeightsNotFoundError(f"{where} is {_shown(value)}; it must be {expected}")
        else:
            known = ", ".join(list(COMPONENTS) + list(SETTINGS))
            raise WeightsNotFoundError(f"{where}: not a component or setting of this pipeline (known: {known})")
    missing = [name for name, (_, _, required) in COMPONENTS.items() if required and name not in components]
    if missing:
        raise WeightsNotFoundError(f"{index_path}: lists no {missing[0]}, which every ffasynth pipeline has")
    return components


def check_base_index(index_path: Path) -> None:
    """An SD1.5 folder's model_index.json, when there is one: its U-Net and VAE are the classes we
    build; what else it lists is never loaded, so any well-formed entry is accepted."""
    if not index_path.is_file():
        return
    index = _read_json(index_path, "pipeline index")
    for name, expected in BASE_COMPONENTS.items():
        value = index.get(name)
        if value is not None and value != ["diffusers", expected]:
            raise WeightsNotFoundError(
                f"{index_path}: {name} is {_shown(value)}; the U-Net and VAE are loaded only as "
                f'["diffusers", "{expected}"]'
            )


def _link_problem(path: Path, root: Path) -> str | None:
    try:
        target = path.resolve(strict=False)
    except (OSError, RuntimeError) as error:  # a loop of links
        return f"{path}: a symlink that cannot be followed ({error})"
    # a Hugging Face cache keeps each file once, as …/models--X/blobs/HASH, and links snapshots to it
    hub_blob = target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
    if target == root or root in target.parents or hub_blob:
        return None
    return f"{path}: a symlink to {target}, outside {root}; copy the file in instead of linking it"


def check_links(folder: Path, paths=None) -> None:
    """Refuse a symlink under FOLDER (or among `paths`) that leads outside it."""
    root = folder.resolve()
    if paths is None:
        paths = []
        for top, dirs, files in os.walk(folder):  # links to folders are listed, never entered
            paths += [Path(top) / name for name in dirs + files]
    for path in paths:
        if path.is_symlink():
            problem = _link_problem(path, root)
            if problem:
                raise WeightsNotFoundError(problem)


def _expected_weights(component: Path, library: str) -> set[Path]:
    """The weights files a component reads: one safetensors file, or a sharded set and its index."""
    single = component / (TRANSFORMERS_WEIGHTS if library == "transformers" else DIFFUSERS_WEIGHTS)
    index = single.with_name(single.name + ".index.json")
    if index.is_file():
        shards = _read_json(index, "weights index").get("weight_map", {})
        return {index} | {component / str(name) for name in set(shards.values())}
    return {single}


def check_files(folder: Path, expected: set[Path]) -> None:
    """Refuse pickles, code, and any weights file under FOLDER but those `expected`."""
    for top, _, files in os.walk(folder):
        for name in sorted(files):
            path = Path(top) / name
            suffix = path.suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                raise WeightsNotFoundError(
                    f"{path}: pickle weights are never loaded (unpickling can run code); convert them to "
                    ".safetensors, or export the pipeline again"
                )
            if suffix == ".py":
                raise WeightsNotFoundError(f"{path}: code in a pipeline folder is never run; remove it")
            weights = suffix in WEIGHT_SUFFIXES or name.endswith(".safetensors.index.json")
            if weights and path not in expected:
                raise WeightsNotFoundError(
                    f"{path}: a weights file this pipeline does not use; remove it (each component reads "
                    f"only its {DIFFUSERS_WEIGHTS} or {TRANSFORMERS_WEIGHTS})"
                )


def _config_model(component: Path, class_name: str) -> torch.nn.Module:
    """The model component/config.json describes, built on the meta device (shapes only)."""
    config_path = component / "config.json"
    config = _read_json(config_path, "model config")
    if config.get("_class_name", class_name) != class_name and class_name in MODEL_CLASSES:
        raise WeightsNotFoundError(f"{config_path}: describes a {config['_class_name']}, not a {class_name}")
    try:
        with torch.device("meta"):
            if class_name == "TokenProjection":  # ffasynth.pipeline.TokenProjection: one nn.Linear(in, out)
                return torch.nn.ModuleDict({"linear": torch.nn.Linear(config["in_features"], config["out_features"])})
            if class_name == "CLIPVisionModelWithProjection":
                return CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(str(component)))
            return MODEL_CLASSES[class_name].from_config(config)
    except Exception as error:  # any value the model's constructor cannot take
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise WeightsNotFoundError(f"{config_path}: does not describe a {class_name} ({cause})") from None


def header_shapes(files: set[Path], remedy: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers of `files`; a missing or damaged file is one
    WeightsNotFoundError ending in `remedy` (default: export the pipeline again, or fetch it again)."""
    shapes = {}
    for path in sorted(p for p in files if p.name.endswith(".safetensors")):
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{path}: missing (the {path.parent.name} weights); {remedy or 'export the pipeline again'}"
            )
        try:
            shapes.update({name: shape for name, (_, shape) in safetensors_header(path).items()})
        except DamagedFileError as error:
            raise WeightsNotFoundError(
                f"{path}: corrupt ({error}); {remedy or 'export it again or fetch it again'}"
            ) from None
    return shapes


def check_weights_match_config(component: Path, class_name: str, weights: set[Path]) -> None:
    """Refuse, before a tensor is read, weights whose names or shapes differ from their config's model."""
    found = header_shapes(weights)
    model = _config_model(component, class_name)
    if isinstance(model, ModelMixin):  # names older diffusers wrote (attention query → to_q...), renamed on load
        found = model._fix_state_dict_keys_on_load(found)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    where = sorted(p for p in weights if p.name.endswith(".safetensors"))[0]
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != shape:
            raise WeightsNotFoundError(
                f"{where}: {name} is {list(found[name])} but {component / 'config.json'} implies {list(shape)}; "
                "the config and the weights are of different models"
            )
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = [f"lacks {len(missing)} of its weights (e.g. {missing[0]})"] if missing else []
        parts += [f"holds {len(unexpected)} tensors it does not describe (e.g. {unexpected[0]})"] if unexpected else []
        raise WeightsNotFoundError(f"{where} does not match {component / 'config.json'}: it {' and '.join(parts)}")


def check_pipeline_folder(folder: Path) -> None:
    """Everything above for a pipeline folder, in one line naming the key or file, before diffusers'
    loader (which imports what the index names, and whose errors span many lines)."""
    folder = Path(folder)
    components = check_model_index(folder / "model_index.json")
    check_links(folder)
    expected: dict[str, set[Path]] = {}
    for name, (library, _) in components.items():
        component = folder / name
        if not component.is_dir():
            raise WeightsNotFoundError(f"{component}: missing; the pipeline index lists {name}")
        if (component / "config.json").is_file():  # a model (schedulers and processors have no weights)
            expected[name] = _expected_weights(component, library)
    adapters = {folder / sub / name for sub, name in ADAPTERS.items() if (folder / sub / name).is_file()}
    check_files(folder, set().union(adapters, *expected.values()))
    for name, weights in expected.items():
        check_weights_match_config(folder / name, components[name][1], weights)
    header_shapes(adapters)


def check_base_folder(folder: Path) -> None:
    """An SD1.5 diffusers folder (model.pretrained): its index, when there is one; no link out of the
    folder among what we read; the U-Net's and VAE's weights shaped as their configs say. Its other
    files (text encoder, safety checker, .bin or fp16 copies) are never read, so they may stay."""
    folder = Path(folder)
    check_base_index(folder / "model_index.json")
    for name, class_name in BASE_COMPONENTS.items():
        component = folder / name
        weights = component / DIFFUSERS_WEIGHTS
        check_links(folder, [component, component / "config.json", weights])
        check_weights_match_config(component, class_name, {weights})


def check_model_folder(folder: Path, class_name: str) -> None:
    """One diffusers model folder (config.json + its safetensors), e.g. a VAE: links, then shapes."""
    folder = Path(folder)
    weights = _expected_weights(folder, "diffusers")
    check_links(folder, [folder / "config.json", *weights])
    check_weights_match_config(folder, class_name, weights)
