"""The probe stage alone: truthmap's batched fits against per-cell scikit-learn, quiet and beside a busy process.

    python bench/probes.py [--n 100,250,1000] [--big 10000] [--sklearn-cells 90] [--check-cells 6]

For each size in --n, on a synthetic store of 30 layers x 15 positions x 576 features (the shape of
SmolLM2-135M's; see `synthetic_store`), in this one process:
- truthmap: `probes.probe_grid` as `pipeline.probe` calls it (the float16 store read a cell at a time through a
  RowView, 5 seeds, 1,000 bootstrap replicates);
- per cell: StandardScaler + LogisticRegression(C=1, max_iter=1000) per (cell, seed) on the same splits, as the
  per-sample pipeline of bench/compare.py fits them; timed on --sklearn-cells cells spread over the grid and
  scaled to all 450;
- the largest AUC difference between truthmap and converged scikit-learn fits (tol 1e-8) on --check-cells cells;
- the probe stage again beside one busy process (a Python loop; one of the 2 cores taken), with the CPUs for the
  fits chosen as by default (fewer fits at once while other processes keep CPUs busy) and with torch's thread
  count forced (as many single-threaded fits at once),
  and the slowdown against the quiet run. OpenMP's wait policy is read when torch starts: to compare it, run the
  bench again with OMP_WAIT_POLICY=passive set.
Then truthmap alone at --big rows (on 2 layers: memory depends on the cells fitted at once, not on their number):
its time and working memory (peak RSS during the stage minus RSS before it), against the target of 1 GB.

Timings are wall seconds on whatever else the machine runs: compare numbers of one run, on a quiet machine.
The synthetic activations have the spectrum of real ones (standardized, a few directions of variance 50-100,
then a power-law tail), which sets how many iterations the fits need: isotropic noise converges in a third of them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
SEEDS = (0, 5, 26, 42, 63)


def synthetic_store(directory: Path, n: int, layers: int = 30, positions: int = 15, hidden: int = 576, seed: int = 0):
    """A float16 cell-major store (activations.CellStore) of n rows, and is_error [n] (~30 % errors).

    Per layer, latent rows (correlated across layers) times the square roots of a real spectrum (variance
    70 / (1 + j/8)^2.1 along direction j) times a random rotation; each position permutes and flips that layer's
    features and adds a little noise. Errors depend on latent directions of mid-range variance, and each cell
    carries a planted error direction of its own strength, so the cells' AUCs range from chance to about 0.8.
    Two features per cell are massive activations (large mean and scale), which standardization removes."""
    import numpy as np

    from truthmap.stages.activations import CellStore

    rng = np.random.default_rng(seed)
    spectrum = 70 / (1 + np.arange(hidden) / 8) ** 2.1
    shared = rng.standard_normal((n, hidden)).astype(np.float32)
    is_error = shared[:, 200] + 0.6 * shared[:, 201] + 1.2 * rng.standard_normal(n) > 1.0
    path = Path(directory) / "acts.f16"
    store = np.memmap(path, mode="w+", dtype=np.float16, shape=(layers, positions, n, hidden))  # CellStore's layout
    for layer in range(layers):
        rotation, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
        latent = 0.7 * shared + 0.71 * rng.standard_normal((n, hidden)).astype(np.float32)
        base = (latent * np.sqrt(spectrum).astype(np.float32)) @ rotation.astype(np.float32)  # [n, hidden]
        for pos in range(positions):
            cell = base[:, rng.permutation(hidden)] * rng.choice([-1, 1], hidden).astype(np.float32)
            cell += 0.05 * rng.standard_normal((n, hidden)).astype(np.float32)
            strength = 0.05 * rng.uniform() * np.exp(-(((layer - layers / 2) / (layers / 3)) ** 2))
            cell += strength * np.outer(is_error - is_error.mean(), rng.standard_normal(hidden)).astype(np.float32)
            cell[:, :2] = cell[:, :2] * 20 + 50
            store[layer, pos] = cell
    store.flush()
    del store
    return CellStore(path, (layers, positions, n, hidden)), is_error


def spread(cells: list, k: int) -> list:
    """k cells evenly spread over the grid's list (all when k >= its length)."""
    import numpy as np

    if k >= len(cells):
        return cells
    return [cells[i] for i in np.linspace(0, len(cells) - 1, k).round().astype(int)]


def truthmap_grid(store, is_error, threads=None):
    """probe_grid as pipeline.probe runs it; returns (wall seconds, grid)."""
    import numpy as np

    from truthmap.analysis.probes import probe_grid
    from truthmap.stages.activations import RowView

    started = time.perf_counter()
    grid = probe_grid(RowView(store, np.arange(len(is_error))), is_error, seeds=SEEDS, progress=False,
                      threads=threads, device="cpu")
    return time.perf_counter() - started, grid


def sklearn_aucs(store, is_error, cells, tol=1e-4, max_iter=1000):
    """Per (seed, cell): StandardScaler + LogisticRegression on the grid's splits; returns (seconds, aucs [seeds,
    cells])."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from truthmap.analysis.probes import split_masks

    train = split_masks(len(is_error), None, SEEDS, is_error)
    aucs = np.empty((len(SEEDS), len(cells)))
    started = time.perf_counter()
    for j, (layer, pos) in enumerate(cells):
        X = store[:, layer, pos, :].astype(np.float32)
        for s, mask in enumerate(train):
            scaler = StandardScaler().fit(X[mask])
            model = LogisticRegression(C=1.0, tol=tol, max_iter=max_iter).fit(scaler.transform(X[mask]), is_error[mask])
            aucs[s, j] = roc_auc_score(is_error[~mask], model.decision_function(scaler.transform(X[~mask])))
    return time.perf_counter() - started, aucs


@contextlib.contextmanager
def busy_process():
    """One other process keeping a CPU busy for as long as the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="100,250,1000", help="sizes compared with per-cell scikit-learn")
    parser.add_argument("--big", type=int, default=10000, help="size run by truthmap alone for memory (0: none)")
    parser.add_argument("--sklearn-cells", type=int, default=90, help="cells fitted per cell by scikit-learn")
    parser.add_argument("--check-cells", type=int, default=6, help="cells checked against converged sklearn fits")
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a busy process")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from compare import MemorySampler, release_freed_memory

    print(f"torch threads {torch.get_num_threads()}, CPUs {len(os.sched_getaffinity(0))}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.n.split(",") if x.strip()]:
            directory = Path(tmp) / str(n)
            directory.mkdir()
            store, is_error = synthetic_store(directory, n)
            cells = [(layer, pos) for layer in range(store.shape[1]) for pos in range(store.shape[2])]
            ours, grid = truthmap_grid(store, is_error)
            timed = spread(cells, args.sklearn_cells)
            seconds, _ = sklearn_aucs(store, is_error, timed)
            theirs = seconds * len(cells) / len(timed)
            checked = spread(cells, args.check_cells)
            _, converged = sklearn_aucs(store, is_error, checked, tol=1e-8, max_iter=100000)
            ours_checked = np.stack([grid.aucs[:, layer, pos] for layer, pos in checked], axis=1)
            delta = float(np.abs(ours_checked - converged).max())
            line = {"n": n, "ours": ours, "theirs": theirs, "timed": len(timed), "delta": delta,
                    "delta_mean": float(np.abs(ours_checked.mean(0) - converged.mean(0)).max()),
                    "best": float(grid.mean.max())}
            if not args.no_busy:
                with busy_process():
                    line["busy"], _ = truthmap_grid(store, is_error)
                    line["busy_forced"], _ = truthmap_grid(store, is_error, threads=torch.get_num_threads())
            rows.append(line)
            print(f"n={n}: truthmap {ours:.1f} s, per-cell sklearn {theirs:.1f} s (from {len(timed)} cells), "
                  f"max |AUC - converged sklearn| {delta:.4f} per seed, {line['delta_mean']:.4f} mean over seeds "
                  f"({len(checked)} cells); best cell {line['best']:.3f}"
                  + (f"; beside a busy process {line['busy']:.1f} s (threads by load), {line['busy_forced']:.1f} s "
                     f"({torch.get_num_threads()} threads)" if "busy" in line else ""))
            del store
        print("\n| rows | truthmap s | per-cell sklearn s | sklearn / truthmap | max AUC diff (per seed, mean) |"
              + (" busy s (threads by load) | busy s (forced) | slowdown by load / forced |" if not args.no_busy else ""))
        print("|---|---|---|---|---|" + ("---|---|---|" if not args.no_busy else ""))
        for r in rows:
            busy = (f" {r['busy']:.1f} | {r['busy_forced']:.1f} | {r['busy'] / r['ours']:.1f}x / "
                    f"{r['busy_forced'] / r['ours']:.1f}x |") if "busy" in r else ""
            print(f"| {r['n']} | {r['ours']:.1f} | {r['theirs']:.1f} | {r['theirs'] / r['ours']:.1f}x | "
                  f"{r['delta']:.4f}, {r['delta_mean']:.4f} |" + busy)
        big = None
        if args.big:
            directory = Path(tmp) / "big"
            directory.mkdir()
            store, is_error = synthetic_store(directory, args.big, layers=2)
            sampler = MemorySampler()
            sampler.start()
            release_freed_memory()
            start = sampler.now()[0]
            sampler.reset()
            seconds, _ = truthmap_grid(store, is_error)
            time.sleep(0.05)
            big = (seconds, sampler.peak - start)
            print(f"\nn={args.big}, 2 layers x 15 positions: {seconds:.1f} s, working memory {big[1] / MB:.0f} MB")
    print("\n## targets (2 CPU cores, quiet)\n")
    for r in rows:
        if r["n"] == 1000:
            easy = (f" (best cell {r['best']:.3f}: separable, so fewer iterations than real activations need)"
                    if r["best"] >= 0.999 else "")
            print(f"- [{'x' if r['ours'] <= 30 else ' '}] 1,000 rows in at most 30 s, on this synthetic store: "
                  f"{r['ours']:.1f} s{easy}; bench/probe_stage.py times a real run's store")
        print(f"- [{'x' if r['ours'] < r['theirs'] else ' '}] faster than per-cell sklearn at {r['n']} rows: "
              f"{r['ours']:.1f} s against {r['theirs']:.1f} s")
        print(f"- [{'x' if r['delta_mean'] <= 0.003 else ' '}] AUCs within 0.003 of converged sklearn at {r['n']} "
              f"rows: {r['delta_mean']:.4f} (mean over seeds; {r['delta']:.4f} per seed)")
        if "busy" in r:
            print(f"- [{'x' if r['busy'] / r['ours'] <= 2.5 else ' '}] beside one busy process at {r['n']} rows, "
                  f"near the 2x of half the CPU: {r['busy'] / r['ours']:.1f}x")
    if big:
        print(f"- [{'x' if big[1] <= 2**30 else ' '}] working memory at {args.big} rows at most 1 GB: "
              f"{big[1] / MB:.0f} MB")


if __name__ == "__main__":
    main()
