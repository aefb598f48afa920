"""The grid scheduler: fits the probes of many (layer, token) cells in batches sized to a memory budget, several
batches at once on a CPU (one thread each, as many as other processes leave free), one batch loaded ahead.

`fit_cells` serves the heatmap (probes.probe_grid), the detection table, generalization and detectors; the fits
themselves are solver.fit_logistic.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from truthmap.analysis.cpuload import FreeCpus, torch_threads
from truthmap.analysis.solver import STATE_VECTORS, fit_logistic
from truthmap.errors import ProbeError

CELL_BUDGET_BYTES = 128 * 2**20  # what fit_cells fits at once: float32 activations, or the fits' float64 state


def fit_cells(read, cells, y, train, C=1.0, max_iter=1000, device=None, threads=None, where=str):
    """Fit the probes of many cells and splits, a batch of cells at a time: the fit of the heatmap, the detection
    table, generalization and detectors.

    read(cell) -> [n, hidden] activations of one cell; y [n] bool; train [S, n] bool (the splits' train rows).
    Yields (the batch's cells, fit_logistic's result as numpy arrays) in the order of cells, the batches being
    fitted holding at most CELL_BUDGET_BYTES of float32 activations together, or of the fits' state where that is
    larger (few rows), and one more batch loaded ahead. where(cell) names a cell in the error about NaN or inf
    values.
    device: where the fits run (None: cuda when available, else cpu); cells are read on the CPU and moved there.
    threads: CPUs for the fits (None: torch's setting, less what other processes keep busy, measured before each
    batch: on a shared CPU, threads that wait for a descheduled peer made the grid 20x slower). On the CPU that
    many batches are fitted at once, each on one thread: a fit is thousands of small operations, and on 2 cores two
    single-threaded fits side by side finished the grid 15-20 % sooner than one fit on both threads (torch
    releases the GIL in its operations).
    """
    import torch

    device = fit_device(device)
    ceiling = threads or torch.get_num_threads()
    workers = ceiling if device.type == "cpu" else 1
    reader = _CellReader(read, cells, where)
    per_batch = batch_size(len(cells), reader.n, reader.hidden, len(train), workers)
    y = np.asarray(y, dtype=np.float64)
    cpus = FreeCpus(ceiling, measure=threads is None and device.type == "cpu")

    def fit(X, n_threads):
        with torch_threads(n_threads):
            result = fit_logistic(X.to(device), y, train, float(C), max_iter=max_iter)
        return {k: (t.cpu().numpy() if torch.is_tensor(t) else t) for k, t in result.items()}

    # Each worker sets its own thread count, which also moves torch's process-wide default: restored on the way out.
    with torch_threads(ceiling), ThreadPoolExecutor(workers) as pool:
        yield from _Batches(cells, per_batch, reader.load, fit, pool, workers, cpus).results()


def fit_device(device=None):
    """The torch device the fits run on: the one given, else cuda when available, else cpu; never mps (Apple GPUs
    have no float64)."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device("cpu") if device.type == "mps" else device


def batch_size(n_cells: int, n: int, hidden: int, n_splits: int, workers: int) -> int:
    """Cells per batch: batches of equal size within CELL_BUDGET_BYTES over the workers, at least one per worker
    (the 15 cells of the input-embedding row on both CPUs)."""
    # Few rows make a cell's activations small, not its L-BFGS state: that bounds the batch then (at 24 rows, 450
    # cells at once held 0.8 GB of state).
    per_cell = max(4 * n * hidden, 8 * STATE_VECTORS * n_splits * (hidden + 1))
    per_batch = max(1, CELL_BUDGET_BYTES // workers // per_cell)
    n_batches = max(-(-n_cells // per_batch), min(workers, n_cells), 1)
    return -(-n_cells // n_batches) if n_cells else 1


class _CellReader:
    """Reads the activations of a batch of cells into one float32 tensor [cells, n, hidden]. The first cell is read
    at once: its shape sizes the batches."""

    def __init__(self, read, cells, where):
        self.read, self.where = read, where
        self.first = read(cells[0]) if cells else None
        self.n, self.hidden = np.shape(self.first) if cells else (0, 0)

    def load(self, start: int, batch):
        import torch

        X = torch.empty(len(batch), self.n, self.hidden, dtype=torch.float32)  # [cells, n, hidden]
        for i, cell in enumerate(batch):
            values = np.asarray(self.first if start == i == 0 else self.read(cell))
            if values.flags.writeable:  # torch casts float16 to float32 (exactly) 30x faster than numpy
                X[i] = torch.from_numpy(values)
            else:  # torch.from_numpy warns on a read-only array (a memmap)
                X[i].numpy()[:] = values
            if not torch.isfinite(X[i].sum()) and not torch.isfinite(X[i]).all():  # the sum: a tenth of the time
                raise ProbeError(
                    f"{self.where(cell)} hold {int((~torch.isfinite(X[i])).sum())} NaN or inf values; extract the "
                    "activations again."
                )
        return X


class _Batches:
    """The batches of fit_cells on a pool of workers: one batch loaded ahead, results handed over in order."""

    def __init__(self, cells, per_batch, load, fit, pool, workers, cpus):
        self.cells, self.per_batch, self.load, self.fit = cells, per_batch, load, fit
        self.pool, self.workers, self.cpus = pool, workers, cpus
        self.starts = deque(range(0, len(cells), per_batch))
        self.ahead = deque()  # (cells, activations) of the next batch, loaded while the others are fitted
        self.in_flight = deque()  # (cells, future) submitted, oldest first; finished ones wait here to be yielded

    def refill(self) -> None:
        """A worker that finishes starts the batch loaded ahead at once, whichever batch it finished."""
        while True:
            if self.starts and not self.ahead:
                start = self.starts.popleft()
                batch = self.cells[start : start + self.per_batch]
                self.ahead.append((batch, self.load(start, batch)))
            running = sum(not future.done() for _, future in self.in_flight)
            if not self.ahead or running >= (self.cpus.free if self.workers > 1 else 1):
                return
            batch, X = self.ahead.popleft()
            n_threads = 1 if self.workers > 1 else self.cpus.free
            self.in_flight.append((batch, self.pool.submit(self.fit, X, n_threads)))

    def results(self):
        while self.starts or self.ahead or self.in_flight:
            self.refill()
            while not self.in_flight[0][1].done():
                wait([future for _, future in self.in_flight if not future.done()], return_when=FIRST_COMPLETED)
                self.refill()
            batch, future = self.in_flight.popleft()
            result = future.result()
            self.cpus.update()
            self.refill()  # before handing the result over: the caller's work on it (AUCs, bootstrap) overlaps the fits
            yield batch, result
