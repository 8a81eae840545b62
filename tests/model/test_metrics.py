"""AUROC/AUPRC against hand-computed values and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnifuse_model.metrics import auprc, auroc, bootstrap_interval, classification_report


def test_binary_auroc_hand_computed():
    # positives {0.8, 0.4}, negatives {0.6, 0.2}: pairs won 3 of 4 -> 0.75
    labels = np.array([[1], [0], [1], [0]], dtype=float)
    scores = np.array([[0.8], [0.6], [0.4], [0.2]])
    assert auroc(labels, scores, "binary") == pytest.approx(0.75)
    # AP: ranks 1 (P, precision 1), 3 (P, precision 2/3) -> (1 + 2/3) / 2
    assert auprc(labels, scores, "binary") == pytest.approx((1 + 2 / 3) / 2)


def test_multilabel_macro_skips_single_class_labels():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=float)
    scores = np.array([[0.8, 0.1, 0.5], [0.6, 0.2, 0.5], [0.4, 0.3, 0.5], [0.2, 0.4, 0.5]])
    # label 0 as above (0.75); labels 1 and 2 hold one class and are undefined
    assert auroc(labels, scores, "multilabel") == pytest.approx(0.75)


def test_multiclass_one_vs_rest_macro():
    labels = np.array([0, 1, 2, 0])
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    # class 0: pos {0.7, 0.3} neg {0.2, 0.1} -> 1.0; class 1: pos {0.5} neg {0.2, 0.3, 0.4}
    # -> 1.0; class 2: pos {0.6} neg {0.1, 0.3, 0.3} -> 1.0
    assert auroc(labels, scores, "multiclass") == pytest.approx(1.0)
    # class 0: pos {0.7, 0.1} neg {0.2, 0.1}: 2 wins + 1 tie of 4 pairs -> 0.625; others 1.0
    scores[3] = [0.1, 0.4, 0.5]
    assert auroc(labels, scores, "multiclass") == pytest.approx((0.625 + 1.0 + 1.0) / 3)


def test_undefined_metric_is_nan_not_an_error():
    labels = np.ones((5, 1))
    assert math.isnan(auroc(labels, np.random.rand(5, 1), "binary"))


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (300, 1)).astype(float)
    scores = labels * 0.5 + rng.random((300, 1))
    point = auroc(labels, scores, "binary")
    low, high = bootstrap_interval(labels, scores, "binary", "auroc", 200, seed=3)
    assert low < point < high and high - low < 0.2
    assert (low, high) == bootstrap_interval(labels, scores, "binary", "auroc", 200, seed=3)
    report = classification_report(labels, scores, "binary", 50)
    assert set(report) >= {"auroc", "auroc_low", "auroc_high", "auprc", "auprc_low", "auprc_high"}
    with pytest.raises(ValueError, match="metric"):
        bootstrap_interval(labels, scores, "binary", "accuracy")


def test_a_perfect_ranking_scores_exactly_one_never_above():
    """sklearn's average precision of 9 positives ranked above 2 negatives sums to
    1.0000000000000002; the site would then send a value the server rejects as out of range."""
    labels = np.r_[np.zeros(2), np.ones(9)]
    scores = np.arange(11) / 11
    assert auprc(labels, scores, "binary") == 1.0
    assert auroc(labels, scores, "binary") == 1.0


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
def test_resampled_metrics_equal_scikit_learns_resample_by_resample(task):
    """The bootstrap computes every resample's AUROC / AUPRC at once (rank statistics); each
    equals scikit-learn's on that resample to rounding, ties and single-class (NaN) columns
    included, and the interval is the percentile of the very same resamples as a loop."""
    from omnifuse_model.metrics import resampled_metric

    rng = np.random.default_rng(5)
    for _ in range(8):
        n = int(rng.integers(4, 40))
        if task == "multiclass":
            labels, scores = rng.integers(0, 3, n), rng.dirichlet(np.ones(3), n).round(1)
        else:
            width = 1 if task == "binary" else 3
            labels = rng.integers(0, 2, (n, width)).astype(float)
            scores = rng.random((n, width)).round(1)  # many ties
        index = np.stack([rng.integers(0, n, n) for _ in range(25)])
        for metric, fn in (("auroc", auroc), ("auprc", auprc)):
            fast = resampled_metric(labels, scores, task, metric, index)
            slow = np.array([fn(labels[i], scores[i], task) for i in index])
            assert np.array_equal(np.isnan(fast), np.isnan(slow))
            assert np.allclose(fast, slow, rtol=0, atol=1e-12, equal_nan=True)
    seeded = np.random.default_rng(3)
    index = [seeded.integers(0, n, n) for _ in range(50)]
    looped = [v for i in index if not math.isnan(v := auroc(labels[i], scores[i], task))]
    expected = np.percentile(looped, [2.5, 97.5])
    got = bootstrap_interval(labels, scores, task, "auroc", 50, seed=3)
    assert np.allclose(got, expected, rtol=0, atol=1e-12)
