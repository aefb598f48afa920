"""The probe stage of a finished run, part by part, with the preconditioner's two data weights.

    python bench/probe_stage.py RUN_DIR [--site mlp] [--curvatures 0.25,DEFAULT]

RUN_DIR is a run directory (runs/<model>/<dataset>/<split>) whose activations are stored. For each weight of the
data in the probes' preconditioner (0.25: p(1 - p) at w = 0, as before issue 17's last change; DEFAULT:
probes.DATA_CURVATURE), in this one process, it times what `pipeline.probe` does: the probe grid on the rows with
a valid exact answer, the input-embedding row, the text-only controls, and the figures and tables (written to a
temporary directory; the run is not changed). It prints the seconds of each part, the L-BFGS iterations summed
over cells, and the largest AUC difference between the two grids. Compare numbers of one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory with stored activations")
    parser.add_argument("--site", default="mlp")
    parser.add_argument("--curvatures", default="0.25,DEFAULT")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import numpy as np
    import pandas as pd
    import torch  # imported before the clock starts, as in a run

    from truthmap import probes
    from truthmap.activations import RowView, open_embedding, open_store
    from truthmap.config import RunConfig
    from truthmap.pipeline import text_controls, write_probe_outputs
    from truthmap.rundir import read_json

    run = Path(args.run)
    settings = read_json(run / "run.json")["settings"]
    config = RunConfig(model=settings["model"], dataset=settings["dataset"], n_samples=settings["n_samples"])
    table = pd.read_parquet(run / "answers.parquet")
    acts, meta = open_store(run / "activations" / args.site)
    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    is_error = ~table["correct"].to_numpy()[rows]
    groups = [table["group"].iloc[i] for i in rows]
    print(f"{run}: {len(rows)} rows, {int(is_error.sum())} errors, store {tuple(acts.shape)}; torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    iterations = [0]
    fit = probes.fit_logistic

    def counted(X, *a, **k):  # sums each cell's iterations: n_iter is the batch's, the slowest cell's
        result = fit(X, *a, **k)
        iterations[0] += result["cell_iterations"]
        return result

    probes.fit_logistic = counted

    grids, default = {}, probes.DATA_CURVATURE
    for name in args.curvatures.split(","):
        probes.DATA_CURVATURE = weight = default if name == "DEFAULT" else float(name)
        seconds, iterations[0] = {}, 0
        started = time.perf_counter()
        grid = probes.probe_grid(RowView(acts, rows), is_error, groups=groups, seeds=config.seeds, progress=False)
        seconds["grid"] = time.perf_counter() - started
        started = time.perf_counter()
        embed = open_embedding(run / "activations" / args.site, meta)
        embed_grid = probes.probe_grid(RowView(embed, rows), is_error, groups=groups, seeds=config.seeds,
                                       progress=False) if embed is not None else None
        seconds["embedding row"] = time.perf_counter() - started
        started = time.perf_counter()
        controls = text_controls(table, rows, is_error, groups, config)
        seconds["controls"] = time.perf_counter() - started
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write_probe_outputs(Path(tmp), grid, embed_grid, controls, "bench", config.dataset)
        seconds["outputs"] = time.perf_counter() - started
        grids[weight] = grid
        parts = ", ".join(f"{part} {s:.1f}" for part, s in seconds.items())
        print(f"data curvature {weight:g}: probe stage {sum(seconds.values()):.1f} s ({parts}); L-BFGS "
              f"iterations of the grid and embedding row, summed over cells, {iterations[0]}; best cell "
              f"{grid.mean.max():.4f}")
    if len(grids) == 2:
        a, b = grids.values()
        print(f"largest |AUC difference| between the two grids: {np.abs(a.aucs - b.aucs).max():.4f} per seed, "
              f"{np.abs(a.mean - b.mean).max():.4f} mean over seeds")


if __name__ == "__main__":
    main()
