"""Write an `Evaluation` to a report folder: metrics.json (values, configuration, software
versions), metrics.csv (one row per method and image), and, through the generic
`evaluation.report.Report`, report.html and summary.md with the metrics table (best value per
column marked; the agreement metrics of `evaluation.agreement` first), the source | real |
generated | |difference| grid of every pair and beside it the vessel overlap and region maps.

The folder is filled beside its final place and renamed into it, so a killed run leaves no half
report; an existing folder is replaced only when it is an earlier report (holds metrics.json).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import torch

from ffasynth.data.io import read_image, save_image
from ffasynth.errors import FFASynthError, ImageReadError
from ffasynth.evaluation import agreement_report
from ffasynth.evaluation.agreement import AGREEMENT_METRICS, PER_IMAGE, analyse_real
from ffasynth.evaluation.agreement import LABELS as AGREEMENT_LABELS
from ffasynth.evaluation.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    PAIRED_METRICS,
    Evaluation,
    load_pair,
    resize_to,
)
from ffasynth.evaluation.report import Cell, Report
from ffasynth.files import atomic_folder, atomic_write, atomic_write_text, check_output_folder
from ffasynth.provenance import versions

DIFFERENCE_GAIN = 4.0  # |real - generated| x 4, clipped: a 0.25 difference shows white
LIBRARIES = ("torchvision", "torchmetrics", "torch-fidelity", "lpips", "pillow")  # what the metrics run on
LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "lpips": "LPIPS", "fid": "FID", "kid": "KID"}
LABELS |= AGREEMENT_LABELS
IMAGE_COLUMNS = [column for metric in AGREEMENT_METRICS for column in PER_IMAGE.get(metric, ())]
CSV_COLUMNS = ["method", "key", "real", "fake", "size", "fov_fraction", "phase", *PAIRED_METRICS, *IMAGE_COLUMNS]
CSV_COLUMNS += ["lesions_shown_real", "lesions_shown_generated"]


def json_safe(value):
    """inf → "inf" (JSON has no infinity), NaN → null, Paths → str, recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def conventions(evaluation: Evaluation) -> str:
    s = evaluation.settings
    size = f"shorter side scaled to {s.resolution} px" if s.resolution else "each real image's own size"
    fov = (
        f"paired metrics inside the real image's field of view (brightness > {s.fov_threshold} after a 7-px box "
        "blur, holes filled): PSNR on its pixels; SSIM's and LPIPS's maps averaged over it (their windows, 11 px "
        "and the network's, also read the generated image just outside it); MS-SSIM on the mask's bounding box "
        "with the outside set to black in both (black corners count as agreement: higher than SSIM's convention)"
        if s.fov_mask
        else "paired metrics over the whole frame (black borders included)"
    )
    patches = f"{s.patches} random {s.patch_size}-px crops per image" if s.patches else "whole images"
    return (
        f"Real: {evaluation.real_dir}. Resolution: {size}; generated images resized to their real partner.\n"
        "Intensity: [0, 1] (8-bit / 255, 16-bit / 65535), data range 1. Channels: grey (one channel) for "
        "PSNR/SSIM/MS-SSIM, colour generated images as luma; repeated to 3 for LPIPS and Inception.\n"
        "SSIM: torchmetrics' (Gaussian 11 px, σ 1.5), its map's reflect-padded 5-px border included (scikit-image "
        "leaves it out: up to 0.005 apart on small images).\n"
        f"Field of view: {fov}.\nLPIPS: {s.lpips_net} network, inputs in [-1, 1]. FID/KID: torch-fidelity "
        f"Inception-v3 2048-d pool features of {patches}; KID over {s.kid_subsets} subsets (seed {s.seed}).\n"
        f"Weights folder: {s.weights_dir or '$FFASYNTH_WEIGHTS_DIR or the torch hub cache'}."
    )


def to_json(evaluation: Evaluation) -> dict:
    methods = {}
    for m in evaluation.methods:
        methods[m.name] = {
            "fake_dir": m.fake_dir,
            "summary": m.summary,
            **m.distribution,
            "n_features": m.n_features,
            "pairing": m.pairing.to_json(),
            "warnings": m.warnings,
            "agreement": m.agreement,
            "per_image": m.per_image,
        }
    return json_safe(
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "real_dir": evaluation.real_dir,
            "source_dir": evaluation.source_dir,
            "config": evaluation.settings.to_json(),
            "conventions": conventions(evaluation),
            "software": versions(*LIBRARIES),
            "skipped": evaluation.skipped,
            "warnings": evaluation.warnings,
            "methods": methods,
        }
    )


def summary_table(evaluation: Evaluation) -> tuple[list[str], list[list], dict[str, str]]:
    """(columns, a row per method, column → "max"/"min" for the best value): the report's metrics table."""
    chosen = [m for m in METRICS if m in evaluation.settings.metrics and m not in evaluation.skipped]
    columns, best = ["method", "pairs"], {}
    for metric in chosen:
        if metric in AGREEMENT_METRICS:
            for column in agreement_report.COLUMNS[metric]:
                columns.append(agreement_report.column_label(column))
                best[columns[-1]] = "max" if HIGHER_IS_BETTER[column] else "min"
            continue
        label = f"{LABELS[metric]}{' (mean ± std)' if metric in PAIRED_METRICS or metric == 'kid' else ''}"
        label += " ↑" if HIGHER_IS_BETTER[metric] else " ↓"
        columns.append(label)
        best[label] = "max" if HIGHER_IS_BETTER[metric] else "min"
    columns.append("features real/gen")
    rows = []
    for m in evaluation.methods:
        row = [m.name, len(m.per_image)]
        for metric in chosen:
            if metric in AGREEMENT_METRICS:
                row += agreement_report.cells(m, metric)
            elif metric in PAIRED_METRICS and metric in m.summary:
                mean, std = m.summary[metric]["mean"], m.summary[metric]["std"]
                row.append(Cell(mean, _mean_std(mean, std)))
            elif metric == "kid" and "kid" in m.distribution:
                row.append(Cell(m.distribution["kid"], _mean_std(m.distribution["kid"], m.distribution["kid_std"])))
            else:
                row.append(m.distribution.get(metric, math.nan))
        row.append(f"{m.n_features['real']}/{m.n_features['fake']}" if m.n_features else "-")
        rows.append(row)
    return columns, rows, best


def _mean_std(mean: float, std: float) -> str:
    if math.isinf(mean):
        return "inf"
    std = 0.0 if abs(std) < 1e-9 * max(abs(mean), 1e-12) else std  # float round-off of a zero spread
    return f"{mean:.4g} ± {std:.2g}"


def _file_name(key: str) -> str:
    """A folder name for a pair's key: the key itself when it is plain, else its plain characters and a hash
    of the key, so that keys differing only in other characters (`Müller_OD`, `Möller_OD`) stay apart."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    return plain if plain == key else f"{plain}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _grid_images(evaluation: Evaluation, folder: Path, maps: bool) -> tuple[list[str], list, list[str], list]:
    """Full-size PNGs under folder/images/pairs/: source, real, and per method generated + |difference|;
    with `maps`, a second grid: the real image's regions, and per method the vessel overlap and the
    generated image's regions. Returns (columns, rows) of each grid."""
    columns, map_columns = ["source", "real"], ["real regions"]
    for m in evaluation.methods:
        name = m.name if len(evaluation.methods) > 1 else "generated"
        columns += [name, f"{name} |difference| ×{DIFFERENCE_GAIN:g}"]
        map_columns += [f"{name} vessels", f"{name} regions"]
    keys = list(dict.fromkeys(p.key for m in evaluation.methods for p in m.pairing.pairs))
    rows, map_rows = [], []
    for key in keys:
        base = folder / "images" / "pairs" / _file_name(key)
        cells: list[Path | None] = [None, None]
        map_cells: list[Path | None] = [None]
        real_maps = None
        for index, m in enumerate(evaluation.methods):
            pair = next((p for p in m.pairing.pairs if p.key == key), None)
            if pair is None:
                cells, map_cells = cells + [None, None], map_cells + [None, None]
                continue
            try:
                real, fake, _, _ = load_pair(pair.real, pair.fake, evaluation.settings.resolution)
                if cells[1] is None:
                    cells[1] = save_image(real, base / "real.png")
                    if pair.source is not None:
                        source = resize_to(read_image(pair.source), tuple(real.shape[-2:]))
                        cells[0] = save_image(source, base / "source.png")
            except ImageReadError:
                cells, map_cells = cells + [None, None], map_cells + [None, None]
                continue
            difference = ((real - fake).abs() * DIFFERENCE_GAIN).clamp(0, 1)
            cells.append(save_image(fake, base / f"generated_{index}.png"))
            cells.append(save_image(difference, base / f"difference_{index}.png"))
            if maps:
                if real_maps is None:
                    real_maps = analyse_real(real[0].numpy(), evaluation.settings.fov_threshold)
                    map_cells[0] = agreement_report.save_regions(real, real_maps, base / "real_regions.png")
                map_cells += agreement_report.save_maps(real_maps, fake, base, index)
        rows.append((key, cells))
        map_rows.append((key, map_cells))
    return columns, rows, map_columns, map_rows if maps else []


def _write_csv(evaluation: Evaluation, path: Path) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for m in evaluation.methods:
                for row in m.per_image:
                    values = {k: ("" if v is None else v) for k, v in json_safe(row).items()}
                    writer.writerow({"method": m.name, **values})

    atomic_write(path, write)


def build_report(evaluation: Evaluation, folder: Path) -> Report:
    """The evaluation as a generic Report: metrics, what was skipped and why, the image grid,
    per-image scores, pairing, conventions, software."""
    names = ", ".join(m.name for m in evaluation.methods)
    report = Report("ffasynth evaluation", intro=f"Generated angiograms ({names}) against {evaluation.real_dir}.")
    columns, rows, best = summary_table(evaluation)
    note = "Best value per column in bold. ↑ higher is better, ↓ lower is better."
    shown = [m for m in AGREEMENT_METRICS if m in evaluation.settings.metrics and m not in evaluation.skipped]
    note = f"{note} {agreement_report.note(evaluation, shown)}".strip()
    report.add_table("Metrics", columns, rows, best, note)
    agreement_report.add_sections(report, evaluation)
    if evaluation.skipped:
        reasons: dict[str, list[str]] = {}
        for metric, reason in evaluation.skipped.items():
            reasons.setdefault(reason, []).append(LABELS[metric])
        report.add_text("Skipped metrics", "\n".join(f"{', '.join(m)}: {r}" for r, m in reasons.items()))
    warnings = evaluation.warnings + [f"{m.name}: {w}" for m in evaluation.methods for w in m.warnings]
    pair_sets = {m.name: {row["key"] for row in m.per_image} for m in evaluation.methods}
    if len({frozenset(keys) for keys in pair_sets.values()}) > 1:
        counts = ", ".join(f"{name} {len(keys)}" for name, keys in pair_sets.items())
        warnings.append(f"the methods were scored on different pairs ({counts}): paired means are not like for like")
    if warnings:
        report.add_text("Warnings", "\n".join(warnings))
    maps = any(m in shown for m in ("vessels", "regions"))
    grid_columns, grid_rows, map_columns, map_rows = _grid_images(evaluation, folder, maps)
    if grid_rows:
        report.add_grid("Source | real | generated | difference", grid_columns, grid_rows)
    if map_rows:
        report.add_grid(f"Vessels and regions ({agreement_report.MAPS_NOTE})", map_columns, map_rows)
    columns = [*PAIRED_METRICS, *IMAGE_COLUMNS]
    metrics = [k for k in columns if any(k in row for m in evaluation.methods for row in m.per_image)]
    for m in evaluation.methods:
        if m.per_image:
            per_image = [
                [row["key"], row["size"], row["fov_fraction"], *(row.get(k, math.nan) for k in metrics)]
                for row in m.per_image
            ]
            report.add_table(
                f"Per image: {m.name}", ["image", "size", "FOV fraction", *map(LABELS.get, metrics)], per_image
            )
    for m in evaluation.methods:
        lines = [f"{m.fake_dir}: {m.pairing.summary()}."]
        if m.pairing.missing_fake:
            lines.append("Real images without a generated partner: " + ", ".join(m.pairing.missing_fake))
        if m.pairing.unmatched_fake:
            lines.append("Generated images without a real partner: " + ", ".join(m.pairing.unmatched_fake))
        lines += m.pairing.notes
        report.add_text(f"Pairing: {m.name}", "\n".join(lines))
    report.add_text("How these numbers were computed", conventions(evaluation))
    report.add_text("Software", ", ".join(f"{k} {v}" for k, v in versions(*LIBRARIES).items()))
    return report


def check_report_folder(out: str | Path, inputs=()) -> Path:
    """Refuse, in one line, a report folder that cannot be written or replaced: a file, not writable, a
    folder holding other things than an earlier report, or one holding an input (`inputs`: the real,
    generated and source folders), which replacing the report would delete."""
    out = Path(out)
    check_output_folder(out, inputs, "--out", replaces=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise FFASynthError(f"--out {out}: exists and is not an earlier ffasynth report; choose another --out")
    return out


def write_evaluation(evaluation: Evaluation, out: str | Path) -> dict[str, Path]:
    """Write metrics.json, metrics.csv, report.html, summary.md (and images/) into `out`."""
    out = check_report_folder(
        out, [evaluation.real_dir, evaluation.source_dir, *(m.fake_dir for m in evaluation.methods)]
    )

    def fill(folder: Path) -> None:
        atomic_write_text(folder / "metrics.json", json.dumps(to_json(evaluation), indent=2, allow_nan=False))
        _write_csv(evaluation, folder / "metrics.csv")
        build_report(evaluation, folder).write(folder)

    with torch.no_grad():
        atomic_folder(out, fill)
    return {name: out / name for name in ("metrics.json", "metrics.csv", "report.html", "summary.md")}
