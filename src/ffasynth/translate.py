"""Batch translation of photo files with an exported pipeline: find the inputs, run each one, write
`<name>_ffa.png` (8-bit grey, the input's size) and, with several samples, `<name>_uncertainty.png`
(the per-pixel std in false colour). A file that fails is reported and skipped; the rest still run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ffasynth.data.io import MIN_SIDE, is_image_file, read_image, save_image
from ffasynth.data.pairs import discover_pairs
from ffasynth.errors import FFASynthError, ImageReadError, OutputError, PairError, WeightsNotFoundError

OUTPUT_SUFFIXES = ("_ffa", "_uncertainty")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def collect_inputs(inputs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files as given, and the image files directly inside folders (sorted; earlier outputs skipped).
    Returns (files, problems) where problems are (path, reason) for inputs that do not exist."""
    files, problems = [], []
    for path in inputs:
        if path.is_dir():
            found = [p for p in sorted(path.iterdir()) if p.is_file() and is_image_file(p)]
            found = [p for p in found if not p.stem.endswith(OUTPUT_SUFFIXES)]
            angiograms = _paired_targets(path)
            found = [p for p in found if p not in angiograms]  # a pair folder: translate its photos only
            if not found:
                problems.append((path, "folder holds no image files"))
            files += found
        elif path.exists():
            files.append(path)
        else:
            problems.append((path, "no such file or folder"))
    return list(dict.fromkeys(files)), problems


def _paired_targets(folder: Path) -> set[Path]:
    """The angiograms of a folder laid out as pairs (e.g. uwf `N.bmp` + `N.1.bmp`), else nothing."""
    try:
        layout, pairs, _ = discover_pairs(folder)
    except (PairError, OSError):
        return set()
    return {pair.target for pair in pairs if pair.target.parent == folder} if layout in ("uwf", "named") else set()


def output_names(files: list[Path]) -> tuple[dict[Path, str], list[str]]:
    """Each input's output name (`<name>_ffa.png`), decided before anything is written so that no two
    outputs share a file, and a note for each group of inputs not named by their stem. The name is the
    file's stem; where several inputs share a stem: in different folders, the folder's name before it
    (`x_7`, `y_7`); in one folder, the stem with its suffix (`a.jpg`, `a.png`); else both (`x_a.png`).
    A name still taken by an earlier input: an input named by its stem takes its suffix too (`a.jpg`
    for `a.jpg.png`), any other a number (`x_a.png-2`)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(path.stem, []).append(path)
    names: dict[Path, str] = {}
    for stem, group in groups.items():
        for path in group:
            if len(group) == 1:
                names[path] = stem
            elif len({p.parent.name for p in group}) == len(group):
                names[path] = f"{path.parent.name}_{stem}"
            elif len({p.name for p in group}) == len(group):
                names[path] = path.name
            else:
                names[path] = f"{path.parent.name}_{path.name}"
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    taken = {name for name, count in counts.items() if count == 1}
    for path in files:  # names still shared, in input order
        name = names[path]
        if counts[name] > 1:
            longer = [path.name] if name == path.stem else []
            numbered = (f"{name}-{number}" for number in range(2, len(files) + 2))
            names[path] = next(c for c in (name, *longer, *numbered) if c not in taken)
            taken.add(names[path])
    renamed: dict[str, list[Path]] = {}
    for path in files:
        if len(groups[path.stem]) > 1 or names[path] != path.stem:
            renamed.setdefault(path.stem, []).append(path)
    notes = [
        f"{', '.join(map(str, group))} would share the output name {output_file(stem)}; written as "
        f"{', '.join(output_file(names[p]) for p in group)} instead"
        for stem, group in renamed.items()
    ]
    return names, notes


def output_file(name: str, kind: str = "ffa") -> str:
    """The file an input with output name `name` is written to: `<name>_ffa.png` (kind "ffa") or
    `<name>_uncertainty.png` (kind "uncertainty"); evaluation pairs outputs by this name."""
    return f"{name}_{kind}.png"


def output_stems(files: list[Path]) -> dict[Path, str]:
    """Each input's output name (see output_names)."""
    return output_names(files)[0]


def uncertainty_rgb(std: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W[, 1]) std in [0, 1] units → (H, W, 3) uint8 in matplotlib's magma; vmax and above = brightest."""
    from matplotlib import colormaps

    values = np.clip(np.squeeze(std, axis=-1) if std.ndim == 3 else std, 0.0, vmax) / max(vmax, 1e-12)
    return (colormaps["magma"](values)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def resolve_device(name: str) -> torch.device:
    """--device auto, cpu, cuda or cuda:N → a torch device that exists here, else one FFASynthError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = name.partition(":")
    if name == "cpu" or (kind == "cuda" and (not colon or (index.isascii() and index.isdigit()))):
        if kind == "cuda" and not torch.cuda.is_available():
            raise FFASynthError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise FFASynthError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device(name)
    raise FFASynthError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")


def library_bars_off() -> None:
    """diffusers' and transformers' own progress bars (loading weights, writing model shards) off: a pipeline
    load, and `--quiet` of any verb, shows ffasynth's bars only."""
    from diffusers.utils import logging as diffusers_logging  # heavy imports: only when asked
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(folder: str | Path, device: str = "auto", dtype: str = "float32"):
    """An exported pipeline folder on a device, in a weight dtype (the libraries' loading bars off).
    With float16 the VAE stays in float32: its decoder's activations can overflow half precision's
    range (bfloat16 has float32's range, so there the VAE follows)."""
    from ffasynth.pipeline import FFASynthesisPipeline  # imports diffusers (~2 s): only when a pipeline is loaded

    library_bars_off()

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise WeightsNotFoundError(f"{folder} is not a pipeline folder (no model_index.json); make one with `export`")
    if dtype not in DTYPES:
        raise FFASynthError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    pipeline = FFASynthesisPipeline.from_pretrained(folder, dtype=DTYPES[dtype])
    if DTYPES[dtype] == torch.float16:
        pipeline.vae.to(torch.float32)
    return pipeline.to(resolve_device(device))


def read_photo(path: str | Path, max_pixels: int | None = None) -> tuple[torch.Tensor, str | None]:
    """A photograph as (3, H, W): uint8 levels for 8-bit files (a quarter of float32's memory on a
    large photo; the pipeline converts a tile at a time), else float32 in [0, 1]; and a warning when
    it is grey (the model was trained on colour photographs: a grey input is more likely an
    angiogram or a red-free frame)."""
    image = read_image(path, max_pixels=max_pixels, min_side=MIN_SIDE, compact=True)
    if image.shape[0] == 3:
        return image, None
    warning = "the photo is grey, but the model expects a colour photograph (is it an angiogram?); translated anyway"
    return image.expand(3, -1, -1).contiguous(), warning


@dataclass(kw_only=True)
class TranslateSettings:
    steps: int | None = None  # None = the pipeline's default (20; 4 for an LCM student)
    seed: int = 0
    samples: int = 1
    guidance: float | None = None  # None = the pipeline's default
    start_strength: float = 1.0  # < 1: start from the photo's latent noised to that fraction of the schedule
    phase: str | None = None
    tile_size: int | None = None
    tile_overlap: int | None = None
    decode_tile_size: int | None = None
    uncertainty_max: float = 0.2
    decoder: str = "vae"  # or "preview": a distilled pipeline's tiny decoder
    outside_field: str = "model"  # or "black": 0 outside the photo's field of view


@dataclass
class TranslateReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[tuple[Path, str]] = field(default_factory=list)
    seconds: dict[Path, float] = field(default_factory=dict)


def translate_files(
    pipeline,
    files: list[Path],
    out_dir: Path,
    settings: TranslateSettings,
    on_done: Callable[[Path, str | None, str | None], None] | None = None,
) -> TranslateReport:
    """Translate each file; every image uses a generator seeded with `settings.seed`, so its result
    does not depend on the other inputs. on_done(path, error or None, warning or None) is called
    after each file."""
    steps = settings.steps if settings.steps is not None else int(pipeline.config.get("num_inference_steps", 20))
    call = {  # what every image's call shares, checked once before the first file
        "num_inference_steps": steps,
        "image_guidance_scale": settings.guidance,
        "num_samples": settings.samples,
        "output_type": "np",
        "phase": settings.phase,
        "start_strength": settings.start_strength,
        "decoder": settings.decoder,
        "outside_field": settings.outside_field,
    }
    pipeline.check_inputs(**call)
    report = TranslateReport()
    stems = output_stems(files)
    for path in files:
        error = warning = None
        try:
            photo, warning = read_photo(path)
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(settings.seed)
            output = pipeline(
                photo,
                generator=generator,
                tile_size=settings.tile_size,
                tile_overlap=settings.tile_overlap,
                decode_tile_size=settings.decode_tile_size,
                **call,
            )
            seconds = time.perf_counter() - start
            size = tuple(photo.shape[-2:])
            del photo  # the photo's memory is free before the output is converted and written
            image = output.images[0]
            if image.shape[:2] != size:
                raise FFASynthError(f"output {image.shape[:2]} differs from the input's size {size}")
            if not np.isfinite(image).all():  # e.g. an extreme --guidance overflowed the sampler: nothing written
                raise FFASynthError(f"the output is not finite (NaN or inf) at guidance {settings.guidance}")
            report.seconds[path] = seconds
            report.written.append(save_image(image.transpose(2, 0, 1), out_dir / output_file(stems[path])))
            if output.uncertainty is not None:
                colour = uncertainty_rgb(output.uncertainty[0], settings.uncertainty_max)
                report.written.append(save_image(colour, out_dir / output_file(stems[path], "uncertainty")))
            del output, image
        except OutputError:  # disk full, no permission: every later image would fail alike
            raise
        except ImageReadError as failure:
            error = failure.cause
        except FFASynthError as failure:
            error = str(failure)
        except (RuntimeError, ValueError, MemoryError) as failure:  # e.g. out of memory on a huge input
            error = f"{type(failure).__name__}: {(str(failure).splitlines() or [''])[0][:200]}"
        if error is not None:
            report.failed.append((path, error))
        elif warning is not None:
            report.warnings.append((path, warning))
        if on_done is not None:
            on_done(path, error, warning)
    return report
