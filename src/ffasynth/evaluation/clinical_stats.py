"""The clinical experiment's statistics: per-fold scores, eye-grouped folds, and how sure a difference is.

Cross-validation folds share most of their training eyes, so their scores are not independent: a plain
t-interval over folds is too narrow. Intervals and tests here use the corrected resampled t statistic
(Nadeau & Bengio 2003, "Inference for the generalization error"; Bouckaert & Frank 2004): the variance
of J fold scores is inflated from σ²/J to (1/J + n_test/n_train)·σ², with J − 1 degrees of freedom.
Two modes are compared fold by fold on the same eyes and the same folds (a paired difference).
"""

from __future__ import annotations

import math

import numpy as np

from ffasynth.errors import FFASynthError

LEVEL = 0.95  # confidence level of every interval


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (the mean of the per-class recalls over the classes in this fold's
    truth: sensitivity and specificity averaged for two classes), macro-F1 and one-vs-rest macro AUC
    (scikit-learn). AUC is NaN when a class is absent from y_true (it is undefined there)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    predicted = probabilities.argmax(1)
    labels = list(range(n_classes))
    present = np.unique(y_true)
    metrics = {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "balanced_accuracy": float(np.mean([(predicted[y_true == c] == c).mean() for c in present])),
        # over the classes in this fold's truth or predictions: a class neither has is not a 0 in the mean
        "macro_f1": float(f1_score(y_true, predicted, average="macro", zero_division=0)),
    }
    if len(present) < 2:
        metrics["auc_ovr"] = float("nan")
    elif n_classes == 2:
        metrics["auc_ovr"] = float(roc_auc_score(y_true, probabilities[:, 1]))
    elif len(present) == n_classes:
        metrics["auc_ovr"] = float(
            roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro", labels=labels)
        )
    else:  # one-vs-rest over the classes present in this fold
        aucs = [roc_auc_score(y_true == c, probabilities[:, c]) for c in present]
        metrics["auc_ovr"] = float(np.mean(aucs))
    return metrics


def make_folds(labels: np.ndarray, groups: list[str], folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold where all images of one group (eye/patient) fall in one fold. Each class needs
    a group in every fold (so every training split holds every class)."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = [len({g for g, label in zip(groups, labels, strict=True) if label == c}) for c in np.unique(labels)]
    smallest = min(per_class)
    if folds < 2 or folds > smallest:
        raise FFASynthError(
            f"--folds {folds} must be between 2 and the smallest class's number of eyes (groups): {smallest}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def corrected_interval(values, test_fraction: float) -> dict[str, float]:
    """Mean of fold scores with its corrected resampled t-interval (module docstring); test_fraction =
    n_test / n_train of a fold. {mean, low, high}; NaN bounds with fewer than two defined values, or when every
    fold scored alike (a sample spread of 0 is a few folds' coincidence, e.g. 2 of 16 test eyes wrong in
    each, not certainty: the t-interval would shrink to the mean)."""
    from scipy import stats

    values = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if values.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan}
    mean = float(values.mean())
    error = _corrected_error(values, test_fraction) if values.size >= 2 else 0.0
    if error == 0:
        return {"mean": mean, "low": math.nan, "high": math.nan}
    half = float(stats.t.ppf(0.5 + LEVEL / 2, values.size - 1)) * error
    return {"mean": mean, "low": mean - half, "high": mean + half}


def _corrected_error(values: np.ndarray, test_fraction: float) -> float:
    """The standard error of the mean of J ≥ 2 fold scores, corrected: √((1/J + n_test/n_train)·σ²)."""
    return math.sqrt((1.0 / values.size + test_fraction) * values.var(ddof=1))


def paired_difference(first, second, test_fraction: float) -> dict[str, float]:
    """first − second, fold by fold (the same folds of the same eyes), over the folds where both are defined:
    {mean, low, high, p (two-sided, corrected resampled t-test), folds, verdict (`verdict`)}."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(first, second, strict=True) if math.isfinite(a) and math.isfinite(b)]
    differences = np.array([a - b for a, b in pairs], dtype=float)
    result = {**corrected_interval(differences, test_fraction), "p": math.nan, "folds": len(pairs)}
    if differences.size >= 2:
        scale = _corrected_error(differences, test_fraction)
        if scale > 0:  # else every fold differs alike: no test (see corrected_interval)
            statistic = result["mean"] / scale
            result["p"] = float(2 * stats.t.sf(abs(statistic), differences.size - 1))
    return {**result, "verdict": verdict(result)}


def verdict(difference: dict[str, float]) -> str:
    """One phrase for a paired difference: which way the interval lies, or that it cannot tell."""
    if not math.isfinite(difference["low"]):
        return "cannot tell (too few folds, or every fold alike)"
    if difference["low"] > 0:
        return "better"
    if difference["high"] < 0:
        return "worse"
    return "no clear difference"
