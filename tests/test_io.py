"""The image reader: every format and mode the field uses, and a corpus of bad files that must
each give one ImageReadError naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from ffasynth.data import io as image_io
from ffasynth.data.io import image_size, is_grey, read_image, save_image, source_tensor, to_uint8, unit_float
from ffasynth.errors import FFASynthError, ImageReadError


def _gradient(h=24, w=32) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 127 // (w + h - 2)], -1).astype(np.uint8)


def test_rgb_png_roundtrip_exact(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == torch.float32 and image.shape == (3, 24, 32)
    assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(rgb))


def test_grey_stored_as_rgb_is_reduced_to_one_channel(tmp_path):
    grey = _gradient()[..., 0]
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "ffa.bmp")
    image = read_image(tmp_path / "ffa.bmp")
    assert image.shape == (1, 24, 32)
    assert torch.allclose(image[0] * 255, torch.from_numpy(grey).float(), atol=1e-3)
    assert read_image(tmp_path / "ffa.bmp", channels=3).shape == (3, 24, 32)


def test_grey_jpeg_saved_as_rgb_counts_as_grey(tmp_path):
    grey = _gradient()[..., 1]
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "ffa.jpg", quality=85)
    assert read_image(tmp_path / "ffa.jpg").shape[0] == 1


def test_colour_stays_colour_and_converts_to_luma(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    assert read_image(tmp_path / "photo.png").shape[0] == 3
    luma = read_image(tmp_path / "photo.png", channels=1)
    expected = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
    assert luma.shape == (1, 24, 32) and np.allclose(luma[0].numpy(), expected, atol=1e-5)
    assert not is_grey(rgb.astype(np.float32) / 255)


def test_jpeg_data_behind_bmp_name(tmp_path):
    Image.fromarray(_gradient()).save(tmp_path / "fake.bmp", format="JPEG")
    assert read_image(tmp_path / "fake.bmp").shape == (3, 24, 32)


@pytest.mark.parametrize("suffix", ["tif", "png"])
def test_16_bit_grey_uses_full_range(tmp_path, suffix):
    data = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / f"deep.{suffix}")
    image = read_image(tmp_path / f"deep.{suffix}")
    assert image.shape == (1, 1, 4)
    assert np.allclose(image[0, 0].numpy(), data[0] / 65535.0, atol=1e-6)


def test_rgba_composited_over_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = 100
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # transparent pixel → black
    rgba[1, 1, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (3, 4, 4)
    assert image[:, 0, 0].abs().max() == 0
    assert image[0, 2, 2] == pytest.approx(200 / 255, abs=1e-6)
    assert image[0, 1, 1] == pytest.approx(200 / 255 * 128 / 255, abs=1e-6)


def test_compact_reading_keeps_8_bit_levels_and_matches_the_float_reading(tmp_path):
    colour = _gradient()
    grey_rgb = np.repeat(colour[..., :1], 3, axis=-1)
    grey_rgb[0, 0] = (10, 11, 11)  # JPEG-level channel noise: still grey, mean 10.67 → 11
    rgba = np.dstack([colour, np.linspace(0, 255, 32 * 24).reshape(24, 32).astype(np.uint8)])
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey_rgb).save(tmp_path / "grey.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(colour[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    for name, channels in [("colour", None), ("colour", 1), ("colour", 3), ("grey", None), ("grey", 3), ("rgba", None)]:
        compact = read_image(tmp_path / f"{name}.png", channels=channels, compact=True)
        full = read_image(tmp_path / f"{name}.png", channels=channels)
        assert compact.dtype == torch.uint8 and compact.shape == full.shape, (name, channels)
        assert (unit_float(compact) - full).abs().max() <= 0.5 / 255 + 1e-6, (name, channels)  # rounding only
    assert torch.equal(read_image(tmp_path / "colour.png", compact=True).permute(1, 2, 0), torch.from_numpy(colour))
    assert read_image(tmp_path / "grey.png", compact=True)[0, 0, 0] == 11
    deep = read_image(tmp_path / "deep.png", compact=True)  # 16-bit data is never cut to 8 bits
    assert deep.dtype == torch.float32 and torch.equal(deep, read_image(tmp_path / "deep.png"))


def test_to_uint8_rounds_block_by_block_and_passes_uint8_through(monkeypatch):
    monkeypatch.setattr(image_io, "ROWS_PER_BLOCK", 7)
    image = torch.rand(1, 30, 11, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    expected = (np.clip(image[0].numpy(), 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(to_uint8(image), expected)
    levels = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8)
    assert np.array_equal(to_uint8(levels), levels.permute(1, 2, 0).numpy())


def test_la_palette_and_bilevel_modes(tmp_path):
    Image.fromarray(_gradient()).convert("P").save(tmp_path / "p.png")
    Image.fromarray(_gradient()[..., 0]).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(_gradient()[..., 0]).convert("1").save(tmp_path / "b.png")
    assert read_image(tmp_path / "p.png").shape[1:] == (24, 32)
    assert read_image(tmp_path / "la.png").shape == (1, 24, 32)
    assert set(read_image(tmp_path / "b.png").unique().tolist()) <= {0.0, 1.0}


def test_cmyk_jpeg_reads_as_rgb(tmp_path):
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").shape == (3, 24, 32)


def test_exif_orientation_applied(tmp_path):
    rgb = _gradient(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "rot.jpg")
    assert image.shape == (3, 20, 10)
    # After a clockwise turn the left column (dark red) becomes the top row.
    assert image[0, 0, :].mean() < image[0, -1, :].mean()


def test_one_pixel_image_is_fine(tmp_path):
    Image.fromarray(np.full((1, 1), 77, np.uint8)).save(tmp_path / "dot.png")
    assert read_image(tmp_path / "dot.png").shape == (1, 1, 1)


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _metadata_bomb_png(path):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 3_000_000, zip=True)  # a few kB on disk, 3 MB inflated
    Image.new("L", (16, 16)).save(path, pnginfo=info)


BAD_FILES = {
    "metadata.png": (_metadata_bomb_png, "metadata inflates past 1 MB"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "truncated.png": (_truncated_png, "truncated"),
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "notes.png": (lambda p: p.write_text("patient notes, not a picture\n"), "plain text"),
    "page.jpg": (lambda p: p.write_text("<!DOCTYPE html><html><body>404</body></html>"), "HTML"),
    "garbage.bmp": (lambda p: p.write_bytes(bytes(range(256)) * 4), "not an image"),
    "missing.png": (lambda p: None, "no such file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_gives_one_error_naming_the_file(tmp_path, name):
    make, cause = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    message = str(caught.value)
    assert name in message and cause.lower() in message.lower(), message
    assert "\n" not in message


def test_pixel_bomb_over_the_limit_is_refused(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")  # PNG compresses this to a few hundred bytes
    with pytest.raises(ImageReadError, match="bomb.png: too large") as info:
        read_image(tmp_path / "bomb.png", max_pixels=50_000)
    # its own size, and every way to raise the limit (not only the environment variable)
    assert "90000 pixels" in str(info.value) and "--max-pixels, data.max_pixels or $FFASYNTH_MAX_PIXELS" in str(
        info.value
    )
    assert read_image(tmp_path / "bomb.png", max_pixels=100_000).shape == (1, 300, 300)


def test_pixel_limit_from_environment(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setenv("FFASYNTH_MAX_PIXELS", "5000")
    with pytest.raises(ImageReadError, match="too large"):
        read_image(tmp_path / "big.png")


def test_save_image_is_lossless_png_and_leaves_no_temp_files(tmp_path):
    image = torch.rand(1, 16, 16)
    save_image(image, tmp_path / "out.png")
    again = read_image(tmp_path / "out.png")
    assert torch.allclose(again, (image * 255).round() / 255, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_real_uwf_images_read_with_expected_channels(shared_data):
    folder = shared_data / "uwf-slo-ffa" / "train"
    source = read_image(folder / "1.bmp")
    target = read_image(folder / "1.1.bmp")
    assert source.shape == (3, 682, 853)
    assert target.shape == (1, 682, 853)


@pytest.mark.parametrize("compression", [None, "tiff_deflate"])
@pytest.mark.parametrize("grey", [True, False])
def test_a_rotated_tiff_is_upright_in_size_and_pixels_or_refused(tmp_path, compression, grey):
    """Pillow's TIFF reader reports a rotated (EXIF 5-8) TIFF's upright size itself: image_size must not
    turn it again; the pixels come out upright, or (Pillow 12 on uncompressed grey) the file is refused."""
    stored = np.zeros((40, 80), np.uint8)
    stored[:10, :20] = 255  # a block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: the block goes to the top right
    data = stored if grey else np.stack([stored] * 3, axis=-1)
    path = tmp_path / "rot.tif"
    Image.fromarray(data).save(path, exif=exif.tobytes(), **({"compression": compression} if compression else {}))
    assert image_size(path) == (40, 80)  # (width, height), upright
    try:
        image = read_image(path)
    except ImageReadError as error:
        assert grey and compression is None and "orientation tag (6)" in str(error)
        return
    assert image.shape[-2:] == (80, 40)
    np.testing.assert_array_equal(image[0].numpy() > 0.5, np.rot90(stored, -1) > 127)


@pytest.mark.parametrize("value", ["inf", "1e400", "0", "-5", "many"])
def test_a_bad_pixel_limit_in_the_environment_is_named(tmp_path, monkeypatch, value):
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    monkeypatch.setenv("FFASYNTH_MAX_PIXELS", value)
    with pytest.raises(FFASynthError, match="FFASYNTH_MAX_PIXELS: environment value") as raised:
        read_image(tmp_path / "small.png")
    assert not isinstance(raised.value, ImageReadError)  # the setting is wrong, not the image: nothing per file


def test_source_tensor_composites_alpha_alike_from_a_path_a_pil_image_and_an_array(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[:, :8, 3] = 0  # the left half transparent: no signal there, however it is given
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    by_path = source_tensor(tmp_path / "a.png")
    assert by_path.dtype == torch.uint8 and int(by_path[:, :, :8].max()) == 0
    assert torch.equal(source_tensor(Image.open(tmp_path / "a.png")), by_path)
    assert torch.equal(source_tensor(rgba), by_path)
    as_float = source_tensor(rgba.astype(np.float32) / 255)
    assert torch.allclose(as_float, by_path.float() / 255, atol=1 / 255)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((8, 8, 3), 200, np.int64), "array of int64"),
        (np.zeros((8, 8), bool), "array of bool"),
        (torch.full((3, 8, 8), 200, dtype=torch.int32), "tensor of torch.int32"),
        (torch.full((3, 8, 8), float("nan")), "NaN or infinite"),
    ],
)
def test_source_tensor_refuses_ambiguous_integers_and_nan(image, message):
    with pytest.raises(FFASynthError, match=message):
        source_tensor(image)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_colour_keeps_its_16_bits(tmp_path, suffix):
    """Pillow decodes 16-bit RGB to 8 bits a channel: 200 fine levels (30000..30199) came back as one."""
    import cv2

    levels = 30000 + np.arange(200, dtype=np.uint16)
    full, empty = np.full((20, 40), 65535, np.uint16), np.zeros((20, 40), np.uint16)
    rgb = np.stack([np.resize(levels, (20, 40)), full, empty], -1)
    cv2.imwrite(str(tmp_path / f"photo{suffix}"), rgb[..., ::-1])  # OpenCV writes BGR
    image = read_image(tmp_path / f"photo{suffix}")
    assert image.shape == (3, 20, 40) and image.dtype == torch.float32
    np.testing.assert_allclose(image.numpy(), rgb.transpose(2, 0, 1) / 65535.0, rtol=0, atol=1e-7)
    assert len(np.unique(image[0].numpy())) == 200
    rgba = np.concatenate([rgb, np.full((20, 40, 1), 32768, np.uint16)], -1)  # half transparent: over black
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba[..., [2, 1, 0, 3]])
    np.testing.assert_allclose(read_image(tmp_path / "alpha.png")[1].numpy(), 32768 / 65535, atol=1e-6)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_16_bit_colour_tiff_is_turned_upright_as_its_8_bit_copy_is(tmp_path, orientation):
    import tifffile

    rng = np.random.default_rng(orientation)
    deep = rng.integers(0, 65536, (12, 20, 3)).astype(np.uint16)
    tag = [(274, "H", 1, orientation, False)]  # EXIF/TIFF orientation
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb", extratags=tag)
    tifffile.imwrite(tmp_path / "shallow.tif", (deep >> 8).astype(np.uint8), photometric="rgb", extratags=tag)
    deep_read, shallow_read = read_image(tmp_path / "deep.tif"), read_image(tmp_path / "shallow.tif")
    assert deep_read.shape == shallow_read.shape and image_size(tmp_path / "deep.tif") == deep_read.shape[:0:-1]
    assert (deep_read - shallow_read).abs().max() < 1.01 / 255  # the same pixels, 8 more bits
