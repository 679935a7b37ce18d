"""Read any image the field hands us; write images atomically.

`read_image` returns a float32 tensor (C, H, W) with values in [0, 1] and a known channel count
(or, with `compact=True`, 8-bit data as uint8 0-255: a quarter of the memory, for large photos).
Every failure is an `ImageReadError` whose message names the file and the cause.

Intensity conventions (explicit, as in medical imaging):
- 8-bit data is divided by 255; 16-bit data (`I;16*`, `I` with values <= 65535, and 16-bit RGB(A), which
  tifffile or OpenCV decode because Pillow keeps only 8 bits of it) by 65535.
- 32-bit float images must already lie in [0, 1].
- Alpha is composited over black (transparent = outside the field of view), then dropped.
- A 3-channel image whose channels are equal (FFA stored as RGB) is "grey" and, with
  `channels=None`, returned with one channel.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ffasynth.errors import FFASynthError, ImageReadError
from ffasynth.files import atomic_write

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; UWF frames are ~12 MP
MAX_PIXELS_ENV = "FFASYNTH_MAX_PIXELS"
LIMIT_OPTIONS = f"raise it with --max-pixels, data.max_pixels or ${MAX_PIXELS_ENV}"
MIN_SIDE = 16  # pixels a side that pairs, translate and evaluate require: smaller holds no eye
# ITU-R BT.601 luma, as Pillow's "L" conversion uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# A truncated file must be an error, never silently half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel-count limit in force: the argument, else $FFASYNTH_MAX_PIXELS, else the default."""
    if max_pixels is not None:
        return int(max_pixels)
    env = os.environ.get(MAX_PIXELS_ENV)
    if env:
        try:
            limit = int(float(env))
        except (ValueError, OverflowError):  # OverflowError: inf, 1e400
            raise FFASynthError(f"{MAX_PIXELS_ENV}: environment value {env!r} is not a finite number") from None
        if limit < 1:  # not an ImageReadError: every image would be blamed for it
            raise FFASynthError(f"{MAX_PIXELS_ENV}: environment value {env!r} must be a positive pixel count")
        return limit
    return DEFAULT_MAX_PIXELS


def _sniff_non_image(path: Path) -> str | None:
    """A friendlier cause for files Pillow cannot identify (text, HTML saved as .jpg...)."""
    head = path.read_bytes()[:512]
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return "not an image: the file is HTML/XML text (a web page saved under an image name?)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "not an image: the file is plain text"
    return None


def _open_checked(path: Path, limit: int, min_side: int = 1) -> Image.Image:
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    # Pillow's own decompression-bomb guard stays on, set to our limit (its warning becomes an error).
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        found = re.search(r"\((\d+) pixels\)", str(error))  # Pillow's "Image size (N pixels) exceeds limit ..."
        size = f"{int(found[1])} pixels, " if found else ""
        raise ImageReadError(path, f"too large: {size}over the limit of {limit} pixels ({LIMIT_OPTIONS})") from None
    except UnidentifiedImageError:
        cause = _sniff_non_image(path) or "not an image, or a format Pillow cannot decode"
        raise ImageReadError(path, cause) from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow raises all three for damaged headers
        if "MAX_TEXT_CHUNK" in str(error):  # a text or colour-profile chunk that inflates past 1 MB
            raise ImageReadError(path, "its metadata inflates past 1 MB (a hostile or damaged file)") from None
        if isinstance(error, PermissionError):
            raise ImageReadError(path, "cannot open it: permission denied (make it readable)") from None
        raise ImageReadError(path, f"cannot open ({error})") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImageReadError(
            path, f"too large: {width}x{height} = {width * height} pixels, limit {limit} ({LIMIT_OPTIONS})"
        )
    if width < 1 or height < 1:
        raise ImageReadError(path, f"has no pixels ({width}x{height})")
    if min(width, height) < min_side:
        image.close()
        raise ImageReadError(path, f"too small: {width}x{height} pixels (at least {min_side} on each side)")
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = upright), 1 when absent or unreadable."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block does not change the pixel grid
        return 1


def twelve_bit_data(path: str | os.PathLike) -> bool:
    """A 16-bit grey file whose values stay within 0..4095: 12-bit data, which reads (÷ 65535) as near black."""
    try:
        with Image.open(path) as image:
            return (image.mode.startswith("I;16") or image.mode == "I") and image.getextrema()[1] <= 4095
    except (OSError, ValueError, SyntaxError):
        return False


def image_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the header, EXIF orientation applied, without decoding pixels."""
    path = Path(path)
    with _open_checked(path, max_pixels_limit(max_pixels)) as image:
        width, height = image.size
        # Pillow's TIFF reader already gives the upright size of a rotated (5-8) TIFF
        swapped = _orientation(image) in (5, 6, 7, 8) and image.format != "TIFF"
    return (height, width) if swapped else (width, height)


def _to_array(image: Image.Image, path: Path, compact: bool = False) -> np.ndarray:
    """Decode to (H, W, C), C in {1, 3}: float32 in [0, 1], or with `compact` 8-bit modes as uint8."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode == "PA":
        image = image.convert("LA")
    mode = image.mode

    if mode.startswith("I;16") or mode == "I":
        data = np.asarray(image).astype(np.float64)
        if mode == "I" and data.size and (data.min() < 0 or data.max() > 65535):
            raise ImageReadError(path, "32-bit integer image with values outside the 16-bit range")
        return (data / 65535.0).astype(np.float32)[..., None]
    if mode == "F":
        data = np.asarray(image, dtype=np.float32)
        if not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
            raise ImageReadError(path, "floating-point image with values outside [0, 1]; convert it to 8/16-bit")
        return data[..., None]
    if mode in ("L", "LA", "RGB", "RGBA"):
        data = np.asarray(image)
        data = data[..., None] if data.ndim == 2 else data
        if not compact:
            data = data.astype(np.float32)
            data /= 255.0  # in place: one float copy of a large photo, not two
        return _over_black(data) if mode in ("LA", "RGBA") else data
    raise ImageReadError(path, f"unsupported image mode {mode!r}")


def _is_deep_colour(image: Image.Image) -> bool:
    """True for 16-bit RGB(A) (PNG, TIFF), which Pillow decodes to 8 bits a channel (mode RGB/RGBA)."""
    if image.mode not in ("RGB", "RGBA") or not image.tile:
        return False
    args = image.tile[0].args if hasattr(image.tile[0], "args") else image.tile[0][3]
    rawmode = args[0] if isinstance(args, tuple) else args
    return isinstance(rawmode, str) and ";16" in rawmode


# EXIF orientation → the numpy steps of ImageOps.exif_transpose (rows, columns of an (H, W, C) array)
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _deep_colour(path: Path, orientation: int, tiff: bool) -> np.ndarray:
    """A 16-bit RGB(A) file at its full depth, (H, W, 3) float32 in [0, 1] (alpha over black), upright: decoded
    by tifffile or OpenCV where Pillow would cut it to 8 bits (16-bit photos keep their 65,536 levels, as 16-bit
    grey does). Neither applies the orientation tag (OpenCV fails on a rotated TIFF): it is applied here."""
    data = None
    if tiff:
        import tifffile

        try:
            data = tifffile.imread(path, key=0)
        except Exception:  # noqa: BLE001 — a compression tifffile needs imagecodecs for (LZW): OpenCV's turn
            data = None
        if data is not None and data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[-1] not in (3, 4):
            data = np.moveaxis(data, 0, -1)  # planar: channels first
    if data is None and (not tiff or orientation == 1):
        import cv2

        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        data = data if data is None or data.ndim != 3 else data[..., [2, 1, 0, 3][: data.shape[-1]]]  # BGR(A)
    if data is None or data.dtype != np.uint16 or data.ndim != 3 or data.shape[-1] not in (3, 4):
        raise ImageReadError(
            path, "a 16-bit colour image that could not be decoded at its depth (a rotated LZW TIFF?); save it as PNG"
        )
    data = _ORIENT.get(orientation, lambda a: a)(data.astype(np.float32) / 65535.0)
    return _over_black(data) if data.shape[-1] == 4 else data


def _over_black(data: np.ndarray) -> np.ndarray:
    """(H, W, C + 1) with alpha last → (H, W, C) composited over black (transparent = no signal): uint8 rounded
    to the nearest level, float in [0, 1] multiplied."""
    if data.dtype == np.uint8:
        return ((data[..., :-1] * data[..., -1:].astype(np.uint16) + 127) // 255).astype(np.uint8)
    return data[..., :-1] * data[..., -1:]


def is_grey(rgb: np.ndarray, tolerance: float = 2.5 / 255) -> bool:
    """True when an (H, W, 3) image carries no colour (channels equal up to JPEG-level noise).
    tolerance is in [0, 1] units; uint8 data is compared in levels (tolerance × 255)."""
    tolerance = tolerance * 255.0 if rgb.dtype == np.uint8 else tolerance
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)  # uint8 stays uint8: max >= min
    return float(np.quantile(spread, 0.999)) <= tolerance * 2 and float(spread.mean()) <= tolerance / 2


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) → (H, W, 1) luma, in rgb's dtype (uint8 rounded)."""
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float32)
    luma = (rgb[..., :3] @ weights)[..., None]
    return (luma + 0.5).astype(np.uint8) if rgb.dtype == np.uint8 else luma


def grey_mean(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) grey stored as RGB → (H, W, 1), the channels' mean (uint8 rounded)."""
    if rgb.dtype == np.uint8:
        return ((rgb.sum(axis=-1, keepdims=True, dtype=np.uint16) + 1) // 3).astype(np.uint8)
    return rgb.mean(axis=-1, keepdims=True)


def read_image(
    path: str | os.PathLike,
    channels: int | None = None,
    max_pixels: int | None = None,
    min_side: int = 1,
    compact: bool = False,
) -> torch.Tensor:
    """Read one image as float32 (C, H, W) in [0, 1].

    channels: None keeps the natural count (1 for grey, including grey stored as RGB; 3 for
    colour); 1 converts colour to luma; 3 repeats grey. min_side: refuse images narrower (e.g. MIN_SIDE).
    compact: 8-bit images come back as uint8 (0-255, the file's levels; `unit_float` makes them
    [0, 1]), a quarter of float32's memory; 16-bit and float images are float32 either way.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, not {channels!r}")
    path = Path(path)
    image = _open_checked(path, max_pixels_limit(max_pixels), min_side)
    upright = image.size if image.format == "TIFF" else None  # a TIFF's header size is already upright
    deep = _is_deep_colour(image)  # before getexif, which may load the image (and empty its tiles)
    orientation = _orientation(image)
    try:
        with image:
            if deep:
                data = np.ascontiguousarray(_deep_colour(path, orientation, image.format == "TIFF"))
            else:
                image = ImageOps.exif_transpose(image)
                image.load()
                if upright is not None and image.size != upright:  # Pillow 12 on uncompressed grey, orient. 5-8
                    raise ImageReadError(
                        path, f"its orientation tag ({orientation}) could not be applied; save it upright (e.g. PNG)"
                    )
                data = _to_array(image, path, compact)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        text = str(error)
        cause = "truncated or corrupt image data" if "truncat" in text.lower() else f"corrupt image data ({text})"
        raise ImageReadError(path, cause) from None
    except MemoryError:
        raise ImageReadError(path, "not enough memory to decode it") from None

    if data.shape[-1] == 3 and channels != 3:
        grey = is_grey(data)
        if grey:  # FFA stored as RGB: average away JPEG-level channel noise
            data = grey_mean(data)
        elif channels == 1:
            data = to_grey(data)
    elif data.shape[-1] == 1 and channels == 3:
        data = np.repeat(data, 3, axis=-1)
    data = np.ascontiguousarray(data.transpose(2, 0, 1))
    data = data if data.flags.writeable else data.copy()  # Pillow's buffer is read-only
    tensor = torch.from_numpy(data)
    return tensor if tensor.dtype == torch.uint8 else tensor.clamp_(0.0, 1.0)


# integer levels → their full scale: 8-bit levels and 16-bit codes
LEVELS = {torch.uint8: 255.0, torch.uint16: 65535.0}


def unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 levels (0-255) or uint16 codes (0-65535) → float32 in [0, 1]; a float tensor as it is (no copy)."""
    scale = LEVELS.get(image.dtype)
    return image.float().div_(scale) if scale is not None else image


ROWS_PER_BLOCK = 512  # to_uint8 converts this many rows at a time: no full-size float copy


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] (or uint8) → (H, W) or (H, W, 3) uint8, rounded."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        array = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    result = np.empty(array.shape, np.uint8)
    for start in range(0, array.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        block = np.clip(array[rows], 0.0, 1.0)
        block *= 255.0
        block += 0.5
        result[rows] = block  # truncation of the non-negative block = rounding
    return result


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a [0, 1] (C, H, W) tensor or uint8 array as an 8-bit image, atomically.
    The format follows the suffix (PNG recommended: lossless)."""
    path = Path(path)
    array = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else to_uint8(image)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageReadError(path, f"unknown image suffix {path.suffix!r} for writing")
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt))


FLOAT_SLACK = 1e-3  # how far outside [0, 1] a float image may reach from rounding (resampling) and be clipped


def source_tensor(image) -> torch.Tensor:
    """A photo as (3, H, W): 8-bit data as uint8 levels (kept compact: a large photo costs 3 bytes a
    pixel; tiles are converted as they are used), anything else as float32 in [0, 1]. Takes a path,
    a PIL image, a (H, W[, C]) array (uint8, uint16 or float in [0, 1]) or a ([1,] C, H, W) / (H, W)
    tensor (uint8 0-255 or float in [0, 1]; other floats are refused). Grey is repeated to RGB."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image), channels=3, compact=True)
    if isinstance(image, Image.Image):  # decoded as read_image decodes a file: upright, alpha composited over black
        image = _to_array(ImageOps.exif_transpose(image), Path("the given PIL image"), compact=True)
    if isinstance(image, np.ndarray):
        if image.dtype.kind != "f" and image.dtype not in (np.uint8, np.uint16):
            raise FFASynthError(f"an image array of {image.dtype}: give uint8 (0-255), uint16 or float in [0, 1]")
        if image.dtype == np.uint16:
            array = image.astype(np.float32) / 65535.0
        else:
            array = image if image.dtype == np.uint8 else image.astype(np.float32, copy=False)  # copied below
        array = array[..., None] if array.ndim == 2 else array
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise FFASynthError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not {image.shape}")
        array = _over_black(array) if array.shape[-1] == 4 else array  # RGBA: as read_image composites it
        image = torch.from_numpy(np.array(array[..., :3].transpose(2, 0, 1)))  # a copy: the caller's array stays theirs
    if not isinstance(image, torch.Tensor):
        raise FFASynthError(f"cannot use a {type(image).__name__} as an image: give a path, PIL image, array or tensor")
    tensor = image.detach().cpu()
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise FFASynthError(f"an image tensor of {tensor.dtype}: give uint8 (0-255) or float in [0, 1]")
    tensor = tensor if tensor.dtype == torch.uint8 else tensor.float()
    if tensor.dtype != torch.uint8 and not torch.isfinite(tensor).all():
        raise FFASynthError("the image holds NaN or infinite values")
    tensor = tensor[None] if tensor.ndim == 2 else tensor[0] if tensor.ndim == 4 and tensor.shape[0] == 1 else tensor
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise FFASynthError(f"an image tensor must be (C, H, W) with 1 or 3 channels, not {tuple(image.shape)}")
    if tensor.dtype != torch.uint8 and tensor.numel():
        low, high = float(tensor.min()), float(tensor.max())
        if low < -FLOAT_SLACK or high > 1.0 + FLOAT_SLACK:  # a [-1, 1] or 0-255 image would be clipped unseen
            raise FFASynthError(
                f"a float image must hold values in [0, 1], not {low:.4g} to {high:.4g}: rescale it "
                "(x / 255 for 0-255 levels, (x + 1) / 2 for [-1, 1]) or give uint8"
            )
        tensor = tensor.clamp(0.0, 1.0)  # rounding slack only
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor
