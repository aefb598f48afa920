"""From a probe's score to a decision: calibrated error probabilities and thresholds with known error rates.

The calibrators map a probe's log-odds z to P(wrong), fitted on calibration rows that the probe never saw:
Platt scaling (a logistic regression on z: two numbers) and, with at least ISOTONIC_MIN_ROWS rows, isotonic
regression (a monotone step function; below that many rows it overfits, as scikit-learn's guide warns).
Both keep the order of z, so the AUC is unchanged; only the probabilities move. ECE (10 equal-width bins) and
the Brier score measure how far they are from the observed error rates.

A threshold is a value of z; an answer is flagged when z >= threshold. At a target false-positive rate a
(right answers flagged as wrong), the threshold lies just above the (k+1)-th highest score of the right answers,
k = floor(a * right answers), so at most a share a of the calibration's right answers is flagged. At a target
recall r, it is the ceil(r * errors)-th highest score of the errors. A threshold needs enough rows to mean
something: at least 1/a right answers for a false-positive rate a, 1/(1-r) errors for a recall r; with fewer it
is refused, with the counts.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.base import BaseEstimator

from truthmap.errors import ConfigError, DataError

ISOTONIC_MIN_ROWS = 1000
TARGET_FPRS = (0.01, 0.05, 0.1)
TARGET_RECALLS = (0.8, 0.9)
ECE_BINS = 10


def check_rate(option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"Invalid {option} {value!r}: a target rate must lie strictly between 0 and 1, such as 0.05.")
    return float(value)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


class PlattCalibrator(BaseEstimator):
    """P(wrong) = sigmoid(a * z + b). Fitted: a_, b_."""

    kind = "platt"

    def fit(self, z, is_error):
        from sklearn.linear_model import LogisticRegression

        fit = LogisticRegression(C=1e6).fit(np.asarray(z, dtype=np.float64)[:, None], np.asarray(is_error, bool))
        self.a_, self.b_ = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        return self

    def predict(self, z):
        return _sigmoid(self.a_ * np.asarray(z, dtype=np.float64) + self.b_)

    def to_arrays(self) -> dict:
        return {"platt": np.array([self.a_, self.b_])}

    @classmethod
    def from_arrays(cls, arrays: dict):
        calibrator = cls()
        calibrator.a_, calibrator.b_ = (float(v) for v in arrays["platt"])
        return calibrator


class IsotonicCalibrator(BaseEstimator):
    """A monotone step function of z, linear between its knots and flat beyond. Fitted: x_, y_ (the knots)."""

    kind = "isotonic"

    def fit(self, z, is_error):
        from sklearn.isotonic import IsotonicRegression

        fit = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(z, np.asarray(is_error, np.float64))
        self.x_, self.y_ = fit.X_thresholds_.astype(np.float64), fit.y_thresholds_.astype(np.float64)
        return self

    def predict(self, z):
        return np.interp(np.asarray(z, dtype=np.float64), self.x_, self.y_)  # what IsotonicRegression.predict does

    def to_arrays(self) -> dict:
        return {"isotonic_x": self.x_, "isotonic_y": self.y_}

    @classmethod
    def from_arrays(cls, arrays: dict):
        calibrator = cls()
        calibrator.x_, calibrator.y_ = arrays["isotonic_x"], arrays["isotonic_y"]
        return calibrator


CALIBRATORS = {"platt": PlattCalibrator, "isotonic": IsotonicCalibrator}


def fit_calibrator(z, is_error):
    """Isotonic with at least ISOTONIC_MIN_ROWS rows, else Platt."""
    kind = "isotonic" if len(z) >= ISOTONIC_MIN_ROWS else "platt"
    return CALIBRATORS[kind]().fit(z, is_error)


def expected_calibration_error(is_error, probability, bins: int = ECE_BINS) -> float:
    """Sum over equal-width bins of |observed error rate - mean probability| x the bin's share of rows."""
    y = np.asarray(is_error, dtype=np.float64)
    p = np.asarray(probability, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        rows = which == b
        total += abs(y[rows].mean() - p[rows].mean()) * rows.mean()
    return float(total)


def brier_score(is_error, probability) -> float:
    return float(np.mean((np.asarray(probability, np.float64) - np.asarray(is_error, np.float64)) ** 2))


def quality(is_error, probability) -> dict:
    return {"ece": round(expected_calibration_error(is_error, probability), 4),
            "brier": round(brier_score(is_error, probability), 4)}


def needed_rows(rate: float) -> int:
    return math.ceil(round(1 / rate, 9))


def threshold_at_fpr(z, is_error, fpr: float) -> float:
    """The lowest threshold that flags at most a share fpr of the right answers among (z, is_error)."""
    fpr = check_rate("--max-fpr", fpr)
    right = np.sort(np.asarray(z, np.float64)[~np.asarray(is_error, bool)])[::-1]
    if right.size < needed_rows(fpr):
        raise DataError(f"A threshold at false-positive rate {fpr:g} needs at least {needed_rows(fpr)} right answers "
                        f"in the calibration rows; they hold {right.size}. Fit on more questions, or pick a larger rate.")
    allowed = math.floor(round(fpr * right.size, 9))
    return float(np.nextafter(right[allowed], np.inf))


def threshold_at_recall(z, is_error, recall: float) -> float:
    """The highest threshold that flags at least a share recall of the errors among (z, is_error)."""
    recall = check_rate("--min-recall", recall)
    errors = np.sort(np.asarray(z, np.float64)[np.asarray(is_error, bool)])[::-1]
    if errors.size < needed_rows(1 - recall):
        raise DataError(f"A threshold at recall {recall:g} needs at least {needed_rows(1 - recall)} errors in the "
                        f"calibration rows; they hold {errors.size}. Fit on more questions, or pick a lower recall.")
    return float(errors[math.ceil(round(recall * errors.size, 9)) - 1])


def threshold_table(z, is_error, fprs=TARGET_FPRS, recalls=TARGET_RECALLS) -> dict:
    """name -> {target, threshold} for each standard target; a refused one holds the reason instead."""
    table = {}
    for kind, targets, find in (("fpr", fprs, threshold_at_fpr), ("recall", recalls, threshold_at_recall)):
        for target in targets:
            name = f"{kind}_{target:g}"
            try:
                table[name] = {"kind": kind, "target": target, "threshold": find(z, is_error, target)}
            except DataError as err:
                table[name] = {"kind": kind, "target": target, "threshold": None, "refused": str(err)}
    return table


def realized(z, is_error, threshold: float) -> dict:
    """The false-positive rate and recall that a threshold gives on rows (z, is_error), with 95 % Wilson intervals."""
    from truthmap.analysis.metrics import wilson_interval

    y = np.asarray(is_error, bool)
    flagged = np.asarray(z, np.float64) >= threshold
    out = {}
    for name, rows in (("fpr", ~y), ("recall", y)):
        hits, n = int(flagged[rows].sum()), int(rows.sum())
        low, high = wilson_interval(hits, n)
        out[name] = {"value": round(hits / n, 4) if n else None, "low": round(low, 4), "high": round(high, 4),
                     "of": n}
    return out
