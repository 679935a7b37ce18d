"""UWF phantom eyes (Optos-like pseudo-colour, registered angiograms), the standard eye's `vary`
option, and the unlimited phantom stream for pretraining."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ffasynth.cli import app
from ffasynth.data.dataset import StreamBatchSampler
from ffasynth.data.phantom import DISEASES, make_eye, write_phantom_dataset
from ffasynth.data.phantom_stream import PhantomStream
from ffasynth.data.phantom_uwf import BLUE_LEVEL
from ffasynth.data.transforms import PairedTransform


def _inner(fov: np.ndarray, margin: int = 9) -> np.ndarray:
    return cv2.erode(fov.astype(np.uint8), np.ones((margin, margin), np.uint8)).astype(bool)


def _high_pass(image: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    image = image.astype(np.float32)
    return image - cv2.GaussianBlur(image, (0, 0), sigma)


def _annulus_median(image, x, y, r_in, r_out):
    ys, xs = np.ogrid[: image.shape[0], : image.shape[1]]
    d = np.hypot(xs - x, ys - y)
    return float(np.median(image[(d >= r_in) & (d <= r_out)]))


def test_uwf_photo_is_red_green_pseudo_colour_and_angiogram_black_outside_the_field():
    for seed in range(3):
        eye = make_eye(192, seed, "normal", style="uwf")
        assert eye.style == "uwf" and eye.photo.shape == (192, 192, 3) and eye.ffa_late.shape == (192, 192)
        assert np.allclose(eye.photo[..., 2], BLUE_LEVEL, atol=1e-6)  # Optos: no blue information
        inside = _inner(eye.fov)
        red, green = eye.photo[..., 0][inside], eye.photo[..., 1][inside]
        assert 0.12 < red.mean() < 0.8 and 0.12 < green.mean() < 0.8
        assert red.std() > 0.02 and green.std() > 0.02 and np.corrcoef(red, green)[0, 1] > 0.3
        # Lids: bright green/yellow beyond the field in the photo, dark in the angiogram.
        outside = ~cv2.dilate(eye.fov.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert outside.mean() > 0.1 and np.quantile(eye.photo[..., 1][outside], 0.9) > green.mean()
        for ffa in (eye.ffa_early, eye.ffa_late):
            assert np.quantile(ffa[outside], 0.99) < 0.12 and ffa[inside].mean() > 0.1
        assert 0.3 < eye.fov.mean() < 0.85


def test_uwf_vessels_dark_in_photo_bright_in_angiograms_at_the_same_pixels():
    for seed in range(2):
        eye = make_eye(256, seed, "normal", style="uwf")
        inside = _inner(eye.fov)
        vessels = eye.vessel_mask[inside].astype(np.float32)
        assert 0.01 < vessels.mean() < 0.2

        def corr(image, mask=vessels, inside=inside):
            return np.corrcoef(mask, _high_pass(image)[inside])[0, 1]

        assert corr(eye.ffa_early) > 0.4 and corr(eye.ffa_late) > 0.15
        assert corr(eye.photo[..., 1]) < -0.2 and corr(eye.photo[..., 0]) < 0
        # 4 px out of register, the agreement is gone: the measure can fail.
        shifted = np.roll(eye.vessel_mask, 4, axis=1)[inside].astype(np.float32)
        assert abs(corr(eye.ffa_early, shifted)) < 0.1 and abs(corr(eye.photo[..., 1], shifted)) < 0.1


def test_uwf_lesions_show_their_angiographic_signs():
    def lesions_inside(eye, kind):
        inside = _inner(eye.fov, 15)
        return [le for le in eye.lesions if le.kind == kind and inside[int(le.y), int(le.x)]]

    ma = make_eye(256, 2, "microaneurysms", style="uwf")
    found = lesions_inside(ma, "microaneurysm")
    assert len(found) >= 5
    for le in found:  # bright dots in the early phase
        x, y = int(round(le.x)), int(round(le.y))
        assert ma.ffa_early[y - 1 : y + 2, x - 1 : x + 2].max() > _annulus_median(ma.ffa_early, x, y, 3, 6) + 0.15

    haem = make_eye(256, 3, "haemorrhages", style="uwf")
    found = lesions_inside(haem, "haemorrhage")
    assert found
    for le in found:  # blood blocks fluorescence and darkens the photo
        ring = (le.radius * 2.5, le.radius * 3.5)
        assert haem.ffa_late[int(le.y), int(le.x)] < 0.6 * _annulus_median(haem.ffa_late, le.x, le.y, *ring)
        assert haem.photo[int(le.y), int(le.x), 1] < _annulus_median(haem.photo[..., 1], le.x, le.y, *ring)

    leak = make_eye(256, 4, "leakage", style="uwf")
    found = lesions_inside(leak, "leakage")
    assert found
    for le in found:  # grows into the late phase
        assert leak.ffa_late[int(le.y), int(le.x)] > leak.ffa_early[int(le.y), int(le.x)] + 0.1

    np_eye = make_eye(256, 5, "non_perfusion", style="uwf")
    found = lesions_inside(np_eye, "non_perfusion")
    assert found
    field = np.median(np_eye.ffa_early[_inner(np_eye.fov)])
    for le in found:  # dark: no capillary bed
        x, y, r = int(le.x), int(le.y), max(2, int(le.radius / 3))
        assert np_eye.ffa_early[y - r : y + r, x - r : x + r].mean() < 0.6 * field


def test_uwf_laser_scars_are_green_in_the_photo_and_stain_in_the_late_angiogram():
    eyes = (make_eye(192, seed, "leakage", "uwf") for seed in range(40))
    eye = next(e for e in eyes if any(le.kind == "laser_scar" for le in e.lesions))
    inside = _inner(eye.fov, 15)
    scars = [le for le in eye.lesions if le.kind == "laser_scar" and inside[int(le.y), int(le.x)]]
    assert len(scars) >= 10
    late, green = [], []
    for le in scars:
        ring = (le.radius * 2.5, le.radius * 4)
        late.append(eye.ffa_late[int(le.y), int(le.x)] - _annulus_median(eye.ffa_late, le.x, le.y, *ring))
        green.append(eye.photo[int(le.y), int(le.x), 1] - _annulus_median(eye.photo[..., 1], le.x, le.y, *ring))
    assert np.median(late) > 0.05 and np.median(green) > 0.03


def test_same_seed_same_eye_other_seed_differs_both_styles():
    for style, vary in (("uwf", False), ("standard", True)):
        a, b = make_eye(96, 11, "haemorrhages", style, vary), make_eye(96, 11, "haemorrhages", style, vary)
        c = make_eye(96, 12, "haemorrhages", style, vary)
        for name in ("photo", "ffa_early", "ffa_late", "vessel_mask", "fov"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
        assert a.lesions == b.lesions and not np.array_equal(a.photo, c.photo)
    with pytest.raises(ValueError, match="unknown phantom style"):
        make_eye(64, 0, "normal", style="oct")


def test_disc_and_macula_positions_vary_across_seeds():
    size = 128
    uwf = np.array([make_eye(size, s, "normal", "uwf").disc for s in range(10)]) / size
    assert uwf[:, 0].std() > 0.04 and uwf[:, 1].std() > 0.02
    plain = [make_eye(size, s, "normal") for s in range(10)]
    varied = [make_eye(size, s, "normal", vary=True) for s in range(10)]

    def disc_to_macula(eyes):  # the standard eye always drew it 0.26 x size from the macula, at one height
        return np.array([(abs(e.disc[0] - e.macula[0]), e.disc[1] - e.macula[1]) for e in eyes]) / size

    assert disc_to_macula(plain)[:, 0].std() < 0.01
    assert disc_to_macula(varied)[:, 0].std() > 0.02 and disc_to_macula(varied)[:, 1].std() > 0.02


def test_default_standard_eye_is_unchanged():
    """vary=False draws what make_eye always drew for a seed (the demo and other tests rely on it)."""
    eye = make_eye(64, 7, "leakage")
    expected_photo = [0.7581, 0.3923, 0.1521, 0.7266, 0.3642, 0.1378, 0.7445, 0.3757, 0.1574]
    assert np.allclose(eye.photo[30:33, 20, :].ravel(), expected_photo, atol=2e-4)
    assert np.allclose(eye.ffa_early[30, 18:22], [0.1347, 0.2105, 0.2229, 0.1765], atol=2e-4)
    assert np.allclose(eye.ffa_late[40, 30:33], [0.2097, 0.3037, 0.2613], atol=2e-4)
    assert np.allclose(eye.disc, (44.8008, 30.2765), atol=1e-3) and len(eye.lesions) == 3


def test_uwf_dataset_and_cli(tmp_path):
    out = write_phantom_dataset(tmp_path / "uwf", n=5, size=64, seed=2, style="uwf")
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert list(rows[0]) == ["id", "label", *DISEASES[1:], "laser_scars"]
    for row in rows:
        counts = {d: int(row[d]) for d in DISEASES[1:]}
        assert (sum(counts.values()) == 0) if row["label"] == "normal" else counts[row["label"]] > 0
    from PIL import Image

    photo = np.asarray(Image.open(out / "1.png"))
    assert photo.shape == (64, 64, 3) and (photo[..., 2] == 4).all()
    result = CliRunner().invoke(
        app, ["data", "phantom", str(tmp_path / "cli"), "--n", "2", "--size", "48", "--style", "uwf"]
    )
    assert result.exit_code == 0, result.output
    assert (np.asarray(Image.open(tmp_path / "cli" / "2.png"))[..., 2] == 4).all()
    result = CliRunner().invoke(app, ["data", "phantom", str(tmp_path / "bad"), "--style", "oct"])
    assert result.exit_code != 0 and "unknown style" in result.output


def _stream(**kwargs) -> PhantomStream:
    settings = dict(size=96, crop=48, seed=3, eyes_per_epoch=3, crops_per_eye=4)
    settings.update(kwargs)
    settings.setdefault("transform", PairedTransform(whole_view_size=0))
    return PhantomStream(**settings)


def test_stream_items_keys_shapes_ranges():
    stream = _stream(transform=PairedTransform(whole_view_size=32))
    assert len(stream) == 12
    items = [stream[(i, 0)] for i in range(len(stream))]
    for item in items:
        assert item["source"].shape == (3, 48, 48) and item["target"].shape == (1, 48, 48)
        assert item["mask"].shape == (1, 48, 48) and item["whole_source"].shape == (3, 32, 32)
        for key in ("source", "target", "whole_source"):
            assert item[key].dtype == torch.float32 and item[key].min() >= -1.0 and item[key].max() <= 1.0
        assert item["label"] in DISEASES and item["phase"] in (0, 1) and item["mask"].mean() > 0.3
    assert {item["phase"] for item in items} == {0, 1}
    batch = torch.utils.data.default_collate(items[:4])  # what the training loop's DataLoader does
    assert batch["source"].shape == (4, 3, 48, 48) and len(batch["label"]) == 4
    # Styles, diseases and sizes follow the weights and ranges given.
    specs = [_stream(styles={"uwf": 3.0, "standard": 1.0}, size=(64, 96)).describe(n) for n in range(400)]
    assert 0.68 < np.mean([spec["style"] == "uwf" for spec in specs]) < 0.82
    assert {spec["disease"] for spec in specs} == set(DISEASES)
    assert min(spec["size"] for spec in specs) == 64 and max(spec["size"] for spec in specs) == 96
    only_uwf = _stream(styles={"uwf": 1.0})
    assert all(only_uwf[(i, 0)]["id"].startswith("uwf-") for i in range(len(only_uwf)))
    with pytest.raises(ValueError, match="unknown style"):
        _stream(styles={"oct": 1.0})
    # a size range per style: UWF-like eyes large, standard ones small (each drawn inside its own range)
    per_style = _stream(styles={"uwf": 1.0, "standard": 1.0}, size={"uwf": (90, 96), "standard": (64, 70)})
    specs = [per_style.describe(n) for n in range(200)]
    assert {s["style"] for s in specs} == {"uwf", "standard"}
    assert all(90 <= s["size"] <= 96 if s["style"] == "uwf" else 64 <= s["size"] <= 70 for s in specs)
    assert per_style[(0, 0)]["source"].shape == (3, 48, 48)
    with pytest.raises(ValueError, match="no size given for style 'standard'"):
        _stream(styles={"uwf": 1.0, "standard": 1.0}, size={"uwf": 96})
    with pytest.raises(ValueError, match="crop"):
        _stream(size={"uwf": 96, "standard": 40})  # smaller than the 48-px crop


def test_stream_items_are_registered_pairs():
    """A crop's photo and angiogram show the same vessels: local green contrast anticorrelates with
    local FFA contrast within an item, and not between items of different eyes."""
    stream = _stream(size=160, crop=96, styles={"uwf": 1.0}, phases=("early",), crops_per_eye=2, eyes_per_epoch=4)
    items = [stream[(i, 0)] for i in range(len(stream))]

    def corr(source, target):
        green = _high_pass(source[1].numpy(), 2.0).ravel()
        return np.corrcoef(green, _high_pass(target[0].numpy(), 2.0).ravel())[0, 1]

    paired = [corr(item["source"], item["target"]) for item in items]
    crossed = [corr(items[i]["source"], items[(i + 2) % len(items)]["target"]) for i in range(len(items))]
    assert np.median(paired) < -0.2 and abs(np.median(crossed)) < 0.1


def test_stream_target_is_the_named_phase_at_the_source_crop():
    """Find each crop in its eye's photo (with its flips); the target is that crop of the angiogram
    of the phase the item names."""
    stream = _stream(transform=PairedTransform(whole_view_size=0, vflip=True))
    for index in range(len(stream)):
        item = stream[(index, 1)]
        eye = stream.eye(stream.eye_number(index, 1))
        photo = eye["source"].permute(1, 2, 0).numpy().astype(np.float32)
        source = ((item["source"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.float32)
        phase = ("early", "late")[item["phase"]]
        for dims in ((), (0,), (1,), (0, 1)):  # undo the flips: the one that matches exactly
            crop = np.flip(source, dims) if dims else source
            scores = cv2.matchTemplate(photo, np.ascontiguousarray(crop), cv2.TM_SQDIFF)
            top, left = np.unravel_index(np.argmin(scores), scores.shape)
            if scores[top, left] < 100:  # float rounding: a few 1-level misses; another place costs ~1e6
                break
        else:
            raise AssertionError(f"crop {index} is not a crop of its eye's photo")
        expected = eye[phase][0, top : top + 48, left : left + 48].numpy().astype(np.float32)
        target = ((item["target"][0].numpy() + 1) * 127.5).round()
        assert np.abs((np.flip(target, dims) if dims else target) - expected).max() <= 1


def test_stream_is_deterministic_and_new_epochs_bring_new_eyes():
    first, again, other = _stream(), _stream(), _stream(seed=4)
    keys = [(5, 0), (0, 1), (11, 2)]
    for key in keys:
        a, b = first[key], again[key]
        assert all(torch.equal(a[k], b[k]) for k in ("source", "target", "mask")) and a["id"] == b["id"]
    assert not torch.equal(first[(5, 0)]["source"], other[(5, 0)]["source"])
    epoch0 = {first[(i, 0)]["id"] for i in range(len(first))}
    epoch1 = {first[(i, 1)]["id"] for i in range(len(first))}
    assert len(epoch0) == 3 and not epoch0 & epoch1
    # Crops of one eye differ from each other.
    assert not torch.equal(first[(0, 0)]["source"], first[(1, 0)]["source"])


def test_stream_ranks_draw_disjoint_eyes():
    ranks = [_stream(rank=r, world_size=3) for r in range(3)]
    ids = [{stream[(i, e)]["id"] for e in range(3) for i in range(len(stream))} for stream in ranks]
    assert all(len(s) == 9 for s in ids)
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    photos = [ranks[r][(0, 0)]["source"] for r in range(3)]
    assert not torch.equal(photos[0], photos[1])
    with pytest.raises(ValueError, match="rank"):
        _stream(rank=3, world_size=3)


def test_stream_draws_each_eye_once_per_epoch(monkeypatch):
    """The sampler visits an epoch's items in random order; the cache keeps every eye of the epoch."""
    import ffasynth.data.phantom_stream as module

    calls = []
    real = module.make_eye
    monkeypatch.setattr(module, "make_eye", lambda *a, **k: calls.append(a) or real(*a, **k))
    stream = _stream(eyes_per_epoch=3, crops_per_eye=4)
    sampler = iter(StreamBatchSampler(len(stream), batch_size=4, seed=0))
    for _ in range(6):  # two epochs of 12 items
        for key in next(sampler):
            stream[key]
    assert len(calls) == 6
