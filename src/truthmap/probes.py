"""Error probes: for every (layer, token) cell, a linear probe on the activations predicts whether the answer is wrong.

As in Orgad et al. (2025): errors are the positive class, each cell gets a logistic regression on standardized
activations, scored by test AUC and averaged over a few seeded train/test splits (one split per seed, shared by
all cells). `fit_logistic` fits many cells and splits at once; `ErrorProbe` is the scikit-learn face of one cell.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from truthmap.errors import ProbeError
from truthmap.progress import progress_bar

MIN_PER_CLASS = 5  # fewer errors (or correct answers) than this and the AUC is noise
CELL_BUDGET_BYTES = 128 * 2**20  # what fit_cells fits at once: float32 activations, or the fits' float64 state
STATE_VECTORS = 45  # [splits, hidden + 1] float64 vectors that fit_logistic keeps per cell (3 per L-BFGS pair)


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


# --------------------------------------------------------------------------------------------- the batched fit


FTOL_EPS = 4  # scipy's test in units of float64's eps (its default ftol is 64 eps)
# The fits of the grid, the detection table, generalization and detectors: a tenth of sklearn's default tol. At
# tol 1e-4 the fits stop where the test AUCs still differ from sklearn's converged fits by up to 0.01 (mean over
# seeds) on a few hundred rows.
GRID_TOL = 1e-5
# The L-BFGS memory and its two-loop recursion: only the search direction comes out of them, which the line search
# then judges in float64, and in float32 they read half the bytes (10 pairs x 3 vectors per fit, every iteration).
HISTORY_DTYPE = "float32"
GRAM_ROWS = 2048  # rows that estimate the preconditioner beyond them
# The weight of the data in the preconditioner, in place of the 1/4 of p(1 - p) at w = 0. Measured on 75 cells of
# real SmolLM2 activations (1,000 WinoBias answers, and their first 100, 250 and 500): 1/40 needs 24-45 % fewer
# iterations than 1/4 at every size (1/4, 1/8, 1/16, 1/20, 1/40, 1/80, 1/200, 1/400 tried; 1/40 to 1/16 best), with
# AUCs as close to converged scikit-learn fits. The optimum is the same; only the path to it changes.
DATA_CURVATURE = 0.025


def fit_logistic(X, y, train, C, standardize=True, max_iter=1000, tol=GRID_TOL, history=10):
    """L2 logistic regressions for B cells x S splits at once, by preconditioned L-BFGS (torch).

    X: [B, n, d] float tensor (one cell per batch entry, all n rows), centred and scaled IN PLACE to save a copy;
    y: [n] 0/1; train: [S, n] bool.
    Each (cell, split) minimises 0.5*||w||^2 + C * sum_train logloss, on features standardized with the train
    rows' mean and std (population std, 0 -> 1, as StandardScaler); the intercept is not penalised. This is
    sklearn's LogisticRegression(C) objective, and `tol` is its gradient tolerance.
    The passes over X (two per iteration: the logits along the search direction, and the gradient) run in X's
    dtype: float32 holds activations read from a float16 store exactly and halves the memory traffic, which is
    what bounds these passes. The L-BFGS memory, which only proposes the search direction, is HISTORY_DTYPE;
    everything else (weights, logits, objective, gradient, line search) is float64.
    Runs on X's device. Returns a dict of tensors there: coef [B, S, d], intercept [B, S] (standardized space),
    mean and scale [B, S, d] (raw space), logits [B, S, n] for every row, converged [B, S] bool, n_iter (int: the
    slowest cell's iterations) and cell_iterations (int: iterations summed over the cells, each until it left the
    batch).
    """
    import torch

    B, n, d = X.shape
    data, device = X.dtype, X.device
    dtype, history_dtype = torch.float64, getattr(torch, HISTORY_DTYPE)
    y = torch.as_tensor(y, dtype=dtype, device=device)  # [n]
    train = torch.as_tensor(train, dtype=dtype, device=device)  # [S, n], 1.0 on train rows
    S = train.shape[0]
    n_train = train.sum(1)  # [S]
    mu, sd, m, v = _standardize(X, train, standardize)  # X is now Xn, centred and scaled by all rows
    Xn = X

    def logits_at(theta, v, m, Xn):  # every row's logits [B, S, n] for theta [B, S, d + 1] (weights, intercept)
        u = theta[..., :d] / v  # [B, S, d] weights on Xn
        return (u.to(data) @ Xn.mT).to(dtype) + (theta[..., d] - (u * m).sum(-1))[..., None]

    def data_term(z, train):  # C * log-loss of the train rows at logits z [..., n], train [..., n]
        return C * (train * (torch.nn.functional.softplus(z) - y * z)).sum(-1)

    def gradient(theta, z):  # gradient [B, S, d + 1] of the objective at theta, whose logits are z
        r = train * (torch.sigmoid(z) - y)  # [B, S, n]
        r_sum = r.sum(-1, keepdim=True)  # [B, S, 1]
        g_w = theta[..., :d] + C * ((r.to(data) @ Xn).to(dtype) - m * r_sum) / v
        return torch.cat([g_w, C * r_sum], -1)

    # Preconditioner: the form of the Hessian, P = I + a * C * X^T X on the train rows, shared by the splits (all
    # rows, rescaled to the mean train size). Standardized features are centred, so the intercept block is
    # separate. At w = 0 every probability is 1/2 and a = 1/4; near the optimum the rows are fitted with
    # confidence and the data's curvature is far smaller, so a = DATA_CURVATURE (see there). With it L-BFGS needs
    # tens of steps, not hundreds. It needs every direction of the data: a low-rank one from 256 of 1,000 rows of
    # real activations took 215 iterations instead of 33. Its factors are float32; rounding can make them
    # slightly indefinite, which the check for uphill directions below catches.
    woodbury = n < d
    c = DATA_CURVATURE * C * float(n_train.mean())
    if woodbury:  # P^-1 = I - c R^T R, R = L^-1 X, L L^T = I + c X X^T: n x d numbers and O(n^2 d) work, not d^3
        c /= n
        factor = torch.empty(B, n, d, dtype=data, device=device)  # R [B, n, d]
        eye = torch.eye(n, dtype=dtype, device=device)
        for i in range(B):  # a cell at a time: the float64 copy of X and L of one cell, not of the batch
            L = torch.linalg.cholesky(eye + c * (Xn[i] @ Xn[i].mT).to(dtype))
            factor[i] = torch.linalg.solve_triangular(L, Xn[i].to(dtype), upper=False)
        del eye
    else:  # P^-1 itself, from a strided sample of GRAM_ROWS rows beyond that (enough to estimate it)
        # One dense product per application reads d x d numbers once; two triangular solves with its Cholesky
        # factor read a triangle twice at half the speed (0.11 against 0.24 ms a cell on 2 cores). Inverting in
        # float32 costs 3 ms a cell (float64: 8 ms), less than 30 iterations save.
        sample = Xn[:, :: -(-n // GRAM_ROWS)]
        c /= sample.shape[1]
        factor = torch.empty(B, d, d, dtype=data, device=device)  # [B, d, d], symmetric
        for i in range(B):  # a cell at a time: d x d temporaries of one cell, not of the batch
            factor[i] = _inverse_of_identity_plus(c, sample[i].mT @ sample[i])
        del sample
    p_b = 0.25 * C * n_train  # [S] intercept curvature at w = 0

    def precondition(g, factor):  # P^-1 g for g [B, S, d + 1] (row vectors)
        q = g[..., :d].to(data)
        if woodbury:
            h_w = g[..., :d] - c * ((q @ factor.mT) @ factor).to(dtype)
        else:
            h_w = (q @ factor).to(dtype)
        return torch.cat([h_w, g[..., d:] / p_b[:, None]], -1)

    theta = torch.zeros(B, S, d + 1, dtype=dtype, device=device)  # weights and intercept of every (cell, split)
    z = torch.zeros(B, S, n, dtype=dtype, device=device)
    loss, g = data_term(z, train), gradient(theta, z)  # [B, S] objective (no penalty at 0), gradient
    h = precondition(g, factor)  # P^-1 g: the one preconditioner application of each iteration
    threshold = tol * C * n_train  # [S] sklearn's tol on the objective divided by C * n_train
    memory = []  # (s, y, P^-1 y, rho), newest last
    stuck = torch.zeros(B, S, dtype=torch.bool, device=device)  # no descent found: the optimum within precision
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # all splits converged, results stored
    result = {"mean": mu + sd * m, "scale": sd * v,  # [B, S, d] raw-space mean and scale of the train rows
              "coef": theta[..., :d].clone(), "intercept": theta[..., d].clone(), "logits": z.clone(),
              "converged": stuck.clone(), "n_iter": 0}
    cells = torch.arange(B, device=device)  # cells still in the batch

    def retire(done):  # store the results of cells[done]; recomputed logits: z accumulated rounding over the steps
        index = cells[done]
        result["coef"][index], result["intercept"][index] = theta[done, :, :d], theta[done, :, d]
        result["logits"][index] = logits_at(theta[done], v[done], m[done], Xn[done])
        result["converged"][index] = (g[done].abs().amax(-1) <= threshold) | stuck[done]

    n_iter = cell_iterations = 0
    for n_iter in range(1, max_iter + 1):
        active = (g.abs().amax(-1) > threshold) & ~stuck  # [cells, S]
        cell_iterations += len(cells)
        done = ~active.any(1) & ~finished
        if done.any():
            retire(done)
            finished |= done
            if finished.all():
                n_iter -= 1
                break
            # Hard cells take several times the iterations of most: stop paying for the others at once. The last
            # cells still in the batch move into the finished ones' places, so a drop copies only as many cells as
            # finished (moving every later cell up, or indexing into new tensors, copied the whole batch).
            keep = ~finished
            moves = _refill_moves(keep)
            Xn, factor, cells, m, v, theta, z, loss, g, h, stuck, active, finished = (
                _refill(t, moves) for t in (Xn, factor, cells, m, v, theta, z, loss, g, h, stuck, active, finished))
            memory = [tuple(_refill(t, moves) for t in pair) for pair in memory]
        # Two-loop recursion, elementwise over the batch (a pair with rho = 0 is a no-op). The initial matrix is
        # gamma * P^-1, applied as P^-1 g minus the stored P^-1 y of each pair: no pass over P here.
        q, r = g.to(history_dtype, copy=True), h.to(history_dtype, copy=True)
        alphas = []
        for s_k, y_k, hy_k, rho in reversed(memory):
            a = rho * torch.linalg.vecdot(s_k, q)
            q.addcmul_(a[..., None], y_k, value=-1)
            r.addcmul_(a[..., None], hy_k, value=-1)
            alphas.append(a)
        if memory:  # scale by the newest curvature pair, as in plain L-BFGS
            _, y_k, hy_k, rho = memory[-1]
            yHy = torch.linalg.vecdot(y_k, hy_k)
            r *= torch.where((rho > 0) & (yHy > 0), 1 / (rho * yHy).clamp_min(1e-30), torch.ones_like(rho))[..., None]
        for (s_k, y_k, _, rho), a in zip(memory, reversed(alphas)):
            r.addcmul_((a - rho * torch.linalg.vecdot(y_k, r))[..., None], s_k)
        direction = r.to(dtype).mul_(active[..., None].to(dtype)).neg_()  # converged fits stay where they are
        slope = torch.linalg.vecdot(g, direction)  # [B, S], < 0 where active
        uphill = active & ~(slope < 0)
        if uphill.any():  # float32 rounding of a preconditioner far too ill-conditioned for it: steepest descent
            direction = torch.where(uphill[..., None], -g, direction)
            slope = torch.linalg.vecdot(g, direction)
        # Backtracking (Armijo) line search. Logits move linearly along the direction, so one pass over X gives
        # dz, the penalty is a quadratic in the step, and every trial step costs only O(n). The full step is
        # tried on the whole batch; shorter ones only for the fits that need them.
        dz = logits_at(direction, v, m, Xn)  # [B, S, n]
        w, d_w = theta[..., :d], direction[..., :d]
        ww, wd, dd = torch.linalg.vecdot(w, w), torch.linalg.vecdot(w, d_w), torch.linalg.vecdot(d_w, d_w)
        step = active.to(dtype)
        z_new = z + step[..., None] * dz
        fit_new = data_term(z_new, train)  # [B, S]
        bad = 0.5 * (ww + step * (2 * wd + step * dd)) + fit_new > loss + 1e-4 * step * slope
        for _ in range(29):
            if not bad.any():
                break
            at = bad.nonzero(as_tuple=True)  # (cell, split) of each fit still without a step
            step[at] *= 0.5
            trial_z = z[at] + step[at][:, None] * dz[at]
            z_new[at], fit_new[at] = trial_z, data_term(trial_z, train[at[1]])
            bad[at] = 0.5 * (ww[at] + step[at] * (2 * wd[at] + step[at] * dd[at])) + fit_new[at] > (
                loss[at] + 1e-4 * step[at] * slope[at])
        stuck |= bad
        step[bad], z_new[bad] = 0, z[bad]
        s_k = step[..., None] * direction
        theta, z = theta + s_k, z_new
        loss_new = torch.where(bad, loss, 0.5 * torch.linalg.vecdot(theta[..., :d], theta[..., :d]) + fit_new)
        g_new = gradient(theta, z)
        h_new = precondition(g_new, factor)
        y_k = g_new - g
        # scipy's L-BFGS-B test (as sklearn runs it): an accepted step that barely lowers the objective means the
        # optimum within float64 precision, where more steps only churn rounding.
        scale = torch.maximum(loss.abs(), loss_new.abs()).clamp_min(1)
        stuck |= active & (loss - loss_new <= FTOL_EPS * torch.finfo(dtype).eps * scale)
        sy = torch.linalg.vecdot(s_k, y_k)
        rho = torch.where(sy > 1e-10, 1 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        memory = (memory + [tuple(t.to(history_dtype) for t in (s_k, y_k, h_new - h, rho))])[-history:]
        loss, g, h = loss_new, g_new, h_new

    if not finished.all():
        retire(~finished)
    result["n_iter"], result["cell_iterations"] = n_iter, cell_iterations
    return result


def _inverse_of_identity_plus(c: float, gram):
    """(I + c * gram)^-1 for a positive semidefinite gram [d, d], in gram's dtype. The sum is formed and inverted in
    that dtype, and again in float64 where its rounding leaves it short of positive definite (a large C: c * gram
    swamps the identity in float32)."""
    import torch

    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    L, info = torch.linalg.cholesky_ex(eye + c * gram)
    if info:
        L = torch.linalg.cholesky(eye.to(torch.float64) + c * gram.to(torch.float64))
    return torch.cholesky_inverse(L).to(gram.dtype)


def _refill_moves(keep):
    """(holes, movers, kept) for dropping the cells where keep [B] is False: the kept cells among the last ones
    (movers) go to the places of the dropped ones among the first `kept` (holes)."""
    kept = int(keep.sum())
    holes = (~keep[:kept]).nonzero().flatten()
    movers = keep[kept:].nonzero().flatten() + kept
    return holes, movers, kept


def _refill(t, moves):
    """t [B, ...] without the dropped cells, in its own memory: t[holes] = t[movers], then its first `kept`."""
    holes, movers, kept = moves
    if len(holes):
        t[holes] = t[movers]
    return t[:kept]


def _standardize(X, train, standardize: bool):
    """Centre and scale X [B, n, d] in place by all rows' mean and std; returns those ([B, 1, d]) and the train
    rows' mean m and std v of the result per split ([B, S, d], float64). Each split's own standardization is then
    a small affine correction (m, v), so one copy of X serves every split and every pass reads X once for S splits.
    Statistics in float64, one cell at a time (float64 temporaries of one cell only)."""
    import torch

    B, n, d = X.shape
    dtype, device = torch.float64, X.device
    S = train.shape[0]
    n_train = train.sum(1)[:, None]  # [S, 1]
    mu = torch.zeros(B, 1, d, dtype=dtype, device=device)
    sd = torch.ones(B, 1, d, dtype=dtype, device=device)
    m = torch.zeros(B, S, d, dtype=dtype, device=device)
    v = torch.ones(B, S, d, dtype=dtype, device=device)
    for i in range(B):
        cell = X[i].to(dtype)  # [n, d]
        mu[i] = cell.mean(0)
        cell -= mu[i]
        if standardize:
            scale = cell.square().mean(0).sqrt()
            sd[i] = torch.where(scale > 0, scale, torch.ones_like(scale))
            cell /= sd[i]
            m[i] = (train @ cell) / n_train
            spread = ((train @ cell.square()) / n_train - m[i].square()).clamp_min(0).sqrt()
            v[i] = torch.where(spread > 1e-6, spread, torch.ones_like(spread))
        X[i] = cell.to(X.dtype)
    return mu, sd, m, v


def _auc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
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
    return float(_auc_rows(scores[None], y_true == classes[1])[0])


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
        with _torch_threads(1):  # small problems: more threads only add overhead
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


# ------------------------------------------------------------------------------------------------- splits and grid


def _no_group(g) -> bool:
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
        key = ("row", i) if _no_group(g) else ("group", g)
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
                    f"The {part} part of the split for seed {seed}{_of(name)} has one class only: {k} incorrect and "
                    f"{idx.size - k} correct answers. Use more samples (--n-samples; --n-questions in table and generalize)."
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


def _on(name: str) -> str:
    return f" {name}" if name else ""


def _of(name: str) -> str:
    return f" of {name}" if name else ""


def check_class_counts(n_errors: int, n_correct: int, name: str = "") -> None:
    """Refuse to probe with fewer than MIN_PER_CLASS errors or correct answers (the AUC would be noise)."""
    if min(n_errors, n_correct) >= MIN_PER_CLASS:
        return
    few = "errors" if n_errors < MIN_PER_CLASS else "correct answers"
    raise ProbeError(
        f"Too few {few} to probe{_on(name)}: {n_errors} incorrect and {n_correct} correct answers with a valid "
        f"exact answer (need at least {MIN_PER_CLASS} of each). Use more samples (--n-samples; --n-questions in table and generalize)."
    )


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
    shape = tuple(getattr(acts, "shape", ()))
    if len(shape) != 4:
        raise ProbeError(f"acts must be 4-D [samples, layers, positions, hidden]; got shape {shape}.")
    n, n_layers, n_positions, hidden = shape
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
    n_errors = int(y.sum())
    check_class_counts(n_errors, n - n_errors, name)

    train = split_masks(n, groups, seeds, y, test_size, name)  # [seeds, n]
    weights = bootstrap_weights(y, n_boot) if n_boot else None  # [n_boot, n], the same draws as the controls
    boot = np.full((n_boot, n_layers, n_positions), np.nan, dtype=np.float32) if n_boot else None

    aucs = np.empty((len(seeds), n_layers, n_positions))
    cells = [(layer, pos) for layer in range(n_layers) for pos in range(n_positions)]
    not_converged = 0
    probing = progress_bar(len(cells), f"Probing{_on(name)}", unit="cell", enabled=progress)
    with probing as advance:
        for batch, fit in fit_cells(lambda cell: acts[:, cell[0], cell[1], :], cells, y, train, C, max_iter,
                                    device, threads, lambda cell: f"Activations{_of(name)} at layer {cell[0]}, "
                                                                  f"position {cell[1]}"):
            logits = fit["logits"]  # [cells, seeds, n]
            not_converged += int((~fit["converged"]).sum())
            for s in range(len(seeds)):
                test = ~train[s]
                for (layer, pos), a in zip(batch, _auc_rows(logits[:, s, test], y[test])):
                    aucs[s, layer, pos] = a
            if n_boot:
                replicates = bootstrap_aucs(logits, y, train, weights)  # [n_boot, cells]
                for i, (layer, pos) in enumerate(batch):
                    boot[:, layer, pos] = replicates[:, i]
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


def fit_cells(read, cells, y, train, C=1.0, max_iter=1000, device=None, threads=None, where=str):
    """Fit the probes of many cells and splits, a batch of cells at a time: the fit of the heatmap, the detection
    table, generalization and detectors.

    read(cell) -> [n, hidden] activations of one cell; y [n] bool; train [S, n] bool (the splits' train rows).
    Yields (the batch's cells, fit_logistic's result as numpy arrays) in the order of cells, the batches being
    fitted holding at most CELL_BUDGET_BYTES of float32 activations together, or of the fits' state where that is
    larger (few rows), and one more batch loaded ahead. where(cell) names a cell in the error about NaN or inf
    values.
    device: where the fits run (None: cuda when available, else cpu); cells are read on the CPU and moved there.
    threads: CPUs for the fits (None: torch's setting, less what other processes keep busy, measured before each
    batch: on a shared CPU, threads that wait for a descheduled peer made the grid 20x slower). On the CPU that
    many batches are fitted at once, each on one thread: a fit is thousands of small operations, and on 2 cores two
    single-threaded fits side by side finished the grid 15-20 % sooner than one fit on both threads (torch
    releases the GIL in its operations).
    """
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "mps":  # Apple GPUs have no float64
        device = torch.device("cpu")
    ceiling = threads or torch.get_num_threads()
    workers = ceiling if device.type == "cpu" else 1
    first = read(cells[0]) if cells else None
    n, hidden = np.shape(first) if cells else (0, 0)
    # Few rows make a cell's activations small, not its L-BFGS state: that bounds the batch then (at 24 rows, 450
    # cells at once held 0.8 GB of state).
    per_cell = max(4 * n * hidden, 8 * STATE_VECTORS * len(train) * (hidden + 1))
    per_batch = max(1, CELL_BUDGET_BYTES // workers // per_cell)
    # batches of equal size, and at least one per worker (the 15 cells of the input-embedding row on both CPUs)
    n_batches = max(-(-len(cells) // per_batch), min(workers, len(cells)), 1)
    per_batch = -(-len(cells) // n_batches) if cells else 1
    y = np.asarray(y, dtype=np.float64)
    sample = cpu_sample() if threads is None and device.type == "cpu" else None
    free = ceiling  # CPUs for the next fits
    if sample is not None:  # the load before the first batch: a short look while this process is idle
        time.sleep(0.1)
        sample, before = cpu_sample(), sample
        free = threads_to_use(ceiling, busy_elsewhere(before, sample))

    def load(start, batch):
        X = torch.empty(len(batch), n, hidden, dtype=torch.float32)  # [cells, n, hidden]
        for i, cell in enumerate(batch):
            values = np.asarray(first if start == i == 0 else read(cell))
            if values.flags.writeable:  # torch casts float16 to float32 (exactly) 30x faster than numpy
                X[i] = torch.from_numpy(values)
            else:  # torch.from_numpy warns on a read-only array (a memmap)
                X[i].numpy()[:] = values
            if not torch.isfinite(X[i].sum()) and not torch.isfinite(X[i]).all():  # the sum: a tenth of the time
                raise ProbeError(
                    f"{where(cell)} hold {int((~torch.isfinite(X[i])).sum())} NaN or inf values; extract the "
                    "activations again."
                )
        return X

    def fit(X, n_threads):
        with _torch_threads(n_threads):
            result = fit_logistic(X.to(device), y, train, float(C), max_iter=max_iter)
        return {k: (t.cpu().numpy() if torch.is_tensor(t) else t) for k, t in result.items()}

    starts = deque(range(0, len(cells), per_batch))
    ahead = deque()  # (cells, activations) of the next batch, loaded while the others are fitted
    in_flight = deque()  # (cells, future) submitted, oldest first; finished ones wait here to be yielded in order
    # Each worker sets its own thread count, which also moves torch's process-wide default: restored on the way out.
    with _torch_threads(ceiling), ThreadPoolExecutor(workers) as pool:

        def refill():  # a worker that finishes starts the batch loaded ahead at once, whichever batch it finished
            while True:
                if starts and not ahead:
                    start = starts.popleft()
                    batch = cells[start : start + per_batch]
                    ahead.append((batch, load(start, batch)))
                running = sum(not future.done() for _, future in in_flight)
                if not ahead or running >= (free if workers > 1 else 1):
                    return
                batch, X = ahead.popleft()
                in_flight.append((batch, pool.submit(fit, X, 1 if workers > 1 else free)))

        while starts or ahead or in_flight:
            refill()
            while not in_flight[0][1].done():
                wait([future for _, future in in_flight if not future.done()], return_when=FIRST_COMPLETED)
                refill()
            batch, future = in_flight.popleft()
            result = future.result()
            if sample is not None:
                now = cpu_sample()
                free = threads_to_use(ceiling, busy_elsewhere(sample, now))
                sample = now
            refill()  # before handing the result over: the caller's work on it (AUCs, bootstrap) overlaps the fits
            yield batch, result


# ------------------------------------------------------------------------------------- threads on a shared CPU


def cpu_sample():
    """(wall seconds, CPU seconds spent by everything on the CPUs this process may use, CPU seconds of this
    process), read from /proc; None where there is no /proc/stat (not Linux)."""
    import os

    try:
        allowed = os.sched_getaffinity(0)
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    busy += sum(ticks) - ticks[3] - ticks[4]  # steal too: a VM's CPU lent elsewhere is not ours
        own = os.times()
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system
    except (OSError, AttributeError, ValueError, IndexError):
        return None


def busy_elsewhere(before, after) -> float:
    """CPUs kept busy by other processes between two cpu_sample()s (0 when either is None)."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def threads_to_use(ceiling: int, busy: float) -> int:
    """Threads for the fits: the CPUs this process may use that others leave free, at most `ceiling`, at least 1.
    A thread count above the free CPUs makes every parallel op wait for a thread that is not running."""
    import os

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return max(1, min(ceiling, round(usable - busy)))


@contextmanager
def _torch_threads(n):
    """Run torch with n intra-op threads (None: unchanged), restoring the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
