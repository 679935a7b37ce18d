"""Whole images at native size with bounded memory: run a function over overlapping tiles and blend
the results with weights that ramp down towards the tile borders shared with a neighbour. The one
tiler and the one padding rule of the package: the diffusion pipeline and the pix2pix baseline
both pad with `pad_to_multiple` and tile with `tiled_map`, so they differ only in the method.

Used three ways by the pipeline: the source encode (pixels → latent, scale 1/f), every denoising
step's model prediction (latent → latent, scale 1; blended at every step, so neighbouring tiles
agree on the one latent the scheduler then steps), and the decode (latent → pixels, scale f).
An input no larger than the tile runs as one piece with weight exactly 1: the same numbers as
running untiled. The pix2pix baseline runs its generator the same way (pixels → pixels, scale 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ffasynth.errors import FFASynthError

# The VAE decode tile's least side (pixels): an image up to this size decodes in one piece. The decoder's
# GroupNorm statistics are each tile's own, so tiles of one image come out at slightly different
# brightness: blocks the size of the tile, which on a near-flat synthetic angiogram are most of its
# low-frequency variance (2026-12-05: at 512 px they decided the own-eye correlation test on the UWF eyes).
DECODE_TILE_MIN = 1024
# The source encode's overlap, a fraction of its tile (tiled_encode): the most the blend allows.
ENCODE_OVERLAP = 0.5


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """(N, C, H, W) → padded on the bottom/right to multiples of `multiple`, so the top-left pixel
    keeps its place and `out[..., :H, :W]` undoes it; reflect (mirror) where it fits, else replicate."""
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


@dataclass(frozen=True)
class Tile:
    """A window of the input grid; `first_*`/`last_*` say whether it touches the grid's borders."""

    top: int
    left: int
    height: int
    width: int
    first_row: bool
    last_row: bool
    first_col: bool
    last_col: bool

    def slices(self, scale: float = 1.0) -> tuple[slice, slice]:
        top, left = round(self.top * scale), round(self.left * scale)
        return slice(top, top + round(self.height * scale)), slice(left, left + round(self.width * scale))


def tile_stride(tile: int, overlap: int, multiple: int = 1) -> int:
    """The step between tile starts: tile − overlap rounded down to `multiple`, at least `multiple`."""
    return max(multiple, (tile - overlap) // multiple * multiple)


def blend_overlap(tile: int, overlap: int, multiple: int = 1) -> int:
    """The overlap the blend ramps may use: the one asked for, unless a stride of at least `multiple` leaves
    neighbours less (tile − overlap < multiple); a longer ramp would weigh both tiles 0 where they meet."""
    return max(0, min(overlap, tile - tile_stride(tile, overlap, multiple)))


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Starts of windows of `tile` covering [0, length) with at least blend_overlap(...) shared; the last
    one ends at `length`. Starts are multiples of `multiple` when length and tile are."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile_stride(tile, overlap, multiple))) + [length - tile]
    return sorted(set(starts))


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Row-major tiles of at most tile×tile; dimensions smaller than the tile are covered whole."""
    rows = tile_starts(height, tile, overlap, multiple)
    cols = tile_starts(width, tile, overlap, multiple)
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Tile(top, left, tile_h, tile_w, i == 0, i == len(rows) - 1, j == 0, j == len(cols) - 1)
        for i, top in enumerate(rows)
        for j, left in enumerate(cols)
    ]


def ramp(length: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D weights towards a shared border: 0 over a guard band of G = R//4 samples at the edge (where
    a convolution's zero padding corrupts a tile's output; the neighbour covers them), then
    sin²(π/2 · (d − G + ½)/(R − G)) up to R, 1 beyond."""
    weights = torch.ones(length, dtype=torch.float64)
    overlap = min(overlap, length // 2)
    if overlap > 0:
        guard = overlap // 4
        rising = torch.zeros(overlap, dtype=torch.float64)
        steps = torch.arange(overlap - guard, dtype=torch.float64)
        rising[guard:] = torch.sin(0.5 * math.pi * (steps + 0.5) / (overlap - guard)) ** 2
        if rise:
            weights[:overlap] = rising
        if fall:
            weights[length - overlap :] = rising.flip(0)
    return weights


def tile_ramps(tile: Tile, overlap: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile's row and column weights in output units; no ramp on sides at the grid's border."""
    height, width, ramp_length = round(tile.height * scale), round(tile.width * scale), round(overlap * scale)
    rows = ramp(height, ramp_length, not tile.first_row, not tile.last_row)
    cols = ramp(width, ramp_length, not tile.first_col, not tile.last_col)
    return rows, cols


def tile_weights(tile: Tile, overlap: int, scale: float = 1.0) -> torch.Tensor:
    """(h, w) blending weights in output units: the outer product of the tile's ramps."""
    rows, cols = tile_ramps(tile, overlap, scale)
    return (rows[:, None] * cols[None, :]).float()


def weight_sums(tiles: list[Tile], overlap: int, scale: float, height: int, width: int):
    """Σ_t w_t over the whole grid, as its row and column factors: every tile's weights are
    r_i(y)·c_j(x) for its grid row i and column j, so Σ_t w_t = (Σ_i r_i)(y) · (Σ_j c_j)(x) and
    blending needs no (H, W) accumulator."""
    row_sum = torch.zeros(height, dtype=torch.float64)
    col_sum = torch.zeros(width, dtype=torch.float64)
    for t in tiles:
        rows, cols = tile_ramps(t, overlap, scale)
        row_slice, col_slice = t.slices(scale)
        if t.first_col:
            row_sum[row_slice] += rows
        if t.first_row:
            col_sum[col_slice] += cols
    return row_sum, col_sum


def tiled_map(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tile: int,
    overlap: int,
    scale: float = 1.0,
    multiple: int = 1,
    batch_size: int = 4,
    out_device: torch.device | str | None = None,
    pass_tiles: bool = False,
) -> torch.Tensor:
    """fn over overlapping tiles of `inputs` (each (N, C_i, H, W)), blended: Σ w_t·fn(x_t) / Σ w_t.

    fn takes the tiles of every input stacked tile-major ((n·N, C_i, h, w) each, on the inputs'
    device: fn moves them where it runs) and returns (n·N, C_out, h·scale, w·scale); up to
    `batch_size` tiles go through fn at once. pass_tiles: fn also gets `tiles=`, the n windows (a
    list of `Tile`, in input units), e.g. to look up what was computed for each tile beforehand.
    The blended output is assembled on `out_device` (default: where fn's results are), e.g. the CPU
    for a large decoded image.
    """
    first = inputs[0]
    count, height, width = first.shape[0], first.shape[-2], first.shape[-1]
    tiles = plan_tiles(height, width, tile, overlap, multiple)
    overlap = blend_overlap(tile, overlap, multiple)
    out_height, out_width = round(height * scale), round(width * scale)
    output = None
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        stacked = [torch.cat([x[(...,) + t.slices()] for t in chunk]) for x in inputs]
        result = fn(*stacked, tiles=chunk) if pass_tiles else fn(*stacked)
        if len(tiles) == 1:  # one piece: no blending arithmetic, identical to the untiled result
            return result if out_device is None else result.to(out_device)
        if output is None:
            device = result.device if out_device is None else out_device
            output = torch.zeros(count, result.shape[1], out_height, out_width, dtype=torch.float32, device=device)
            row_sum, col_sum = weight_sums(tiles, overlap, scale, out_height, out_width)
        for index, t in enumerate(chunk):
            rows, cols = t.slices(scale)
            row_ramp, col_ramp = tile_ramps(t, overlap, scale)
            weights = ((row_ramp / row_sum[rows])[:, None] * (col_ramp / col_sum[cols])[None, :]).float()
            piece = result[index * count : (index + 1) * count].float() * weights.to(result.device)
            output[..., rows, cols] += piece.to(output.device)
    return output.to(result.dtype)


def check_tile_settings(
    size: int | None,
    overlap: int | None,
    decode_size: int | None,
    vae_factor: int,
    unet_factor: int,
    names: tuple[str, str, str] = ("tile_size", "tile_overlap", "decode_tile_size"),
) -> list[str]:
    """Refuse, in one line saying what was asked and what is allowed, tile settings (in pixels; None =
    the default, not checked) that the tiler would otherwise change quietly; return a note for each
    value rounded on purpose.
    size: 0 (whole image) or a multiple of the model's downsampling f = VAE × U-Net factor, at least f.
    overlap: 0 to half the tile (latent_tile caps the blend there); rounded down to the VAE's grid,
    the pixels of one latent (noted). decode_size: 0 (whole image) or a multiple of the VAE factor."""
    size_name, overlap_name, decode_name = names
    factor = vae_factor * unet_factor
    notes = []
    if size is not None and (size < 0 or (size > 0 and size % factor)):
        below = max(factor, size // factor * factor)
        raise FFASynthError(
            f"{size_name} {size}: allowed 0 (the whole image) or a multiple of {factor}, the model's downsampling "
            f"(e.g. {below} or {below + factor})"
        )
    if overlap is not None:
        tile = size if size else None
        if overlap < 0 or (tile is not None and overlap > tile // 2):
            allowed = f"0 to {tile // 2} (half the tile)" if tile is not None else "0 or more"
            raise FFASynthError(f"{overlap_name} {overlap}: allowed {allowed}")
        if overlap % vae_factor:
            rounded = overlap // vae_factor * vae_factor
            notes.append(f"{overlap_name} {overlap} is rounded down to {rounded}, a whole number of latent pixels "
                         f"({vae_factor} px each)")  # fmt: skip
    if decode_size is not None and (decode_size < 0 or (decode_size > 0 and decode_size % vae_factor)):
        below = max(vae_factor, decode_size // vae_factor * vae_factor)
        raise FFASynthError(
            f"{decode_name} {decode_size}: allowed 0 (the whole image) or a multiple of {vae_factor}, the VAE's "
            f"downsampling (e.g. {below})"
        )
    return notes


def latent_tile(tile_px: int, overlap_px: int, vae_factor: int, unet_factor: int) -> tuple[int, int]:
    """A pixel tile and overlap → latent units: the tile a multiple of the U-Net's downsampling."""
    tile = max(unet_factor, tile_px // vae_factor // unet_factor * unet_factor)
    overlap = min(max(0, overlap_px // vae_factor), tile // 2)
    return tile, overlap


def tiled_encode(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile_px: int,
    overlap_px: int | None,
    factor: int,
) -> torch.Tensor:
    """Pixels (N, 3, H, W) → latents (N, C, H/f, W/f) in tiles of tile_px (the size the model saw
    in training, so each tile's normalisation statistics match training's crops).

    overlap_px None: half the tile (`ENCODE_OVERLAP`). The encoder's GroupNorm statistics are each
    tile's own, so the latent of a place depends on what else its tile holds: with a quarter overlap a
    UWF photo's tiles that hold the eyelids or the black border encode the retina beside them shifted,
    and the angiogram shows it as a rectangle one tile in from the field's edge (2026-12-05). Half the
    tile spreads every change of context over the whole tile: no steps, for about twice the encoder's tiles
    (2026-12-05, an 853×682 photo at 128-px tiles: conditioning 0.9 → 1.4 s of an 11.5-s translation)."""
    tile = max(factor, tile_px // factor * factor)
    overlap_px = round(tile * ENCODE_OVERLAP) if overlap_px is None else overlap_px
    overlap = min(overlap_px // factor * factor, tile // 2)
    return tiled_map(encode, [image], tile, overlap, scale=1.0 / factor, multiple=factor, batch_size=1)


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int,
    overlap: int,
    factor: int,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Latents (N, C, h, w) → pixels (N, C', h·f, w·f), decoding latent tiles of `tile` one at a time."""
    return tiled_map(decode, [latents], tile, overlap, scale=float(factor), batch_size=1, out_device=out_device)


@dataclass(frozen=True)
class TileSettings:
    """Tiling in pixels. size: the denoising and source-encoding tile (0 = whole image); overlap:
    between the denoising tiles (the source encode overlaps by half its tile, `tiled_encode`);
    decode_size: the VAE decode tile (0 = whole), at least DECODE_TILE_MIN because the decoder's
    normalisation statistics differ from tile to tile (seams, brightness blocks), overlapping by a
    quarter of it; batch_size: denoising tiles per U-Net pass."""

    size: int
    overlap: int
    decode_size: int
    batch_size: int = 8

    @classmethod
    def resolve(cls, size: int, overlap: int | None = None, decode_size: int | None = None, batch_size: int = 8):
        """Defaults: overlap = size/4; decode_size = max(size, DECODE_TILE_MIN) (whole image when size is 0)."""
        overlap = size // 4 if overlap is None else overlap
        decode_size = (max(size, DECODE_TILE_MIN) if size > 0 else 0) if decode_size is None else decode_size
        if min(size, overlap, decode_size) < 0 or batch_size < 1:
            raise FFASynthError(f"tile sizes and overlap must be >= 0 and the tile batch >= 1, not {size, overlap}")
        return cls(size, overlap, decode_size, batch_size)
