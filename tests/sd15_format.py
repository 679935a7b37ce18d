"""Folders in the exact on-disk layouts of the weights the SD1.5 path is documented with, holding
random values at reduced widths, so tests run the real loading code on CPU in seconds.

- `write_sd15_folder`: stable-diffusion-v1-5/stable-diffusion-v1-5 (diffusers layout: model_index.json,
  unet/, vae/, scheduler/), SD1.5's block structure and config files, narrower channels.
- `write_openai_clip_folder`: openai/clip-vit-large-patch14 (a whole CLIPModel: text + vision towers,
  config.json in that repo's form, model.safetensors, preprocessor_config.json), narrower towers but
  the real 224² input, 14-pixel patches and 768-d projection.
- `write_image_variations_encoder`: lambdalabs/sd-image-variations-diffusers' image_encoder/ (only a
  pickled pytorch_model.bin, as on its main revision) and feature_extractor/.

The config.json files are written as the real repositories hold them (older library versions, fewer
keys), after the weights, so loading fills the defaults exactly as it does for the real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Channel widths every level of the reduced U-Net and VAE uses (SD1.5: 320/640/1280/1280 and 128/256/512/512).
UNET_CHANNELS = (32, 32, 64, 64)
VAE_CHANNELS = (32, 32, 64, 64)
CLIP_HIDDEN = 32  # ViT-L/14: 1024 (vision), 768 (text)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The preprocessor_config.json of openai/clip-vit-large-patch14 and of the image-variation repo's feature_extractor/.
CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "resample": 3,
    "size": 224,
}

SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def sd15_unet_config(channels: tuple[int, ...] = UNET_CHANNELS, layers_per_block: int = 2) -> dict:
    """SD1.5's unet/config.json with other widths (attention_head_dim 8 is its number of heads)."""
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": list(channels),
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


def sd15_vae_config(channels: tuple[int, ...] = VAE_CHANNELS, layers_per_block: int = 2) -> dict:
    """SD1.5's vae/config.json with other widths: no scaling_factor key, so diffusers' default 0.18215 applies."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": list(channels),
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": layers_per_block,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def _write_json(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2) + "\n")


def _save_diffusers_model(model: torch.nn.Module, folder: Path, config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)


def write_sd15_folder(path: str | Path, seed: int = 0, layers_per_block: int = 2) -> Path:
    """A stable-diffusion-v1-5 diffusers folder (model_index.json, unet/, vae/, scheduler/) with
    SD1.5's blocks, 4 latent channels, cross-attention width 768, VAE downsampling 8 and scaling
    0.18215, random values at widths UNET_CHANNELS / VAE_CHANNELS. No text encoder or tokenizer:
    ffasynth never reads them (the index lists them, as the real one does)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(path)
    torch.manual_seed(seed)
    unet_config = sd15_unet_config(layers_per_block=layers_per_block)
    vae_config = sd15_vae_config(layers_per_block=layers_per_block)
    _save_diffusers_model(UNet2DConditionModel.from_config(unet_config), folder / "unet", unet_config)
    _save_diffusers_model(AutoencoderKL.from_config(vae_config), folder / "vae", vae_config)
    _write_json(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    _write_json(folder / "model_index.json", SD15_MODEL_INDEX)
    return folder


# Keys every config of transformers 4.1x dumped into each sub-config (generation defaults and the like).
_LEGACY_KEYS = {
    "add_cross_attention": False,
    "architectures": None,
    "bad_words_ids": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tie_encoder_decoder": False,
    "tie_word_embeddings": True,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": None,
    "torchscript": False,
    "transformers_version": "4.16.0.dev0",
    "use_bfloat16": False,
}

_CLIP_SHAPE = {"hidden_size": CLIP_HIDDEN, "intermediate_size": 4 * CLIP_HIDDEN, "num_attention_heads": 4}


# The vision tower's config keys both real repositories write (ViT-L/14's, at the reduced depth).
_VISION_TOWER = {
    "hidden_act": "quick_gelu",
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_channels": 3,
    "num_hidden_layers": 2,
}


def openai_clip_config(vision_projection_dim: bool = True) -> dict:
    """config.json of openai/clip-vit-large-patch14 (a CLIPModel, transformers 4.16 form) at reduced
    widths. vision_projection_dim=False leaves projection_dim out of vision_config, as CLIP-L configs
    of that era (e.g. SD's safety checker) do: only the top level then says 768."""
    text = {
        **_LEGACY_KEYS,
        **_CLIP_SHAPE,
        "_name_or_path": "",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408,
    }
    vision = {
        **_LEGACY_KEYS,
        **_CLIP_SHAPE,
        "_name_or_path": "",
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dropout": 0.0,
        "eos_token_id": None,
        **_VISION_TOWER,
        "pad_token_id": None,
        "patch_size": 14,
        "projection_dim": 768,
    }
    if not vision_projection_dim:
        del vision["projection_dim"]
    return {
        "_name_or_path": "clip-vit-large-patch14/",
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": text,
        "text_config_dict": {**_CLIP_SHAPE, "num_hidden_layers": 2, "projection_dim": 768},
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": vision,
        "vision_config_dict": {**_CLIP_SHAPE, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 768},
    }


def openai_clip_model(seed: int):
    """A whole CLIPModel (text + vision, 768-d projections) of the reduced shape, seeded."""
    from transformers import CLIPConfig, CLIPModel

    text = {**_CLIP_SHAPE, "num_hidden_layers": 2, "hidden_act": "quick_gelu", "projection_dim": 768}
    vision = {**text, "image_size": 224, "patch_size": 14}
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()


def write_openai_clip_folder(path: str | Path, seed: int = 0, vision_projection_dim: bool = True) -> Path:
    """openai/clip-vit-large-patch14's folder: config.json (model_type "clip"), model.safetensors with
    text_model.*, vision_model.*, text_projection, visual_projection, logit_scale, and
    preprocessor_config.json; towers CLIP_HIDDEN wide, 224² input, 14-pixel patches, 768-d projections."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in openai_clip_model(seed).state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", openai_clip_config(vision_projection_dim))
    _write_json(folder / "preprocessor_config.json", CLIP_PREPROCESSOR)
    return folder


def image_variations_encoder_config() -> dict:
    """image_encoder/config.json of lambdalabs/sd-image-variations-diffusers (transformers 4.25 form), reduced."""
    return {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPVisionModelWithProjection"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        **_CLIP_SHAPE,
        **_VISION_TOWER,
        "patch_size": 14,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
    }


def image_variations_encoder(seed: int = 0):
    """The CLIPVisionModelWithProjection that write_image_variations_encoder(seed) stores."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**image_variations_encoder_config())).eval()


def write_image_variations_encoder(path: str | Path, seed: int = 0) -> Path:
    """lambdalabs/sd-image-variations-diffusers' encoder as on its main revision: image_encoder/ holds
    config.json and only a pickled pytorch_model.bin (with the position_ids buffer transformers 4.25
    still saved), feature_extractor/ the preprocessor config. Returns the repository folder."""
    folder = Path(path)
    encoder = image_variations_encoder(seed)
    state = dict(encoder.state_dict())
    patches = (224 // 14) ** 2
    state["vision_model.embeddings.position_ids"] = torch.arange(patches + 1).unsqueeze(0)
    (folder / "image_encoder").mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "image_encoder" / "pytorch_model.bin")
    _write_json(folder / "image_encoder" / "config.json", image_variations_encoder_config())
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", CLIP_PREPROCESSOR)
    return folder
