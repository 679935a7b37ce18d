"""FFASynthesisPipeline: the diffusers contract (save/load, swappable schedulers, output dataclass),
one U-Net pass per step without guidance, cached conditioning, seeds, inputs of any kind and size,
uncertainty from several samples, phases."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from PIL import Image

from ffasynth.data.io import save_image, unit_float
from ffasynth.data.registration import field_of_view
from ffasynth.errors import FFASynthError
from ffasynth.pipeline import FFASynthesisPipeline, TileSettings, TokenProjection, source_tensor
from tests.helpers import micro_pipeline, seeded


@pytest.fixture(scope="module")
def pipe():
    return micro_pipeline()


@pytest.fixture(scope="module")
def photo():
    return torch.rand(3, 40, 52, generator=seeded(1))


def _run(pipeline, image, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "pt", **kwargs}
    return pipeline(image, generator=seeded(seed), **kwargs)


@pytest.mark.parametrize(
    "overrides",
    [("model.clip_tokens=patches",), ("model.use_clip=false",), ("model.use_concat=false", "model.num_phases=0")],
)
def test_saved_pipeline_loads_back_with_the_same_outputs(tmp_path, photo, overrides):
    pipeline = micro_pipeline(*overrides)
    pipeline.save_pretrained(tmp_path)
    weights = sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".json"
    )
    assert all(w.endswith(".safetensors") for w in weights), weights  # no pickle files
    loaded = FFASynthesisPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    settings = ("use_clip", "use_concat", "clip_tokens", "clip_view", "num_phases", "prediction_type", "tile_size")
    settings += ("projection",)
    assert {k: loaded.config[k] for k in settings} == {k: pipeline.config[k] for k in settings}
    if "model.clip_tokens=patches" in overrides:
        assert (
            isinstance(loaded.projection, TokenProjection)
            and "projection/diffusion_pytorch_model.safetensors" in weights
        )
        assert torch.equal(loaded.projection.linear.weight, pipeline.projection.linear.weight)
    if "model.use_clip=false" in overrides:
        assert loaded.image_encoder is None and not any(w.startswith("image_encoder") for w in weights)
    phase = "late" if pipeline.config.num_phases else None
    expected = _run(pipeline, photo, phase=phase, num_samples=2).images[0]
    again = _run(loaded, photo, phase=phase, num_samples=2).images[0]
    assert torch.equal(expected, again)


def test_one_unet_pass_per_step_without_guidance_and_one_batched_pair_with_it(pipe, photo):
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        one = {"num_inference_steps": 4, "num_samples": 2, "tile_size": 0}
        plain = _run(pipe, photo, image_guidance_scale=1.0, **one).images[0]
        assert batches == [2] * 4  # 4 steps, both samples in one pass, no unconditional pass
        batches.clear()
        guided = _run(pipe, photo, image_guidance_scale=2.0, **one).images[0]
        assert batches == [4] * 4  # conditional + null condition, batched into the same 4 passes
        # no scale given: the one the pipeline was exported with (the tiny preset's 5), saved with it
        assert pipe.config.image_guidance_scale == 5.0
        batches.clear()
        default = _run(pipe, photo, **one).images[0]
        assert batches == [4] * 4
        assert torch.equal(default, _run(pipe, photo, image_guidance_scale=5.0, **one).images[0])
    finally:
        hook.remove()
    assert not torch.allclose(plain, guided, atol=1e-3) and not torch.allclose(guided, default, atol=1e-3)


@pytest.mark.parametrize("clip_view,clip_calls", [("whole", 1), ("tile", 2)])
def test_source_conditioning_is_computed_once_per_image_not_per_step_or_tile(clip_view, clip_calls):
    pipe = micro_pipeline(f"model.clip_view={clip_view}")
    calls = {"clip": 0, "vae_encoder": 0, "unet": 0}

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    hooks = [
        pipe.image_encoder.register_forward_hook(counter("clip")),
        pipe.vae.encoder.register_forward_hook(counter("vae_encoder")),
        pipe.unet.register_forward_hook(counter("unet")),
    ]
    try:
        for steps in (2, 5):
            calls.update(clip=0, vae_encoder=0, unet=0)
            # 96×64 px with 32-px tiles overlapping by 16: 5×3 encode tiles, 15 latent tiles per step;
            # CLIP: the whole photo once, or the 15 tiles once in batches of 8 (2 passes)
            _run(pipe, [torch.rand(3, 64, 96), torch.rand(3, 64, 96)], num_inference_steps=steps, tile_overlap=16)
            assert calls["clip"] == 2 * clip_calls and calls["vae_encoder"] == 2 * 15
            assert calls["unet"] == 2 * steps * 2  # 15 tiles per step in batches of 8
    finally:
        for hook in hooks:
            hook.remove()


def test_same_seed_same_image_and_another_seed_another(pipe, photo):
    first = _run(pipe, photo, seed=7).images[0]
    assert torch.equal(first, _run(pipe, photo, seed=7).images[0])
    assert (first - _run(pipe, photo, seed=8).images[0]).abs().mean() > 1e-3


def test_a_list_of_generators_gives_each_photo_the_image_it_gets_alone(pipe, photo):
    other = photo.flip(-1)
    alone = [_run(pipe, photo, seed=3).images[0], _run(pipe, other, seed=4).images[0]]
    together = pipe([photo, other], generator=[seeded(3), seeded(4)], num_inference_steps=3, output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(alone, together.images, strict=True))
    # one generator is drawn from in turn: the second photo's noise is not the one it gets alone
    shared = _run(pipe, [photo, other], seed=4).images
    assert not torch.equal(shared[1], _run(pipe, other, seed=4).images[0])
    with pytest.raises(FFASynthError, match="1 generators for 2 photos"):
        pipe([photo, other], generator=[seeded(3)], num_inference_steps=3)


def test_float_images_outside_0_1_are_refused_not_clipped_and_a_pil_image_is_turned_upright(tmp_path):
    for image, shown in ((torch.rand(3, 8, 8) * 2 - 1, "-0."), (np.full((8, 8, 3), 200.0, np.float32), "200")):
        with pytest.raises(FFASynthError, match=f"values in \\[0, 1\\], not {shown}"):
            source_tensor(image)
    assert source_tensor(torch.full((3, 4, 4), 1.0005)).max() == 1.0  # rounding slack is clipped
    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to be shown upright
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif)
    from_file = source_tensor(tmp_path / "turned.jpg")
    with Image.open(tmp_path / "turned.jpg") as opened:
        assert from_file.shape == (3, 60, 40) and torch.equal(source_tensor(opened), from_file)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, DDPMScheduler])
def test_any_diffusers_scheduler_can_be_swapped_in(photo, scheduler_class):
    pipeline = micro_pipeline()
    default = _run(pipeline, photo).images[0]
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    swapped = _run(pipeline, photo).images[0]
    assert swapped.shape == (1, 40, 52) and torch.isfinite(swapped).all()
    assert torch.equal(swapped, _run(pipeline, photo).images[0])  # stochastic samplers use the generator too
    assert not torch.equal(swapped, default)
    trained = pipeline.config.prediction_type
    other = "epsilon" if trained == "v_prediction" else "v_prediction"
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, prediction_type=other)
    with pytest.raises(FFASynthError, match=f"trained for '{trained}'"):
        _run(pipeline, photo)


def test_inputs_of_any_kind_and_size_come_back_at_their_size(pipe, tmp_path):
    rgb = (np.random.default_rng(0).random((29, 37, 3)) * 255).astype(np.uint8)
    save_image(rgb, tmp_path / "photo.png")
    tensor = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)
    reference = _run(pipe, tensor).images[0]
    assert reference.shape == (1, 29, 37)
    levels = torch.from_numpy(rgb.transpose(2, 0, 1).copy())  # uint8 0-255
    images = (tmp_path / "photo.png", str(tmp_path / "photo.png"), Image.fromarray(rgb), rgb, tensor[None], levels)
    for image in images:
        assert torch.allclose(_run(pipe, image).images[0], reference, atol=1e-6), type(image)
    # 8-bit inputs stay uint8 until a tile is used (a quarter of float32's memory on a large photo)
    for image in images[:4] + (levels,):
        assert source_tensor(image).dtype == torch.uint8, type(image)
    assert torch.equal(unit_float(source_tensor(rgb)), tensor) and source_tensor(tensor).dtype == torch.float32
    grey = Image.fromarray(rgb[..., 0])
    out = _run(pipe, [grey, np.zeros((7, 9), np.float32)], output_type="pil")
    assert [(i.mode, i.size) for i in out.images] == [("L", (37, 29)), ("L", (9, 7))]
    arrays = _run(pipe, rgb, output_type="np").images
    assert arrays[0].shape == (29, 37, 1) and arrays[0].dtype == np.float32
    with pytest.raises(FFASynthError, match="1 or 3 channels"):
        _run(pipe, torch.rand(2, 8, 8))


def test_uncertainty_is_the_std_of_the_samples_and_the_image_their_mean(pipe, photo):
    samples = pipe.sample_image(
        photo, 3, seeded(3), pipe.config.image_guidance_scale, 4, None, TileSettings.resolve(32)
    )
    assert samples.shape == (4, 1, 40, 52)
    out = _run(pipe, photo, seed=3, num_samples=4)
    assert torch.allclose(out.images[0], samples.mean(0), atol=1e-6)
    assert torch.allclose(out.uncertainty[0], samples.std(0), atol=1e-6)
    assert out.uncertainty[0].mean() > 1e-3
    assert _run(pipe, photo).uncertainty is None
    as_array = _run(pipe, photo, seed=3, num_samples=4, output_type="np").uncertainty[0]
    assert as_array.shape == (40, 52, 1) and np.allclose(as_array[..., 0], samples.std(0)[0].numpy(), atol=1e-6)


def test_phase_selects_early_or_late_and_is_refused_where_the_model_has_none(pipe, photo):
    early = _run(pipe, photo, phase="early").images[0]
    assert torch.equal(early, _run(pipe, photo).images[0])  # early is the default
    assert (early - _run(pipe, photo, phase="late").images[0]).abs().mean() > 1e-4
    with pytest.raises(FFASynthError, match="not one this model knows"):
        _run(pipe, photo, phase="venous")
    with pytest.raises(FFASynthError, match="without a phase input"):
        _run(micro_pipeline("model.num_phases=0"), photo, phase="late")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_guidance_scale": 0.5}, "image_guidance_scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_samples": 0}, "num_samples"),
        ({"output_type": "jpg"}, "output_type"),
    ],
)
def test_bad_settings_are_refused_in_one_line(pipe, photo, kwargs, message):
    with pytest.raises(FFASynthError, match=message):
        _run(pipe, photo, **kwargs)


def test_plain_diffusers_loads_an_exported_folder_once_ffasynth_is_imported(pipe, photo, tmp_path):
    import diffusers

    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded, FFASynthesisPipeline)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_run(loaded, photo).images[0], _run(pipe, photo).images[0])


def test_outside_field_black_zeroes_the_output_beyond_the_photos_field_of_view_and_keeps_it_inside(pipe):
    """A real angiogram has no signal where the camera saw nothing; the model draws grey texture there.
    outside_field="black" gives 0 outside the photo's field of view and exactly the model's output inside;
    "model" (the default) keeps the model's output everywhere."""
    photo = torch.rand(3, 40, 52, generator=seeded(3)) * 0.8 + 0.2
    photo[:, :8], photo[:, :, 40:] = 0.0, 0.0  # black above and to the right, as a UWF photo's corners
    inside = torch.from_numpy(field_of_view(photo.permute(1, 2, 0).numpy()))
    assert 0.5 < inside.float().mean() < 0.8  # the field found: neither everything nor nothing
    black = _run(pipe, photo, outside_field="black").images[0][0]
    model = _run(pipe, photo).images[0][0]
    assert torch.equal(black[inside], model[inside])
    assert (black[~inside] == 0).all() and model[~inside].mean() > 0.02  # the model does draw there
    with pytest.raises(FFASynthError, match="outside_field 'grey': allowed 'black' or 'model'"):
        _run(pipe, photo, outside_field="grey")
    # the field is the training's (data.fov_threshold, recorded at export): a dim strip at its edge is
    # outside at a threshold above its brightness, as the training crops counted it
    photo[:, :, 30:40] = 0.1
    dim = torch.from_numpy(field_of_view(photo.permute(1, 2, 0).numpy(), 0.15))
    assert dim[:, 33:40].sum() == 0 and dim[inside].float().mean() > 0.6
    pipe.register_to_config(fov_threshold=0.15)
    try:
        black = _run(pipe, photo, outside_field="black").images[0][0]
    finally:
        pipe.register_to_config(fov_threshold=0.04)
    assert (black[~dim] == 0).all() and black[dim].mean() > 0.02


def test_check_inputs_takes_the_calls_own_keywords():
    """translate_files checks one dict of settings before its first file and passes the same dict to every
    call: each setting check_inputs takes must be a keyword of __call__ with the same default."""
    checked = inspect.signature(FFASynthesisPipeline.check_inputs).parameters
    call = inspect.signature(FFASynthesisPipeline.__call__).parameters
    for name, parameter in list(checked.items())[1:]:
        assert name in call, name
        if parameter.default is not inspect.Parameter.empty:
            assert call[name].default == parameter.default, name


def test_a_folder_saved_before_fov_threshold_was_recorded_loads_with_0_04(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index.pop("fov_threshold") == 0.04
    index_path.write_text(json.dumps(index))
    loaded = FFASynthesisPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.fov_threshold == 0.04
    photo = torch.rand(3, 32, 32, generator=seeded(4)) * 0.8 + 0.2
    photo[:, :, :8] = 0.0
    black = _run(loaded, photo, outside_field="black").images[0][0]
    assert (black[:, :4] == 0).all() and black[:, 12:].mean() > 0.02


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, None])
def test_max_steps_is_the_most_a_swapped_scheduler_can_take(scheduler_class):
    """DDIM / DDPM space their steps "leading" with steps_offset 1: at 1000 steps the last would be t = 1000,
    past the schedule's end; the exported DPM-Solver++ (None: as exported) spaces them "linspace", which at 1000
    rounds two steps to one t, a zero-length step that made the image NaN. max_steps allows only distinct
    steps inside the schedule."""
    pipe = micro_pipeline()
    if scheduler_class is not None:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, steps_offset=1, timestep_spacing="leading")
    most = pipe.max_steps
    pipe.scheduler.set_timesteps(most)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert max(timesteps) < pipe.scheduler.config.num_train_timesteps and len(set(timesteps)) == len(timesteps)
    pipe.check_inputs(num_inference_steps=most, image_guidance_scale=1.0, num_samples=1)
    with pytest.raises(FFASynthError, match=f"num_inference_steps {most + 1}: allowed a whole number from 1 to {most}"):
        pipe.check_inputs(num_inference_steps=most + 1, image_guidance_scale=1.0, num_samples=1)


@pytest.mark.parametrize(
    ("steps", "samples", "named"),
    [
        (2.5, 1, "num_inference_steps"),
        (2, 1.5, "num_samples"),
        (True, 1, "num_inference_steps"),
        (2, "2", "num_samples"),
    ],
)
def test_steps_and_samples_must_be_whole_numbers(steps, samples, named):
    pipe = micro_pipeline()
    with pytest.raises(FFASynthError, match=f"{named} .*: allowed a whole number"):
        pipe.check_inputs(num_inference_steps=steps, image_guidance_scale=1.0, num_samples=samples)
    pipe.check_inputs(num_inference_steps=np.int64(2), image_guidance_scale=1.0, num_samples=np.int32(2))


def test_the_token_projection_runs_through_its_component_so_offload_hooks_fire():
    """enable_model_cpu_offload hooks each component's forward: the projection must be called as the registered
    component, not its inner Linear, or its weights stay on the host while CLIP's features are on the GPU."""
    pipe = micro_pipeline("model.clip_tokens=patches")
    assert pipe.projection is not None and "projection" in pipe.model_cpu_offload_seq.split("->")
    calls = []
    pipe.projection.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    pipe.encode_source(torch.rand(1, 3, 32, 32, generator=seeded(1)), 32, 0, (32, 32))
    assert calls, "the projection component's forward was bypassed"


def test_several_samples_are_decoded_one_at_a_time(photo):
    """The VAE decoder's peak memory is one sample's, whatever --samples is (its largest activations)."""
    pipeline = micro_pipeline()
    batches = []
    pipeline.vae.decoder.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    samples = pipeline.sample_image(photo, 2, seeded(0), 1.0, 3, None, TileSettings.resolve(32, decode_size=0))
    assert samples.shape[0] == 3 and batches == [1, 1, 1]
