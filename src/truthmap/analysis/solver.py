"""The solver of the error probes: L2 logistic regressions of many cells and splits at once, by preconditioned
L-BFGS in torch.

`fit_logistic` is the one entry. Its state lives in `_BatchedFit`, whose methods are the steps of an iteration:
retire the converged cells, propose a direction (`_two_loop`), search along it, take the step. The grid scheduler
(scheduler.py) hands it batches of cells; `probes.ErrorProbe` a batch of one.
"""

from __future__ import annotations

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
STATE_VECTORS = 45  # [splits, hidden + 1] float64 vectors that fit_logistic keeps per cell (3 per L-BFGS pair)
LINE_SEARCH_HALVINGS = 29  # shorter steps tried before a fit counts as stuck


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
    fit = _BatchedFit(X, y, train, C, standardize, tol, history)
    n_iter = cell_iterations = 0
    for n_iter in range(1, max_iter + 1):
        cell_iterations += len(fit.cells)
        if fit.retire_converged():
            n_iter -= 1
            break
        direction, slope = fit.descent_direction()
        step, z_new, fit_new, bad = fit.line_search(direction, slope)
        fit.take_step(direction, step, z_new, fit_new, bad)
    if not fit.finished.all():
        fit.retire(~fit.finished)
    fit.result["n_iter"], fit.result["cell_iterations"] = n_iter, cell_iterations
    return fit.result


class _BatchedFit:
    """The state of one fit_logistic call. Tensors of the cells still in the batch come first in [cells, S, ...];
    a cell whose splits have all converged is retired (its results stored) and leaves the batch."""

    def __init__(self, X, y, train, C, standardize, tol, history):
        import torch

        B, n, d = X.shape
        self.C, self.d, self.history = C, d, history
        self.data, device = X.dtype, X.device
        self.dtype, self.history_dtype = torch.float64, getattr(torch, HISTORY_DTYPE)
        dtype = self.dtype
        self.y = torch.as_tensor(y, dtype=dtype, device=device)  # [n]
        self.train = torch.as_tensor(train, dtype=dtype, device=device)  # [S, n], 1.0 on train rows
        S = self.train.shape[0]
        n_train = self.train.sum(1)  # [S]
        mu, sd, self.m, self.v = _standardize(X, self.train, standardize)  # X is now Xn: centred, scaled by all rows
        self.Xn = X
        self.woodbury, self.c, self.factor = _preconditioner(self.Xn, C, n_train)
        self.p_b = 0.25 * C * n_train  # [S] intercept curvature at w = 0
        self.theta = torch.zeros(B, S, d + 1, dtype=dtype, device=device)  # weights and intercept of every fit
        self.z = torch.zeros(B, S, n, dtype=dtype, device=device)
        # [B, S] objective (no penalty at 0), gradient
        self.loss, self.g = self.data_term(self.z, self.train), self.gradient(self.theta, self.z)
        self.h = self.precondition(self.g, self.factor)  # P^-1 g: the one preconditioner application per iteration
        self.threshold = tol * C * n_train  # [S] sklearn's tol on the objective divided by C * n_train
        self.memory = []  # (s, y, P^-1 y, rho), newest last
        # no descent found: the optimum within precision
        self.stuck = torch.zeros(B, S, dtype=torch.bool, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)  # all splits converged, results stored
        self.active = None  # [cells, S] fits still moving, set by retire_converged
        # mean and scale [B, S, d]: the train rows' standardization in raw space
        self.result = {"mean": mu + sd * self.m, "scale": sd * self.v,
                       "coef": self.theta[..., :d].clone(), "intercept": self.theta[..., d].clone(),
                       "logits": self.z.clone(), "converged": self.stuck.clone(), "n_iter": 0}
        self.cells = torch.arange(B, device=device)  # cells still in the batch

    def logits_at(self, theta, v, m, Xn):
        """Every row's logits [B, S, n] for theta [B, S, d + 1] (weights, intercept)."""
        d = self.d
        u = theta[..., :d] / v  # [B, S, d] weights on Xn
        return (u.to(self.data) @ Xn.mT).to(self.dtype) + (theta[..., d] - (u * m).sum(-1))[..., None]

    def data_term(self, z, train):
        """C * log-loss of the train rows at logits z [..., n], train [..., n]."""
        import torch

        return self.C * (train * (torch.nn.functional.softplus(z) - self.y * z)).sum(-1)

    def gradient(self, theta, z):
        """Gradient [B, S, d + 1] of the objective at theta, whose logits are z."""
        import torch

        C, d = self.C, self.d
        r = self.train * (torch.sigmoid(z) - self.y)  # [B, S, n]
        r_sum = r.sum(-1, keepdim=True)  # [B, S, 1]
        g_w = theta[..., :d] + C * ((r.to(self.data) @ self.Xn).to(self.dtype) - self.m * r_sum) / self.v
        return torch.cat([g_w, C * r_sum], -1)

    def precondition(self, g, factor):
        """P^-1 g for g [B, S, d + 1] (row vectors)."""
        import torch

        d = self.d
        q = g[..., :d].to(self.data)
        if self.woodbury:
            h_w = g[..., :d] - self.c * ((q @ factor.mT) @ factor).to(self.dtype)
        else:
            h_w = (q @ factor).to(self.dtype)
        return torch.cat([h_w, g[..., d:] / self.p_b[:, None]], -1)

    def retire(self, done):
        """Store the results of cells[done]; recomputed logits: z accumulated rounding over the steps."""
        d, result, theta = self.d, self.result, self.theta
        index = self.cells[done]
        result["coef"][index], result["intercept"][index] = theta[done, :, :d], theta[done, :, d]
        result["logits"][index] = self.logits_at(theta[done], self.v[done], self.m[done], self.Xn[done])
        result["converged"][index] = (self.g[done].abs().amax(-1) <= self.threshold) | self.stuck[done]

    def retire_converged(self) -> bool:
        """Mark the fits still moving (active); retire the cells with none. True when every cell is retired."""
        self.active = (self.g.abs().amax(-1) > self.threshold) & ~self.stuck  # [cells, S]
        done = ~self.active.any(1) & ~self.finished
        if done.any():
            self.retire(done)
            self.finished |= done
            if self.finished.all():
                return True
            self.drop_finished()
        return False

    def drop_finished(self) -> None:
        # Hard cells take several times the iterations of most: stop paying for the others at once. The last cells
        # still in the batch move into the finished ones' places, so a drop copies only as many cells as finished
        # (moving every later cell up, or indexing into new tensors, copied the whole batch).
        moves = _refill_moves(~self.finished)
        names = ("Xn", "factor", "cells", "m", "v", "theta", "z", "loss", "g", "h", "stuck", "active", "finished")
        for name in names:
            setattr(self, name, _refill(getattr(self, name), moves))
        self.memory = [tuple(_refill(t, moves) for t in pair) for pair in self.memory]

    def descent_direction(self):
        """The L-BFGS direction [cells, S, d + 1] (zero for converged fits) and the slope along it [cells, S]."""
        import torch

        r = _two_loop(self.g, self.h, self.memory, self.history_dtype)
        direction = r.to(self.dtype).mul_(self.active[..., None].to(self.dtype)).neg_()  # converged fits stay put
        slope = torch.linalg.vecdot(self.g, direction)  # [B, S], < 0 where active
        uphill = self.active & ~(slope < 0)
        if uphill.any():  # float32 rounding of a preconditioner far too ill-conditioned for it: steepest descent
            direction = torch.where(uphill[..., None], -self.g, direction)
            slope = torch.linalg.vecdot(self.g, direction)
        return direction, slope

    def line_search(self, direction, slope):
        """Backtracking (Armijo) line search -> (step [B, S], logits there, data term there, no step found [B, S]).

        Logits move linearly along the direction, so one pass over X gives dz, the penalty is a quadratic in the
        step, and every trial step costs only O(n). The full step is tried on the whole batch; shorter ones only
        for the fits that need them."""
        import torch

        d, z, loss = self.d, self.z, self.loss
        dz = self.logits_at(direction, self.v, self.m, self.Xn)  # [B, S, n]
        w, d_w = self.theta[..., :d], direction[..., :d]
        ww, wd, dd = torch.linalg.vecdot(w, w), torch.linalg.vecdot(w, d_w), torch.linalg.vecdot(d_w, d_w)
        step = self.active.to(self.dtype)
        z_new = z + step[..., None] * dz
        fit_new = self.data_term(z_new, self.train)  # [B, S]
        bad = 0.5 * (ww + step * (2 * wd + step * dd)) + fit_new > loss + 1e-4 * step * slope
        for _ in range(LINE_SEARCH_HALVINGS):
            if not bad.any():
                break
            at = bad.nonzero(as_tuple=True)  # (cell, split) of each fit still without a step
            step[at] *= 0.5
            trial_z = z[at] + step[at][:, None] * dz[at]
            z_new[at], fit_new[at] = trial_z, self.data_term(trial_z, self.train[at[1]])
            bad[at] = 0.5 * (ww[at] + step[at] * (2 * wd[at] + step[at] * dd[at])) + fit_new[at] > (
                loss[at] + 1e-4 * step[at] * slope[at])
        return step, z_new, fit_new, bad

    def take_step(self, direction, step, z_new, fit_new, bad) -> None:
        """Move to the searched step, test for a stall, and remember the curvature pair."""
        import torch

        d, dtype, loss = self.d, self.dtype, self.loss
        self.stuck |= bad
        step[bad], z_new[bad] = 0, self.z[bad]
        s_k = step[..., None] * direction
        self.theta, self.z = self.theta + s_k, z_new
        loss_new = torch.where(bad, loss, 0.5 * torch.linalg.vecdot(self.theta[..., :d], self.theta[..., :d]) + fit_new)
        g_new = self.gradient(self.theta, self.z)
        h_new = self.precondition(g_new, self.factor)
        y_k = g_new - self.g
        # scipy's L-BFGS-B test (as sklearn runs it): an accepted step that barely lowers the objective means the
        # optimum within float64 precision, where more steps only churn rounding.
        scale = torch.maximum(loss.abs(), loss_new.abs()).clamp_min(1)
        self.stuck |= self.active & (loss - loss_new <= FTOL_EPS * torch.finfo(dtype).eps * scale)
        sy = torch.linalg.vecdot(s_k, y_k)
        rho = torch.where(sy > 1e-10, 1 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        pair = tuple(t.to(self.history_dtype) for t in (s_k, y_k, h_new - self.h, rho))
        self.memory = (self.memory + [pair])[-self.history:]
        self.loss, self.g, self.h = loss_new, g_new, h_new


def _two_loop(g, h, memory, history_dtype):
    """L-BFGS's two-loop recursion, elementwise over the batch (a pair with rho = 0 is a no-op): the quasi-Newton
    step [B, S, d + 1] for gradient g, before its sign. The initial matrix is gamma * P^-1, applied as h = P^-1 g
    minus the stored P^-1 y of each pair: no pass over P here."""
    import torch

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
    return r


def _preconditioner(Xn, C, n_train):
    """(woodbury, c, factor): the form of the Hessian, P = I + a * C * X^T X on the train rows, for Xn [B, n, d].

    Shared by the splits (all rows, rescaled to the mean train size). Standardized features are centred, so the
    intercept block is separate. At w = 0 every probability is 1/2 and a = 1/4; near the optimum the rows are
    fitted with confidence and the data's curvature is far smaller, so a = DATA_CURVATURE (see there). With it
    L-BFGS needs tens of steps, not hundreds. It needs every direction of the data: a low-rank one from 256 of
    1,000 rows of real activations took 215 iterations instead of 33. Its factors are float32; rounding can make
    them slightly indefinite, which the check for uphill directions (descent_direction) catches.
    With fewer rows than features (woodbury), P^-1 = I - c R^T R with R = L^-1 X, L L^T = I + c X X^T: factor is
    R [B, n, d], n x d numbers and O(n^2 d) work, not d^3. Otherwise factor is P^-1 itself [B, d, d]."""
    import torch

    B, n, d = Xn.shape
    data, device, dtype = Xn.dtype, Xn.device, torch.float64
    woodbury = n < d
    c = DATA_CURVATURE * C * float(n_train.mean())
    if woodbury:
        c /= n
        factor = torch.empty(B, n, d, dtype=data, device=device)  # R [B, n, d]
        eye = torch.eye(n, dtype=dtype, device=device)
        for i in range(B):  # a cell at a time: the float64 copy of X and L of one cell, not of the batch
            L = torch.linalg.cholesky(eye + c * (Xn[i] @ Xn[i].mT).to(dtype))
            factor[i] = torch.linalg.solve_triangular(L, Xn[i].to(dtype), upper=False)
    else:  # P^-1 itself, from a strided sample of GRAM_ROWS rows beyond that (enough to estimate it)
        # One dense product per application reads d x d numbers once; two triangular solves with its Cholesky
        # factor read a triangle twice at half the speed (0.11 against 0.24 ms a cell on 2 cores). Inverting in
        # float32 costs 3 ms a cell (float64: 8 ms), less than 30 iterations save.
        sample = Xn[:, :: -(-n // GRAM_ROWS)]
        c /= sample.shape[1]
        factor = torch.empty(B, d, d, dtype=data, device=device)  # [B, d, d], symmetric
        for i in range(B):  # a cell at a time: d x d temporaries of one cell, not of the batch
            factor[i] = _inverse_of_identity_plus(c, sample[i].mT @ sample[i])
    return woodbury, c, factor


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
