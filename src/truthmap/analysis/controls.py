"""Text-only controls: how much of the errors the words alone give away, with no model internals.

A probe that detects errors is only interesting if it beats what the text alone gives away (control tasks,
Hewitt and Liang 2019; report selectivity, not accuracy). Each control is a scikit-learn text classifier, TF-IDF
of character and word n-grams and a logistic regression, on one text of each row: the exact answer, the whole
answer, or the question. Controls are fitted on exactly the rows, splits and seeds of the probes
(probes.split_masks) and scored by the same test AUC and bootstrap (probes.bootstrap_aucs), so that a cell's
selectivity, its AUC minus the best control's, compares like with like.

The numbers here need no model or torch; the heatmap stage draws them and the pipeline writes them.
"""

from __future__ import annotations

import warnings

import numpy as np

from truthmap.analysis.evaluation import auc_rows, bootstrap_aucs, interval
from truthmap.errors import ProbeError

# control name -> (answers.parquet column, label in tables and figures)
CONTROLS = {
    "text_exact_answer": ("exact_answer", "Text @ exact answer"),
    "text_answer": ("answer", "Text @ answer"),
    "text_question": ("question", "Text @ question"),
}
CONTROL_C = 1.0  # sklearn's default; on TF-IDF rows (unit length) it ranks as well as 10x weaker or stronger


# The classifier's features: TF-IDF (sublinear tf, smoothed idf, each part of unit length) of character 1-4-grams
# within words and of word 1-2-grams, then an L2 logistic regression. The same as a scikit-learn pipeline of
# make_union(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True), TfidfVectorizer(
# analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=...)) and LogisticRegression(C) fitted on
# each split's rows; the n-grams of each text are counted once for all splits instead of once per split (5 seeds:
# 5x fewer passes of the analyzers, which took most of the controls' time).
NGRAMS = (
    {"analyzer": "char_wb", "ngram_range": (1, 4)},
    {"analyzer": "word", "ngram_range": (1, 2), "token_pattern": r"(?u)\b\w+\b"},
)


def ngram_counts(texts) -> list:
    """For each of NGRAMS, the [texts, n-grams] sparse counts, columns in the sorted order of a vectorizer's
    vocabulary. Raises ValueError when a kind finds no n-gram at all."""
    from sklearn.feature_extraction.text import CountVectorizer

    return [CountVectorizer(**params).fit_transform(texts).tocsr() for params in NGRAMS]


def tfidf_features(counts: list, fit_rows, rows) -> tuple:
    """TF-IDF features of `fit_rows` and of `rows`, with the vocabulary and idf of `fit_rows` alone, as a
    TfidfVectorizer fitted on those texts would give them."""
    from scipy.sparse import diags, hstack
    from sklearn.preprocessing import normalize

    fit_parts, parts = [], []
    for kind in counts:
        fitted = kind[fit_rows]
        df = np.bincount(fitted.indices, minlength=kind.shape[1])
        vocabulary = np.flatnonzero(df)
        if not len(vocabulary):
            raise ValueError("empty vocabulary; the fitted texts hold no n-gram")
        idf = diags(np.log((1 + fitted.shape[0]) / (1 + df[vocabulary])) + 1)
        for source, out in ((fitted, fit_parts), (kind[rows], parts)):
            tf = source[:, vocabulary].astype(np.float64)
            tf.data = np.log(tf.data) + 1
            out.append(normalize(tf @ idf))
    return hstack(fit_parts).tocsr(), hstack(parts).tocsr()


def control_scores(texts, is_error, fit_masks, score_texts=None) -> np.ndarray:
    """[seeds, n] error log-odds: for each mask [seeds, rows], a classifier fitted on texts[mask] scores every
    text of score_texts (default: texts itself, so the rows outside the mask are the held-out ones)."""
    from sklearn.linear_model import LogisticRegression

    texts = [str(t) for t in texts]
    y = np.asarray(is_error, dtype=bool)
    scored = np.arange(len(texts)) if score_texts is None else len(texts) + np.arange(len(score_texts))
    every = texts if score_texts is None else texts + [str(t) for t in score_texts]
    out = np.empty((len(fit_masks), len(scored)))
    try:
        counts = ngram_counts(every)
        for s, mask in enumerate(fit_masks):
            fit_rows = np.flatnonzero(mask)
            X_fit, X = tfidf_features(counts, fit_rows, scored)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a convergence warning on a few hundred rows changes no ranking
                model = LogisticRegression(C=CONTROL_C, max_iter=1000).fit(X_fit, y[fit_rows])
            out[s] = model.decision_function(X)
    except ValueError as err:  # e.g. every text empty: "empty vocabulary"
        raise ProbeError(f"A text-only control cannot be fitted: {err}") from None
    return out


def control_grid(texts: dict, is_error, train, weights=None) -> dict:
    """Every control on the probe grid's splits: name -> {label, auc_mean, auc_std, aucs, auc_low, auc_high}.

    texts: control name -> one text per row; train: [seeds, rows] (probes.split_masks); weights: the probe grid's
    bootstrap_weights, so that the intervals and the selectivity's replicates pair up row for row. A control that
    cannot be fitted gets NaN and a note. The replicates [n_boot] are returned under "boot" (None without weights).
    """
    y = np.asarray(is_error, dtype=bool)
    out = {}
    for name, column_texts in texts.items():
        entry = {"label": CONTROLS.get(name, (name, name))[1]}
        try:
            scores = control_scores(column_texts, y, train)  # [seeds, rows]
        except ProbeError as err:
            out[name] = entry | {"auc_mean": float("nan"), "auc_std": float("nan"), "note": str(err), "boot": None}
            continue
        aucs = [float(auc_rows(scores[s, ~mask][None], y[~mask])[0]) for s, mask in enumerate(train)]
        entry |= {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "aucs": aucs, "boot": None}
        if weights is not None:
            boot = bootstrap_aucs(scores[None], y, train, weights)[:, 0]  # [n_boot]
            low, high = interval(boot)
            entry |= {"auc_low": float(low), "auc_high": float(high), "boot": boot}
        out[name] = entry
    return out


def best_control(controls: dict) -> str | None:
    """The name of the control of highest mean AUC (NaN left out), or None when none could be fitted."""
    fitted = {name: c["auc_mean"] for name, c in controls.items() if np.isfinite(c["auc_mean"])}
    return max(fitted, key=fitted.get) if fitted else None


def selectivity(grid, controls: dict) -> dict:
    """Per cell, AUC minus the best control's AUC on the same rows: mean [layers, positions], and where the grid
    has bootstrap replicates, the 95 % interval of that difference (paired replicates: the same rows drawn for the
    cell and the control) and `clears`: the cell's own interval lies above the best control's AUC."""
    best = best_control(controls)
    if best is None:
        return {"control": None}
    control = controls[best]
    out = {"control": best, "control_auc": control["auc_mean"], "mean": np.asarray(grid.mean) - control["auc_mean"]}
    if getattr(grid, "boot", None) is not None and control.get("boot") is not None:
        out["low"], out["high"] = interval(np.asarray(grid.boot, dtype=np.float64) - control["boot"][:, None, None])
    if getattr(grid, "low", None) is not None:
        out["clears"] = np.asarray(grid.low) > control["auc_mean"]
    return out


def public(controls: dict) -> dict:
    """controls without the bootstrap replicates: what goes into JSON."""
    return {name: {k: v for k, v in c.items() if k != "boot"} for name, c in controls.items()}


def verdict(best_cell: dict, controls: dict, dataset: str = "") -> str:
    """One sentence per dataset: the best cell, its AUC and interval, the best control, and whether the probe beats
    it (its 95 % interval lies above the control's AUC)."""
    where = f"{dataset}: " if dataset else ""
    name = best_control(controls)
    cell = f"best cell layer {best_cell['layer']}, {best_cell['token']}"
    return where + compare(cell, best_cell, controls[name] if name else None)


def compare(what: str, probe: dict, control: dict | None) -> str:
    """'<what>, AUC a [low, high]; best text-only control <label>, AUC c [low, high]; the probe beats it (...)'.
    probe and control hold auc_mean, and auc_low / auc_high when there is an interval; control also its label
    (or method, as a row of the detection table)."""
    said = f"{what}, AUC {probe['auc_mean']:.3f}" + _bounds(probe)
    if control is None:
        return f"{said}; no text-only control could be fitted."
    label = control.get("label", control.get("method"))
    said += f"; best text-only control {label}, AUC {control['auc_mean']:.3f}" + _bounds(control)
    gap = probe["auc_mean"] - control["auc_mean"]
    if "auc_low" not in probe:
        return f"{said}; selectivity {gap:+.3f} (no interval)."
    if probe["auc_low"] > control["auc_mean"]:
        return f"{said}; the probe beats it (selectivity {gap:+.3f}; its 95% interval lies above the control's AUC)."
    return (f"{said}; the probe does not beat it (selectivity {gap:+.3f}; its 95% interval does not lie above the "
            "control's AUC).")


def _bounds(entry: dict) -> str:
    return f" [{entry['auc_low']:.3f}, {entry['auc_high']:.3f}]" if "auc_low" in entry else ""


# --------------------------------------------------------------------- held-out data (detection, generalization)


def transfer_control_aucs(name: str, train_texts, train_errors, fit_masks, test_texts, test_errors) -> list[float]:
    """Per seed: the control fitted on train_texts[fit_masks[s]] (the probes' fit rows), its AUC on the test rows."""
    y = np.asarray(test_errors, dtype=bool)
    scores = control_scores(train_texts, train_errors, fit_masks, score_texts=test_texts)  # [seeds, test rows]
    return [float(a) for a in auc_rows(scores, y)]


def texts_of(run_answers, ids) -> dict:
    """control name -> the texts of the rows `ids` of an answers table (a DataFrame with an id column)."""
    table = run_answers.set_index("id").loc[list(ids)]
    return {name: [str(t) for t in table[column]] for name, (column, _) in CONTROLS.items()}
