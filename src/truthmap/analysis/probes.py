"""Error probes: for every (layer, token) cell, a linear probe on the activations predicts whether the answer is wrong.

As in Orgad et al. (2025): errors are the positive class, each cell gets a logistic regression on standardized
activations, scored by test AUC and averaged over a few seeded train/test splits (one split per seed, shared by
all cells). This module is the estimators' face: `ErrorProbe` (one cell, scikit-learn's conventions) and
`probe_grid` (every cell). The work is done in solver.py (the batched L-BFGS fit), scheduler.py (batches of
cells on the CPUs or a GPU), evaluation.py (AUCs, splits, bootstrap intervals) and cpuload.py.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from truthmap.analysis.cpuload import torch_threads
from truthmap.analysis.evaluation import (
    MIN_PER_CLASS,
    N_BOOT,
    auc,
    auc_rows,
    bootstrap_aucs,
    bootstrap_weights,
    check_class_counts,
    grouped_split,
    interval,
    of_name,
    on_name,
    split_masks,
)
from truthmap.analysis.scheduler import fit_cells
from truthmap.analysis.solver import GRID_TOL, fit_logistic
from truthmap.errors import ProbeError
from truthmap.progress import progress_bar

# The names other modules and users imported from here before the solver, the scheduler and the evaluation moved
# out: still importable from truthmap.analysis.probes.
__all__ = [
    "ErrorProbe", "ProbeGrid", "ProbeInputError", "probe_grid", "GRID_TOL", "MIN_PER_CLASS", "N_BOOT", "auc",
    "bootstrap_aucs", "bootstrap_weights", "check_class_counts", "fit_cells", "fit_logistic", "grouped_split",
    "interval", "split_masks",
]


class ProbeInputError(ProbeError, ValueError):
    """Bad input to ErrorProbe. Also a ValueError, which scikit-learn's conventions and checks expect."""


def _check_positive(value, name: str, owner: str) -> None:
    # scikit-learn's wording, so that users of sklearn recognise it.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ProbeInputError(f"The '{name}' parameter of {owner} must be a float > 0. Got {value!r} instead.")


def _check_C(C, owner: str) -> None:
    _check_positive(C, "C", owner)


def _check_max_iter(max_iter, owner: str) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ProbeInputError(f"The 'max_iter' parameter of {owner} must be an int >= 1. Got {max_iter!r} instead.")


# --------------------------------------------------------------------------------------- the estimator (one cell)


class ErrorProbe(ClassifierMixin, BaseEstimator):
    """Standardize, then L2 logistic regression: the probe of one (layer, token) cell.

    Parameters are sklearn's LogisticRegression ones (C is the inverse penalty: 0.5*||w||^2 + C * sum logloss;
    tol bounds the gradient of that objective divided by C * n_samples, as sklearn's lbfgs), with the grid's
    tolerance GRID_TOL as default, so that a detector's probe is fitted as the heatmap's.
    Fitted attributes: classes_, coef_ [d] and intercept_ (on standardized features), mean_ and scale_ [d] (the
    standardization; with standardize=False scale_ is ones and mean_ only centres, which moves the intercept
    alone), n_features_in_, n_iter_. The fit is deterministic, hence no random_state.
    ClassifierMixin comes first: scikit-learn's check_mixin_order requires mixins left of BaseEstimator.
    """

    def __init__(self, C=1.0, max_iter=1000, standardize=True, tol=GRID_TOL):
        self.C = C
        self.max_iter = max_iter
        self.standardize = standardize
        self.tol = tol

    def fit(self, X, y):
        import torch
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.utils.multiclass import check_classification_targets, type_of_target
        from sklearn.utils.validation import validate_data

        _check_C(self.C, "ErrorProbe")
        _check_max_iter(self.max_iter, "ErrorProbe")
        _check_positive(self.tol, "tol", "ErrorProbe")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ProbeInputError(
                f"The 'standardize' parameter of ErrorProbe must be a bool. Got {self.standardize!r} instead."
            )
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if self.classes_.size == 1:
            raise ProbeInputError(
                f"ErrorProbe needs samples of 2 classes, but y has only one class: {self.classes_.tolist()[0]!r}."
            )
        y_type = type_of_target(y, input_name="y", raise_unknown=True)
        if y_type != "binary":
            raise ProbeInputError(f"Only binary classification is supported. The type of the target is {y_type}.")
        with torch_threads(1):  # small problems: more threads only add overhead
            fit = fit_logistic(
                torch.tensor(X)[None],  # [1, n, d]: a batch of one cell (a copy: X may be read-only)
                (y == self.classes_[1]).astype(np.float64),
                np.ones((1, X.shape[0]), dtype=bool),  # one split: every row trains
                C=float(self.C),
                standardize=self.standardize,
                max_iter=self.max_iter,
                tol=float(self.tol),
            )
        self.coef_ = fit["coef"][0, 0].numpy()
        self.intercept_ = float(fit["intercept"][0, 0])
        self.mean_ = fit["mean"][0, 0].numpy()
        self.scale_ = fit["scale"][0, 0].numpy()
        self.n_iter_ = max(1, fit["n_iter"])
        if not bool(fit["converged"].all()):
            warnings.warn(
                f"ErrorProbe did not converge in {self.max_iter} iterations; increase max_iter.", ConvergenceWarning
            )
        return self

    def decision_function(self, X):
        """Log-odds of classes_[1] (the error class when y is is_error), shape (n,)."""
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, X):
        from scipy.special import expit

        p = expit(self.decision_function(X))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X):
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(int)]

    def auc(self, X, y) -> float:
        """Test ROC AUC with classes_[1] as positives (score keeps sklearn's accuracy)."""
        return auc(np.asarray(y) == self.classes_[1], self.decision_function(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags


# ------------------------------------------------------------------------------------------------- the grid


@dataclass
class ProbeGrid:
    """Test AUC of the error probe of every (layer, token position) cell, over seeded splits."""

    mean: np.ndarray  # [layers, positions] mean AUC over the seeds
    std: np.ndarray  # [layers, positions] standard deviation over the seeds (ddof=0)
    aucs: np.ndarray  # [seeds, layers, positions]
    n_train: int  # rows in the train part (mean over seeds; with groups the splits differ by under a group)
    n_test: int
    n_errors: int  # positives: incorrect answers
    n_correct: int
    seeds: tuple[int, ...]
    # The 95 % interval of `mean` over test rows (bootstrap_aucs): replicates [n_boot, layers, positions] float32,
    # and their 2.5 and 97.5 percentiles [layers, positions]. None with n_boot=0.
    boot: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None


def probe_grid(
    acts,
    is_error,
    groups=None,
    seeds=(0, 5, 26, 42, 63),
    C=1.0,
    test_size=0.2,
    progress=True,
    name="",
    max_iter=1000,
    threads=None,
    device=None,
    n_boot=N_BOOT,
) -> ProbeGrid:
    """Fit and score an error probe for every (layer, position) cell of acts [n, layers, positions, hidden].

    acts is read one cell (acts[:, layer, pos, :]) at a time and converted to float32, so a cell-major float16
    store (activations.CellStore, or a memmap view) is never loaded whole. is_error: bool [n], the positive class.
    For each seed one grouped split (stratified by is_error) serves all cells; each cell gets a standardized L2
    logistic regression (sklearn's C) on train and its ROC AUC on test. Cells are fitted in batches (fit_cells).
    threads, device: as fit_cells.
    n_boot: bootstrap replicates of the test rows for each cell's 95 % interval (bootstrap_aucs); 0 for none.
    """
    _check_C(C, "probe_grid")
    shape, y, seeds = _check_grid_input(acts, is_error, seeds)
    n, n_layers, n_positions, hidden = shape
    n_errors = int(y.sum())
    check_class_counts(n_errors, n - n_errors, name)

    train = split_masks(n, groups, seeds, y, test_size, name)  # [seeds, n]
    weights = bootstrap_weights(y, n_boot) if n_boot else None  # [n_boot, n], the same draws as the controls
    boot = np.full((n_boot, n_layers, n_positions), np.nan, dtype=np.float32) if n_boot else None

    aucs = np.empty((len(seeds), n_layers, n_positions))
    cells = [(layer, pos) for layer in range(n_layers) for pos in range(n_positions)]
    not_converged = 0
    probing = progress_bar(len(cells), f"Probing{on_name(name)}", unit="cell", enabled=progress)
    with probing as advance:
        for batch, fit in fit_cells(lambda cell: acts[:, cell[0], cell[1], :], cells, y, train, C, max_iter,
                                    device, threads, lambda cell: f"Activations{of_name(name)} at layer {cell[0]}, "
                                                                  f"position {cell[1]}"):
            not_converged += int((~fit["converged"]).sum())
            _score_batch(batch, fit["logits"], y, train, weights, aucs, boot)
            advance(len(batch))
    if not_converged:
        warnings.warn(f"{not_converged} of {aucs.size} probe fits did not converge in {max_iter} iterations.")
    return ProbeGrid(
        mean=aucs.mean(0),
        std=aucs.std(0),
        aucs=aucs,
        n_train=int(round(train.sum(1).mean())),
        n_test=int(round((~train).sum(1).mean())),
        n_errors=n_errors,
        n_correct=n - n_errors,
        seeds=seeds,
        boot=boot,
        low=interval(boot)[0] if n_boot else None,
        high=interval(boot)[1] if n_boot else None,
    )


def _check_grid_input(acts, is_error, seeds):
    """(acts' shape, is_error as bool [n], seeds as ints) or a ProbeError naming what is wrong."""
    shape = tuple(getattr(acts, "shape", ()))
    if len(shape) != 4:
        raise ProbeError(f"acts must be 4-D [samples, layers, positions, hidden]; got shape {shape}.")
    n = shape[0]
    y = np.asarray(is_error)
    if y.shape != (n,):
        raise ProbeError(f"is_error has shape {y.shape} but acts has {n} samples; give one bool per sample.")
    if y.dtype != bool:
        if not np.isin(y, [0, 1]).all():
            values = np.unique(y)[:5].tolist()
            raise ProbeError(f"is_error must be bool (True = incorrect answer); got values {values}.")
        y = y.astype(bool)
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ProbeError("seeds is empty; give at least one seed.")
    return shape, y, seeds


def _score_batch(batch, logits, y, train, weights, aucs, boot) -> None:
    """Write the test AUCs [seeds, layer, pos] of a batch of cells into aucs, and their bootstrap replicates into
    boot (weights None: no bootstrap). logits [cells, seeds, n]: every row scored by each seed's fit."""
    for s in range(len(train)):
        test = ~train[s]
        for (layer, pos), a in zip(batch, auc_rows(logits[:, s, test], y[test])):
            aucs[s, layer, pos] = a
    if weights is not None:
        replicates = bootstrap_aucs(logits, y, train, weights)  # [n_boot, cells]
        for i, (layer, pos) in enumerate(batch):
            boot[:, layer, pos] = replicates[:, i]
