"""The SD1.5 path's weights, in their real on-disk layouts (tests/sd15_format.py): the default CLIP
encoder loads as the 768-d image embedding, a .bin-only encoder is refused and converted once, safely,
and a config that names no weights is refused instead of training from random values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.config import load_config
from ffasynth.errors import ConfigError, WeightsNotFoundError
from ffasynth.models import loading
from ffasynth.models.components import build_components
from ffasynth.training.stage1 import build_stage1
from tests.sd15_format import (
    image_variations_encoder,
    openai_clip_model,
    sd15_unet_config,
    write_image_variations_encoder,
    write_openai_clip_folder,
    write_sd15_folder,
)

REPO = Path(__file__).resolve().parents[1]
SD15_YAML = REPO / "configs" / "sd15.yaml"
CONVERT = "ffasynth weights convert-clip"


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vision_projection_dim", [True, False])
def test_openai_clip_folder_loads_as_the_768d_projected_image_embedding(tmp_path, vision_projection_dim):
    folder = write_openai_clip_folder(tmp_path / "clip-vit-large-patch14", vision_projection_dim=vision_projection_dim)
    encoder, processor = loading.load_image_encoder(str(folder))
    assert encoder.config.projection_dim == 768 and encoder.visual_projection.weight.shape == (768, 32)
    assert (encoder.config.image_size, encoder.config.patch_size) == (224, 14)
    assert processor.crop_size["height"] == 224 and processor.image_mean[0] == pytest.approx(0.48145466)
    # the same vector CLIPModel.get_image_features gives: vision tower → pooled CLS → visual_projection
    whole = openai_clip_model(seed=0)
    with torch.no_grad():
        expected = whole.visual_projection(whole.vision_model(pixel_values=_pixels()).pooler_output)
        embeds = encoder(pixel_values=_pixels()).image_embeds
    assert embeds.shape == (2, 768)
    assert torch.allclose(embeds, expected, atol=1e-5)


def test_clip_weights_missing_from_the_vision_tower_are_refused_not_left_random(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_openai_clip_folder(tmp_path / "clip")
    state = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("vision_model.encoder.layers.1.")},
        str(folder / "model.safetensors"),
    )
    with pytest.raises(WeightsNotFoundError, match=r"vision_model\.encoder\.layers\.1\.") as info:
        loading.load_image_encoder(str(folder))
    assert "\n" not in str(info.value)


def test_bin_only_encoder_is_refused_then_converted_once_by_the_cli(tmp_path):
    repo = write_image_variations_encoder(tmp_path / "sd-image-variations-diffusers", seed=3)
    with pytest.raises(WeightsNotFoundError) as info:
        loading.load_image_encoder(str(repo))
    message = str(info.value)
    assert f"`{CONVERT} {repo} --out DIR`" in message and "pytorch_model.bin" in message and "\n" not in message

    out = tmp_path / "clip-image-variations"
    result = CliRunner().invoke(app, ["weights", "convert-clip", str(repo), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"model.image_encoder={out}" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    encoder, processor = loading.load_image_encoder(str(out))
    original = image_variations_encoder(seed=3)
    with torch.no_grad():
        assert torch.equal(encoder(pixel_values=_pixels()).image_embeds, original(pixel_values=_pixels()).image_embeds)
    assert processor.crop_size["height"] == 224

    again = CliRunner().invoke(app, ["weights", "convert-clip", str(repo), "--out", str(out)])
    assert isinstance(again.exception, WeightsNotFoundError) and "not empty" in str(again.exception)


def test_a_hub_encoder_with_only_a_bin_is_refused_with_the_download_and_convert_commands(monkeypatch):
    repo = "lambdalabs/sd-image-variations-diffusers"

    def hub_without_safetensors(source, subfolder, where):  # what transformers raises for such a repo
        raise OSError(
            f"{source} does not appear to have a file named model.safetensors or model.safetensors.index.json"
        )

    monkeypatch.setattr(loading, "_clip_vision_model", hub_without_safetensors)
    with pytest.raises(WeightsNotFoundError) as info:
        loading.load_image_encoder(repo)
    message = str(info.value)
    assert f"hf download {repo} --local-dir DIR" in message and f"{CONVERT} DIR --out" in message
    assert "openai/clip-vit-large-patch14" in message and "\n" not in message

    def offline(source, subfolder, where):  # no answer from the Hub: the plain download advice, no conversion
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {source}/model.safetensors")

    monkeypatch.setattr(loading, "_clip_vision_model", offline)
    with pytest.raises(WeightsNotFoundError, match=f"could not fetch .*hf download {repo}") as info:
        loading.load_image_encoder(repo)
    assert CONVERT not in str(info.value)


class _RunsCode:
    """Unpickling this calls os.makedirs(marker): what a hostile .bin would do with worse code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_bin_that_would_run_code_is_refused_and_never_executed(tmp_path):
    repo = write_image_variations_encoder(tmp_path / "repo")
    marker = tmp_path / "pickle-ran"
    state = dict(image_variations_encoder().state_dict())
    state["vision_model.post_layernorm.weight"] = _RunsCode(marker)
    torch.save(state, repo / "image_encoder" / "pytorch_model.bin")

    with pytest.raises(WeightsNotFoundError, match="convert-clip"):
        loading.load_image_encoder(str(repo))
    result = CliRunner().invoke(app, ["weights", "convert-clip", str(repo), "--out", str(tmp_path / "out")])
    message = str(result.exception)
    assert isinstance(result.exception, WeightsNotFoundError), result.output
    assert "refused without running it" in message and "\n" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"vision_model.x": 1.5}, torch.zeros(3)])
def test_a_bin_that_is_not_a_tensor_state_dict_is_refused(tmp_path, content):
    repo = write_image_variations_encoder(tmp_path / "repo")
    torch.save(content, repo / "image_encoder" / "pytorch_model.bin")
    with pytest.raises(WeightsNotFoundError, match="not a state dict of tensors"):
        loading.convert_clip_checkpoint(repo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sd15_config_names_an_encoder_that_loads_without_conversion():
    config = load_config(SD15_YAML)
    assert config.model.image_encoder == "openai/clip-vit-large-patch14"
    assert not config.model.allow_random_init


@pytest.mark.parametrize(
    ("overrides", "named", "not_named"),
    [
        ([], ["model.pretrained", "model.image_encoder", "model.allow_random_init=true"], []),
        (["model.pretrained=SD"], ["model.image_encoder", "CLIP image encoder"], ["model.pretrained", "VAE"]),
        (["model.image_encoder=CLIP"], ["model.pretrained", "U-Net and VAE"], ["model.image_encoder"]),
        (["model.use_clip=false", "model.vae=VAE"], ["the U-Net,", "model.pretrained"], ["VAE", "image_encoder"]),
    ],
)
def test_sd15_preset_without_weights_is_refused_naming_the_missing_option(overrides, named, not_named):
    with pytest.raises(ConfigError) as info:
        build_components(load_config(preset="sd15", overrides=overrides))
    message = str(info.value)
    assert "\n" not in message
    assert all(text in message for text in named), message
    assert not any(text in message for text in not_named), message


def test_random_init_only_when_asked_and_recorded_as_such():
    # the tiny preset asks for random values where its base model is switched off
    tiny = build_components(load_config(preset="tiny", overrides=["model.base=none"]))
    assert tiny.sources == {"unet": "", "vae": "", "image_encoder": ""}
    with pytest.raises(ConfigError, match="no weights are named for the U-Net, VAE and CLIP image encoder"):
        build_components(load_config(preset="tiny", overrides=["model.base=none", "model.allow_random_init=false"]))
    based = build_components(load_config(preset="tiny"))  # by default: every part from the shipped base
    assert set(based.sources.values()) == {"base:tiny"}


def test_sd15_yaml_with_sd15_format_folders_loads_them_and_trains_a_step(tmp_path):
    sd15 = write_sd15_folder(tmp_path / "stable-diffusion-v1-5", seed=1)
    clip = write_openai_clip_folder(tmp_path / "clip-vit-large-patch14", seed=2)
    unet, vae = loading.load_unet_and_vae(str(sd15), load_config(SD15_YAML).model)
    assert len(unet.config.down_block_types) == 4 and unet.config.cross_attention_dim == 768
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.scaling_factor == 0.18215

    config = load_config(SD15_YAML, overrides=[f"model.pretrained={sd15}", f"model.image_encoder={clip}"])
    task = build_stage1(config)
    components = task.components
    assert components.sources == {"unet": str(sd15), "vae": str(sd15), "image_encoder": str(clip)}
    assert components.unet.config.in_channels == 8 and components.unet.conv_in.weight[:, 4:].abs().sum() == 0
    assert task.conditioner.projection is None  # the 768-d embedding is the U-Net's token as it is

    generator = torch.Generator().manual_seed(0)
    batch = {
        "source": torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1,
        "target": torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1,
        "phase": torch.tensor([1]),
    }
    loss, _ = task.loss(batch, 0, generator, "adamw")
    loss.backward()
    assert torch.isfinite(loss)
    assert components.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0  # the source latent reaches the loss


@pytest.mark.parametrize("name", ["vae.safetensors", "notes.txt"])
def test_a_vae_given_as_one_file_is_told_to_be_a_folder_not_said_missing(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(WeightsNotFoundError, match=f"{tmp_path / name} is a file: give the VAE's folder"):
        loading.load_vae(str(tmp_path / name))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        loading.load_vae(str(tmp_path / "absent"))


def test_an_unreachable_hub_is_said_in_one_line_at_once_not_after_retries(monkeypatch):
    """Offline, huggingface_hub retries each file 5 times over ~30 s and then blames a missing config.json:
    one quick connection check sends hub ids to the local cache only, and the line says why."""
    import socket
    import time

    import huggingface_hub.constants as hub

    def no_network(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # put back after the test, as the cache below
    loading.hub_unreachable.cache_clear()
    try:
        began = time.perf_counter()
        with pytest.raises(WeightsNotFoundError, match="no connection to huggingface.co: Name or service not known, "
                           "and not in the local Hugging Face cache") as info:  # fmt: skip
            loading.load_vae("someone/some-model")
        assert time.perf_counter() - began < 10 and "\n" not in str(info.value)
        assert hub.HF_HUB_OFFLINE is True
    finally:
        loading.hub_unreachable.cache_clear()


@pytest.mark.parametrize("damage", ["cut short", "config.json", "index", "missing shard"])
def test_a_damaged_clip_download_is_one_line_naming_it(tmp_path, damage):
    """The 1.7 GB CLIP file is the download most likely to arrive cut short: one line naming the file, as for
    the U-Net and the VAE (it was a SafetensorError / OSError traceback, at training and at export)."""
    folder = write_openai_clip_folder(tmp_path / "clip")
    weights = folder / "model.safetensors"
    if damage == "cut short":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = f"{weights}: corrupt"
    elif damage == "config.json":
        (folder / "config.json").write_text('{"model_type": "clip", "vision_con')
        expected = f"the CLIP image encoder in {folder} cannot be read"
    elif damage == "index":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../elsewhere.safetensors"}}')
        expected = "names files outside"
    else:
        shard = "model-00002-of-00002.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        expected = f"{shard}: missing (the clip weights); fetch it again"
    with pytest.raises(WeightsNotFoundError) as info:
        loading.load_image_encoder(str(folder))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_mistyped_local_path_is_said_as_one_before_the_hub(tmp_path, monkeypatch):
    """`model.pretrained=weights/sd15` with weights/ here but no sd15 in it is most likely a local path gone
    wrong: it is still tried as a hub id (a folder named like a hub owner must not hide the Hub), and when that
    fails too the line says first that the path does not exist here, then why the Hub did not have it."""
    import huggingface_hub.constants as hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network: the Hub's answer comes at once
    loading.hub_unreachable.cache_clear()
    try:
        (tmp_path / "weights").mkdir()
        model = load_config(preset="tiny").model
        with pytest.raises(WeightsNotFoundError) as info:
            loading.load_unet_and_vae("weights/sd15", model)
        assert str(info.value).startswith(
            f"weights/sd15 does not exist (relative to {tmp_path}), and as a Hugging Face Hub id it could not be "
            "fetched either (offline mode (HF_HUB_OFFLINE), and not in the local Hugging Face cache)"
        ), str(info.value)
        with pytest.raises(WeightsNotFoundError, match="weights/clip-vit-large-patch14 does not exist"):
            loading.load_image_encoder("weights/clip-vit-large-patch14")
        (tmp_path / "openai").mkdir()  # a local folder named like the owner: still a hub id
        assert loading._is_hub_id("openai/clip-vit-large-patch14")
    finally:
        loading.hub_unreachable.cache_clear()


def test_a_folder_holding_a_single_file_or_an_fp16_variant_says_what_to_give(tmp_path):
    model = load_config(preset="tiny").model
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsNotFoundError, match=r"holds v1-5-pruned-emaonly.safetensors: give that file"):
        loading.load_unet_and_vae(str(holder), model)
    folder = write_sd15_folder(tmp_path / "sd15", layers_per_block=1)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(WeightsNotFoundError, match=r"found diffusion_pytorch_model.fp16.safetensors: rename it to "):
        loading.load_unet_and_vae(str(folder), model)


@pytest.mark.parametrize("header", ["{not json", '{"parts": ["vae"]}', "[1, 2]"])
def test_a_base_file_with_a_damaged_header_is_one_line(tmp_path, header):
    from safetensors.torch import save_file

    from ffasynth.models import base

    path = tmp_path / "base.safetensors"
    save_file({"vae.x": torch.zeros(1)}, str(path), metadata={"ffasynth_base": header})
    with pytest.raises(WeightsNotFoundError, match="has a damaged ffasynth_base header"):
        base.read_header(path)


def test_weights_of_another_family_are_refused_in_one_line_before_anything_is_built_on_them(tmp_path):
    """An SDXL-shaped U-Net loaded and then failed in its first forward with a traceback; an SD2-shaped one
    trained behind a new random 768 → 1024 projection, and a VAE of another latent width failed in conv_in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    clip = write_openai_clip_folder(tmp_path / "clip")
    folders = {}
    for name, changes in {
        "sd2": {"cross_attention_dim": 1024, "use_linear_projection": True},
        "sdxl": {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 8 * 6 + 768},
        "latents": {"out_channels": 16},
    }.items():  # fmt: skip
        folders[name] = write_sd15_folder(tmp_path / name)
        UNet2DConditionModel.from_config({**sd15_unet_config(), **changes}).save_pretrained(folders[name] / "unet")

    def refusal(*overrides: str) -> str:
        config = load_config(SD15_YAML, overrides=[f"model.image_encoder={clip}", *overrides])
        with pytest.raises(ConfigError) as info:
            build_components(config)
        return str(info.value)

    assert "cross-attention is 1024 wide but model.cross_attention_dim is 768" in refusal(
        f"model.pretrained={folders['sd2']}"
    )
    assert "added 'text_time' embeddings (an SDXL-family model)" in refusal(f"model.pretrained={folders['sdxl']}")
    assert "its U-Net draws 16 latent channels but model.latent_channels is 4" in refusal(
        f"model.pretrained={folders['latents']}"
    )
    wide = tmp_path / "vae16"
    AutoencoderKL(latent_channels=16, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).save_pretrained(wide)  # fmt: skip
    sd15 = write_sd15_folder(tmp_path / "sd15")
    vae_refused = refusal(f"model.pretrained={sd15}", f"model.vae={wide}")
    assert f"model.vae={wide}: its VAE has 16 latent channels" in vae_refused
    # the SD2 width, asked for: a projection from CLIP's 768-d embedding is trained to it
    asked = [f"model.pretrained={folders['sd2']}", f"model.image_encoder={clip}", "model.cross_attention_dim=1024"]
    config = load_config(SD15_YAML, overrides=asked)
    assert build_components(config).unet.config.cross_attention_dim == 1024


def test_a_missing_weights_file_with_one_slash_is_a_missing_file_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not loading._is_hub_id("models/v1-5-pruned-emaonly.safetensors")
    assert loading._is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(WeightsNotFoundError, match=r"^models/v1-5-pruned-emaonly.safetensors does not exist"):
        loading.load_unet_and_vae("models/v1-5-pruned-emaonly.safetensors", load_config(preset="tiny").model)


def test_an_fp16_clip_file_loads_in_float32_as_the_u_net_and_vae_do(tmp_path):
    from safetensors.torch import load_file, save_file

    clip = write_openai_clip_folder(tmp_path / "clip")
    weights = load_file(clip / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, clip / "model.safetensors")
    encoder, _ = loading.load_image_encoder(str(clip))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


def test_the_cli_keeps_the_libraries_loading_bars_off_though_huggingface_hub_came_first(tmp_path, capfd, monkeypatch):
    """huggingface_hub is imported with the CLI, before HF_HUB_DISABLE_PROGRESS_BARS was set: transformers then
    drew its "Loading weights" bar for every CLIP load."""
    import huggingface_hub
    import transformers

    from ffasynth.cli import _quiet_libraries

    clip = write_openai_clip_folder(tmp_path / "clip")
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(variable, raising=False)
    try:
        _quiet_libraries()
        capfd.readouterr()
        loading.load_image_encoder(str(clip))
        assert "Loading weights" not in capfd.readouterr().err
    finally:
        huggingface_hub.utils.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
