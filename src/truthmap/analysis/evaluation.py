"""How the error probes are scored: ROC AUCs, seeded grouped train/test splits, and bootstrap intervals.

Everything here works on scores and labels (numpy), whatever made them: the probe grid (probes.py), the text-only
controls, the detection table and generalization share these splits and AUCs so that they see the same rows.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from truthmap.errors import ProbeError

MIN_PER_CLASS = 5  # fewer errors (or correct answers) than this and the AUC is noise
MORE_SAMPLES = "Use more samples (--n-samples; --n-questions in table and generalize)."


# ----------------------------------------------------------------------------------------------------- AUCs


def auc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of scores [m, n] against one boolean label vector [n] (ties count one half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=-1)  # [m, n], average ranks for ties, as roc_auc_score
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return (ranks[:, positive].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc(y_true, scores) -> float:
    """ROC AUC with the errors (True / the larger label) as positives. One class only -> ProbeError, not NaN."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    classes = np.unique(y_true)
    if classes.size != 2:
        raise ProbeError(f"An AUC needs labels of 2 classes, got {classes.size} ({classes.tolist()[:5]}).")
    return float(auc_rows(scores[None], y_true == classes[1])[0])


def on_name(name: str) -> str:
    """' nq' for a name in messages ('Probing nq'), '' without one."""
    return f" {name}" if name else ""


def of_name(name: str) -> str:
    """' of nq' for a name in messages ('the split of nq'), '' without one."""
    return f" of {name}" if name else ""


def check_class_counts(n_errors: int, n_correct: int, name: str = "") -> None:
    """Refuse to probe with fewer than MIN_PER_CLASS errors or correct answers (the AUC would be noise)."""
    if min(n_errors, n_correct) >= MIN_PER_CLASS:
        return
    few = "errors" if n_errors < MIN_PER_CLASS else "correct answers"
    raise ProbeError(
        f"Too few {few} to probe{on_name(name)}: {n_errors} incorrect and {n_correct} correct answers with a valid "
        f"exact answer (need at least {MIN_PER_CLASS} of each). {MORE_SAMPLES}"
    )


# ---------------------------------------------------------------------------------------------------- splits


def no_group(g) -> bool:
    # None, or how pandas reads a null group from parquet: NaN or pd.NA (all NaN would otherwise be one group).
    return g is None or (isinstance(g, float) and math.isnan(g)) or type(g).__name__ == "NAType"


def grouped_split(n, groups=None, test_size=0.2, seed=0, stratify=None):
    """Seeded train/test split of range(n) -> (train_idx, test_idx), both sorted int arrays.

    groups: n hashables, or None (also NaN, pd.NA) entries, a row of its own; rows sharing a group land on the
    same side.
    stratify: optional n labels; each label's share of test rows is then close to test_size (a group counts
    under its members' largest label, so a group holding an error is placed with the errors).
    """
    if not isinstance(n, numbers.Integral) or n < 2:
        raise ProbeError(f"A train/test split needs at least 2 rows, got n={n!r}.")
    if not (isinstance(test_size, numbers.Real) and 0 < test_size < 1):
        raise ProbeError(f"test_size must be a float between 0 and 1 (exclusive). Got {test_size!r} instead.")
    if groups is None:
        groups = [None] * n
    if len(groups) != n:
        raise ProbeError(f"groups has {len(groups)} entries but there are {n} rows; give one group (or None) per row.")
    ids: dict = {}
    row_group = np.empty(n, dtype=np.int64)  # group number of each row, in order of first appearance
    for i, g in enumerate(groups):
        key = ("row", i) if no_group(g) else ("group", g)
        try:
            row_group[i] = ids.setdefault(key, len(ids))
        except TypeError:
            raise ProbeError(f"groups[{i}] = {g!r} is not hashable; use a string or number per group.") from None
    sizes = np.bincount(row_group)  # [n_groups]
    labels = np.zeros(n, dtype=np.int64)
    if stratify is not None:
        labels = np.unique(np.asarray(stratify), return_inverse=True)[1].reshape(-1)
    if labels.shape != (n,):
        raise ProbeError(f"stratify has {labels.size} entries but there are {n} rows.")
    group_label = np.zeros(sizes.size, dtype=np.int64)
    np.maximum.at(group_label, row_group, labels)

    rng = np.random.default_rng(seed)
    order = rng.permutation(sizes.size)  # one shuffle of the groups; strata take their groups in this order
    in_test = np.zeros(sizes.size, dtype=bool)
    for label in np.unique(group_label):
        members = order[group_label[order] == label]
        target = round(test_size * sizes[members].sum())
        before = np.cumsum(sizes[members]) - sizes[members]  # test rows already taken when a group comes up
        in_test[members[before < target]] = True  # overshoots the target by less than one group
    test_rows = in_test[row_group]
    if test_rows.all() or not test_rows.any():
        raise ProbeError(
            f"test_size={test_size} leaves the {'train' if test_rows.all() else 'test'} part empty with {n} rows "
            f"in {sizes.size} groups; use more samples or another test_size."
        )
    return np.flatnonzero(~test_rows), np.flatnonzero(test_rows)


def split_masks(n, groups, seeds, is_error, test_size=0.2, name="") -> np.ndarray:
    """[seeds, n] True on the train rows of each seed's grouped, stratified split: the splits of probe_grid, which
    the text-only controls (controls.py) reuse so that probes and controls see the same rows.

    Every split is checked before any fit: roc_auc_score on one class returns NaN with only a warning."""
    y = np.asarray(is_error, dtype=bool)
    train = np.zeros((len(seeds), n), dtype=bool)
    for i, seed in enumerate(seeds):
        parts = grouped_split(n, groups, test_size, seed, stratify=y)
        for part, idx in zip(("train", "test"), parts):
            k = int(y[idx].sum())
            if k == 0 or k == idx.size:
                raise ProbeError(
                    f"The {part} part of the split for seed {seed}{of_name(name)} has one class only: {k} "
                    f"incorrect and {idx.size - k} correct answers. {MORE_SAMPLES}"
                )
        train[i, parts[0]] = True
    return train


# ------------------------------------------------------------------------------------------- intervals (bootstrap)

N_BOOT = 1000  # bootstrap replicates per cell: percentiles of 1,000 draws move by about 0.005 AUC between seeds
BOOT_ELEMENTS = 2**22  # replicates x cells x test rows held at once by bootstrap_aucs (float32: ~16 MB per array)


def bootstrap_weights(is_error, n_boot=N_BOOT, seed=0) -> np.ndarray:
    """[n_boot, n] float32 counts: each replicate redraws the errors from the errors and the correct answers from
    the correct ones, with replacement (a stratified bootstrap of the rows). Rows, not splits, are redrawn, so every
    seed's test part sees the same draw and the interval of a mean over seeds is not narrowed by counting the same
    rows several times as if independent."""
    y = np.asarray(is_error, dtype=bool)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, y.size), dtype=np.float32)
    for members in (np.flatnonzero(y), np.flatnonzero(~y)):
        if members.size:
            weights[:, members] = rng.multinomial(members.size, np.full(members.size, 1 / members.size), size=n_boot)
    return weights


def weighted_aucs(scores, positive, weights) -> np.ndarray:
    """[n_boot, m] AUC of each row of scores [m, n] (ties count one half) with row weights [n_boot, n] (bootstrap
    counts): the AUC of the resampled rows. NaN where a replicate draws no positive or no negative row.

    Each score row is sorted once: a positive's share is the weight of the negatives below it, a cumulative sum
    over the negatives in that row's order, read at a position known before any replicate. Per replicate and row
    that is O(negatives + positives), and the sum over the positives is a matrix product."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    weights = np.asarray(weights, dtype=np.float32)
    m, n = scores.shape
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    order = np.argsort(scores[:, neg], axis=1, kind="stable")  # [m, negatives] each row's negatives, ascending
    sorted_neg = np.take_along_axis(scores[:, neg], order, 1)
    below = np.stack([np.searchsorted(sorted_neg[r], scores[r, pos], "left") for r in range(m)])  # [m, positives]
    upto = np.stack([np.searchsorted(sorted_neg[r], scores[r, pos], "right") for r in range(m)])  # ... or tied
    ties = bool((below != upto).any())  # probe logits rarely tie; text controls can
    # Rows of weights first ([rows, m, b]): the cumulative sum then adds whole rows of m x b numbers at a time, which
    # vectorises, where a sum along each short row of the other layout runs element by element.
    columns = neg[order].T  # [negatives, m] rows of weights in each score row's order
    below, upto = below.T, upto.T  # [positives, m]
    out = np.empty((weights.shape[0], m))
    per_chunk = max(1, BOOT_ELEMENTS // max(1, m * n))
    for lo in range(0, weights.shape[0], per_chunk):
        w = np.ascontiguousarray(weights[lo : lo + per_chunk].T)  # [n, b]
        cum = np.zeros((neg.size + 1, m, w.shape[1]), dtype=np.float32)  # negative weight below each position
        np.cumsum(w[columns], axis=0, out=cum[1:])
        share = cum[below, np.arange(m)]  # [positives, m, b]
        if ties:  # half the tied negatives' weight
            share += cum[upto, np.arange(m)]
            share *= 0.5
        w_pos = w[pos]  # [positives, b]
        numerator = np.einsum("pmb,pb->bm", share, w_pos)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + per_chunk] = numerator / (w_pos.sum(0) * w[neg].sum(0))[:, None]
    out[~np.isfinite(out)] = np.nan
    return out


def bootstrap_aucs(scores, is_error, train, weights) -> np.ndarray:
    """[n_boot, m] mean over seeds of each replicate's test AUC, for scores [m, seeds, n] (every row scored by the
    fit of each seed), the seeds' train masks [seeds, n] and bootstrap_weights [n_boot, n]. A replicate that draws
    one class only in some seed's test part averages the other seeds."""
    y = np.asarray(is_error, dtype=bool)
    scores = np.asarray(scores)
    per_seed = np.stack(
        [weighted_aucs(scores[:, s, ~mask], y[~mask], weights[:, ~mask]) for s, mask in enumerate(train)]
    )  # [seeds, n_boot, m]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all seeds NaN: stays NaN
        return np.nanmean(per_seed, axis=0)


def interval(replicates, level=0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis of bootstrap replicates (NaN replicates left out)."""
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(np.asarray(replicates, dtype=np.float64), [tail, 100 - tail], axis=0)
    return low, high
