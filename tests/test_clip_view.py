"""model.clip_view: CLIP sees the same kind of image in training and at inference. "tile": the
training crop, and at inference each denoising tile's own pixels; "whole": the whole photo (its
224² CLIP view) in both. The setting travels with the pipeline folder; old folders mean "whole"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffasynth.data.dataset import PairDataset
from ffasynth.data.io import save_image
from ffasynth.data.pairs import Pair
from ffasynth.data.transforms import PairedTransform, normalise, whole_view
from ffasynth.errors import FFASynthError
from ffasynth.models.components import build_components
from ffasynth.models.conditioning import SourceConditioner
from ffasynth.pipeline import FFASynthesisPipeline, TileSettings
from ffasynth.tiling import plan_tiles
from ffasynth.training.stage1 import Stage1Task
from tests.helpers import micro_config, micro_pipeline, seeded


class Recorder:
    """Forward hooks that keep what CLIP's vision model and the U-Net were given."""

    def __init__(self, pipe_or_encoder, unet=None):
        encoder = getattr(pipe_or_encoder, "image_encoder", pipe_or_encoder)
        self.clip_pixels: list[torch.Tensor] = []
        self.unet_calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (conv_in input, encoder_hidden_states)
        self.hooks = [encoder.register_forward_pre_hook(self._clip, with_kwargs=True)]
        if unet is not None:
            self.hooks.append(unet.register_forward_pre_hook(self._unet, with_kwargs=True))

    def _clip(self, module, args, kwargs):
        self.clip_pixels.append(kwargs["pixel_values"].clone())

    def _unet(self, module, args, kwargs):
        self.unet_calls.append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def _padded(photo: torch.Tensor, multiple: int) -> torch.Tensor:
    """The pipeline's padding, written out: reflect on the bottom/right to a multiple."""
    pad_h, pad_w = -photo.shape[-2] % multiple, -photo.shape[-1] % multiple
    return F.pad(photo[None], (0, pad_w, 0, pad_h), mode="reflect")


@torch.no_grad()
def test_tile_view_gives_each_tiles_unet_call_the_clip_tokens_of_exactly_that_tiles_pixels():
    pipe = micro_pipeline("model.clip_view=tile")
    assert pipe.config.clip_view == "tile"
    photo = torch.rand(3, 50, 70, generator=seeded(4))  # padded to 52×72 (multiple of 4)
    padded = _padded(photo, 4)
    factor = pipe.vae_scale_factor
    tiles = plan_tiles(52 // factor, 72 // factor, 16, 8)  # 32-px tiles overlapping by 16 px, in latent units
    assert len(tiles) >= 6
    conditioner = pipe.conditioner()
    expected = {t: conditioner.tokens(padded[(...,) + t.slices(factor)], unit_range=True)[0] for t in tiles}
    source_latents = pipe.encode_source(padded, 32, 16).latents
    with Recorder(pipe, pipe.unet) as seen:
        pipe.sample_image(photo, 2, seeded(0), 1.0, 2, None, TileSettings.resolve(32, 16, batch_size=4))
    assert len(seen.clip_pixels) == -(-len(tiles) // 4)  # once per image, in batches of 4 tiles, not per step
    rows = [(x[i], h[i]) for x, h in seen.unet_calls for i in range(x.shape[0])]
    assert len(rows) == 2 * len(tiles) * 2  # steps × tiles × samples
    found = []
    for model_input, tokens in rows:
        # which tile this row denoises: the one whose source latent it carries
        tile = next(t for t in tiles if torch.equal(model_input[4:], source_latents[0][(...,) + t.slices()]))
        assert torch.allclose(tokens, expected[tile], atol=1e-6)
        found.append(tile)
    assert sorted(found, key=tiles.index) == [t for t in tiles for _ in range(4)]
    assert len({tuple(v.flatten().tolist()) for v in expected.values()}) == len(tiles)  # tiles do differ


@torch.no_grad()
def test_an_image_in_one_tile_gets_the_tokens_it_got_before_the_setting():
    pipe = micro_pipeline("model.clip_view=tile")
    photo = torch.rand(3, 30, 38, generator=seeded(5))
    padded = _padded(photo, 4)  # 32×40: one 40-px tile
    condition = pipe.encode_source(padded, 40, 0, photo.shape[-2:])
    # before: CLIP of the padded photo, once, for the one U-Net input (tests/test_golden.py pins the output)
    assert torch.equal(condition.tokens, pipe.conditioner().tokens(padded, unit_range=True))
    one = pipe.sample_image(photo, 2, seeded(1), 1.0, 1, None, TileSettings.resolve(0))
    again = pipe.sample_image(photo, 2, seeded(1), 1.0, 1, None, TileSettings.resolve(64))
    assert torch.equal(one, again)


def _write_pair(folder, height=90, width=130, seed=0):
    rng = np.random.default_rng(seed)
    photo = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    target = (rng.random((height, width)) * 255).astype(np.uint8)
    save_image(photo, folder / f"{seed}.png")
    save_image(target, folder / f"{seed}.1.png")
    return Pair(str(seed), folder / f"{seed}.png", folder / f"{seed}.1.png", "early")


def _stage1_task(clip_view: str) -> Stage1Task:
    config = micro_config(f"model.clip_view={clip_view}")
    torch.manual_seed(0)
    components = build_components(config, random_weights=True)
    conditioner = SourceConditioner.from_components(components, config.model)
    return Stage1Task(components, conditioner, config.stage1, config.model.num_phases, clip_view)


def _batch(item: dict) -> dict:
    return {k: v[None] if torch.is_tensor(v) else [v] for k, v in item.items()}


@torch.no_grad()
def test_whole_view_in_training_is_what_the_pipeline_gives_clip_for_the_same_photo(tmp_path):
    pair = _write_pair(tmp_path)
    dataset = PairDataset([pair], PairedTransform(crop_size=32, hflip=False, min_fov_fraction=0.0))
    batch = _batch(dataset[0])
    task = _stage1_task("whole")
    with Recorder(task.conditioner.image_encoder) as trained:
        task._condition(batch, None)
    pipe = micro_pipeline("model.clip_view=whole")
    with Recorder(pipe) as inferred:
        pipe(pair.source, num_inference_steps=1, output_type="pt")  # read from the file, as translate does
    assert len(trained.clip_pixels) == 1 and len(inferred.clip_pixels) == 1
    assert torch.allclose(trained.clip_pixels[0], inferred.clip_pixels[0], atol=1e-5)
    # "tile" training shows CLIP the crop instead: a different image
    tile_task = _stage1_task("tile")
    with Recorder(tile_task.conditioner.image_encoder) as cropped:
        tile_task._condition(batch, None)
    assert torch.allclose(cropped.clip_pixels[0], tile_task.conditioner.clip_pixels(batch["source"]), atol=1e-6)
    assert (cropped.clip_pixels[0] - trained.clip_pixels[0]).abs().mean() > 0.1


def test_the_whole_view_is_flipped_with_the_crop(tmp_path):
    pair = _write_pair(tmp_path, 48, 48, seed=1)
    dataset = PairDataset([pair], PairedTransform(crop_size=48, hflip=True, vflip=True, min_fov_fraction=0.0))
    photo, _ = dataset.load(0)
    view = whole_view(photo)
    flips = set()
    for epoch in range(12):
        item = dataset[(0, epoch)]
        # the crop is the whole 48×48 photo, so its flips are read off it
        flipped = {(h, v): _flip(normalise(photo), h, v) for h in (0, 1) for v in (0, 1)}
        h, v = next(key for key, image in flipped.items() if torch.equal(item["source"], image))
        assert torch.allclose(item["whole_source"], _flip(normalise(view), h, v), atol=1e-6)
        flips.add((h, v))
    assert len(flips) >= 3


def _flip(image: torch.Tensor, horizontal: int, vertical: int) -> torch.Tensor:
    image = image.flip(-1) if horizontal else image
    return image.flip(-2) if vertical else image


def test_whole_view_training_refuses_batches_without_the_whole_photo():
    task = _stage1_task("whole")
    with pytest.raises(FFASynthError, match="clip_view=whole"):
        task._condition({"source": torch.zeros(1, 3, 32, 32)}, None)


@pytest.mark.parametrize("clip_view", ["tile", "whole"])
def test_the_pipeline_folder_keeps_the_setting(tmp_path, clip_view):
    pipe = micro_pipeline(f"model.clip_view={clip_view}")
    assert pipe.config.clip_view == clip_view  # exported from the training config
    pipe.save_pretrained(tmp_path)
    loaded = FFASynthesisPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.clip_view == clip_view
    photo = torch.rand(3, 40, 72, generator=seeded(2))  # several tiles: the two views differ here
    expected = pipe(photo, num_inference_steps=2, generator=seeded(0), output_type="pt").images[0]
    assert torch.equal(loaded(photo, num_inference_steps=2, generator=seeded(0), output_type="pt").images[0], expected)


def test_a_folder_saved_before_the_setting_loads_as_whole(tmp_path):
    whole = micro_pipeline("model.clip_view=whole")
    tile = micro_pipeline("model.clip_view=tile")
    tile.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["clip_view"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    old = FFASynthesisPipeline.from_pretrained(tmp_path)
    old.set_progress_bar_config(disable=True)
    assert old.config.clip_view == "whole"
    photo = torch.rand(3, 40, 72, generator=seeded(2))
    kwargs = {"num_inference_steps": 2, "output_type": "pt"}
    out = old(photo, generator=seeded(0), **kwargs).images[0]
    assert torch.equal(out, whole(photo, generator=seeded(0), **kwargs).images[0])
    assert not torch.equal(out, tile(photo, generator=seeded(0), **kwargs).images[0])
