"""The field's error-detection metrics, one implementation for every table, report and detector.

Every function takes is_error (True where the answer is wrong: errors are the positives) and scores (higher =
more likely wrong: a probe's log-odds or probability, a baseline's uncertainty).

- AUROC: evaluation.auc (ties count one half).
- AUPRC: average precision with the errors as positives, as sklearn's average_precision_score: the sum over
  thresholds of (recall step) x precision, no interpolation.
- FPR at 95 % recall: the share of right answers flagged at the highest threshold that flags at least 95 % of
  the errors.
- Risk-coverage: keep the k answers with the lowest scores (k = 1..n); coverage k/n, risk the error rate of
  the kept answers. AURC is the mean risk over those n coverages (Geifman et al.); lower is better. Tied scores
  are kept or rejected together in expectation: a tie block counts its mean error rate at every position.
- PRR, the prediction-rejection ratio (Malinin et al. 2017; LM-Polygraph's PredictionRejectionArea with
  max_rejection 1): the prediction-rejection curve is the accuracy of the kept answers against the share
  rejected (0, 1/n, ..., (n-1)/n); its area for the method, for random rejection (the base accuracy at every
  point) and for the oracle (errors rejected first) give PRR = (method - random) / (oracle - random): 1 for
  the oracle, 0 for random, below 0 for worse than random. The area under that curve is 1 - AURC, so
  PRR = (AURC_random - AURC) / (AURC_random - AURC_oracle).

Intervals: `bootstrap_interval` (stratified bootstrap of rows, percentile) for the curve metrics and
`wilson_interval` for a rate counted on rows (a threshold's realized FPR or recall).
"""

from __future__ import annotations

import numpy as np

from truthmap.errors import ProbeError

METRICS = ("auroc", "auprc", "prr", "fpr_at_95_recall", "aurc")  # higher better except fpr_at_95_recall and aurc
RECALL_FOR_FPR = 0.95


def _checked(is_error, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(is_error, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ProbeError(f"Metrics need one score per label: got {y.shape} labels and {s.shape} scores.")
    if not np.isfinite(s).all():
        raise ProbeError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite; drop those rows first.")
    errors = int(y.sum())
    if errors in (0, y.size):
        raise ProbeError(f"These metrics need errors and right answers; got {errors} errors in {y.size} rows.")
    return y, s


def auroc(is_error, scores) -> float:
    from truthmap.analysis.evaluation import auc

    y, s = _checked(is_error, scores)
    return auc(y, s)


def _descending_thresholds(y, s):
    """True and false positives when flagging every score >= each distinct threshold, highest first."""
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last row of each block of tied scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp, fp


def auprc(is_error, scores) -> float:
    y, s = _checked(is_error, scores)
    tp, fp = _descending_thresholds(y, s)
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_recall(is_error, scores, recall: float = RECALL_FOR_FPR) -> float:
    y, s = _checked(is_error, scores)
    tp, fp = _descending_thresholds(y, s)
    first = int(np.argmax(tp / tp[-1] >= recall - 1e-12))
    return float(fp[first] / (y.size - tp[-1]))


def fpr_at_95_recall(is_error, scores) -> float:
    return fpr_at_recall(is_error, scores, RECALL_FOR_FPR)


def risk_coverage(is_error, scores) -> tuple[np.ndarray, np.ndarray]:
    """coverage [n] (k/n, k = 1..n) and risk [n] (error rate of the k answers with the lowest scores)."""
    y, s = _checked(is_error, scores)
    order = np.argsort(s, kind="stable")
    y, s = y[order].astype(np.float64), s[order]
    block = np.r_[0, np.cumsum(np.diff(s) != 0)]  # tie block of each sorted row
    y = (np.bincount(block, y) / np.bincount(block))[block]  # each tied row counts its block's mean
    k = np.arange(1, y.size + 1)
    return k / y.size, np.cumsum(y) / k


def aurc(is_error, scores) -> float:
    return float(risk_coverage(is_error, scores)[1].mean())


def prr(is_error, scores) -> float:
    y, s = _checked(is_error, scores)
    random = y.mean()  # the risk of random rejection at every coverage
    oracle = aurc(y, y.astype(np.float64))
    return float((random - aurc(y, s)) / (random - oracle))


FUNCTIONS = {"auroc": auroc, "auprc": auprc, "prr": prr, "fpr_at_95_recall": fpr_at_95_recall, "aurc": aurc}


def all_metrics(is_error, scores) -> dict[str, float]:
    """Every metric of METRICS for one score vector."""
    return {name: FUNCTIONS[name](is_error, scores) for name in METRICS}


def mean_metrics(is_error, score_rows) -> dict[str, float]:
    """Every metric, averaged over score_rows [seeds, n] (one row per seed's probe or control)."""
    rows = [all_metrics(is_error, row) for row in np.atleast_2d(np.asarray(score_rows, dtype=np.float64))]
    return {name: float(np.mean([r[name] for r in rows])) for name in METRICS}


def accuracy_curve(is_error, score_rows, points: int = 20) -> dict[str, list[float]]:
    """Accuracy of the kept answers at coverages 1/points .. 1 (the risk-coverage curve, read as accuracy), the
    mean over score_rows [seeds, n]: what the report plots, one line per method."""
    coverage = np.arange(1, points + 1) / points
    curves = []
    for row in np.atleast_2d(np.asarray(score_rows, dtype=np.float64)):
        kept, risk = risk_coverage(is_error, row)
        k = np.clip(np.ceil(coverage * kept.size).astype(int), 1, kept.size)  # answers kept at each coverage
        curves.append(1 - risk[k - 1])
    return {"coverage": [round(float(c), 4) for c in coverage],
            "accuracy": [round(float(a), 4) for a in np.mean(curves, axis=0)]}


def bootstrap_interval(metric, is_error, scores, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(low, high) percentile interval of metric(is_error, scores) over a stratified bootstrap of the rows."""
    y, s = _checked(is_error, scores)
    rng = np.random.default_rng(seed)
    errors, right = np.flatnonzero(y), np.flatnonzero(~y)
    values = []
    for _ in range(n_boot):
        rows = np.r_[rng.choice(errors, errors.size), rng.choice(right, right.size)]
        values.append(metric(y[rows], s[rows]))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate; (0, 1) when there are no trials."""
    from statistics import NormalDist

    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


# ------------------------------------------------------------------------------ the detection table's second table

LABELS = {"auc_mean": "AUROC", "auprc": "AUPRC", "prr": "PRR", "fpr_at_95_recall": "FPR@95", "aurc": "AURC"}


def metrics_frame(results: list[dict]):
    """One row per (dataset, method) of the detection results, with every metric (NaN where one is missing)."""
    import pandas as pd

    frame = pd.DataFrame(results)
    for column in LABELS:
        if column not in frame:
            frame[column] = np.nan
    return frame[["dataset", "method", *LABELS]].rename(columns=LABELS)


def metrics_markdown(frame) -> str:
    lines = ["| dataset | method | " + " | ".join(LABELS.values()) + " |", "|---|---|" + "---:|" * len(LABELS)]
    for row in frame.itertuples(index=False):
        cells = ["n/a" if not np.isfinite(v) else f"{v:.3f}" for v in row[2:]]
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_risk_coverage(results: list[dict], png_path) -> None:
    """Accuracy of the kept answers against the share kept, one line per method, one panel per dataset."""
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig = Figure(figsize=(4.2 * len(datasets), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
    for ax, dataset in zip(axes, datasets):
        for row in results:
            if row["dataset"] == dataset and row.get("risk_coverage"):
                curve = row["risk_coverage"]
                ax.plot(curve["coverage"], curve["accuracy"], label=row["method"], linewidth=1)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("share of answers kept")
        ax.set_ylabel("accuracy of the kept answers")
        ax.tick_params(labelsize=8)
    axes[-1].legend(fontsize=6, loc="lower left")
    fig.savefig(png_path, dpi=110, format="png")  # write_atomic passes a temporary name without .png
