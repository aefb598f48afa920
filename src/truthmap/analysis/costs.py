"""What each method of the detection table costs per answer, beside its AUC.

Counted beyond the pass that wrote the answer: extra forward passes of the model, generated tokens, and seconds
measured on the machine that ran the run (per answer: a stage's wall time over its answers).

- Logit aggregates read the answer's own token log-probabilities: nothing extra.
- Text-only controls: no model (a TF-IDF classifier).
- p(True): one forward pass over a prompt holding the question and the answer (the baselines stage's seconds,
  shared by its two variants).
- A probe: one cell of the pass that wrote the answer, no extra pass. truthmap reads it either while generating
  (run.json "activations_while_generating") or in a second pass over prompt and answer (the extract stage, whose
  seconds are shown then: an upper bound, as that pass reads every layer).
- Sampling baselines: K generations and the extraction calls that locate their exact answers, measured
  (sampling_baselines.sampling_cost).
"""

from __future__ import annotations

import math

NOTHING = {"forward_passes": 0, "generated_tokens": 0.0, "seconds": 0.0}


def measured(run) -> dict:
    """stage -> seconds per answer of a run (costs.json and run.json), and whether activations were read while
    generating."""
    from truthmap.rundir import read_json

    saved = read_json(run.costs) if run.costs.exists() else {}
    made = read_json(run.run_json) if run.run_json.exists() else {}
    out = {stage: entry["seconds_per_answer"] for stage, entry in saved.items()}
    if made.get("seconds") is not None and made.get("n_samples"):
        out["answers"] = made["seconds"] / made["n_samples"]
    out["while_generating"] = bool(made.get("activations_while_generating"))
    return out


def method_cost(method: str, seconds: dict) -> dict | None:
    """The cost per answer of a method of the detection table (by its label); None for a method not known here."""
    from truthmap.analysis.controls import CONTROLS
    from truthmap.stages.baselines import BASELINE_NAMES

    if method in (BASELINE_NAMES["p_true"], BASELINE_NAMES["p_true_exact"]):
        per_answer = seconds.get("baselines")
        return {"forward_passes": 1, "generated_tokens": 0.0, "seconds": per_answer / 2 if per_answer else None}
    if method in BASELINE_NAMES.values() or method in {label for _, label in CONTROLS.values()}:
        return dict(NOTHING)
    if method.startswith("Probe @ "):
        return {"forward_passes": 0, "generated_tokens": 0.0,
                "seconds": 0.0 if seconds.get("while_generating") else seconds.get("extract")}
    return None


def add_costs(results: list[dict], test_run) -> list[dict]:
    """Each row with a "cost" (rows that bring their own, the sampling baselines, keep it)."""
    seconds = measured(test_run)
    return [row if "cost" in row else row | {"cost": method_cost(row["method"], seconds)} for row in results]


def cost_frame(results: list[dict]):
    """One row per (dataset, method): AUC, its interval, and the cost per answer."""
    import pandas as pd

    rows = []
    for r in results:
        cost = r.get("cost") or {}
        rows.append({"dataset": r["dataset"], "method": r["method"], "auc": r["auc_mean"],
                     "auc_low": r.get("auc_low", math.nan), "auc_high": r.get("auc_high", math.nan),
                     "forward_passes": cost.get("forward_passes", cost.get("generations", math.nan)),
                     "extractions": cost.get("extractions", 0.0 if cost else math.nan),
                     "generated_tokens": cost.get("generated_tokens", math.nan),
                     "seconds": math.nan if cost.get("seconds") is None else cost["seconds"]})
    return pd.DataFrame(rows)


def cost_markdown(frame) -> str:
    """The AUC with its interval and the cost of each method, per dataset."""
    def number(value, digits):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"

    lines = ["\nAUC and cost per answer (beyond the pass that wrote it):\n",
             "| dataset | method | AUC [95% interval] | extra passes | extractions | generated tokens | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in frame.itertuples():
        interval = f" [{r.auc_low:.3f}, {r.auc_high:.3f}]" if math.isfinite(r.auc_low) else ""
        lines.append(f"| {r.dataset} | {r.method} | {number(r.auc, 3)}{interval} | {number(r.forward_passes, 0)} | "
                     f"{number(r.extractions, 1)} | {number(r.generated_tokens, 1)} | {number(r.seconds, 4)} |")
    return "\n".join(lines) + "\n"


def versus_markdown(results: list[dict]) -> str:
    """Per sampling baseline, the best probe (chosen on validation) against it on the same test rows: both AUCs,
    the paired interval of the difference, and what each costs per answer."""
    costs = {(r["dataset"], r["method"]): r.get("cost") or {} for r in results}
    lines = []
    for r in results:
        v = r.get("versus_probe")
        if not v:
            continue
        d, probe_cost, cost = v["difference"], costs.get((r["dataset"], v["probe"]), {}), r.get("cost") or {}
        seconds = [c.get("seconds") for c in (probe_cost, cost)]
        ratio = (f"; the probe takes {seconds[0] / seconds[1]:.3g} of its seconds" if None not in seconds
                 and seconds[1] > 0 else "")
        lines.append(f"- {r['dataset']}: {v['probe']} AUC {v['probe_auc']:.3f} against {r['method']} "
                     f"{v['baseline_auc']:.3f} (K={r.get('n_resamples')}, T={r.get('temperature')}), difference "
                     f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]; per answer the probe needs no extra "
                     f"pass, {r['method']} {cost.get('generations')} generations and {cost.get('extractions')} "
                     f"extractions ({cost.get('generated_tokens')} generated tokens){ratio}.")
    if not lines:
        return ""
    return "\nThe probe against the sampling baselines (same test rows, paired 95 % intervals):\n\n" + "\n".join(lines) + "\n"


def plot_auc_vs_cost(frame, title: str, png_path) -> None:
    """AUC against seconds per answer (log scale; methods that cost nothing sit at the left edge), one marker per
    dataset, the interval as a vertical bar."""
    import numpy as np
    from matplotlib.figure import Figure

    known = frame[np.isfinite(frame["auc"]) & np.isfinite(frame["seconds"])]
    floor = 1e-4  # seconds shown for methods that cost nothing measurable
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for marker, (dataset, part) in zip("osD^v<>", known.groupby("dataset", sort=False)):
        x = np.maximum(part["seconds"].to_numpy(float), floor)
        y = part["auc"].to_numpy(float)
        spread = np.abs(np.stack([y - part["auc_low"].fillna(part["auc"]), part["auc_high"].fillna(part["auc"]) - y]))
        ax.errorbar(x, y, yerr=spread, fmt=marker, capsize=2, label=dataset, alpha=0.8)
        for xi, yi, method in zip(x, y, part["method"]):
            ax.annotate(method, (xi, yi), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds per answer beyond the answer itself (log; {floor:g} = nothing extra)")
    ax.set_ylabel("AUC on the test rows")
    ax.set_title(title, fontsize=9)
    if len(known):
        ax.legend(fontsize=7)
    fig.savefig(png_path, dpi=150, format="png")  # write_atomic names a temporary file without .png
