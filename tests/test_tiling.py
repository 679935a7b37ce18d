"""Tiled denoising and decoding: coverage, exact blending of local functions, tiled ≈ full decode,
one tile = untiled, and no visible seam on a phantom."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from ffasynth.data.phantom import make_eye
from ffasynth.models.conditioning import decode_latents, encode_latents
from ffasynth.pipeline import TileSettings
from ffasynth.tiling import (
    DECODE_TILE_MIN,
    blend_overlap,
    pad_to_multiple,
    plan_tiles,
    tile_weights,
    tiled_decode,
    tiled_encode,
    tiled_map,
    weight_sums,
)
from tests.helpers import micro_pipeline, seeded


@pytest.mark.parametrize(
    "length,tile,overlap,multiple", [(100, 32, 8, 1), (96, 32, 16, 4), (33, 16, 4, 1), (20, 32, 8, 1)]
)
def test_tiles_cover_the_grid_and_share_at_least_the_overlap(length, tile, overlap, multiple):
    tiles = plan_tiles(length, length + 5, tile, overlap, multiple)
    covered = torch.zeros(length, length + 5, dtype=torch.int64)
    for t in tiles:
        covered[t.slices()] += 1
        assert t.height == min(tile, length) and t.top % multiple == 0
    assert covered.min() >= 1
    tops = sorted({t.top for t in tiles})
    assert all(b - a <= tile - overlap for a, b in zip(tops, tops[1:], strict=False))
    assert tops[-1] + min(tile, length) == length
    if length <= tile:
        assert tops == [0]


@pytest.mark.parametrize(("height", "width", "mode"), [(5, 6, "reflect"), (3, 2, "replicate"), (8, 8, None)])
def test_padding_goes_bottom_right_so_the_image_keeps_its_top_left_corner(height, width, mode):
    image = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    padded = pad_to_multiple(image, 4)
    assert padded.shape[-2:] == (-(-height // 4) * 4, -(-width // 4) * 4)
    assert torch.equal(padded[..., :height, :width], image)
    if mode is not None:  # the first padded row mirrors the row above the last (reflect) or repeats the last
        assert torch.equal(padded[..., height, :width], image[..., height - 2 if mode == "reflect" else height - 1, :])
    else:
        assert padded is image  # no copy when nothing is padded


def test_weights_ramp_only_towards_neighbours_and_stay_positive_where_tiles_meet():
    tiles = plan_tiles(40, 40, 16, 8)
    corner = tile_weights(tiles[0], 8)
    assert corner[0, 0] == 1 and corner[15, 15] == 0  # the grid border stays 1; the shared corner's guard is 0
    total = sum(F.pad(tile_weights(t, 8), (t.left, 40 - t.left - t.width, t.top, 40 - t.top - t.height)) for t in tiles)
    assert total.min() > 0.1


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "scale"), [(40, 40, 16, 8, 1.0), (37, 52, 16, 6, 2.0)])
def test_separable_weight_sums_equal_the_accumulated_weights(height, width, tile, overlap, scale):
    tiles = plan_tiles(height, width, tile, overlap)
    out_h, out_w = round(height * scale), round(width * scale)
    total = torch.zeros(out_h, out_w, dtype=torch.float64)
    for t in tiles:
        rows, cols = t.slices(scale)
        total[rows, cols] += tile_weights(t, overlap, scale).double()
    row_sum, col_sum = weight_sums(tiles, overlap, scale, out_h, out_w)
    assert torch.allclose(row_sum[:, None] * col_sum[None, :], total, rtol=1e-6, atol=1e-6)


def _local_net(seed: int = 0) -> torch.nn.Module:
    """Convolutions with zero padding (the edge behaviour of a U-Net or decoder), receptive field ±3, ×2 upsampling."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Upsample(scale_factor=2, mode="nearest"),
        torch.nn.Conv2d(8, 3, 5, padding=2),
    ).eval()


@torch.no_grad()
def test_blending_reproduces_a_local_function_exactly():
    net = _local_net()
    latents = torch.randn(2, 4, 45, 70)
    full = net(latents)
    # overlap 12 → guard band 3 ≥ the receptive field: each output pixel comes from tiles where it is valid
    tiled = tiled_map(net, [latents], 16, 12, scale=2.0, batch_size=3)
    assert tiled.shape == full.shape
    assert torch.allclose(tiled, full, atol=1e-5), (tiled - full).abs().max()
    without_guard = tiled_map(net, [latents], 16, 0, scale=2.0)
    assert (without_guard - full).abs().max() > 1e-2  # hard tiles do see the zero padding


@pytest.mark.parametrize(
    ("tile", "overlap", "multiple", "shared"), [(64, 32, 64, 0), (32, 24, 16, 16), (48, 40, 16, 32), (32, 8, 4, 8)]
)
def test_an_overlap_the_stride_cannot_keep_blends_without_holes(tile, overlap, multiple, shared):
    """tile − overlap below `multiple`: the starts step by `multiple`, so neighbours share less than asked.
    Ramps as long as the asked overlap weighed both tiles 0 where they meet: 0/0, NaN in the output (pix2pix
    at tile 256, overlap 64, 2**8). The blend now uses the overlap the tiles really share."""
    image = torch.rand(1, 1, 150, 200, generator=seeded(0))
    tiled = tiled_map(lambda x: x * 2.0, [image], tile, overlap, multiple=multiple)
    assert torch.isfinite(tiled).all() and torch.allclose(tiled, image * 2.0, atol=1e-5)
    assert blend_overlap(tile, overlap, multiple) == min(
        overlap, tile - max(multiple, (tile - overlap) // multiple * multiple)
    )


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_fn_is_told_which_tiles_it_was_given(batch_size):
    # a map of each pixel's own (row, column): a tile's stacked pixels say where they came from
    rows, cols = torch.meshgrid(torch.arange(37.0), torch.arange(50.0), indexing="ij")
    coords = torch.stack([rows, cols])[None].expand(2, -1, -1, -1)
    seen = []

    def fn(x, *, tiles):
        assert x.shape[0] == 2 * len(tiles) <= 2 * batch_size
        for i, t in enumerate(tiles):  # tile-major: the N=2 images of tile i, then of tile i + 1
            assert torch.equal(x[2 * i : 2 * i + 2], coords[(...,) + t.slices()])
        seen.extend(tiles)
        return x * 2

    out = tiled_map(fn, [coords], 16, 6, batch_size=batch_size, pass_tiles=True)
    assert seen == plan_tiles(37, 50, 16, 6)
    assert torch.allclose(out, coords * 2, atol=1e-4)


@torch.no_grad()
def test_tiled_decode_and_encode_match_the_full_ones_on_a_micro_vae():
    vae = micro_pipeline().vae
    latents = torch.randn(1, 4, 64, 64, generator=seeded(0)) * vae.config.scaling_factor
    full = decode_latents(vae, latents)

    def decode(z):
        return decode_latents(vae, z)

    assert torch.equal(tiled_decode(decode, latents, 64, 16, 2), full)  # fits in one tile: untouched
    tiled = tiled_decode(decode, latents, 32, 8, 2)
    # GroupNorm statistics and the mid-block attention see a tile, not the image: close, not equal
    error = (tiled - full).abs()
    hard = (tiled_decode(decode, latents, 32, 0, 2) - full).abs()  # no overlap, no blending
    assert error.mean() < hard.mean(), (error.mean(), hard.mean())
    assert error.mean() < 0.2 * full.std() and error.max() < 0.5, (error.mean(), error.max())
    image = torch.rand(1, 3, 128, 128, generator=seeded(1)) * 2 - 1
    encoded = encode_latents(vae, image)
    tiled_latents = tiled_encode(lambda x: encode_latents(vae, x), image, 64, 16, 2)
    assert tiled_latents.shape == encoded.shape
    assert (tiled_latents - encoded).abs().mean() < 0.1 * encoded.std()


@torch.no_grad()
def test_images_up_to_the_decode_tile_minimum_decode_in_one_piece_without_tile_blocks():
    """The default decode tile is at least DECODE_TILE_MIN (1024 px), so an 853×682 UWF image decodes as the
    whole image does. Smaller tiles (512 px was the default) each normalise by their own GroupNorm
    statistics: brightness blocks, most of a near-flat synthetic image's variation. Shown here at micro
    scale: a 160×128 image, its decode tile 64 px against one piece."""
    assert TileSettings.resolve(128).decode_size == DECODE_TILE_MIN >= 1024 > max(853, 682)
    assert TileSettings.resolve(2048).decode_size == 2048 and TileSettings.resolve(0).decode_size == 0
    vae = micro_pipeline().vae
    latents = torch.randn(1, 4, 64, 80, generator=seeded(3)) * 0.2 * vae.config.scaling_factor
    latents[..., :, :40] += 0.5 * vae.config.scaling_factor  # a brighter left half: the tiles' statistics differ

    def decode(z):
        return decode_latents(vae, z)

    def decoded(size: int) -> torch.Tensor:  # as FFASynthesisPipeline.sample_image decodes (factor 2)
        tile = max(1, min(160, size) // 2)
        return tiled_decode(decode, latents, tile, tile // 4, 2)

    whole = decode(latents)
    assert torch.equal(decoded(TileSettings.resolve(32).decode_size), whole)
    # 64-px tiles: their low-frequency brightness departs from the whole decode's, block by block
    blocks = F.avg_pool2d(decoded(64) - whole, 16)
    assert blocks.abs().max() > 0.02, blocks.abs().max()
    # and the pipeline itself: its default decode is the one-piece decode
    pipe = micro_pipeline()
    photo = torch.rand(3, 128, 160, generator=seeded(4))
    default = pipe.sample_image(photo, 2, seeded(0), 1.0, 1, None, TileSettings.resolve(32))
    one_piece = pipe.sample_image(photo, 2, seeded(0), 1.0, 1, None, TileSettings.resolve(32, decode_size=0))
    assert torch.equal(default, one_piece)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
@torch.no_grad()
def test_an_image_that_fits_in_one_tile_gives_the_untiled_sampler_result(scheduler_class):
    """Against a plain diffusers loop; Euler's starting noise is scaled by init_noise_sigma and its model
    input by scale_model_input (both identities for DDIM)."""
    pipe = micro_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    photo = torch.rand(3, 24, 32, generator=seeded(2))
    tiled = pipe.sample_image(photo, 4, seeded(5), 1.0, 2, "late", TileSettings.resolve(32, 8))
    # the plain sampler: whole-image conditioning, one U-Net pass on the whole latent per step, one decode
    conditioner = pipe.conditioner()
    source = photo[None] * 2 - 1
    tokens, source_latents = conditioner.tokens(source), encode_latents(pipe.vae, source)
    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    latents = torch.randn((2, 4, 12, 16), generator=seeded(5)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([scheduler.scale_model_input(latents, t), source_latents.expand(2, -1, -1, -1)], dim=1)
        noise = pipe.unet(
            model_input, t, encoder_hidden_states=tokens.expand(2, -1, -1), class_labels=torch.tensor([1, 1])
        )
        latents = scheduler.step(noise.sample, t, latents).prev_sample
    untiled = ((decode_latents(pipe.vae, latents) + 1) / 2).clamp(0, 1)
    assert torch.allclose(tiled, untiled, atol=1e-6), (tiled - untiled).abs().max()


def _border_gradient_ratio(image: torch.Tensor, edges: list[int], width: int = 3, margin: int = 8) -> float:
    """Mean |step| between neighbouring pixel columns/rows within `width` of a tile edge ÷ the same
    elsewhere (inner lines only: the image's own border is the VAE's business)."""
    profiles = [
        (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2)),
        (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3)),
    ]
    near, far = [], []
    for profile in profiles:
        for position in range(margin, profile.shape[0] - margin):
            close = any(abs(position + 0.5 - edge) <= width for edge in edges)
            (near if close else far).append(profile[position])
    return float(torch.stack(near).mean() / torch.stack(far).mean())


@torch.no_grad()
def test_no_visible_seam_at_tile_borders_on_a_phantom():
    pipe = micro_pipeline("stage1.prediction_type=epsilon")  # the stand-in below answers with ε
    alphas = pipe.scheduler.alphas_cumprod

    def structured_unet(module, args, kwargs, output):
        """A U-Net stand-in whose clean-latent guess is the source latent under a zero-padded 7×7 mean:
        a phantom image comes out, tiles darken at their edges the way convolutions do."""
        noisy, source = args[0][:, :4], args[0][:, 4:]
        target = F.avg_pool2d(source, 7, stride=1, padding=3)
        alpha = alphas[int(args[1])]
        output.sample = (noisy - alpha.sqrt() * target) / (1 - alpha).sqrt()  # ε that implies x0 = target
        return output

    latents = []  # the sampled latent, as the decoder receives it
    hooks = [
        pipe.unet.register_forward_hook(structured_unet, with_kwargs=True),
        pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: latents.append(args[0])),
    ]
    eye = make_eye(size=128, seed=2)
    photo = torch.from_numpy(eye.photo.transpose(2, 0, 1).copy())
    try:  # decoded whole, so what is measured is the tiling of the denoising steps
        blended = pipe.sample_image(photo, 6, seeded(0), 1.0, 1, None, TileSettings.resolve(32, 16, decode_size=0))
        pipe.sample_image(photo, 6, seeded(0), 1.0, 1, None, TileSettings.resolve(32, 0, decode_size=0))
    finally:
        for hook in hooks:
            hook.remove()
    # latent tiles of 16 every 8 (blended) or every 16 (hard); inner edges only
    edges = sorted({e for t in plan_tiles(64, 64, 16, 8) for e in (t.left, t.left + t.width)} - {0, 64})
    assert _border_gradient_ratio(latents[0], edges, width=1, margin=4) < 1.2
    assert _border_gradient_ratio(blended, [2 * e for e in edges], width=3, margin=8) < 1.2
    # the measure does see seams where they exist: abutting denoising tiles, no blending (the source is
    # encoded with its half-tile overlap either way, so these seams are the denoising steps' alone)
    assert _border_gradient_ratio(latents[1], [16, 32, 48], width=1, margin=4) > 1.35


def test_source_encode_spreads_a_tiles_context_over_the_whole_tile():
    """The encoder normalises each tile by its own statistics (GroupNorm), so a place's latent depends on
    what else its tile holds. On a UWF photo the tiles that hold the eyelids encode the retina beside them
    shifted: with a quarter overlap that shift changes within a narrow band, a step the angiogram shows as
    a rectangle one tile in from the field's edge. The default half-tile overlap spreads it over the tile.
    Here an encoder that subtracts its tile's mean, a flat image with a bright band at the top."""

    def encode(x):
        return F.avg_pool2d(x, 4) - x.mean(dim=(-2, -1), keepdim=True)

    image = torch.full((1, 3, 320, 320), 0.5)
    image[..., :48, :] = 1.0

    def largest_step(overlap):
        flat = tiled_encode(encode, image, 128, overlap, 4)[0, 0, 16:, 8:-8]  # below the band (12 latent rows)
        return float((flat[1:] - flat[:-1]).abs().max())

    quarter, default = largest_step(32), largest_step(None)
    assert default < 0.6 * quarter, (default, quarter)
    assert largest_step(64) == default  # None is half the tile
    # an encoder without context (a 4×4 mean): the blend reassembles the untiled latent exactly, any size
    image = torch.rand(1, 3, 236, 300, generator=seeded(5))
    assert torch.allclose(
        tiled_encode(lambda x: F.avg_pool2d(x, 4), image, 64, None, 4), F.avg_pool2d(image, 4), atol=1e-6
    )
