"""What a clinical experiment leaves on disk: `metrics.json` (per mode: mean, std and 95% interval over folds, the
per-fold values, the confusion matrix and every out-of-fold prediction; the settings; library
versions; with synthetic angiograms, their vessel and region agreement with the real ones per
class) and, per mode, `confusion_<mode>.png` and `roc_<mode>.png`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ffasynth.evaluation.agreement import HIGHER_IS_BETTER, LABELS, PER_IMAGE
from ffasynth.evaluation.clinical import ClinicalResult
from ffasynth.evaluation.plots import plot_confusion, plot_roc
from ffasynth.evaluation.report import Cell, Report
from ffasynth.files import atomic_write_text
from ffasynth.provenance import versions


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined score (e.g. AUC with one class in a fold) is null."""
    return None if math.isnan(value) else value


def mode_record(result: ClinicalResult) -> dict:
    counts = {name: int((result.y_true == i).sum()) for i, name in enumerate(result.classes)}
    return {
        "summary": {k: {s: _finite(v) for s, v in ms.items()} for k, ms in result.summary().items()},
        "folds": [{k: _finite(v) for k, v in fold.items()} for fold in result.fold_metrics],
        "classes": result.classes,
        "class_counts": counts,
        "confusion": result.confusion().tolist(),  # rows: true class, columns: predicted
        "skipped": result.skipped,
        "predictions": [
            {
                "id": example,
                "label": result.classes[int(result.y_true[i])],
                "fold": int(result.fold_of[i]),
                "probabilities": [round(float(p), 6) for p in result.probabilities[i]],
            }
            for i, example in enumerate(result.ids)
        ],
    }


def write_clinical_report(
    results: list[ClinicalResult],
    out: str | Path,
    skipped_modes: dict[str, str] | None = None,
    agreement: dict[str, dict] | None = None,
    differences: dict[str, dict] | None = None,
    **context,
) -> Path:
    """Write metrics.json and the figures into `out`; `agreement` (class → vessel/region scores of the
    synthetic angiograms against the real ones: `evaluation.agreement.scores_by_class`), `differences`
    (mode → metric → its paired difference from source-only: `clinical_stats.paired_difference`) and
    `context` (data folder, synthetic folder...) go beside the settings. Returns the metrics.json path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modes = {}
    for result in results:
        mode = result.settings.mode
        record = mode_record(result)
        record["figures"] = {
            "confusion": plot_confusion(result, out / f"confusion_{mode}.png").name,
            "roc": plot_roc(result, out / f"roc_{mode}.png").name,
        }
        modes[mode] = record
    settings = {k: v for k, v in dataclasses.asdict(results[0].settings).items() if k != "mode"}
    document = {
        "experiment": "clinical",
        "settings": {**settings, **context, "pretrained_backbone": settings["weights"] is not None},
        "modes": modes,
        "skipped_modes": skipped_modes or {},
        "difference_from_source_only": {
            mode: {
                metric: {k: _finite(v) if isinstance(v, float) else v for k, v in d.items()} for metric, d in m.items()
            }
            for mode, m in (differences or {}).items()
        },
        "agreement_by_class": {
            label: {k: v if k == "n" else {s: _finite(x) for s, x in v.items()} for k, v in scores.items()}
            for label, scores in (agreement or {}).items()
        },
        "versions": versions("timm", "scikit-learn"),
    }
    path = atomic_write_text(out / "metrics.json", json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_html(document, out)
    return path


METRIC_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "auc_ovr": "AUC (one-vs-rest)",
}


def interval_text(record: dict, signed: bool = False) -> str:
    """A summary or difference record as "mean [low, high]" (and ", p = …: verdict" for a difference); "-"
    when undefined. Undefined figures are NaN in the results and None in metrics.json: both are left out."""
    mean, low, high, p = (_defined(record.get(k)) for k in ("mean", "low", "high", "p"))
    if mean is None:
        return "-"
    form = "+.3f" if signed else ".3f"
    text = f"{mean:{form}}" + (f" [{low:{form}}, {high:{form}}]" if low is not None else "")
    text += f", p = {p:.2g}" if p is not None else ""
    return text + (f": {record['verdict']}" if record.get("verdict") else "")


def _defined(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _cell(record: dict, signed: bool = False) -> Cell:
    return Cell(record.get("mean"), interval_text(record, signed))


def write_html(document: dict, out: Path) -> dict[str, Path]:
    """report.html + summary.md in the format `ffasynth evaluate` uses: one table of the modes (best per
    column marked), the ROC curves and confusion matrices, and the settings."""
    settings = document["settings"]
    repeats = f" × {settings['repeats']} repeats" if settings.get("repeats", 1) > 1 else ""
    report = Report(
        "Clinical validation: disease classification",
        intro=(
            f"{settings['folds']}-fold cross-validation{repeats} (stratified; every example of one group in one "
            f"fold: an eye for paired data, an image for class folders unless groups.csv joins them) of a "
            f"{settings['backbone']} classifier "
            f"({'pretrained' if settings['pretrained_backbone'] else 'random initialisation'}), "
            f"{settings['epochs']} epochs at {settings['image_size']}², fusion {settings['fusion']}; the "
            "modes run on the same eyes and folds. Mean over the folds (an AUC over the folds where it is "
            "defined) with its 95% interval by the corrected resampled t statistic (Nadeau & Bengio: folds "
            "share training eyes, so a plain interval over folds is too narrow). The ROC legends give the "
            "AUC of the pooled out-of-fold predictions, which differs from the table's mean over folds."
        ),
    )
    columns = ["mode", "examples", *(f"{name} ↑" for name in METRIC_NAMES.values())]
    rows = []
    for mode, record in document["modes"].items():
        row = [mode, sum(record["class_counts"].values())]
        for metric in METRIC_NAMES:
            row.append(_cell(record["summary"].get(metric, {})))
        rows.append(row)
    report.add_table("Scores", columns, rows)
    compared = document.get("difference_from_source_only") or {}
    if compared:
        rows = [[mode, *(_cell(d[m], signed=True) for m in METRIC_NAMES)] for mode, d in compared.items()]
        report.add_table(
            "Difference from source-only (same eyes, same folds)",
            ["mode", *METRIC_NAMES.values()],
            rows,
            note="Mode minus source-only, fold by fold: mean [95% interval], p of the corrected resampled t-test; "
            "'better' or 'worse' only when the interval excludes 0.",
        )
    if document.get("agreement_by_class"):
        metrics = (*PER_IMAGE["vessels"], *PER_IMAGE["regions"])
        labels = [f"{LABELS[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in metrics]
        rows = []
        for label, scores in document["agreement_by_class"].items():
            cells = [Cell(scores[m]["mean"], f"{scores[m]['mean']:.3f} ± {scores[m]['std']:.3f}") if m in scores
                     else "-" for m in metrics]  # fmt: skip
            rows.append([label, scores["n"], *cells])
        report.add_table(
            "Synthetic against real angiograms, per class",
            ["class", "pairs", *labels],
            rows,
            note="Vessel masks (Frangi) and regions brighter / darker than the local background by 0.1, as in "
            "`ffasynth evaluate`: does the synthetic angiogram keep each class's vessels and lesions?",
        )
    figures = []
    for mode, record in document["modes"].items():
        figures += [
            (f"{mode}: ROC", out / record["figures"]["roc"]),
            (f"{mode}: confusion", out / record["figures"]["confusion"]),
        ]
    report.add_figures("ROC curves and confusion matrices", figures)
    skipped = document.get("skipped_modes") or {}
    text = "\n".join(f"{k}: {v}" for k, v in settings.items())
    if skipped:
        text += "\n\nSkipped modes: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
    report.add_text("Settings", text)
    return report.write(out)
