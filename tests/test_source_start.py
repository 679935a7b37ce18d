"""The source-started sampler (`start_strength` < 1): the photo's latent noised to an intermediate
timestep, the first steps skipped, as in img2img."""

from __future__ import annotations

import pytest
import torch

from ffasynth.data.io import read_image, save_image, unit_float
from ffasynth.errors import FFASynthError
from ffasynth.models.conditioning import encode_latents
from tests.corpus import cli
from tests.helpers import micro_pipeline, seeded


@pytest.fixture(scope="module")
def pipe():
    return micro_pipeline()


@pytest.fixture(scope="module")
def photo():
    return torch.rand(3, 32, 32, generator=seeded(4))


def _run(pipe, photo, **kwargs):
    kwargs = {"num_inference_steps": 10, "output_type": "pt", "image_guidance_scale": 1.0, "tile_size": 0, **kwargs}
    return pipe(photo, generator=seeded(0), **kwargs).images[0]


def _passes(pipe, photo, **kwargs) -> tuple[int, torch.Tensor]:
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        image = _run(pipe, photo, **kwargs)
    finally:
        hook.remove()
    return len(calls), image


def test_the_first_steps_are_skipped_and_the_result_differs_from_pure_noise(pipe, photo):
    full_passes, full = _passes(pipe, photo)
    passes, started = _passes(pipe, photo, start_strength=0.6)
    assert (full_passes, passes) == (10, 6)
    assert not torch.allclose(full, started)
    assert torch.equal(started, _run(pipe, photo, start_strength=0.6))  # same seed, same image


def test_the_first_step_sees_the_photos_latent_noised_to_the_start_timestep(pipe, photo):
    """x_t = √ᾱ_t · z_photo + √(1 − ᾱ_t) · ε, with t the first timestep kept and ε the seed's noise."""
    seen = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: seen.append((args[0].clone(), args[1])))
    try:
        _run(pipe, photo, start_strength=0.6)
    finally:
        hook.remove()
    sample, t = seen[0]
    pipe.scheduler.set_timesteps(10)
    assert int(t) == int(pipe.scheduler.timesteps[4])  # 10 steps at strength 0.6: the first 4 skipped
    with torch.no_grad():
        latent = encode_latents(pipe.vae, unit_float(photo)[None] * 2 - 1)
    noise = torch.randn(latent.shape, generator=seeded(0))
    alpha_bar = pipe.scheduler.alphas_cumprod[int(t)]
    expected = alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise
    channels = latent.shape[1]
    assert torch.allclose(sample[:, :channels], expected, atol=1e-5)
    assert torch.allclose(sample[:, channels : 2 * channels], latent, atol=1e-6)  # the concat path, as ever


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan")])
def test_strengths_outside_0_1_are_refused_in_one_line(pipe, photo, strength):
    with pytest.raises(FFASynthError, match="start_strength"):
        _run(pipe, photo, start_strength=strength)


def test_a_model_without_the_concat_path_cannot_start_from_the_photo(photo):
    pipe = micro_pipeline("model.use_concat=false")
    with pytest.raises(FFASynthError, match="concat path"):
        _run(pipe, photo, start_strength=0.5)
    assert _run(pipe, photo, start_strength=1.0).shape == (1, 32, 32)


def test_translate_takes_start_strength_and_refuses_one_outside_0_1(pipe, photo, tmp_path):
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    save_image(photo, tmp_path / "photo.png")
    refused = cli("translate", folder, tmp_path / "photo.png", "--out", tmp_path / "a", "--start-strength", "0")
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 2 and lines == ["error: --start-strength 0.0: allowed more than 0 to 1"], refused.output
    done = cli("translate", folder, tmp_path / "photo.png", "--out", tmp_path / "b", "--start-strength", "0.5",
               "--steps", "4", "--quiet")  # fmt: skip
    assert done.exit_code == 0, done.output
    written = read_image(tmp_path / "b" / "photo_ffa.png", channels=1)
    expected = _run(pipe, photo, num_inference_steps=4, start_strength=0.5, image_guidance_scale=None, tile_size=None)
    assert written.shape == expected.shape and (written - expected).abs().max() <= 1 / 255 + 1e-6
