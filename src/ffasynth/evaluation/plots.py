"""Figures for the clinical experiment: pooled one-vs-rest ROC curves and the confusion matrix (PNG,
written atomically). matplotlib is imported inside each function: with its Agg backend set first, and
only by the runs that draw."""

from __future__ import annotations

from pathlib import Path

from ffasynth.evaluation.clinical import ClinicalResult
from ffasynth.files import atomic_write


def plot_roc(result: ClinicalResult, path: str | Path) -> Path:
    """One-vs-rest ROC curves pooled over folds, one line per class, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, roc_curve

    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for index, name in enumerate(result.classes):
        truth = result.y_true == index
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, result.probabilities[:, index])
        axis.plot(fpr, tpr, label=f"{name} (pooled AUC {auc(fpr, tpr):.2f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {result.settings.mode}")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return Path(path)


def plot_confusion(result: ClinicalResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = result.confusion()
    figure, axis = plt.subplots(figsize=(5, 4.5), dpi=100)
    axis.imshow(matrix, cmap="Blues")
    ticks = range(len(result.classes))
    axis.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=f"Confusion, {result.settings.mode}")
    axis.set_xticklabels(result.classes, rotation=30, ha="right")
    axis.set_yticklabels(result.classes)
    for i in ticks:
        for j in ticks:
            axis.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return Path(path)
