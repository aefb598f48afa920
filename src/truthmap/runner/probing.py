"""Stage 5: probe every (layer, position) cell of the store, with the text-only controls beside them, and write
the heatmap, the selectivity map, the top cells and probes.json (probes.probe_grid does the fitting)."""

from __future__ import annotations

from pathlib import Path

from truthmap.config import RunConfig, run_dir
from truthmap.rundir import POSITIONS, ProbeFiles, RunDir, read_json, write_json
from truthmap.runner.contract import answers_table

PROBE_OUTPUTS = 3  # bump when the probe stage writes new files: 2 = embedding row, controls, intervals; 3 = fair verdict


def probe(config: RunConfig, lm=None) -> RunDir:
    """Probe every (layer, position) cell on the rows with a valid exact answer; write the heatmap and tables.
    The caller skips it when probes.json was made with these settings (probes_made, probes_wanted)."""
    import numpy as np

    from truthmap.analysis.verdict import run_verdict  # the cell chosen on validation rows, the embedding row a control
    from truthmap.lm.models import model_slug
    from truthmap.stages.activations import open_embedding, open_store

    run = run_dir(config)
    out = run.probe_files(config.site)
    table = answers_table(run)
    acts, meta = open_store(run.activations(config.site))
    made_by = probes_wanted(config, run)
    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    embed = open_embedding(run.activations(config.site), meta)
    grid, embed_grid, controls = probe_cells(table, rows, acts, embed, config)
    title = f"{model_slug(config.model)} · {config.dataset} ({config.split}) · {config.site} · n={len(rows)}"
    summary = write_probe_outputs(out, grid, embed_grid, controls, title, config.dataset)

    summary |= run_verdict(table, rows, acts, embed, config.seeds, config.dataset, config.device)
    write_json(
        out.summary,
        made_by
        | {
            "rows_with_valid_exact_answer": int(len(rows)),
            "errors": grid.n_errors,
            "correct": grid.n_correct,
            "n_train": grid.n_train,
            "n_test": grid.n_test,
            **summary,
            "activations": {k: meta[k] for k in ("shape", "dtype", "clipped")},
        },
    )
    return run


def probe_cells(table, rows, acts, embed, config: RunConfig, progress=True) -> tuple:
    """(probe grid, input-embedding row or None, text controls) on the answers table's rows (with a valid exact
    answer), of the store acts [answers, layers, positions, hidden] and embed [answers, 1, positions, hidden]."""
    from truthmap.analysis.probes import probe_grid
    from truthmap.stages.activations import RowView

    is_error = ~table["correct"].to_numpy()[rows]
    groups = [table["group"].iloc[i] for i in rows]
    grid = probe_grid(RowView(acts, rows), is_error, groups=groups, seeds=config.seeds, name=config.dataset,
                      device=config.device, progress=progress)
    embed_grid = None
    if embed is not None:  # the token-identity floor: one more "layer", probed on the same rows and splits
        embed_grid = probe_grid(RowView(embed, rows), is_error, groups=groups, seeds=config.seeds,
                                name=f"{config.dataset} (input embedding)", device=config.device, progress=False)
    # Not in a thread beside the grid: with the grid's two fits on the 2 CPUs that made the stage slower.
    return grid, embed_grid, text_controls(table, rows, is_error, groups, config)


def text_controls(table, rows, is_error, groups, config: RunConfig) -> dict:
    """The text-only controls (controls.py) on the probe grid's rows, splits and bootstrap draws."""
    from truthmap.analysis.controls import CONTROLS, control_grid
    from truthmap.analysis.probes import bootstrap_weights, split_masks

    texts = {name: [str(t) for t in table[column].iloc[rows]] for name, (column, _) in CONTROLS.items()}
    train = split_masks(len(rows), groups, tuple(config.seeds), is_error, name=config.dataset)
    return control_grid(texts, is_error, train, bootstrap_weights(is_error))


def write_probe_outputs(out: ProbeFiles | Path, grid, embed_grid, controls: dict, title: str, dataset: str) -> dict:
    """heatmap.png|svg|csv (embedding row below layer 0, grey dots where a cell's interval does not clear the best
    control), selectivity.png|svg|csv, top_cells.json; returns the summary entries of probes.json."""
    out = ProbeFiles(out.path if isinstance(out, ProbeFiles) else out)
    from truthmap.analysis.controls import best_control, public, selectivity, verdict
    from truthmap.analysis.heatmap import (
        EMBED_ROW,
        plot_heatmap,
        top_cells,
        with_embedding,
        write_heatmap_csv,
        write_selectivity_csv,
        write_top_cells,
    )

    rows, labels = with_embedding(grid, embed_grid)
    sel = selectivity(rows, controls)
    best_name = best_control(controls)
    control_auc = controls[best_name]["auc_mean"] if best_name else None
    note = ""
    if "clears" in sel:
        note = f"· : 95% interval does not clear {controls[best_name]['label']} (AUC {control_auc:.3f})"
    plot_heatmap(rows.mean, POSITIONS, title, out.heatmap_png, out.heatmap_svg, labels,
                 marked=~sel["clears"] if "clears" in sel else None, note=note)
    write_heatmap_csv(rows, POSITIONS, out.heatmap_csv, labels)
    if best_name:
        plot_heatmap(sel["mean"], POSITIONS, f"Selectivity: AUC minus {controls[best_name]['label']}\n{title}",
                     out.selectivity_png, out.selectivity_svg, labels, marked=~sel["clears"] if "clears" in sel
                     else None, diverging=True, note=note)
        write_selectivity_csv(sel, POSITIONS, out.selectivity_csv, labels)
    write_top_cells(grid, POSITIONS, out.top_cells, control_auc=control_auc)
    best = top_cells(grid, POSITIONS, k=1, control_auc=control_auc)[0]
    return {
        "best": best,
        "embedding_best": top_cells(embed_grid, POSITIONS, k=1, control_auc=control_auc)[0] | {"layer": EMBED_ROW}
        if embed_grid else None,
        "controls": public(controls),
        "best_control": best_name,
        "verdict": verdict(best, controls, dataset),
    }


def probes_wanted(config: RunConfig, run: RunDir) -> dict:
    """What probes.json must have been made with: the answers the store belongs to, the site, seeds and outputs."""
    from truthmap.stages.activations import open_store

    _, meta = open_store(run.activations(config.site))  # no store, or an unfinished one: the error says what to run
    return {"answers": meta["answers"], "site": config.site, "seeds": list(config.seeds), "outputs": PROBE_OUTPUTS}


def probes_made(config: RunConfig, run: RunDir) -> dict | None:
    summary = run.probe_files(config.site).summary
    return read_json(summary) if summary.exists() else None


def fit_detector(config: RunConfig, token: str, layer: int | None, out: str | None = None) -> dict:
    """Fit a detector on a run's rows (a quarter of them, grouped by question, kept apart to calibrate it), test it
    on the test split when extracted, save it as a directory, and score the rows of both runs."""
    import dataclasses

    import numpy as np

    from truthmap.analysis.detection import (
        CALIBRATION_SHARE,
        detector_test_results,
        probe_data,
        split_for_calibration,
        write_detector_scores,
    )
    from truthmap.analysis.detector import Detector, check_finite
    from truthmap.errors import ConfigError
    from truthmap.rundir import check_token
    from truthmap.runner.contract import extraction_done

    check_token(token)
    run = run_dir(config)
    path = Path(out or run.detector(config.site))
    if path.suffix.lower() == ".json":
        raise ConfigError(f"A detector is saved as a directory (config.json, model.safetensors, README.md); got --out "
                          f"{path}. Name a directory, such as {path.with_name(path.stem)}.")
    data = probe_data(run, config.site, f"{config.dataset} ({config.split})")
    read = data.layer_reader(token)
    X = np.stack([read(layer_) for layer_ in range(data.acts.shape[1])], axis=1)  # [rows, layers, hidden]
    check_finite(X, data.ids, Detector(token=token, site=config.site))
    fit, calibrate = split_for_calibration(data, config.seeds[0])
    made = read_json(run.run_json)
    info = detector_info(config, run, made, data, fit, calibrate)
    detector = Detector(token=token, layer=layer, site=config.site, seeds=config.seeds, info=info)
    detector.fit(X[fit], data.is_error[fit], [data.groups[i] for i in fit])
    detector.calibrate(X[calibrate], data.is_error[calibrate])
    test_run = run_dir(dataclasses.replace(config, split="test"))
    tested = config.split == "train" and extraction_done(test_run, config.site)
    if tested:
        detector.info["test"] = detector_test_results(detector, run, test_run, data, config.seeds)
    detector.save_pretrained(path)
    scored = {str(run.path): write_detector_scores(detector, run, in_train=True)}
    if tested:
        scored[str(test_run.path)] = write_detector_scores(detector, test_run, in_train=False)
    return {"detector": str(path), "layer": detector.layer_, "token": token, "calibration": detector.calibration_,
            "thresholds": {k: v["threshold"] for k, v in detector.thresholds_.items()},
            "test": detector.info.get("test"), "scored": scored, "calibration_share": CALIBRATION_SHARE}


def detector_info(config: RunConfig, run, made: dict, data, fit, calibrate) -> dict:
    """What a saved detector records of where it comes from: model, dataset, prompt and extraction, counts."""
    import time

    from truthmap.rundir import file_sha256

    settings = made["settings"]
    return {
        "model": config.model,
        "dataset": config.dataset,
        "dataset_version": settings.get("dataset_version"),
        # a custom or imported file's own hash; a built-in dataset: the hash of the answers the probe saw
        "dataset_sha256": settings.get("custom_sha256") or settings.get("import_sha256") or file_sha256(run.answers),
        "chat_template": made["chat_template"],
        "model_identity": made.get("model_identity"),  # score refuses other weights under the same name
        **{k: settings.get(k) for k in ("prompt_style", "max_new_tokens", "locate", "extractor", "extraction_tries",
                                        "extraction_prompt")},
        "training": {
            "run": str(run.path),
            "rows": len(data.ids),
            "errors": int(data.is_error.sum()),
            "correct": int((~data.is_error).sum()),
            "fit_rows": len(fit),
            "calibration_rows": len(calibrate),
            "seeds": list(config.seeds),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
