"""A corpus of bad and awkward inputs, generated into a folder by the tests (no binary fixtures
are committed). Every image case knows what a correct program does with it in each slot: as a
photograph (the source) or as an angiogram (the target, or a generated FFA).

Kinds of image case:
- unreadable: must be refused, in one line naming the file, with `cause` in it;
- tiny: readable, but too small to be an eye (refused in every slot, "too small");
- colour: a readable colour photograph (fine as a photo; refused where an FFA is expected);
- grey: a readable grey image (fine as an FFA; flagged where a colour photo is expected).

Below the cases: `cli` runs the real entry point and keeps what a user would see, and small
judges return None when a case was handled, else what is wrong.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import traceback
import zlib
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ffasynth.cli import main
from ffasynth.data.phantom import make_eye

WIDTH, HEIGHT = 56, 40  # every well-formed corpus image, before EXIF rotation


@dataclass(frozen=True)
class ImageCase:
    name: str
    suffix: str
    kind: str  # unreadable, tiny, colour, grey
    cause: str  # words the refusal or warning must contain (lower case)
    make: Callable[[], bytes]
    size: tuple[int, int] = (WIDTH, HEIGHT)  # (width, height) as displayed, for a readable file

    @property
    def filename(self) -> str:
        return f"{self.name}{self.suffix}"

    def expected(self, slot: str) -> str | None:
        """The words of the one-line refusal (or warning) in this slot ("photo" or "ffa"); None = accepted."""
        if self.kind in ("unreadable", "tiny"):
            return self.cause
        if slot == "photo" and self.kind == "grey":
            return "grey"
        if slot == "ffa" and self.kind == "colour":
            return "colour"
        return None


def photo_array(seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """A phantom fundus photograph, (H, W, 3) uint8."""
    eye = make_eye(max(size), seed=seed)
    return (eye.photo[: size[1], : size[0]] * 255 + 0.5).astype(np.uint8)


def ffa_array(seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """The matching phantom angiogram, (H, W) uint8."""
    eye = make_eye(max(size), seed=seed)
    return (eye.ffa_early[: size[1], : size[0]] * 255 + 0.5).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def pixel_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A ~160-byte PNG whose header claims width x height pixels (400 MP by default)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    data = zlib.compress(b"\0" * (width + 1) * 4)  # a few rows; a reader must refuse before decoding
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def tiff_rgb16(array: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit-per-channel RGB TIFF (what Pillow cannot write)."""
    height, width, _ = array.shape
    pixels = array.astype("<u2").tobytes()
    tags = 10
    bps_offset = 8 + 2 + 12 * tags + 4
    data_offset = bps_offset + 6

    def short(tag, value):
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    def long(tag, value):
        return struct.pack("<HHII", tag, 4, 1, value)

    entries = [
        long(256, width),
        long(257, height),
        struct.pack("<HHII", 258, 3, 3, bps_offset),  # BitsPerSample 16,16,16
        short(259, 1),  # no compression
        short(262, 2),  # RGB
        long(273, data_offset),
        short(277, 3),
        long(278, height),
        long(279, len(pixels)),
        short(284, 1),  # chunky
    ]
    ifd = struct.pack("<H", tags) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 16, 16, 16) + pixels


def _exif_rotated() -> bytes:
    """Stored 56x40 with EXIF orientation 6: shown (and read) 40x56."""
    stored = Image.fromarray(photo_array(3, (HEIGHT, WIDTH))).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _rgba() -> bytes:
    photo = photo_array(4)
    alpha = np.where(photo.max(axis=-1) > 10, 255, 0).astype(np.uint8)
    return encode(Image.fromarray(np.dstack([photo, alpha])), "PNG")


def _palette() -> bytes:
    return encode(Image.fromarray(photo_array(5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")


def _grey16() -> bytes:
    return encode(Image.fromarray(ffa_array(6).astype(np.uint16) * 257), "TIFF")


IMAGE_CASES: tuple[ImageCase, ...] = (
    ImageCase("truncated-jpeg", ".jpg", "unreadable", "truncated",
              lambda: _truncated(encode(Image.fromarray(photo_array(1)), "JPEG", quality=95))),
    ImageCase("truncated-png", ".png", "unreadable", "truncated",
              lambda: _truncated(encode(Image.fromarray(photo_array(2)), "PNG"))),
    ImageCase("zero-bytes", ".png", "unreadable", "empty", lambda: b""),
    ImageCase("text-named-png", ".png", "unreadable", "text", lambda: b"patient 17, left eye\nsee report\n"),
    ImageCase("html-saved-as-jpg", ".jpg", "unreadable", "html",
              lambda: b"<!DOCTYPE html><html><body>Session expired</body></html>"),
    ImageCase("pixel-bomb", ".png", "unreadable", "too large", pixel_bomb),
    ImageCase("one-pixel", ".png", "tiny", "too small",
              lambda: encode(Image.fromarray(photo_array(7, (1, 1))), "PNG"), (1, 1)),
    ImageCase("three-by-two", ".png", "tiny", "too small",
              lambda: encode(Image.fromarray(photo_array(8, (3, 2))), "PNG"), (3, 2)),
    ImageCase("tiff-16bit-rgb", ".tif", "colour", "", lambda: tiff_rgb16(photo_array(9).astype(np.uint16) * 257)),
    ImageCase("tiff-16bit-grey", ".tif", "grey", "", _grey16),
    ImageCase("rgba", ".png", "colour", "", _rgba),
    ImageCase("palette", ".png", "colour", "", _palette),
    ImageCase("cmyk-jpeg", ".jpg", "colour", "",
              lambda: encode(Image.fromarray(photo_array(10)).convert("CMYK"), "JPEG", quality=95)),
    ImageCase("exif-rotated", ".jpg", "colour", "", _exif_rotated, (HEIGHT, WIDTH)),
    ImageCase("grey-photo", ".png", "grey", "", lambda: encode(Image.fromarray(ffa_array(11)), "PNG")),
    ImageCase("colour-ffa", ".png", "colour", "", lambda: encode(Image.fromarray(photo_array(12)), "PNG")),
)  # fmt: skip


def write_case(case: ImageCase, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(case.make())
    return path


def write_photo(path: Path, seed: int = 20, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_array(seed, size)).save(path)
    return path


def write_ffa(path: Path, seed: int = 20, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ffa_array(seed, size)).save(path)
    return path


def write_pair_folder(folder: Path, cases=IMAGE_CASES, good: int = 2) -> dict[str, tuple[ImageCase, str, Path]]:
    """A uwf-layout folder: `good` valid pairs (ids 1..good), then each case once as a photo (its
    angiogram valid, of the case's size) and once as an angiogram (its photo valid), plus a pair of
    different sizes. Returns {file name: (case, slot, path)} for the bad files."""
    for i in range(1, good + 1):
        write_photo(folder / f"{i}.png", seed=i)
        write_ffa(folder / f"{i}.1.png", seed=i)
    planted: dict[str, tuple[ImageCase, str, Path]] = {}
    for number, case in enumerate(cases, start=100):
        size = case.size if case.kind != "unreadable" else (WIDTH, HEIGHT)
        photo = write_case(case, folder / f"{number}{case.suffix}")
        write_ffa(folder / f"{number}.1.png", seed=number, size=size)
        planted[photo.name] = (case, "photo", photo)
        write_photo(folder / f"{number + 100}.png", seed=number, size=size)
        ffa = write_case(case, folder / f"{number + 100}.1{case.suffix}")
        planted[ffa.name] = (case, "ffa", ffa)
    write_photo(folder / "900.png", seed=900)
    write_ffa(folder / "900.1.png", seed=900, size=(WIDTH - 8, HEIGHT))
    return planted


SIZE_MISMATCH = "900.1.png"


def write_folder_without_pairs(folder: Path) -> Path:
    """Photos with no angiograms and a stray text file: a folder with no pairs at all."""
    write_photo(folder / "photo-left.png", seed=1)
    write_photo(folder / "photo-right.png", seed=2)
    (folder / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("angiograms to follow\n")
    return folder


WEIGHTS = "diffusion_pytorch_model.safetensors"


def break_pipeline(pipeline_dir: Path, out: Path, how: str) -> Path:
    """A copy of an exported pipeline folder with its U-Net weights file missing or cut short."""
    shutil.copytree(pipeline_dir, out)
    weights = out / "unet" / WEIGHTS
    if how == "missing":
        weights.unlink()
    elif how == "corrupt":
        weights.write_bytes(_truncated(weights.read_bytes(), 0.5))
    else:
        raise ValueError(how)
    return weights


# (file name, YAML text, words the one-line refusal must contain)
BAD_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("unknown-key.yaml", "preset: tiny\nstage1:\n  learning_rate: 0.001\n", "stage1.learning_rate"),
    ("wrong-type.yaml", "preset: tiny\nstage1:\n  max_steps: lots\n", "stage1.max_steps"),
    ("not-a-mapping.yaml", "- preset: tiny\n- seed: 3\n", "not-a-mapping.yaml"),
    ("broken-yaml.yaml", "stage1: {max_steps: 3\n", "broken-yaml.yaml"),
)


# ---- judging what a program did with a case


@dataclass
class Run:
    exit_code: int
    output: str  # stdout and stderr


def cli(*args) -> Run:
    """Run `ffasynth ARGS` through the real entry point (`ffasynth.cli.main`, which prints an
    FFASynthError as one line and exits 2); any other exception is kept as its traceback."""
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["ffasynth", *map(str, args)]
    os.environ["COLUMNS"] = "400"  # rich tables: one row per line
    code, trace, said = 0, "", io.StringIO()
    try:
        with redirect_stdout(said), redirect_stderr(said):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception as error:  # what a user would see as a traceback
        code, trace = 1, "".join(traceback.format_exception(error))
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return Run(code, said.getvalue() + trace)


def line_problem(output: str, name: str, words: str) -> str | None:
    """None when one line of `output` names `name` together with `words`; else what is wrong."""
    if "Traceback" in output:
        return "a traceback was printed"
    lines = [line.lower() for line in output.splitlines() if name in line]
    if not lines:
        return f"no line names {name}"
    if not any(words in line for line in lines):
        return f"the lines naming {name} do not say {words!r}: {lines[0][:200]}"
    return None


def kept_or_named(name: str, expected: str | None, kept, reported, output: str) -> str | None:
    """A planted file `name`: kept and not reported when `expected` is None; else named in one line of
    `output` with the words `expected`, and not kept."""
    if expected is None:
        return None if name in kept and name not in reported else f"{name} was left out or reported"
    return line_problem(output, f"/{name}", expected) or (f"{name} is still kept" if name in kept else None)


def no_partial_files(folder: Path) -> str | None:
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []
    return f"half-written files left: {leftovers}" if leftovers else None


def complete_png(path: Path, size: tuple[int, int]) -> str | None:
    if not path.is_file():
        return f"{path.name} was not written"
    with Image.open(path) as image:
        image.load()  # a half-written PNG fails here
        if image.size != size:
            return f"{path.name} is {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}"
    return None


def exit_problem(run: Run, expected: int) -> str | None:
    return None if run.exit_code == expected else f"exit {run.exit_code}, not {expected}: {run.output[-500:]}"
