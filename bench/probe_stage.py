"""The probe stage of a finished run, with this checkout's probe grid and an earlier revision's.

    python bench/probe_stage.py RUN_DIR [--site mlp] [--against REV] [--rounds N]

RUN_DIR is a run directory (runs/<model>/<dataset>/<split>) whose activations are stored. In this one process it
times what `pipeline.probe` does: `truthmap.probe_cells` (the probe grid on the rows with a valid exact answer,
the input-embedding row and the text-only controls), then the figures and tables (written to a
temporary directory; the run is not changed). With --against, the probe grids (fits, batches, threads) alternate
between `probes` of this checkout and src/truthmap/probes.py at git revision REV (the rest of the stage is this
checkout's), for --rounds rounds (default 2; without --against, 1). It prints the seconds of the two parts and the
L-BFGS iterations summed over cells for each run, each version's median stage time over several rounds, and the
largest AUC difference between the versions' grids. Compare numbers of one run, on a quiet machine: this machine's
speed drifts by a fifth within an hour, so one run of the stage says little against a target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path


def load_revision(rev: str):
    """src/truthmap/probes.py as it was at git revision rev, imported as a module of its own."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{rev}:src/truthmap/probes.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"probes_{rev.replace('/', '_')}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory with stored activations")
    parser.add_argument("--site", default="mlp")
    parser.add_argument("--against", help="a git revision whose probes module to time as well")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternations of the versions (default 2), or runs of this checkout alone (default 1)")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import numpy as np
    import pandas as pd
    import torch  # imported before the clock starts, as in a run

    import truthmap
    from truthmap.analysis import probes  # the module whose versions are compared: its solver is swapped below

    run = Path(args.run)
    settings = json.loads((run / "run.json").read_text())["settings"]
    config = truthmap.RunConfig(model=settings["model"], dataset=settings["dataset"], n_samples=settings["n_samples"])
    table = pd.read_parquet(run / "answers.parquet")
    acts, meta = truthmap.open_store(run / "activations" / args.site)
    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    is_error = ~table["correct"].to_numpy()[rows]
    print(f"{run}: {len(rows)} rows, {int(is_error.sum())} errors, store {tuple(acts.shape)}; torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    versions = {"this checkout": probes}
    if args.against:
        versions = {args.against: load_revision(args.against), **versions}
    iterations, counting = [0], threading.Lock()  # fits run in several threads at once

    def counted(fit):  # sums each cell's iterations: n_iter is the batch's, the slowest cell's
        def fit_and_count(X, *a, **k):
            result = fit(X, *a, **k)
            with counting:
                iterations[0] += result["cell_iterations"]
            return result
        return fit_and_count

    for module in versions.values():
        home = sys.modules[module.fit_cells.__module__]  # where fit_cells looks fit_logistic up (truthmap.analysis.scheduler)
        home.fit_logistic = counted(home.fit_logistic)

    checkout_grid = probes.probe_grid
    grid_functions = {name: module.probe_grid for name, module in versions.items()}
    grids = {}
    rounds = args.rounds or (2 if args.against else 1)
    stage_seconds = {name: [] for name in grid_functions}
    for _ in range(rounds):
        for name, probe_grid in grid_functions.items():
            probes.probe_grid = probe_grid  # what truthmap.probe_cells calls
            iterations[0] = 0
            started = time.perf_counter()
            embed = truthmap.open_embedding(run / "activations" / args.site, meta)
            grid, embed_grid, controls = truthmap.probe_cells(table, rows, acts, embed, config, progress=False)
            cells = time.perf_counter() - started
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                truthmap.write_probe_outputs(Path(tmp), grid, embed_grid, controls, "bench", config.dataset)
            outputs = time.perf_counter() - started
            grids[name] = grid
            stage_seconds[name].append(cells + outputs)
            print(f"{name}: probe stage {cells + outputs:.1f} s (grid, input-embedding row and text controls "
                  f"{cells:.1f}, figures and tables {outputs:.1f}); L-BFGS iterations of the grid and embedding row, "
                  f"summed over cells, {iterations[0]}; best cell {grid.mean.max():.4f}")
    probes.probe_grid = checkout_grid
    if rounds > 1:
        for name, seconds in stage_seconds.items():
            print(f"{name}: median probe stage {np.median(seconds):.1f} s over {len(seconds)} runs "
                  f"({min(seconds):.1f}-{max(seconds):.1f} s)")
    if len(grids) == 2:
        a, b = grids.values()
        print(f"largest |AUC difference| between the two versions' grids: {np.abs(a.aucs - b.aucs).max():.4f} per "
              f"seed, {np.abs(a.mean - b.mean).max():.4f} mean over seeds")


if __name__ == "__main__":
    main()
