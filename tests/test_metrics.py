"""The field's metrics (truthmap.analysis.metrics) on hand-computed cases and against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from truthmap.analysis import metrics
from truthmap.errors import ProbeError

# Descending scores: error, right, error, right, right.
Y = np.array([True, False, True, False, False])
S = np.array([0.9, 0.8, 0.7, 0.6, 0.1])


def test_hand_computed_case():
    assert metrics.auroc(Y, S) == pytest.approx(5 / 6)  # 5 of the 6 (error, right) pairs ordered
    assert metrics.auprc(Y, S) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.fpr_at_95_recall(Y, S) == pytest.approx(1 / 3)  # both errors flagged only with 0.8 flagged
    coverage, risk = metrics.risk_coverage(Y, S)
    np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 4, 2 / 5])
    assert metrics.aurc(Y, S) == pytest.approx(59 / 300)
    # random: 0.4 at every coverage; oracle: risks 0, 0, 0, 1/4, 2/5 -> 0.13
    assert metrics.prr(Y, S) == pytest.approx((0.4 - 59 / 300) / (0.4 - 0.13))


def test_oracle_random_and_reversed():
    assert metrics.prr(Y, Y.astype(float)) == pytest.approx(1.0)
    assert metrics.prr(Y, -Y.astype(float)) < 0
    tied = np.array([True, False, False, True])
    scores = np.array([1.0, 1.0, 0.0, 0.0])  # each tie block holds one error and one right answer
    np.testing.assert_allclose(metrics.risk_coverage(tied, scores)[1], [0.5] * 4)
    assert metrics.prr(tied, scores) == pytest.approx(0.0)
    assert metrics.aurc(tied, scores) == pytest.approx(0.5)


def test_lm_polygraph_area():
    """PRR's area of the method is LM-Polygraph's: mean accuracy of the kept answers, rejecting 0 .. n-1."""
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.3
    s = rng.normal(size=200) + y
    order = np.argsort(s)
    quality = (~y)[order].astype(float)
    kept = np.cumsum(quality) / np.arange(1, 201)  # keeping the 1..n most confident
    area = kept.mean()
    assert 1 - metrics.aurc(y, s) == pytest.approx(area)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.25
    s = np.round(rng.normal(size=300) + 1.2 * y, 1)  # rounded: ties too
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert metrics.auprc(y, s) == pytest.approx(average_precision_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    assert metrics.fpr_at_95_recall(y, s) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_one_class_and_nan_are_refused():
    with pytest.raises(ProbeError, match="need errors and right answers; got 0 errors in 3 rows"):
        metrics.prr([False] * 3, [0.1, 0.2, 0.3])
    with pytest.raises(ProbeError, match="1 scores are NaN or infinite"):
        metrics.auprc([True, False], [np.nan, 0.2])


def test_wilson_interval():
    low, high = metrics.wilson_interval(5, 100)
    assert (low, high) == pytest.approx((0.0215, 0.1118), abs=1e-4)  # the textbook Wilson interval of 5/100
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_holds_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = rng.normal(size=200) + y
    low, high = metrics.bootstrap_interval(metrics.prr, y, s, n_boot=200)
    assert low < metrics.prr(y, s) < high


def test_accuracy_curve():
    curve = metrics.accuracy_curve(Y, S, points=5)
    assert curve["coverage"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert curve["accuracy"] == pytest.approx([1, 1, 0.6667, 0.75, 0.6], abs=1e-4)
