"""Paired crops, flips, padding, FOV-aware crop choice, and the Dataset built on them."""

from __future__ import annotations

import pytest
import torch

from ffasynth.config import load_config
from ffasynth.data.dataset import PairDataset
from ffasynth.data.pair_check import load_pairs
from ffasynth.data.transforms import PairedTransform, choose_crop, denormalise, fov_mask, whole_view, window_counts
from ffasynth.errors import ConfigError


def _pair(h=60, w=80):
    # Target is a deterministic function of source position: crops agree iff they are the same window.
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coord = (ys * w + xs).float() / (h * w)
    source = torch.stack([coord, 1 - coord, torch.full_like(coord, 0.5)])
    return source, coord[None].clone()


def test_source_and_target_get_the_same_crop_and_flip():
    source, target = _pair()
    transform = PairedTransform(crop_size=32, hflip=True, vflip=True, min_fov_fraction=0.0)
    for seed in range(20):
        item = transform(source, target, torch.Generator().manual_seed(seed))
        assert item["source"].shape == (3, 32, 32) and item["target"].shape == (1, 32, 32)
        assert torch.allclose(item["source"][0], item["target"][0], atol=1e-6)
        assert item["source"].min() >= -1 and item["source"].max() <= 1


def test_same_generator_seed_same_crop_different_seed_differs():
    source, target = _pair()
    transform = PairedTransform(crop_size=24, min_fov_fraction=0.0)
    first = transform(source, target, torch.Generator().manual_seed(3))
    again = transform(source, target, torch.Generator().manual_seed(3))
    other = transform(source, target, torch.Generator().manual_seed(4))
    assert torch.equal(first["target"], again["target"])
    assert not torch.equal(first["target"], other["target"])


def test_small_images_are_padded_not_crashed_on():
    source, target = _pair(20, 30)
    item = PairedTransform(crop_size=48, hflip=False)(source, target, torch.Generator().manual_seed(0))
    assert item["source"].shape == (3, 48, 48)
    assert item["mask"].sum() > 0 and item["mask"].sum() < 48 * 48  # padding is outside the FOV
    assert torch.equal(denormalise(item["target"])[item["mask"] == 0], torch.zeros(int((item["mask"] == 0).sum())))


def test_crops_avoid_black_border():
    mask = torch.zeros(1, 100, 100)
    mask[:, 60:, 60:] = 1  # only the bottom-right corner is inside the field of view
    hits, positions = 0, set()
    for seed in range(30):
        top, left = choose_crop(mask, 30, torch.Generator().manual_seed(seed), 0.9)
        hits += float(mask[0, top : top + 30, left : left + 30].sum()) / 900 >= 0.9 - 1e-9
        positions.add((top, left))
    assert hits == 30
    assert len(positions) > 10  # uniform among the good windows, not one fixed window


def test_fov_mask_keeps_dark_vessels_inside_field():
    image = torch.zeros(3, 50, 50)
    image[:, 10:40, 10:40] = 0.5
    image[:, 24:26, 10:40] = 0.02  # a dark vessel crossing the field
    mask = fov_mask(image, threshold=0.04)
    assert mask[0, 25, 25] == 1 and mask[0, 2, 2] == 0


def test_dataset_items_are_deterministic_per_epoch(phantom_dir):
    pairs = load_pairs(phantom_dir, phase="both")
    dataset = PairDataset(pairs, PairedTransform(crop_size=32), seed=1)
    assert len(dataset) == 20
    item = dataset[3]
    assert item["source"].shape == (3, 32, 32) and item["target"].shape == (1, 32, 32)
    assert item["phase"] in (0, 1) and item["label"]
    assert torch.equal(dataset[3]["target"], item["target"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["target"], item["target"])
    whole = PairDataset(pairs)[0]
    assert whole["source"].shape == (3, 64, 64)


def _rows_and_cols(h=256, w=256):
    """source channel 0 = row / h, channel 1 = column / w; the target = row / h: a crop says which rows
    and columns it covers, so a zoomed crop's window can be read off its values."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = ys.float() / h, xs.float() / w
    return torch.stack([rows * 0.9 + 0.1, cols * 0.9 + 0.1, torch.full_like(rows, 0.5)]), (rows * 0.9 + 0.1)[None]


def test_zoom_out_crops_cover_windows_up_to_zoom_out_times_wider_shrunk_to_the_crop_size():
    source, target = _rows_and_cols()
    transform = PairedTransform(crop_size=16, hflip=False, min_fov_fraction=0.0, whole_view_size=0, zoom_out=4.0)
    spans = []
    for seed in range(40):
        item = transform(source, target, torch.Generator().manual_seed(seed))
        assert item["source"].shape == (3, 16, 16) and item["target"].shape == (1, 16, 16)
        rows = denormalise(item["source"][0])
        assert torch.allclose(rows, denormalise(item["target"][0]), atol=1e-6)  # paired: the same window
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        # area-averaged: the first and last output rows are the means of the window's first and last
        # z rows, so their difference is the window's side minus z, in rows: (16z - z) / 256 * 0.9
        step = float(rows[-1].mean() - rows[0].mean()) / 0.9 * 256
        spans.append(step / 15)  # = z, the zoom this crop was drawn with
    assert min(spans) >= 1.0 - 1e-3 and max(spans) <= 4.0 + 0.07
    assert max(spans) > 3.0 and min(spans) < 1.5  # log-uniform over [1, 4]: both ends are drawn
    small_source, small_target = _rows_and_cols(20, 30)
    for seed in range(10):  # the window stops at the image's longest side (30): every column holds image
        mask = transform(small_source, small_target, torch.Generator().manual_seed(seed))["mask"][0]
        assert bool((mask.amax(dim=0) == 1).all())  # a window up to 64 wide would have padding-only columns
    again = transform(source, target, torch.Generator().manual_seed(7))
    assert torch.equal(again["source"], transform(source, target, torch.Generator().manual_seed(7))["source"])


def test_zoom_out_1_draws_the_same_crops_as_before():
    """zoom_out 1 draws no zoom: the crop is choose_crop's window at crop_size from the same generator."""
    source, target = _rows_and_cols(60, 80)
    transform = PairedTransform(crop_size=24, hflip=False, min_fov_fraction=0.0, whole_view_size=0, zoom_out=1.0)
    for seed in range(5):
        item = transform(source, target, torch.Generator().manual_seed(seed))
        top, left = choose_crop(fov_mask(source), 24, torch.Generator().manual_seed(seed), 0.0)
        assert torch.allclose(denormalise(item["target"]), target[:, top : top + 24, left : left + 24], atol=1e-6)


def test_zoomed_crops_take_their_window_counts_from_the_cache_and_match_uncached_ones(tmp_path):
    source, target = _rows_and_cols(96, 128)
    transform = PairedTransform(crop_size=16, min_fov_fraction=0.5, whole_view_size=0, zoom_out=4.0)
    asked = []

    def counts(window):
        asked.append(window)
        return window_counts(fov_mask(source), window)

    for seed in range(12):
        cached = transform(source, target, torch.Generator().manual_seed(seed), counts=counts)
        plain = transform(source, target, torch.Generator().manual_seed(seed))
        assert all(torch.equal(cached[k], plain[k]) for k in ("source", "target", "mask"))
    assert set(asked) <= {round(16 * 4 ** (k / 8)) for k in range(9)} and len(set(asked)) > 2


@pytest.mark.parametrize("value", ["0.5", "20", ".nan"])
def test_zoom_out_outside_1_16_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"data\.zoom_out"):
        load_config(preset="tiny", overrides=[f"data.zoom_out={value}"])
    assert load_config(preset="tiny", overrides=["data.zoom_out=4"]).data.zoom_out == 4.0


def test_source_jitter_changes_the_photo_by_one_gain_per_channel_and_one_gamma_and_never_the_target():
    """data.source_jitter s: each crop's photo becomes clamp(g_c · x^γ), g_c in [1 - s, 1 + s], γ in [e^-s, e^s],
    the same for its CLIP view; the target, the mask and the crop are those drawn without it."""
    strength = 0.3
    source, target = _pair()
    source[:, :, :10] = 0.0  # a black rim: it stays black
    plain = PairedTransform(crop_size=32, min_fov_fraction=0.0, whole_view_size=16)
    jittered = PairedTransform(crop_size=32, min_fov_fraction=0.0, whole_view_size=16, source_jitter=strength)
    gammas, gain_gaps = [], []
    for seed in range(12):
        a = plain(source, target, torch.Generator().manual_seed(seed))
        b = jittered(source, target, torch.Generator().manual_seed(seed))
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["mask"], b["mask"])
        for key in ("source", "whole_source"):
            x, y = denormalise(a[key]).double(), denormalise(b[key]).double()
            assert (y[x == 0] == 0).all()
            inside = (x > 0.05) & (y > 0.02) & (y < 0.98)  # neither clipped nor near 0
            fits = []  # log y = γ log x + log g_c, channel by channel
            for c in range(3):
                lx, ly = x[c][inside[c]].log(), y[c][inside[c]].log()
                if lx.std() < 0.05:  # a constant channel: the gain alone shows
                    gain, gamma = float((ly - lx * fits[0][1]).mean().exp()), fits[0][1]
                else:
                    design = torch.stack([lx, torch.ones_like(lx)], 1)
                    gamma, log_gain = torch.linalg.lstsq(design, ly[:, None]).solution[:, 0].tolist()
                    gain = float(torch.tensor(log_gain).exp())
                    assert torch.allclose(design @ torch.tensor([gamma, log_gain]).double(), ly, atol=2e-3)
                fits.append((gain, gamma))
                assert 1 - strength - 1e-3 <= gain <= 1 + strength + 1e-3
            assert abs(fits[0][1] - fits[1][1]) < 1e-2  # one gamma for every channel
            assert abs(torch.tensor(fits[0][1]).log()) <= strength + 1e-2
        gammas.append(fits[0][1])
        gain_gaps.append(abs(fits[0][0] - fits[1][0]))
    assert max(gammas) - min(gammas) > 0.1  # drawn afresh per crop
    assert max(gain_gaps) > 0.05  # a gain per channel, not one for all


@pytest.mark.parametrize("value", ["-0.1", "1.0", "1.5", "nan"])
def test_source_jitter_is_refused_outside_0_to_1(value):
    with pytest.raises(ConfigError, match="data.source_jitter"):
        load_config(None, "tiny", [f"data.source_jitter={value}"])
    assert load_config(None, "tiny", ["data.source_jitter=0.5"]).data.source_jitter == 0.5


def test_the_whole_view_is_the_centre_of_an_oblong_photo():
    photo = torch.linspace(0, 1, 64).expand(3, 32, 64).contiguous()  # brightness grows to the right
    view = whole_view(photo, size=32)  # the short side is already 32: no resizing, the middle 32 columns
    assert torch.allclose(view, photo[:, :, 16:48], atol=1e-5)
    assert torch.allclose(whole_view(photo.transpose(1, 2), size=32), photo[:, :, 16:48].transpose(1, 2), atol=1e-5)


def test_crops_stay_inside_a_field_that_is_not_symmetric_under_transposition():
    mask = torch.zeros(1, 64, 128)
    mask[..., 96:] = 1  # only the right quarter is inside: a crop read with rows and columns swapped lands outside
    for seed in range(30):
        top, left = choose_crop(mask, 32, torch.Generator().manual_seed(seed), min_fraction=0.9)
        assert mask[0, top : top + 32, left : left + 32].mean() >= 0.9, (top, left)
