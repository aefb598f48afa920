"""The model card (README.md) of a saved detector, written from its config.json alone: what it detects, for which
model, how well, at which thresholds, against which controls, and its limits. Every number comes from the config."""

from __future__ import annotations

METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC (errors as positives)", "prr": "PRR",
                "fpr_at_95_recall": "FPR at 95 % recall", "aurc": "AURC (lower is better)"}


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_interval(entry) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    return f"{_number(entry.get('value'))} [{_number(entry.get('low'))}, {_number(entry.get('high'))}]"


def _header(config: dict) -> list[str]:
    identity = config.get("model_identity") or {}
    training = config.get("training") or {}
    return [
        "---", "library_name: truthmap", "tags: [truthmap, hallucination-detection, probe]", "---", "",
        f"# Error detector for {config.get('model')}: {config.get('dataset')}, {config.get('site')} layer "
        f"{config.get('layer')}, token {config.get('token')}", "",
        "A linear probe on the model's own activations that gives each answer of the model a probability of being "
        f"wrong. It reads the activations of **{config.get('model')}** at site `{config.get('site')}`, layer "
        f"{config.get('layer')}, token `{config.get('token')}`, and was fitted with truthmap "
        f"{config.get('truthmap_version')} (format {config.get('format_version')}).", "",
        "| | |", "|---|---|",
        f"| model | {config.get('model')} |",
        f"| weights | {identity.get('weights') or identity.get('hub_id') or 'unknown'} "
        f"(sha256 {identity.get('weights_sha256') or 'unknown'}, revision {identity.get('revision') or 'n/a'}) |",
        f"| dataset | {config.get('dataset')} (version {config.get('dataset_version')}, sha256 "
        f"{config.get('dataset_sha256') or 'unknown'}) |",
        f"| prompt | chat template {config.get('chat_template')}; exact answers: {config.get('locate')}, extractor "
        f"{config.get('extractor')} |",
        f"| training rows | {training.get('rows')} ({training.get('errors')} errors, {training.get('correct')} right) |",
        "",
    ]


def _test_lines(config: dict) -> list[str]:
    test = config.get("test")
    if not test:
        return ["## How well", "", "No test split was extracted when the detector was fitted: no held-out numbers.", ""]
    lines = ["## How well (test split, 95 % intervals)", "",
             f"{test.get('rows')} held-out answers ({test.get('errors')} wrong).", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_with_interval(test.get(key))} |" for key, label in METRIC_NAMES.items()]
    control = test.get("best_control")
    if control:
        lines += ["", f"Best text-only control on the same rows ({control.get('method')}, a classifier that sees only "
                  f"the text): AUROC {_number(control.get('auc'))}. The probe's AUROC minus this is what the activations "
                  "add beyond the text."]
    return lines + [""]


def _threshold_lines(config: dict) -> list[str]:
    thresholds = config.get("thresholds") or {}
    realized = (config.get("test") or {}).get("thresholds", {})
    lines = ["## Thresholds", "",
             "An answer is flagged when the probe's log-odds is at or above the threshold. Set on the calibration "
             "rows; the false-positive rate (right answers flagged) and recall (errors flagged) on the test split:",
             "", "| target | threshold | test FPR [95 %] | test recall [95 %] |", "|---|---:|---|---|"]
    for row in thresholds.values():
        target = f"{row['kind']} {row['target']:g}"
        if row.get("threshold") is None:
            lines.append(f"| {target} | refused | {row.get('refused', '')} | |")
            continue
        got = realized.get(f"{row['kind']}_{row['target']:g}", {})
        lines.append(f"| {target} | {row['threshold']:.4f} | {_with_interval(got.get('fpr'))} | "
                     f"{_with_interval(got.get('recall'))} |")
    calibration = config.get("calibration") or {}
    if calibration.get("refused"):
        lines += ["", f"Not calibrated: {calibration['refused']} The probabilities are the probe's own."]
    elif calibration:
        before, after = calibration.get("before", {}), calibration.get("after", {})
        lines += ["", f"Calibration: {calibration.get('method')} on {calibration.get('rows')} rows kept apart from "
                  f"the probe's fit ({calibration.get('errors')} errors); ECE {_number(before.get('ece'))} -> "
                  f"{_number(after.get('ece'))}, Brier {_number(before.get('brier'))} -> {_number(after.get('brier'))}."]
    return lines + [""]


def model_card(config: dict) -> str:
    limits = ["## Limits", "",
              f"- Only for {config.get('model')} with these exact weights: other weights or another model are refused.",
              f"- Fitted on {config.get('dataset')}; on other kinds of questions its error rates are unknown: measure "
              "them (`truthmap generalize`) before trusting the thresholds there.",
              "- Thresholds hold on average over new answers like the calibration rows, not for each answer.",
              "", "## Use", "", "```", "truthmap answer --detector DIR --question \"...\" --max-fpr 0.05", "```", ""]
    return "\n".join(_header(config) + _test_lines(config) + _threshold_lines(config) + limits)
