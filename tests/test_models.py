"""Model components: conv_in surgery, conditioning paths, offset noise, weight loading formats."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from ffasynth.config import load_config
from ffasynth.errors import WeightsNotFoundError
from ffasynth.models import loading
from ffasynth.models.architecture import downsampling_factor, unet_config, vae_config
from ffasynth.models.components import add_phase_embedding, build_components, count_parameters, widen_conv_in
from ffasynth.models.conditioning import SourceConditioner
from ffasynth.training.stage1 import offset_noise
from tests.helpers import micro_config
from tests.ldm_format import unet_to_ldm, vae_to_ldm


def test_zero_initialised_conv_in_leaves_the_unet_output_unchanged():
    torch.manual_seed(0)
    model = micro_config().model
    unet = UNet2DConditionModel(**unet_config(model)).eval()
    latents, tokens = torch.randn(2, 4, 16, 16), torch.randn(2, 1, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        before = unet(latents, t, encoder_hidden_states=tokens).sample
        widen_conv_in(unet, 4)
        after = unet(torch.cat([latents, 5 * torch.randn(2, 4, 16, 16)], 1), t, encoder_hidden_states=tokens).sample
    assert unet.config.in_channels == 8 and unet.conv_in.weight.shape[1] == 8
    assert torch.allclose(before, after, atol=1e-6, rtol=0), (before - after).abs().max()
    assert unet.conv_in.weight[:, 4:].abs().sum() == 0


def test_phase_embedding_starts_at_zero_and_then_separates_phases():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(micro_config().model)).eval()
    x, t, h = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 1, 32)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=h).sample
        add_phase_embedding(unet, 2)
        early = unet(x, t, encoder_hidden_states=h, class_labels=torch.tensor([0])).sample
        assert torch.allclose(plain, early, atol=1e-6)
        unet.class_embedding.weight.normal_()
        late = unet(x, t, encoder_hidden_states=h, class_labels=torch.tensor([1])).sample
        early = unet(x, t, encoder_hidden_states=h, class_labels=torch.tensor([0])).sample
    assert not torch.allclose(early, late, atol=1e-4)


@pytest.mark.parametrize("strength", [0.0, 0.1, 0.5])
def test_offset_noise_adds_the_stated_variance_to_channel_means(strength):
    generator = torch.Generator().manual_seed(0)
    latents = torch.zeros(4000, 4, 8, 8)
    noise = offset_noise(latents, strength, generator)
    channel_means = noise.mean(dim=(2, 3))
    expected = 1 / 64 + strength**2  # mean of 64 unit normals + the shared offset
    assert channel_means.var().item() == pytest.approx(expected, rel=0.05)
    assert noise.var().item() == pytest.approx(1 + strength**2, rel=0.03)
    # one offset per (sample, channel): two channels' means share nothing beyond the sample's own noise
    correlation = torch.corrcoef(channel_means[:, :2].T)[0, 1].item()
    assert abs(correlation) < 0.05


def _conditioner(config, components):
    return SourceConditioner.from_components(components, config.model)


def _predict(components, conditioner, source, noisy):
    tokens, source_latents = conditioner(components.vae, source)
    with torch.no_grad():
        return components.unet(
            SourceConditioner.unet_input(noisy, source_latents),
            torch.tensor([300, 300]),
            encoder_hidden_states=tokens,
            class_labels=torch.tensor([0, 0]),
        ).sample


@pytest.mark.parametrize(
    "clip,concat,tokens",
    [(True, False, "embed"), (True, False, "patches"), (False, True, "embed"), (True, True, "embed")],
)
def test_each_conditioning_path_carries_the_source_and_nothing_when_off(clip, concat, tokens):
    torch.manual_seed(0)
    config = micro_config(
        f"model.use_clip={str(clip).lower()}", f"model.use_concat={str(concat).lower()}", f"model.clip_tokens={tokens}"
    )
    components = build_components(config, random_weights=True)
    if concat:  # training moves the zero-initialised source channels; emulate that
        torch.nn.init.normal_(components.unet.conv_in.weight, std=0.1)
    conditioner = _conditioner(config, components).eval()
    assert (components.image_encoder is not None) == clip
    source_a, source_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    noisy = torch.randn(2, 4, 16, 16)
    out_a = _predict(components, conditioner, source_a, noisy)
    out_b = _predict(components, conditioner, source_b, noisy)
    assert not torch.allclose(out_a, out_b, atol=1e-5), "the source does not reach the U-Net"
    tokens_a, latents_a = conditioner(components.vae, source_a)
    tokens_b, latents_b = conditioner(components.vae, source_b)
    assert torch.equal(tokens_a, tokens_b) != clip  # off → identical (zero) tokens whatever the source
    assert (latents_a is None) != concat
    assert components.unet.config.in_channels == (8 if concat else 4)
    expected_tokens = 1 if (not clip or tokens == "embed") else (32 // 8) ** 2 + 1
    assert tokens_a.shape == (2, expected_tokens, 32)
    dropped_tokens, dropped_latents = conditioner(components.vae, source_a, keep=torch.tensor([False, True]))
    assert dropped_tokens[0].abs().sum() == 0 and torch.equal(dropped_tokens[1], tokens_a[1])
    if concat:
        assert dropped_latents[0].abs().sum() == 0


@pytest.mark.parametrize("shape", [(32, 32), (32, 48), (48, 32)])
def test_clip_preprocessing_matches_the_processor_on_square_and_oblong_images(shape):
    config = micro_config()
    components = build_components(config, random_weights=True)
    conditioner = _conditioner(config, components)
    image = torch.rand(1, 3, *shape)  # oblong: the centre crop, not a corner, is what CLIP sees
    ours = conditioner.clip_pixels(image * 2 - 1)
    reference = components.image_processor(
        images=image[0].permute(1, 2, 0).numpy(), do_rescale=False, return_tensors="pt"
    ).pixel_values
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-4)


@pytest.mark.parametrize("vae_channels", [[8, 16], [8, 8, 16]])
def test_downsampling_factor_is_the_vaes_pixels_per_latent(vae_channels):
    model = micro_config(f"model.vae_channels={vae_channels}").model
    vae = AutoencoderKL(**vae_config(model)).eval()
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 32, 48)).latent_dist.mean
    factor = downsampling_factor(vae.config)
    assert factor == downsampling_factor(vae_channels)
    assert latent.shape[-2:] == (32 // factor, 48 // factor)


def _tiny_sd(model):
    torch.manual_seed(1)
    return UNet2DConditionModel(**unet_config(model)), AutoencoderKL(**vae_config(model))


def test_diffusers_folder_roundtrip(tmp_path):
    model = micro_config().model
    unet, vae = _tiny_sd(model)
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae.save_pretrained(tmp_path / "sd" / "vae")
    loaded_unet, loaded_vae = loading.load_unet_and_vae(str(tmp_path / "sd"), model)
    for a, b in ((unet, loaded_unet), (vae, loaded_vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="diffusion_pytorch_model.safetensors"):
        loading.load_unet_and_vae(str(tmp_path / "sd"), model)


def _single_file(model, unet, vae) -> dict:
    """The U-Net and VAE in the original (CompVis) single-file key layout, with a CLIP text key as SD files have."""
    return {
        **unet_to_ldm(unet.state_dict(), model.unet_layers_per_block, len(model.unet_channels)),
        **vae_to_ldm(vae.state_dict(), len(model.vae_channels)),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8),
    }


def test_single_file_checkpoint_in_the_original_layout_roundtrips(tmp_path):
    layers = ["model.unet_layers_per_block=2", "model.vae_layers_per_block=2"]
    config = micro_config(*layers)
    model = config.model
    unet, vae = _tiny_sd(model)
    checkpoint = _single_file(model, unet, vae)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.in_layers") for k in checkpoint)
    path = tmp_path / "sd15-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    loaded_unet, loaded_vae = loading.load_unet_and_vae(str(path), model)
    for a, b in ((unet, loaded_unet), (vae, loaded_vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k].reshape(sa[k].shape)) for k in sa)
    # the whole stage-1 build path accepts it too, and widens conv_in with zero-initialised weights
    components = build_components(micro_config(*layers, f"model.pretrained={path}"))
    assert components.unet.config.in_channels == 8 and components.sources["unet"] == str(path)
    assert components.unet.conv_in.weight[:, 4:].abs().sum() == 0
    # from scratch there is nothing to preserve: every input channel starts with the default init
    scratch = build_components(micro_config(*layers), random_weights=True)
    assert scratch.unet.conv_in.weight[:, 4:].abs().sum() > 0


def test_bad_weight_files_fail_in_one_sentence(tmp_path):
    model = micro_config().model
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(WeightsNotFoundError, match="pickle"):
        loading.load_unet_and_vae(str(pickle_file), model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsNotFoundError, match="junk.safetensors"):
        loading.load_unet_and_vae(str(junk), model)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsNotFoundError, match="not a single-file Stable Diffusion"):
        loading.load_unet_and_vae(str(other), model)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        loading.load_unet_and_vae(str(tmp_path / "missing-folder" / "x"), model)
    with pytest.raises(WeightsNotFoundError, match="image encoder"):
        loading.load_image_encoder(str(tmp_path))


def test_hub_id_without_internet_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as info:
        loading.load_unet_and_vae("ffasynth-test/not-a-real-model", micro_config().model)
    message = str(info.value)
    assert "hf download ffasynth-test/not-a-real-model" in message and "\n" not in message


def test_clip_folder_roundtrip_with_the_image_variation_layout(tmp_path):
    config = micro_config()
    components = build_components(config, random_weights=True)
    components.image_encoder.save_pretrained(tmp_path / "image_encoder")
    components.image_processor.save_pretrained(tmp_path / "feature_extractor")
    encoder, processor = loading.load_image_encoder(str(tmp_path))
    assert processor.crop_size == components.image_processor.crop_size
    a, b = components.image_encoder.state_dict(), encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sd15_preset_has_exactly_sd15_shapes():
    config = load_config(preset="sd15", overrides=["model.num_phases=0"])
    with torch.device("meta"):  # shapes without storage: the same counts, no 3.4 GB of weights
        unet = UNet2DConditionModel(**unet_config(config.model))
        assert count_parameters(unet) == 859_520_964  # SD1.5's U-Net
        widen_conv_in(unet, 4)
        assert count_parameters(unet) == 859_520_964 + 4 * 320 * 3 * 3  # + the source latent's input weights
        add_phase_embedding(unet, 2)
        assert count_parameters(unet) == 859_520_964 + 4 * 320 * 9 + 2 * 1280
        vae = AutoencoderKL(**vae_config(config.model))
        assert count_parameters(vae) == 83_653_863  # SD1.5's VAE
    assert all(p.is_meta for p in [*unet.parameters(), *vae.parameters()])


@pytest.mark.parametrize("shape", [(30, 44), (44, 30), (61, 90)])
def test_clip_resizes_an_oblong_image_to_the_processors_size(shape):
    """The long side is truncated as CLIPImageProcessor truncates it; rounded, 30 × 44 became 32 × 47 instead of
    32 × 46, a sub-pixel stretch that moved every pixel of the crop (random-noise images show it most)."""
    config = micro_config()
    components = build_components(config, random_weights=True)
    conditioner = _conditioner(config, components)
    image = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    ours = conditioner.clip_pixels(image * 2 - 1)
    reference = components.image_processor(
        images=image[0].permute(1, 2, 0).numpy(), do_rescale=False, return_tensors="pt"
    ).pixel_values
    difference = (ours - reference).abs()  # torch's and PIL's bicubic kernels differ a little
    assert difference.mean() < 0.05, float(difference.mean())


def test_a_single_file_is_read_for_its_u_net_and_vae_only_and_loads_in_float32(tmp_path, monkeypatch):
    """The real file is 4.3 GB, its text encoder and an EMA copy included: only the two parts are read, onto
    modules built on the meta device (no random initialisation to overwrite), and an fp16 file is upcast."""
    import safetensors

    layers = ["model.unet_layers_per_block=2", "model.vae_layers_per_block=2"]
    model = micro_config(*layers).model
    unet, vae = _tiny_sd(model)
    checkpoint = {**_single_file(model, unet, vae), "model_ema.decay": torch.tensor(0.9999)}
    path = tmp_path / "sd15-fp16.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in checkpoint.items()}, str(path))
    read: list[str] = []

    class Recording:  # safe_open, noting each tensor read
        def __init__(self, *args, **kwargs):
            self.file = safetensors.safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(loading, "safe_open", Recording)
    loaded_unet, loaded_vae = loading.load_unet_and_vae(str(path), model)
    assert read and all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in read)
    for original, loaded in ((unet, loaded_unet), (vae, loaded_vae)):
        values = loaded.state_dict()
        assert all(v.dtype == torch.float32 and not v.is_meta for v in values.values())
        expected = original.state_dict()
        assert all(torch.equal(values[k].reshape(expected[k].shape), expected[k].half().float()) for k in expected)
