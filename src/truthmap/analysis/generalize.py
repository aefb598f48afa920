"""Generalization: a probe trained on one dataset's train split, scored on every dataset's test split.

Each source dataset's probe sits at one token (exact_answer_last by default) and, per seed, the layer chosen on
a validation split of the source's train rows (as in the detection table). Its AUC on each target's test rows is
averaged over the seeds. The second matrix subtracts the target's Logits-min-exact AUC: above zero, the
transferred probe beats the best logit baseline of the paper on the target's own errors. The text-only controls
(controls.py) transfer the same way, fitted on the source's rows that fit the probes: the third matrix subtracts
the best of them for the same source and target, so a probe that transfers only what the words carry sits at 0.
"""

from __future__ import annotations

import warnings

import numpy as np

from truthmap.analysis.detection import (
    ProbeData,
    baseline_aucs,
    check_splits,
    choose_layers,
    probe_data,
    probe_logits,
    run_texts,
    validation_masks,
)
from truthmap.analysis.evaluation import auc
from truthmap.errors import ProbeError
from truthmap.rundir import RunDir, write_json

REFERENCE_BASELINE = "logits_min_exact"


def transfer_aucs(sources: dict[str, ProbeData], targets: dict[str, ProbeData], token: str, seeds):
    """[sources, targets] mean test AUC over the seeds, the layers chosen per source, and why cells are blank.

    A source with too few errors or correct answers to train leaves its row blank, a target with one class
    its column: the rest of the matrix stands."""
    out = np.full((len(sources), len(targets)), np.nan)
    layers, blank = {}, {}
    for name, test in targets.items():
        if len(set(test.is_error)) < 2:
            blank[f"test on {name}"] = f"one class only in {test.name} ({int(test.is_error.sum())} of {len(test.is_error)} incorrect)"
    for i, (name, train) in enumerate(sources.items()):
        try:
            fit, _, val = choose_layers(train.layer_reader(token), train.acts.shape[1], train.is_error, train.groups, seeds, train.name)
        except ProbeError as err:
            blank[f"train on {name}"] = str(err)
            continue
        chosen = val.argmax(1)
        layers[name] = [int(layer) for layer in chosen]
        for j, (target, test) in enumerate(targets.items()):
            if f"test on {target}" not in blank:
                read = test.layer_reader(token)
                out[i, j] = np.mean([auc(test.is_error, probe_logits(fit, layer, s, read(layer))) for s, layer in enumerate(chosen)])
    return out, layers, blank


def control_transfer_aucs(runs: dict, sources: dict[str, ProbeData], targets: dict[str, ProbeData], seeds) -> dict:
    """control name -> [sources, targets] mean test AUC over the seeds of that text-only control, fitted per seed on
    the source's probe fit rows (validation_masks). Blank where the probe matrix would be blank."""
    from truthmap.analysis.controls import CONTROLS, control_scores

    names = list(runs)
    out = {name: np.full((len(sources), len(targets)), np.nan) for name in CONTROLS}
    target_texts = {t: run_texts(runs[t][1], targets[t].ids) for t in names}
    for i, source in enumerate(names):
        train = sources[source]
        try:  # the probes' own test of a source (choose_layers): too few errors leave the row blank
            masks = validation_masks(train.is_error, train.groups, seeds)
            check_splits(train.is_error, masks, seeds, train.name)
        except ProbeError:
            continue
        texts = run_texts(runs[source][0], train.ids)
        for name in CONTROLS:
            every = [text for t in names for text in target_texts[t][name]]  # one pass scores every target
            try:
                scores = control_scores(texts[name], train.is_error, masks, every)  # [seeds, all target rows]
            except ProbeError:
                continue
            start = 0
            for j, target in enumerate(names):
                y = targets[target].is_error
                part = scores[:, start : start + len(y)]
                start += len(y)
                if len(set(y)) == 2:
                    out[name][i, j] = np.mean([auc(y, row) for row in part])
    return out


def generalization(runs: dict[str, tuple[RunDir, RunDir]], site: str, token: str, seeds, directory) -> dict:
    """Write auc.csv / auc_minus_baseline.csv and their heatmaps (sources down, targets across) into directory."""
    import pandas as pd

    from truthmap.analysis.heatmap import plot_matrix
    from truthmap.rundir import GeneralizationFiles, write_atomic

    out = GeneralizationFiles(directory)
    sources = {name: probe_data(train, site, f"{name} (train)") for name, (train, _) in runs.items()}
    targets = {name: probe_data(test, site, f"{name} (test)") for name, (_, test) in runs.items()}
    values, layers, blank = transfer_aucs(sources, targets, token, seeds)
    names = list(runs)
    raw = pd.DataFrame(values, index=pd.Index(names, name="train on"), columns=pd.Index(names, name="test on"))
    baseline = pd.Series({name: baseline_aucs(runs[name][1], targets[name])[REFERENCE_BASELINE] for name in names})
    relative = raw - baseline[raw.columns].to_numpy()[None, :]
    controls = control_transfer_aucs(runs, sources, targets, seeds)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a blank cell in every control stays blank
        best_control = np.nanmax(np.stack(list(controls.values())), axis=0)  # [sources, targets]
    minus_control = raw - best_control
    files = {}
    for stem, frame, (vmin, vmax, cmap), title in (
        ("auc", raw, (0.5, 1.0, "Blues"), f"Probe AUC, train on row, test on column · {token}"),
        ("auc_minus_baseline", relative, (-0.3, 0.3, "RdBu_r"), "AUC minus the test dataset's Logits-min-exact AUC"),
        ("auc_minus_control", minus_control, (-0.3, 0.3, "RdBu_r"),
         "AUC minus the best text-only control trained and tested on the same datasets"),
    ):
        path, figure = out.matrix(stem)
        write_atomic(path, lambda tmp, frame=frame: frame.to_csv(tmp, float_format="%.4f"))
        plot_matrix(frame, title, figure, vmin, vmax, cmap)
        files[stem] = str(path)
    long = pd.DataFrame([
        {"train_on": s, "test_on": t, "control": name, "auc": values[i, j]}
        for name, values in controls.items() for i, s in enumerate(names) for j, t in enumerate(names)
    ])
    write_atomic(out.text_controls, lambda tmp: long.to_csv(tmp, index=False, float_format="%.4f"))
    files["text_controls"] = str(out.text_controls)
    write_json(out.summary, {
        "token": token, "site": site, "seeds": list(seeds), "layers": layers, "baseline": REFERENCE_BASELINE,
        "baseline_auc": baseline.to_dict(), "blank": blank,
        "text_controls": {k: v.tolist() for k, v in controls.items()},  # control -> [sources, targets]
    })
    return files | {"auc_table": raw, "relative_table": relative, "control_table": minus_control, "blank": blank}
