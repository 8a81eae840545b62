"""AUROC / AUPRC for the three task kinds, with bootstrap confidence intervals; calibration
(ECE, reliability bins) and bootstrap intervals of a mean (over seeds).

Binary: plain. Multi-label: macro over labels that hold both classes. Multi-class:
one-vs-rest macro over classes (METHOD.md section 7). Ranking metrics come from
scikit-learn; an undefined metric (a single class in the labels) is NaN, never an error.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from omnifuse_model.config import TaskKind

METRICS = ("auroc", "auprc")


def _one_vs_rest(labels: np.ndarray, scores: np.ndarray, task: TaskKind) -> tuple[np.ndarray, ...]:
    """Labels and scores as [N, C] binary indicator / score matrices."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if task == "multiclass":
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        indicator = np.zeros_like(scores)
        indicator[np.arange(len(labels)), labels] = 1.0
        return indicator, scores
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    return labels, scores


def _macro(metric, labels: np.ndarray, scores: np.ndarray) -> float:
    values = []
    for column in range(labels.shape[1]):
        y = labels[:, column]
        if y.min() == y.max():
            continue  # undefined for a single class
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values.append(metric(y, scores[:, column]))
    # Areas lie in [0, 1]; summation can overshoot by an ulp (sklearn's average precision of
    # a perfect ranking of 9 positives in 11 is 1.0000000000000002), which the server's
    # strict reply screening would reject as out of range.
    return float(np.clip(np.mean(values), 0.0, 1.0)) if values else math.nan


def auroc(labels: np.ndarray, scores: np.ndarray, task: TaskKind) -> float:
    """Area under the ROC curve (macro over labels/classes where more than one)."""
    return _macro(roc_auc_score, *_one_vs_rest(labels, scores, task))


def auprc(labels: np.ndarray, scores: np.ndarray, task: TaskKind) -> float:
    """Average precision (area under the precision-recall curve), macro as ``auroc``."""
    return _macro(average_precision_score, *_one_vs_rest(labels, scores, task))


def bootstrap_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    task: TaskKind,
    metric: str = "auroc",
    samples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over resampled examples.

    Resamples where the metric is undefined are skipped; (nan, nan) when none is defined.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    labels, scores = np.asarray(labels), np.asarray(scores)
    rng = np.random.default_rng(seed)
    n = len(labels)
    # one draw per resample, as a loop of fn(labels[index], ...) would make them
    index = np.stack([rng.integers(0, n, n) for _ in range(samples)]) if samples else None
    if index is None or n == 0:
        return math.nan, math.nan
    values = resampled_metric(labels, scores, task, metric, index)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def resampled_metric(
    labels: np.ndarray, scores: np.ndarray, task: TaskKind, metric: str, index: np.ndarray
) -> np.ndarray:
    """``auroc`` / ``auprc`` of every resample ``labels[index[r]], scores[index[r]]`` at once:
    [R] values, NaN where undefined. The same quantities as scikit-learn's (the tests compare
    them resample by resample, to rounding), without its per-call overhead: 200 resamples of
    200 examples in a few ms instead of ~170 ms."""
    truth, score = _one_vs_rest(labels, scores, task)
    columns = []
    for column in range(truth.shape[1]):
        y = truth[:, column][index]  # [R, n]
        s = score[:, column][index]
        area = _resampled_auroc(y, s) if metric == "auroc" else _resampled_auprc(y, s)
        single = y.min(axis=1) == y.max(axis=1)  # undefined for a single class
        columns.append(np.where(single, np.nan, area))
    stacked = np.stack(columns, axis=1)  # [R, C]
    defined = ~np.isnan(stacked)
    count = defined.sum(axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(defined, stacked, 0.0).sum(axis=1) / count
    return np.where(count > 0, np.clip(mean, 0.0, 1.0), np.nan)


def _resampled_auroc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per row: the area under the ROC curve (the Mann-Whitney statistic, ties counted half,
    which is what the trapezoidal ROC area equals)."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)  # average ranks of tied scores
    positives = y.sum(axis=1)
    negatives = y.shape[1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def _resampled_auprc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per row: average precision, sum over distinct thresholds (highest first) of the
    recall gained there times the precision there (scikit-learn's definition)."""
    order = np.argsort(-s, axis=1, kind="stable")
    s, y = np.take_along_axis(s, order, 1), np.take_along_axis(y, order, 1)
    true_positives = np.cumsum(y, axis=1)
    last_of_tie = np.ones_like(s, dtype=bool)
    last_of_tie[:, :-1] = s[:, 1:] != s[:, :-1]
    at_threshold = np.where(last_of_tie, true_positives, 0.0)
    before = np.zeros_like(at_threshold)  # true positives at the previous threshold
    before[:, 1:] = np.maximum.accumulate(at_threshold, axis=1)[:, :-1]
    precision = true_positives / np.arange(1, s.shape[1] + 1)
    gained = np.where(last_of_tie, true_positives - before, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gained * precision).sum(axis=1) / true_positives[:, -1]


def classification_report(
    labels: np.ndarray,
    scores: np.ndarray,
    task: TaskKind,
    bootstrap_samples: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """AUROC and AUPRC with 95% bootstrap intervals (keys ``auroc``, ``auroc_low``, ...)."""
    report: dict[str, float] = {"n": float(len(labels))}
    for name, fn in (("auroc", auroc), ("auprc", auprc)):
        report[name] = fn(labels, scores, task)
        if bootstrap_samples > 0:
            low, high = bootstrap_interval(labels, scores, task, name, bootstrap_samples, seed)
            report[f"{name}_low"], report[f"{name}_high"] = low, high
    return report


def _calibration_pairs(
    labels: np.ndarray, probabilities: np.ndarray, task: TaskKind
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs that calibration is measured on.

    Binary and multi-label: every predicted probability against its 0/1 label (multi-label
    pools the labels). Multi-class: the top class's probability against whether it was right.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if task == "multiclass":
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        top = probabilities.argmax(axis=1)
        return probabilities.max(axis=1), (top == labels).astype(np.float64)
    return probabilities.reshape(-1), np.asarray(labels, dtype=np.float64).reshape(-1)


def reliability_bins(
    labels: np.ndarray, probabilities: np.ndarray, task: TaskKind, bins: int = 10
) -> list[dict[str, float | int]]:
    """Equal-width confidence bins over [0, 1] (the last one closed): per bin its edges,
    count, mean confidence and observed frequency (NaN in an empty bin)."""
    if bins < 1:
        raise ValueError(f"bins: expected >= 1, got {bins}")
    confidence, outcome = _calibration_pairs(labels, probabilities, task)
    index = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else math.nan,
                "frequency": float(outcome[members].mean()) if count else math.nan,
            }
        )
    return rows


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, task: TaskKind, bins: int = 10
) -> float:
    """ECE: sum over bins of (bin count / total) * |observed frequency - mean confidence|,
    with the bins of :func:`reliability_bins`; NaN without predictions."""
    rows = reliability_bins(labels, probabilities, task, bins)
    total = sum(row["count"] for row in rows)
    if total == 0:
        return math.nan
    return float(
        sum(
            row["count"] / total * abs(row["frequency"] - row["confidence"])
            for row in rows
            if row["count"]
        )
    )


def per_label_report(labels: np.ndarray, scores: np.ndarray) -> list[dict[str, float | int]]:
    """AUROC / AUPRC of every label of a multi-label task (NaN where a label has one class)."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    rows = []
    for column in range(labels.shape[1]):
        y, s = labels[:, column], scores[:, column]
        rows.append(
            {
                "label": column,
                "positives": int(y.sum()),
                "auroc": auroc(y, s, "binary"),
                "auprc": auprc(y, s, "binary"),
            }
        )
    return rows


def mean_interval(
    values: np.ndarray, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. per-seed differences);
    (nan, nan) with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)
