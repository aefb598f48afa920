"""Generalization: a probe trained on one dataset's train split, scored on every dataset's test split.

Each source dataset's probe sits at one token (exact_answer_last by default) and, per seed, the layer chosen on
a validation split of the source's train rows (as in the detection table). Its AUC on each target's test rows is
averaged over the seeds. The second matrix subtracts the target's Logits-min-exact AUC: above zero, the
transferred probe beats the best logit baseline of the paper on the target's own errors.
"""

from __future__ import annotations

import numpy as np

from truthmap.detection import ProbeData, baseline_aucs, choose_layers, probe_data, probe_logits
from truthmap.errors import ProbeError
from truthmap.probes import auc
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


def generalization(runs: dict[str, tuple[RunDir, RunDir]], site: str, token: str, seeds, directory) -> dict:
    """Write auc.csv / auc_minus_baseline.csv and their heatmaps (sources down, targets across) into directory."""
    import pandas as pd

    from truthmap.heatmap import plot_matrix
    from truthmap.rundir import write_atomic

    sources = {name: probe_data(train, site, f"{name} (train)") for name, (train, _) in runs.items()}
    targets = {name: probe_data(test, site, f"{name} (test)") for name, (_, test) in runs.items()}
    values, layers, blank = transfer_aucs(sources, targets, token, seeds)
    names = list(runs)
    raw = pd.DataFrame(values, index=pd.Index(names, name="train on"), columns=pd.Index(names, name="test on"))
    baseline = pd.Series({name: baseline_aucs(runs[name][1], targets[name])[REFERENCE_BASELINE] for name in names})
    relative = raw - baseline[raw.columns].to_numpy()[None, :]
    files = {}
    for stem, frame, (vmin, vmax, cmap), title in (
        ("auc", raw, (0.5, 1.0, "Blues"), f"Probe AUC, train on row, test on column · {token}"),
        ("auc_minus_baseline", relative, (-0.3, 0.3, "RdBu_r"), "AUC minus the test dataset's Logits-min-exact AUC"),
    ):
        path = directory / f"{stem}.csv"
        write_atomic(path, lambda tmp, frame=frame: frame.to_csv(tmp, float_format="%.4f"))
        plot_matrix(frame, title, directory / f"{stem}.png", vmin, vmax, cmap)
        files[stem] = str(path)
    write_json(directory / "generalization.json", {"token": token, "site": site, "seeds": list(seeds), "layers": layers,
                                                   "baseline": REFERENCE_BASELINE, "baseline_auc": baseline.to_dict(), "blank": blank})
    return files | {"auc_table": raw, "relative_table": relative, "blank": blank}
