"""The verdict: does a probe detect errors better than the text alone, judged without the winner's curse.

The heatmap shows every (layer, token) cell; taking the maximum of some 450 noisy AUCs and setting it against
three controls favours the probe. Here each side is chosen the same way, on rows the test never sees:

- For each seed's split, the train rows are split again (80/20, grouped, stratified); every cell is fitted on the
  80 % and its AUC on the 20 % (validation) chooses the cell that stands for the probe. That cell, fitted on all
  the train rows, scores the test rows: the probe's AUC. The detection table chooses layers the same way.
- The controls: the text-only classifiers (controls.py) and the input-embedding row (token identity, no model
  computation beyond the lookup; its position chosen on validation as the probe's cell). The control of highest
  validation AUC is the bar.
- Probe minus bar gets a paired bootstrap interval: the same resampled test rows score both.
- The incremental question: a logistic regression on the out-of-fold scores of the bar and the probe on the
  train rows, scored on the test rows, against the bar alone (paired interval of the gain).
- With fewer than MIN_TEST_PER_CLASS errors or right answers in the test rows, the verdict says the data is too
  small to conclude.

`fair_verdict` works on plain arrays (testable on constructed scores); `run_verdict` fits what it needs from a
run's activations and texts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from truthmap.errors import ProbeError

MIN_TEST_PER_CLASS = 20  # fewer test errors (or right answers) than this and a 0.05 AUC gap is within the noise
OOF_FOLDS = 5  # folds of the train rows that give the out-of-fold scores the combination is fitted on
VALIDATION_SHARE = 0.2  # of the train rows, as detection.validation_masks


@dataclass
class Family:
    """Candidates of which one stands for a method in each seed: the cells of the probe grid, the positions of the
    embedding row, or one text control (a single member).

    labels: one per member; val_auc [seeds, members]: AUC on the validation rows of each seed's train part;
    scores [members, seeds, n]: error scores of every row by the member fitted on that seed's train rows (the test
    rows are the held-out ones); oof [members, seeds, n]: out-of-fold scores on the train rows (None: no
    combination)."""

    name: str
    label: str
    labels: list
    val_auc: np.ndarray
    scores: np.ndarray
    oof: np.ndarray | None = None

    def chosen(self) -> np.ndarray:
        """[seeds] index of the member of best validation AUC in each seed (NaN never chosen)."""
        values = np.where(np.isfinite(self.val_auc), self.val_auc, -np.inf)
        return values.argmax(1)

    def validation(self) -> float:
        """Mean over seeds of the chosen members' validation AUC."""
        return float(np.mean(self.val_auc[np.arange(len(self.val_auc)), self.chosen()]))

    def picked(self, array) -> np.ndarray:
        """[seeds, n]: each seed's row of array [members, seeds, n] at its chosen member."""
        seeds = np.arange(array.shape[1])
        return np.asarray(array, dtype=np.float64)[self.chosen(), seeds]

    def member(self) -> str:
        """The member chosen most often over the seeds."""
        return Counter(self.labels[i] for i in self.chosen()).most_common(1)[0][0]

    def agreement(self) -> str:
        """'' when every seed chose the same member, else 'in k of n splits' (k: how often member() was chosen)."""
        k = Counter(self.labels[i] for i in self.chosen()).most_common(1)[0][1]
        return "" if k == len(self.val_auc) else f"in {k} of {len(self.val_auc)} splits"


def heldout_aucs(scores, is_error, train) -> list[float]:
    """Per seed, the AUC of scores [seeds, n] on that seed's test rows (~train)."""
    from truthmap.analysis.evaluation import auc_rows

    return [float(auc_rows(scores[s, ~mask][None], is_error[~mask])[0]) for s, mask in enumerate(train)]


def combine(probe_oof, control_oof, probe_scores, control_scores, is_error, train) -> np.ndarray:
    """[seeds, n] error log-odds of a logistic regression on (probe, control) scores, fitted per seed on the
    out-of-fold scores of the train rows; it scores every row from the scores of the models fitted on all train rows."""
    from sklearn.linear_model import LogisticRegression

    out = np.empty(probe_scores.shape)
    for s, mask in enumerate(train):
        X_fit = np.column_stack([probe_oof[s, mask], control_oof[s, mask]])
        mean, scale = X_fit.mean(0), X_fit.std(0) + 1e-12
        model = LogisticRegression(C=1.0).fit((X_fit - mean) / scale, is_error[mask])
        out[s] = model.decision_function((np.column_stack([probe_scores[s], control_scores[s]]) - mean) / scale)
    return out


def paired(boot_a, boot_b) -> dict:
    """Mean of a - b over the replicates' pairs and its 95 % interval."""
    from truthmap.analysis.evaluation import interval

    low, high = interval(np.asarray(boot_a, np.float64) - np.asarray(boot_b, np.float64))
    return {"low": round(float(low), 4), "high": round(float(high), 4)}


def fair_verdict(is_error, train, probe: Family, controls: list[Family], dataset: str = "", weights=None) -> dict:
    """The verdict dict (see the module's docstring); is_error [n] bool, train [seeds, n] the outer splits' train
    rows, weights: bootstrap_weights [n_boot, n] (default: drawn here)."""
    from truthmap.analysis.evaluation import bootstrap_aucs, bootstrap_weights, interval

    y = np.asarray(is_error, dtype=bool)
    train = np.asarray(train, dtype=bool)
    weights = bootstrap_weights(y) if weights is None else weights
    test_errors = int(min(y[~mask].sum() for mask in train))
    test_correct = int(min((~y[~mask]).sum() for mask in train))
    fitted = [c for c in controls if np.isfinite(c.val_auc).any()]
    out = {"dataset": dataset, "test_errors": test_errors, "test_correct": test_correct,
           "seeds": len(train), "controls": {}}
    for c in controls:
        out["controls"][c.name] = {"label": c.label, "member": c.member() if c in fitted else None,
                                   "validation_auc": round(c.validation(), 4) if c in fitted else None,
                                   "auc_mean": round(float(np.mean(heldout_aucs(c.picked(c.scores), y, train))), 4)
                                   if c in fitted else None}
    p_scores = probe.picked(probe.scores)
    candidates = [p_scores]
    bar = max(fitted, key=Family.validation) if fitted else None
    if bar is not None:
        candidates.append(bar.picked(bar.scores))
        if probe.oof is not None and bar.oof is not None:
            candidates.append(combine(probe.picked(probe.oof), bar.picked(bar.oof), p_scores, candidates[1], y, train))
    stacked = np.stack(candidates)  # [methods, seeds, n]
    means = [float(np.mean(heldout_aucs(s, y, train))) for s in stacked]
    boot = bootstrap_aucs(stacked, y, train, weights)  # [n_boot, methods], the same rows drawn for every method
    low, high = interval(boot)

    def entry(i):  # method i's AUC on the test rows and its interval
        return {"auc_mean": round(means[i], 4), "auc_low": round(float(low[i]), 4), "auc_high": round(float(high[i]), 4)}

    out["probe"] = {"cell": probe.member(), "chosen": probe.agreement(),
                    "validation_auc": round(probe.validation(), 4)} | entry(0)
    if bar is not None:
        out["bar"] = {"name": bar.name, "label": bar.label, "member": bar.member(), "chosen": bar.agreement()} | entry(1)
        out["difference"] = {"mean": round(means[0] - means[1], 4)} | paired(boot[:, 0], boot[:, 1])
    if len(candidates) == 3:
        out["combined"] = entry(2)
        out["gain"] = {"mean": round(means[2] - means[1], 4)} | paired(boot[:, 2], boot[:, 1])
    out["conclusion"] = conclusion(out)
    out["text"] = sentence(out)
    return out


def conclusion(v: dict) -> str:
    """'too small', 'no control', 'beats', 'loses' or 'tie' (the difference's interval holds 0)."""
    if min(v["test_errors"], v["test_correct"]) < MIN_TEST_PER_CLASS:
        return "too small"
    if "difference" not in v:
        return "no control"
    if v["difference"]["low"] > 0:
        return "beats"
    return "loses" if v["difference"]["high"] < 0 else "tie"


def _auc(entry: dict) -> str:
    return f"AUC {entry['auc_mean']:.3f} [{entry['auc_low']:.3f}, {entry['auc_high']:.3f}]"


def _gap(entry: dict) -> str:
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def sentence(v: dict) -> str:
    """The verdict in words: the test rows' counts, the probe, the bar, the difference and the combination."""
    where = f"{v['dataset']}: " if v["dataset"] else ""
    chosen = f"; {v['probe']['chosen']}" if v["probe"]["chosen"] else ""
    said = (f"{where}probe at {v['probe']['cell']} (chosen on validation rows of the train part{chosen}), "
            f"{_auc(v['probe'])} on the test rows")
    if "bar" in v:
        said += f"; bar: {v['bar']['label']}"
        if v["bar"]["member"] != v["bar"]["label"]:
            said += f" at {v['bar']['member']}"
        said += f" ({v['bar']['chosen']})" if v["bar"]["chosen"] else ""
        said += f", {_auc(v['bar'])}; probe minus bar {_gap(v['difference'])}"
    if "gain" in v:
        said += f"; probe and bar combined {_auc(v['combined'])}, gain over the bar {_gap(v['gain'])}"
    words = {
        "too small": (f"too small to conclude: the test rows hold {v['test_errors']} errors and {v['test_correct']} "
                      f"right answers (need {MIN_TEST_PER_CLASS} of each; use more samples)"),
        "no control": "no control could be fitted",
        "beats": "the probe beats the bar (the difference's 95% interval lies above 0)",
        "loses": "the bar beats the probe (the difference's 95% interval lies below 0)",
        "tie": "no clear difference (the difference's 95% interval holds 0)",
    }
    said += f". Verdict: {words[v['conclusion']]}"
    if "gain" in v and v["conclusion"] != "too small":
        said += "; the probe adds to the bar" if v["gain"]["low"] > 0 else "; no clear gain from adding the probe"
    return said + "."


# ------------------------------------------------------------------------------------- the inputs, from a run


@dataclass
class Splits:
    """Masks [seeds, n] over the probed rows: train (the probe grid's splits), inner (the part of train that fits
    while the rest of train chooses) and folds (seed -> fold of each train row, -1 outside train)."""

    train: np.ndarray
    inner: np.ndarray
    folds: np.ndarray

    def fold_masks(self) -> np.ndarray:
        """[seeds * OOF_FOLDS, n]: the train rows outside each fold, seed-major."""
        return np.concatenate([[t & (f != k) for k in range(OOF_FOLDS)] for t, f in zip(self.train, self.folds)])

    def out_of_fold(self, scores) -> np.ndarray:
        """[m, seeds, n] from scores [m, seeds * OOF_FOLDS, n] of fold_masks' fits: each train row scored by the
        fit without its fold (NaN outside train)."""
        m, seeds = scores.shape[0], len(self.train)
        out = np.full((m, seeds, self.train.shape[1]), np.nan)
        for s in range(seeds):
            for k in range(OOF_FOLDS):
                rows = self.folds[s] == k
                out[:, s, rows] = scores[:, s * OOF_FOLDS + k, rows]
        return out


def make_splits(is_error, groups, seeds, name: str = "") -> Splits:
    """The probe grid's splits (probes.split_masks), each train part split again (grouped, stratified) for
    validation and cut into OOF_FOLDS folds; every part checked for both classes before any fit."""
    from truthmap.analysis.evaluation import grouped_split, split_masks
    from truthmap.analysis.selection import fold_of_groups

    y = np.asarray(is_error, dtype=bool)
    train = split_masks(len(y), groups, seeds, y, name=name)
    inner = np.zeros_like(train)
    folds = np.full(train.shape, -1, dtype=np.int64)
    for s, (seed, mask) in enumerate(zip(seeds, train)):
        rows = np.flatnonzero(mask)
        fit, _ = grouped_split(len(rows), [groups[i] for i in rows], VALIDATION_SHARE, seed, stratify=y[rows])
        inner[s, rows[fit]] = True
        folds[s, rows] = fold_of_groups([groups[i] for i in rows], OOF_FOLDS, seed)
        for part, where in (("fit", inner[s]), ("validation", mask & ~inner[s])):
            errors = int(y[where].sum())
            if errors in (0, int(where.sum())):
                raise ProbeError(f"The {part} part of the train rows for seed {seed}{f' of {name}' if name else ''} "
                                 f"has one class only ({errors} of {int(where.sum())} incorrect); no verdict. "
                                 "Use more samples (--n-samples).")
    return Splits(train, inner, folds)


def cell_family(name: str, label: str, read, cells, labels, is_error, splits: Splits, device=None) -> Family:
    """Every cell fitted on the inner rows and scored on validation; the chosen cells (one per seed) fitted again on
    the train rows (their test scores) and on each fold's complement (their out-of-fold scores)."""
    from truthmap.analysis.evaluation import auc_rows
    from truthmap.analysis.scheduler import fit_cells

    y = np.asarray(is_error, dtype=bool)
    val_rows = splits.train & ~splits.inner
    val = np.empty((len(splits.train), len(cells)))
    index = {cell: i for i, cell in enumerate(cells)}
    for batch, fit in fit_cells(read, cells, y, splits.inner, device=device):
        for s, rows in enumerate(val_rows):
            val[s, [index[c] for c in batch]] = auc_rows(fit["logits"][:, s, rows], y[rows])
    keep = sorted(set(np.where(np.isfinite(val), val, -np.inf).argmax(1).tolist()))  # the seeds' choices
    masks = np.concatenate([splits.train, splits.fold_masks()])
    logits = np.concatenate([fit["logits"] for _, fit in fit_cells(read, [cells[i] for i in keep], y, masks,
                                                                    device=device)])  # [kept, masks, n]
    seeds = len(splits.train)
    return Family(name, label, [labels[i] for i in keep], val[:, keep], logits[:, :seeds],
                  splits.out_of_fold(logits[:, seeds:]))


def text_family(name: str, label: str, texts, is_error, splits: Splits) -> Family:
    """One text-only control (controls.control_scores) fitted on the inner, train and fold masks."""
    from truthmap.analysis.controls import control_scores
    from truthmap.analysis.evaluation import auc_rows

    y = np.asarray(is_error, dtype=bool)
    seeds = len(splits.train)
    try:
        scores = control_scores(texts, y, np.concatenate([splits.inner, splits.train, splits.fold_masks()]))
    except ProbeError:  # a control that cannot be fitted (no n-gram at all) takes no part
        return Family(name, label, [label], np.full((seeds, 1), np.nan), np.zeros((1, seeds, len(y))))
    val = [auc_rows(scores[s, rows][None], y[rows])[0] for s, rows in enumerate(splits.train & ~splits.inner)]
    return Family(name, label, [label], np.array(val)[:, None], scores[None, seeds : 2 * seeds],
                  splits.out_of_fold(scores[None, 2 * seeds :]))


def run_verdict(table, rows, acts, embed, seeds, dataset: str, device=None) -> dict:
    """probes.json's verdict entries for the answers table's rows `rows` (valid exact answer), of the store acts
    [answers, layers, positions, hidden] and embed [answers, 1, positions, hidden] (or None): {"verdict": its
    sentence, "verdict_details": the dict of fair_verdict}."""
    from truthmap.analysis.controls import CONTROLS
    from truthmap.analysis.evaluation import bootstrap_weights
    from truthmap.rundir import POSITIONS
    from truthmap.stages.activations import RowView

    y = ~table["correct"].to_numpy()[rows]
    groups = [table["group"].iloc[i] for i in rows]
    try:
        splits = make_splits(y, groups, tuple(seeds), dataset)
    except ProbeError as err:
        return {"verdict": f"{dataset}: {err}", "verdict_details": None}
    view = RowView(acts, rows)
    cells = [(layer, p) for layer in range(view.shape[1]) for p in range(view.shape[2])]
    read = lambda cell: view[:, cell[0], cell[1], :]
    probe = cell_family("probe", "Probe", read, cells, [f"layer {la}, {POSITIONS[p]}" for la, p in cells], y, splits,
                        device)
    controls = [text_family(name, label, [str(t) for t in table[column].iloc[rows]], y, splits)
                for name, (column, label) in CONTROLS.items()]
    if embed is not None:
        rows_embed = RowView(embed, rows)
        positions = [(0, p) for p in range(rows_embed.shape[2])]
        controls.append(cell_family("input_embedding", "Input embedding", lambda c: rows_embed[:, 0, c[1], :],
                                    positions, [POSITIONS[p] for _, p in positions], y, splits, device))
    details = fair_verdict(y, splits.train, probe, controls, dataset, bootstrap_weights(y))
    return {"verdict": details["text"], "verdict_details": details}


# --------------------------------------------------------------------- the probe against a baseline (detection table)


def chosen_probe_scores(train, test, position: str, seeds) -> np.ndarray:
    """[seeds, test rows] error log-odds of the probe at `position` whose layer each seed chose on validation rows
    of the train run (detection.chosen_layer_probe's choice), on the test run's rows (detection.ProbeData)."""
    from truthmap.analysis.detection import choose_layers, probe_logits

    fit, _, val = choose_layers(train.layer_reader(position), train.acts.shape[1], train.is_error, train.groups,
                                seeds, train.name)
    read = test.layer_reader(position)
    return np.stack([probe_logits(fit, layer, s, read(layer)) for s, layer in enumerate(val.argmax(1))])


def probe_versus(probe_scores, baseline_scores, is_error, weights=None) -> dict:
    """The probe (scores [seeds, n]) against a baseline (scores [n]) on the same test rows: both AUCs and the
    paired 95 % interval of probe minus baseline (the same rows drawn for both)."""
    from truthmap.analysis.evaluation import bootstrap_aucs, bootstrap_weights

    y = np.asarray(is_error, dtype=bool)
    probe_scores = np.asarray(probe_scores, dtype=np.float64)
    stacked = np.stack([probe_scores, np.broadcast_to(baseline_scores, probe_scores.shape)])  # [2, seeds, n]
    everything = np.zeros(probe_scores.shape, dtype=bool)  # no train rows: every row is a test row
    boot = bootstrap_aucs(stacked, y, everything, bootstrap_weights(y) if weights is None else weights)
    aucs = [float(np.mean(heldout_aucs(s, y, everything))) for s in stacked]
    return {"probe_auc": round(aucs[0], 4), "baseline_auc": round(aucs[1], 4),
            "difference": {"mean": round(aucs[0] - aucs[1], 4)} | paired(boot[:, 0], boot[:, 1])}
