"""Error detection on held-out data: probes at chosen cells against the baselines (the paper's Table 1).

For each probed token, and each seed: the train run's rows are split 80/20 (grouped, stratified); a probe per
layer is fitted on the 80 %, the layer with the best AUC on the 20 % is chosen (never looking at test), and that
probe scores the test run's rows. Baselines need no training and score the same test rows. The text-only controls
(controls.py) are fitted per seed on the rows the probes fit on. Every method is evaluated on the test rows that
have a valid exact answer, so all rows of the table share one test set; probes and controls also get a 95 %
interval over those rows, and the verdict per dataset sets the best probe against the best control.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from truthmap.analysis.evaluation import auc, check_class_counts, grouped_split
from truthmap.analysis.scheduler import fit_cells
from truthmap.errors import ProbeError
from truthmap.rundir import POSITIONS, RunDir

PROBE_TOKENS = ("-1", "-2", "last_q", "exact_answer_last", "exact_answer_after_last")


@dataclass
class ProbeData:
    """The rows of one run that probes may use: those with a valid exact answer."""

    acts: object  # [rows, layers, positions, hidden] view, read one cell at a time
    is_error: np.ndarray  # bool [rows]
    groups: list
    ids: list
    name: str

    def layer_reader(self, position: str):
        """layer -> [rows, hidden] activations at one position."""
        p = POSITIONS.index(position)
        return lambda layer: self.acts[:, layer, p, :]


def probe_data(run: RunDir, site: str, name: str = "") -> ProbeData:
    from truthmap.rundir import ANSWERS_FIX, read_parquet
    from truthmap.stages.activations import RowView, open_store

    table = read_parquet(run.answers, ["id", "group", "correct", "exact_answer_valid"], ANSWERS_FIX)
    acts, _ = open_store(run.activations(site))
    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    return ProbeData(
        acts=RowView(acts, rows),
        is_error=~table["correct"].to_numpy()[rows],
        groups=list(table["group"].iloc[rows]),
        ids=list(table["id"].iloc[rows]),
        name=name or str(run.path),
    )



def validation_masks(is_error: np.ndarray, groups, seeds) -> np.ndarray:
    """[seeds, rows] True on the 80 % that fits, False on the 20 % that chooses the layer."""
    fit = np.zeros((len(seeds), len(is_error)), dtype=bool)
    for i, seed in enumerate(seeds):
        fit[i, grouped_split(len(is_error), groups, 0.2, seed, stratify=is_error)[0]] = True
    return fit


def fit_layers(read_layer, n_layers: int, is_error: np.ndarray, fit_masks: np.ndarray, C: float = 1.0) -> dict:
    """A probe per (layer, mask) on read_layer(layer) [rows, hidden], fitted as the heatmap's (probes.fit_cells):
    coef, mean, scale [layers, masks, hidden], intercept [layers, masks] and logits [layers, masks, rows]."""
    parts = [fit for _, fit in fit_cells(read_layer, list(range(n_layers)), is_error, fit_masks, C,
                                         where=lambda layer: f"Activations at layer {layer}")]
    return {k: np.concatenate([part[k] for part in parts]) for k in ("coef", "intercept", "mean", "scale", "logits")}


def probe_logits(fit: dict, layer: int, mask: int, X: np.ndarray) -> np.ndarray:
    """Error log-odds of rows X [n, hidden] under the probe of (layer, mask)."""
    standardized = (np.asarray(X, dtype=np.float64) - fit["mean"][layer, mask]) / fit["scale"][layer, mask]
    return standardized @ fit["coef"][layer, mask] + fit["intercept"][layer, mask]


def validation_aucs(is_error: np.ndarray, fit: dict, fit_masks: np.ndarray) -> np.ndarray:
    """[masks, layers] AUC of each layer's probe on the rows its mask held out."""
    out = np.empty((fit_masks.shape[0], fit["logits"].shape[0]))
    for s, mask in enumerate(fit_masks):
        for layer in range(out.shape[1]):
            out[s, layer] = auc(is_error[~mask], fit["logits"][layer, s, ~mask])
    return out


def check_splits(is_error: np.ndarray, fit_masks: np.ndarray, seeds, name: str) -> None:
    check_class_counts(int(is_error.sum()), int((~is_error).sum()), name)
    for seed, mask in zip(seeds, fit_masks):
        for part, rows in (("fit", mask), ("validation", ~mask)):
            errors = int(is_error[rows].sum())
            if errors in (0, int(rows.sum())):
                raise ProbeError(
                    f"The {part} part of the train rows of {name} for seed {seed} has one class only "
                    f"({errors} of {int(rows.sum())} incorrect). Use more samples (--n-samples; --n-questions in table and generalize)."
                )


def choose_layers(read_layer, n_layers: int, is_error: np.ndarray, groups, seeds, name: str, C: float = 1.0):
    """Fit every layer on each seed's 80 %; returns the fits, the masks and the validation AUCs [seeds, layers]."""
    fit_masks = validation_masks(is_error, groups, seeds)
    check_splits(is_error, fit_masks, seeds, name)
    fit = fit_layers(read_layer, n_layers, is_error, fit_masks, C)
    return fit, fit_masks, validation_aucs(is_error, fit, fit_masks)


def chosen_layer_probe(train: ProbeData, test: ProbeData, position: str, seeds, C: float = 1.0) -> dict:
    """Per seed: the layer chosen on validation and that probe's AUC on the test rows."""
    check_class_counts(int(test.is_error.sum()), int((~test.is_error).sum()), test.name)
    n_layers = train.acts.shape[1]
    fit, _, val = choose_layers(train.layer_reader(position), n_layers, train.is_error, train.groups, seeds, train.name, C)
    layers = val.argmax(1)
    read_test = test.layer_reader(position)
    scores = np.stack([probe_logits(fit, layer, s, read_test(layer)) for s, layer in enumerate(layers)])  # [seeds, n]
    test_aucs = [auc(test.is_error, row) for row in scores]
    low, high = interval_over_test_rows(scores, test.is_error)
    return field_metrics(test.is_error, scores) | {
        "auc_mean": float(np.mean(test_aucs)),
        "auc_std": float(np.std(test_aucs)),
        "auc_low": low,
        "auc_high": high,
        "aucs": [float(a) for a in test_aucs],
        "layers": [int(layer) for layer in layers],
        "validation_auc": [float(val[s, layer]) for s, layer in enumerate(layers)],
    }


def interval_over_test_rows(scores, is_error) -> tuple[float, float]:
    """95 % interval of the mean over seeds of the test AUCs of scores [seeds, test rows]: the stratified bootstrap
    of the test rows (probes.bootstrap_aucs), one draw shared by all seeds."""
    from truthmap.analysis.evaluation import bootstrap_aucs, bootstrap_weights, interval

    scores = np.asarray(scores, dtype=np.float64)
    boot = bootstrap_aucs(scores[None], is_error, np.zeros(scores.shape, dtype=bool), bootstrap_weights(is_error))
    low, high = interval(boot[:, 0])
    return float(low), float(high)


def run_texts(run: RunDir, ids) -> dict:
    """control name -> the texts (exact answer, answer, question) of the rows `ids` of a run."""
    import pandas as pd

    from truthmap.analysis.controls import CONTROLS, texts_of

    columns = ["id"] + [column for column, _ in CONTROLS.values()]
    return texts_of(pd.read_parquet(run.answers, columns=columns), ids)


def text_control_results(train_run: RunDir, test_run: RunDir, train: ProbeData, test: ProbeData, seeds) -> list[dict]:
    """The text-only controls (controls.py) as rows of the detection table: per seed, fitted on the train rows the
    probes fit on (validation_masks), scored on the test rows."""
    from truthmap.analysis.controls import CONTROLS, control_scores

    masks = validation_masks(train.is_error, train.groups, seeds)
    train_texts, test_texts = run_texts(train_run, train.ids), run_texts(test_run, test.ids)
    results = []
    for name, (_, label) in CONTROLS.items():
        try:
            check_splits(train.is_error, masks, seeds, train.name)
            check_class_counts(int(test.is_error.sum()), int((~test.is_error).sum()), test.name)
            scores = control_scores(train_texts[name], train.is_error, masks, test_texts[name])  # [seeds, test rows]
            aucs = [auc(test.is_error, row) for row in scores]
            low, high = interval_over_test_rows(scores, test.is_error)
            outcome = field_metrics(test.is_error, scores) | {
                "auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "auc_low": low, "auc_high": high,
                "aucs": aucs}
        except ProbeError as err:
            outcome = {"auc_mean": float("nan"), "auc_std": float("nan"), "note": str(err)}
        results.append({"method": label} | outcome)
    return results


def field_metrics(is_error, scores) -> dict:
    """AUPRC, PRR, FPR at 95 % recall, AURC (means over the rows of scores [seeds, n]) and the accuracy of the kept
    answers against the share kept (metrics.py), for the rows of the detection table beside their AUC."""
    from truthmap.analysis.metrics import accuracy_curve, mean_metrics

    values = mean_metrics(is_error, scores)
    return {k: v for k, v in values.items() if k != "auroc"} | {"risk_coverage": accuracy_curve(is_error, scores)}


def baseline_aucs(test_run: RunDir, test: ProbeData) -> dict[str, float]:
    """AUC of every baseline on the test rows with a valid exact answer (rows a baseline cannot score are left out)."""
    return {name: row["auc_mean"] for name, row in baseline_results(test_run, test).items()}


def baseline_results(test_run: RunDir, test: ProbeData) -> dict[str, dict]:
    """AUC and field_metrics of every baseline on the test rows with a valid exact answer (rows a baseline cannot
    score are left out)."""
    import pandas as pd

    from truthmap.stages.baselines import BASELINE_NAMES

    scores = pd.read_parquet(test_run.baselines).set_index("id").loc[test.ids]
    out = {}
    for column in BASELINE_NAMES:
        values = scores[column].to_numpy(dtype=float)
        known = np.isfinite(values)
        if len(set(test.is_error[known])) == 2:
            out[column] = {"auc_mean": auc(test.is_error[known], values[known])} | field_metrics(test.is_error[known],
                                                                                               values[known])
        else:
            out[column] = {"auc_mean": float("nan")}
    return out


def evaluate_dataset(dataset: str, train_run: RunDir, test_run: RunDir, site: str, seeds) -> list[dict]:
    """One column of the detection table: every baseline and every chosen-cell probe on the test split."""
    from truthmap.stages.baselines import BASELINE_NAMES

    train = probe_data(train_run, site, f"{dataset} (train)")
    test = probe_data(test_run, site, f"{dataset} (test)")
    common = {"dataset": dataset, "n_train": len(train.ids), "n_test": len(test.ids), "test_errors": int(test.is_error.sum())}
    results = [
        common | {"method": BASELINE_NAMES[name], "auc_std": float("nan")} | value
        for name, value in baseline_results(test_run, test).items()
    ]
    results += [common | row for row in text_control_results(train_run, test_run, train, test, seeds)]
    for position in PROBE_TOKENS:
        try:
            outcome = chosen_layer_probe(train, test, position, seeds)
        except ProbeError as err:  # too few errors in one dataset leaves its cells blank, not the whole table
            outcome = {"auc_mean": float("nan"), "auc_std": float("nan"), "note": str(err)}
        results.append(common | {"method": f"Probe @ {position}"} | outcome)
    return results


def method_order(methods) -> list[str]:
    from truthmap.analysis.controls import CONTROLS
    from truthmap.stages.baselines import BASELINE_NAMES

    controls = [label for _, label in CONTROLS.values()]
    known = list(BASELINE_NAMES.values()) + controls + [f"Probe @ {p}" for p in PROBE_TOKENS]
    # others (the sampling baselines) after them, in the order they came
    return [m for m in known if m in set(methods)] + [m for m in dict.fromkeys(methods) if m not in known]


def detection_frames(results: list[dict]):
    """Wide tables (methods down, datasets across) of mean and std AUC, in the order the datasets came."""
    import pandas as pd

    long = pd.DataFrame(results)
    datasets = list(dict.fromkeys(long["dataset"]))
    methods = method_order(long["method"])
    mean = long.pivot(index="method", columns="dataset", values="auc_mean").loc[methods, datasets]
    std = long.pivot(index="method", columns="dataset", values="auc_std").loc[methods, datasets]
    return mean, std


def best_per_column(mean):
    return mean.eq(mean.max(axis=0, skipna=True), axis=1) & mean.notna()


def markdown_table(mean, std) -> str:
    best = best_per_column(mean)
    lines = ["| method | " + " | ".join(mean.columns) + " |", "|---|" + "---:|" * len(mean.columns)]
    for method in mean.index:
        cells = []
        for dataset in mean.columns:
            value, spread = mean.at[method, dataset], std.at[method, dataset]
            text = "n/a" if not np.isfinite(value) else f"{value:.3f}" + (f" ± {spread:.3f}" if np.isfinite(spread) else "")
            cells.append(f"**{text}**" if best.at[method, dataset] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_detection_table(results: list[dict], directory, title: str) -> dict:
    """detection_table.csv (mean and std per dataset), .md (best per column in bold), .png, results.json."""
    from truthmap.analysis.heatmap import plot_matrix
    from truthmap.rundir import TableFiles, write_atomic, write_json

    out = TableFiles(directory)
    mean, std = detection_frames(results)
    wide = mean.join(std, rsuffix="_std")
    write_atomic(out.csv, lambda tmp: wide.to_csv(tmp, float_format="%.4f"))
    from truthmap.analysis.costs import cost_frame, cost_markdown, plot_auc_vs_cost, versus_markdown
    from truthmap.analysis.metrics import metrics_frame, metrics_markdown, plot_risk_coverage

    others, costs = metrics_frame(results), cost_frame(results)
    write_atomic(out.metrics_csv, lambda tmp: others.to_csv(tmp, index=False, float_format="%.4f"))
    write_atomic(out.cost_csv, lambda tmp: costs.to_csv(tmp, index=False, float_format="%.5g"))
    text = (f"{title}\n\n" + markdown_table(mean, std) + "\nEvery metric (metrics.py; FPR@95 and AURC: lower is "
            "better):\n\n" + metrics_markdown(others) + verdicts(results) + versus_markdown(results)
            + cost_markdown(costs))
    write_atomic(out.md, lambda tmp: tmp.write_text(text))
    plot_matrix(mean, title, out.png, 0.5, 1.0, bold=best_per_column(mean))
    write_atomic(out.risk_coverage_png, lambda tmp: plot_risk_coverage(results, tmp))
    write_atomic(out.cost_png, lambda tmp: plot_auc_vs_cost(costs, title, tmp))
    write_json(out.results, results)
    return {"csv": str(out.csv), "md": str(out.md), "png": str(out.png), "metrics_csv": str(out.metrics_csv),
            "cost_csv": str(out.cost_csv), "cost_png": str(out.cost_png),
            "risk_coverage_png": str(out.risk_coverage_png)}


def best_probe_row(rows: list[dict]) -> dict | None:
    """The probe row of the detection table whose chosen layers scored best on validation rows (never test)."""
    probes = [r for r in rows if r["method"].startswith("Probe @ ") and r.get("validation_auc")]
    return max(probes, key=lambda r: float(np.mean(r["validation_auc"]))) if probes else None


def verdicts(results: list[dict]) -> str:
    """Per dataset, in words: the best probe row (on validation rows) against the best text-only control row, with their 95 % intervals
    over the test rows; the probe beats the control when its interval lies above the control's AUC."""
    from truthmap.analysis.controls import CONTROLS, compare

    labels = {label for _, label in CONTROLS.values()}
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset and np.isfinite(r["auc_mean"])]
        probes = [r for r in rows if r["method"].startswith("Probe @ ")]
        controls = [r for r in rows if r["method"] in labels]
        if not probes:
            continue
        probe = best_probe_row(probes) or max(probes, key=lambda r: r["auc_mean"])  # chosen on validation rows
        control = max(controls, key=lambda r: r["auc_mean"]) if controls else None
        lines.append(f"- {dataset}: " + compare(f"best probe {probe['method']}", probe, control))
    return "\nVerdict (95 % intervals over the test rows):\n\n" + "\n".join(lines) + "\n" if lines else ""


CALIBRATION_SHARE = 0.25  # of a detector's training rows, grouped by question, kept apart to calibrate it


def split_for_calibration(data: ProbeData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows that fit the probe, rows that calibrate it): grouped, so that no question is on both sides."""
    return grouped_split(len(data.ids), data.groups, CALIBRATION_SHARE, seed, stratify=data.is_error)


def detector_test_results(detector, train_run: RunDir, test_run: RunDir, train: ProbeData, seeds) -> dict:
    """The detector on the test split (Detector.evaluate: metrics with intervals, realized thresholds) and the best
    text-only control fitted on the same train rows and scored on the same test rows."""
    test = probe_data(test_run, detector.site, "the test split")
    try:
        out = detector.evaluate(test.layer_reader(detector.token)(detector.layer_), test.is_error)
    except ProbeError as err:  # one class in the test split: no metric, but the detector is still saved
        return {"rows": len(test.ids), "note": str(err)}
    controls = [r for r in text_control_results(train_run, test_run, train, test, seeds) if np.isfinite(r["auc_mean"])]
    if controls:
        best = max(controls, key=lambda r: r["auc_mean"])
        out["best_control"] = {"method": best["method"], "auc": round(best["auc_mean"], 4),
                               "low": round(best["auc_low"], 4), "high": round(best["auc_high"], 4)}
    return out


def write_detector_scores(detector, run: RunDir, in_train: bool) -> dict:
    """detector_scores.parquet: the detector's error probability for each row (NaN without a valid exact answer)."""
    import numpy as np
    import pandas as pd

    from truthmap.rundir import DETECTOR_SCORE_COLUMNS, EXACT_POSITIONS, write_parquet
    from truthmap.stages.activations import open_store

    table = pd.read_parquet(run.answers, columns=["id", "correct", "exact_answer_valid"])
    acts, _ = open_store(run.activations(detector.site))
    cell = acts[:, detector.layer_, POSITIONS.index(detector.token), :]  # [rows, hidden]: the detector's layer alone
    probability = detector.predict_proba(cell)[:, 1]
    usable = table["exact_answer_valid"].to_numpy() if detector.token in EXACT_POSITIONS else np.ones(len(table), bool)
    probability[~usable] = np.nan
    scores = pd.DataFrame({"id": table["id"], "error_probability": probability, "in_train": in_train & usable})
    write_parquet(run.detector_scores, scores[list(DETECTOR_SCORE_COLUMNS)])
    errors = ~table["correct"].to_numpy()[usable]
    summary = {"rows": int(usable.sum())}
    if len(set(errors)) == 2:
        from truthmap.analysis.metrics import all_metrics

        summary["auc"] = round(auc(errors, probability[usable]), 4)
        summary |= {k: round(v, 4) for k, v in all_metrics(errors, probability[usable]).items() if k != "auroc"}
    return summary
