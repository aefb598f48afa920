"""Calibration and thresholds (truthmap.analysis.calibration, Detector.calibrate) on constructed cases."""

import numpy as np
import pytest

from truthmap.analysis import calibration
from truthmap.analysis.calibration import (IsotonicCalibrator, PlattCalibrator, expected_calibration_error, realized,
                                  threshold_at_fpr, threshold_at_recall, threshold_table)
from truthmap.errors import ConfigError, DataError


def overconfident(n, seed):
    """True log-odds t; the probe's score is 4 t: right in order, far too sure of itself."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    is_error = rng.random(n) < 1 / (1 + np.exp(-t))
    return 4 * t, is_error


@pytest.mark.parametrize("calibrator", [PlattCalibrator, IsotonicCalibrator])
def test_calibration_lowers_ece_on_held_out_rows(calibrator):
    z, y = overconfident(3000, 0)
    held_z, held_y = overconfident(3000, 1)
    raw = 1 / (1 + np.exp(-held_z))
    fitted = calibrator().fit(z, y)
    before = expected_calibration_error(held_y, raw)
    after = expected_calibration_error(held_y, fitted.predict(held_z))
    assert before > 0.1 and after < 0.03
    if calibrator is PlattCalibrator:
        assert fitted.a_ == pytest.approx(0.25, abs=0.05)  # undoes the factor 4


def test_ece_and_brier_by_hand():
    y = np.array([True, False, True, False])
    p = np.array([0.95, 0.95, 0.15, 0.05])  # bin 9: rate 0.5, mean 0.95; bin 1: rate 1, mean 0.15; bin 0: 0 vs 0.05
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.25 * 0.85 + 0.25 * 0.05)
    assert calibration.brier_score(y, p) == pytest.approx((0.05**2 + 0.95**2 + 0.85**2 + 0.05**2) / 4)


def test_thresholds_by_hand():
    z = np.arange(10.0)  # rows 0..9; errors at 6..9
    y = z >= 6
    assert threshold_at_fpr(z, y, 0.5) == pytest.approx(2.0) and threshold_at_fpr(z, y, 0.5) > 2  # flags 3, 4, 5: 3/6
    assert threshold_at_recall(z, y, 0.5) == 8.0  # flags 8, 9
    assert threshold_at_recall(z, y, 0.75) == 7.0  # ceil(3) errors
    with pytest.raises(DataError, match=r"^A threshold at false-positive rate 0.01 needs at least 100 right answers in "
                                        r"the calibration rows; they hold 6\."):
        threshold_at_fpr(z, y, 0.01)
    with pytest.raises(DataError, match="needs at least 10 errors in the calibration rows; they hold 4"):
        threshold_at_recall(z, y, 0.9)
    table = threshold_table(z, y)
    assert table["fpr_0.01"]["threshold"] is None and "they hold 6" in table["fpr_0.01"]["refused"]


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, True])
def test_target_rates_outside_0_1_are_refused(rate):
    with pytest.raises(ConfigError, match=rf"^Invalid --max-fpr {rate!r}: a target rate must lie strictly between 0 "
                                          r"and 1, such as 0.05\.$"):
        threshold_at_fpr(np.arange(10.0), np.arange(10) > 5, rate)


@pytest.mark.parametrize("target", [0.05, 0.1])
def test_realized_fpr_on_held_out_rows_lies_in_its_interval(target):
    """The threshold holds its rate on the calibration rows, and on new rows the realized rate's 95 % interval
    holds the target in most draws (about 95 %, a little less: the threshold itself is estimated)."""
    inside = 0
    for seed in range(20):
        z, y = overconfident(20000, 2 * seed)  # many calibration rows: the threshold varies little
        held_z, held_y = overconfident(2000, 2 * seed + 1)
        threshold = threshold_at_fpr(z, y, target)
        assert (z[~y] >= threshold).mean() <= target
        got = realized(held_z, held_y, threshold)["fpr"]
        assert got["of"] == int((~held_y).sum()) and got["low"] <= got["value"] <= got["high"]
        inside += got["low"] <= target <= got["high"]
    assert inside >= 16


def test_detector_calibrates_and_flags():
    from truthmap.analysis.detector import Detector

    rng = np.random.default_rng(0)
    y = rng.random(1200) < 0.4
    X = rng.normal(size=(1200, 6)) + 1.5 * y[:, None] * np.eye(6)[0]
    detector = Detector(token="-1").fit(X[:600], y[:600])
    raw = detector.predict_proba(X[600:])[:, 1]
    detector.calibrate(X[600:900], y[600:900])
    assert detector.calibration_["method"] == "platt" and detector.calibration_["rows"] == 300
    assert set(detector.thresholds_) == {"fpr_0.01", "fpr_0.05", "fpr_0.1", "recall_0.8", "recall_0.9"}
    assert detector.thresholds_["fpr_0.01"]["threshold"] is not None  # 180-odd right answers: enough for 1 %
    calibrated = detector.predict_proba(X[600:])[:, 1]
    assert np.argsort(calibrated).tolist() == np.argsort(raw).tolist() or not np.allclose(calibrated, raw)
    assert detector.threshold(max_fpr=0.05) == detector.thresholds_["fpr_0.05"]["threshold"]
    result = detector.evaluate(X[900:], y[900:], n_boot=50)
    assert result["auroc"]["low"] <= result["auroc"]["value"] <= result["auroc"]["high"]
    assert set(result["thresholds"]) == set(detector.thresholds_)
    with pytest.raises(ConfigError, match="^Give one target"):
        detector.threshold()
    with pytest.raises(ConfigError, match="no calibration rows"):
        Detector(token="-1").fit(X[:600], y[:600]).threshold(max_fpr=0.05)


def test_calibration_rows_of_one_class_refuse_thresholds_with_the_counts(tmp_path):
    from truthmap.analysis.detector import Detector

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.5
    X = rng.normal(size=(200, 4)) + y[:, None]
    detector = Detector(token="-1").fit(X[:100], y[:100]).calibrate(X[100:][~y[100:]], y[100:][~y[100:]])
    assert detector.calibrator_ is None
    assert detector.calibration_["refused"].startswith("The calibration rows hold 0 errors and ")
    assert "they hold 0" in detector.thresholds_["recall_0.9"]["refused"]
    result = detector.evaluate(X[:100], y[:100], n_boot=20)  # the AUC is still reported
    assert 0.5 < result["auroc"]["value"] <= 1 and result["thresholds"].keys() <= {"fpr_0.05", "fpr_0.1"}
    loaded = Detector.from_pretrained(detector.save_pretrained(tmp_path / "d"))
    np.testing.assert_array_equal(loaded.predict_proba(X), detector.predict_proba(X))
    with pytest.raises(DataError, match="needs at least 10 errors in the calibration rows; they hold 0"):
        loaded.threshold(min_recall=0.9)


def test_nan_activations_are_refused_naming_the_row():
    from truthmap.analysis.detector import Detector, check_finite

    values = np.ones((3, 2, 4))
    values[1, 0, 2] = np.inf
    with pytest.raises(DataError, match=r"^The activations of q-2 at site mlp, token -1 hold NaN or inf \(1 of 3 rows\)"):
        check_finite(values, ["q-1", "q-2", "q-3"], Detector(token="-1"))
