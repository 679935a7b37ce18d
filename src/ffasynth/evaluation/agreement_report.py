"""The agreement metrics (`evaluation.agreement`) in the evaluation report: their columns of the
metrics table, the sentence under it, the per-phase table, the lesion counts in words, and per pair
the vessel overlap and region images beside the source | real | generated grid."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ffasynth.data.io import save_image
from ffasynth.evaluation.agreement import HIGHER_IS_BETTER, LABELS, MEANINGS, PER_IMAGE, Maps, analyse
from ffasynth.evaluation.lesions import recall_sentence
from ffasynth.evaluation.metrics import Evaluation, MethodResult
from ffasynth.evaluation.regions import regions_image
from ffasynth.evaluation.report import Cell, Report
from ffasynth.evaluation.vessels import overlap_image

COLUMNS = {"retrieval": ("own_eye", "own_eye_vessels"), **PER_IMAGE}
MAPS_NOTE = "vessels: real only green, generated only magenta, both white; regions: hyper yellow, hypo blue"


def column_label(column: str) -> str:
    return f"{LABELS[column]} {'↑' if HIGHER_IS_BETTER[column] else '↓'}"


def mean_std(summary: dict) -> Cell:
    mean, std = summary["mean"], summary["std"]
    std = 0.0 if abs(std) < 1e-9 * max(abs(mean), 1e-12) else std  # float round-off of a zero spread
    return Cell(mean, f"{mean:.3g} ± {std:.2g}")


def cells(method: MethodResult, metric: str) -> list:
    """The metrics-table cells of one agreement metric for one method (NaN where it has no value)."""
    found = []
    for column in COLUMNS[metric]:
        if metric == "retrieval" and "retrieval" in method.agreement:
            scores = method.agreement["retrieval"]
            fraction, margin = scores[column], scores[f"{column}_margin"]
            found.append(Cell(fraction, f"{fraction:.2f} ({margin:+.3f})"))
        elif column == "lesion_recall" and "lesions" in method.agreement:
            lesions = method.agreement["lesions"]
            text = f"{lesions['recall']:.2f} ({lesions['shown_generated']}/{lesions['shown_real']})"
            found.append(Cell(lesions["recall"], text) if lesions["shown_real"] else math.nan)
        elif column in method.summary:
            found.append(mean_std(method.summary[column]))
        else:
            found.append(math.nan)
    return found


def note(evaluation: Evaluation, metrics: list[str]) -> str:
    """One sentence per agreement metric in the table, chance level included."""
    parts = [MEANINGS[c] for metric in metrics for c in COLUMNS[metric] if c in MEANINGS]
    chances = {m.agreement["retrieval"]["chance"] for m in evaluation.methods if "retrieval" in m.agreement}
    if chances:
        parts[0] += f" (chance {min(chances):.2f})"
    return ". ".join(part[0].upper() + part[1:] for part in parts) + "." if parts else ""


def add_sections(report: Report, evaluation: Evaluation) -> None:
    """The per-phase table and the lesion counts in words, where the evaluation has them."""
    rows = []
    columns = [c for metric in ("vessels", "regions") for c in PER_IMAGE[metric]]
    for m in evaluation.methods:
        for phase, summary in m.agreement.get("by_phase", {}).items():
            pairs = max((s["n"] for s in summary.values()), default=0)
            rows.append([m.name, phase, pairs, *(mean_std(summary[c]) if c in summary else math.nan for c in columns)])
    if rows:
        shown = [c for i, c in enumerate(columns) if any(not isinstance(row[3 + i], float) for row in rows)]
        keep = [3 + columns.index(c) for c in shown]
        report.add_table(
            "Vessels and regions per phase",
            ["method", "phase", "pairs", *map(column_label, shown)],
            [row[:3] + [row[i] for i in keep] for row in rows],
        )
    lines = [
        f"{m.name}: the generated angiograms show {recall_sentence(m.agreement['lesions']['kinds'])}."
        for m in evaluation.methods
        if m.agreement.get("lesions", {}).get("shown_real")
    ]
    if lines:
        lines.append(
            "Each lesion the phantom drew counts once in every angiogram (early and late) whose real image "
            "shows it; the generated one shows it when its contrast there is at least half the real one's."
        )
        report.add_text("Lesions drawn in the phantoms", "\n".join(lines))


def save_regions(image: torch.Tensor, maps: Maps, path: Path) -> Path:
    """An angiogram (1, H, W) with its hyper- and hypofluorescent regions in colour, as a PNG."""
    return save_image(torch.from_numpy(regions_image(image[0].numpy(), maps.hyper, maps.hypo)), path)


def save_maps(real_maps: Maps, fake: torch.Tensor, folder: Path, index: int) -> tuple[Path, Path]:
    """The vessel overlap of a pair and the generated image's regions, as PNGs in `folder`."""
    fake_maps = analyse(fake[0].numpy(), real_maps.fov)
    overlap = torch.from_numpy(overlap_image(real_maps.vessels, fake_maps.vessels))
    vessels = save_image(overlap, folder / f"vessels_{index}.png")
    return vessels, save_regions(fake, fake_maps, folder / f"regions_{index}.png")
