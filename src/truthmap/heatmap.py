"""The layer x token heatmap of error-probe AUCs (as Orgad et al. 2025, Figure 2), its CSV and the best cells.

Stages never import each other: a grid here is anything with `mean` and `std` arrays [layers, positions], such
as probes.ProbeGrid. Every file is written atomically (temp file in the same directory, then os.replace).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from truthmap.errors import ProbeError
from truthmap.rundir import write_atomic, write_json

# Short axis labels for the token positions; negative positions count back from the end of the answer.
TOKEN_LABELS: dict[str, str] = {
    "last_q": "last q",
    "first_answer": "first ans",
    "second_answer": "second ans",
    "exact_answer_before_first": "before exact",
    "exact_answer_first": "exact first",
    "exact_answer_last": "exact last",
    "exact_answer_after_last": "after exact",
    **{str(k): f"end {k}".replace("-", "\N{MINUS SIGN}") for k in range(-8, 0)},
}


def token_label(position: str) -> str:
    return TOKEN_LABELS.get(str(position), str(position))


def _check_shape(values: np.ndarray, positions, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(positions):
        raise ProbeError(
            f"{what} has shape {values.shape} but there are {len(positions)} positions; "
            "expected [layers, positions]."
        )
    return values


def plot_heatmap(mean, positions, title, png_path, svg_path):
    """Draw mean AUC [layers, positions] with layer 0 at the bottom; write PNG and SVG; return the Figure.

    Uses matplotlib's object API (Figure, no pyplot), so no global backend or open-figure state is touched;
    PNG is rendered by Agg.
    """
    from matplotlib.figure import Figure

    mean = _check_shape(mean, positions, "mean")
    n_layers, n_positions = mean.shape
    fig = Figure(figsize=(1.2 + 0.42 * n_positions, 1.6 + 0.2 * n_layers), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mean, origin="lower", cmap="Blues", vmin=0.5, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_positions), [token_label(p) for p in positions], rotation=60, ha="right")
    layer_ticks = range(0, n_layers, max(1, -(-n_layers // 32)))  # every layer up to 32 layers
    ax.set_yticks(layer_ticks, [str(layer) for layer in layer_ticks])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="AUC")
    write_atomic(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    write_atomic(Path(svg_path), lambda tmp: fig.savefig(tmp, format="svg"))
    return fig


def write_heatmap_csv(grid, positions, path) -> None:
    """Long format, one row per cell: layer, token (position name), auc_mean, auc_std."""
    mean = _check_shape(grid.mean, positions, "grid.mean")
    std = _check_shape(grid.std, positions, "grid.std")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer", "token", "auc_mean", "auc_std"])
            for layer in range(mean.shape[0]):
                for j, position in enumerate(positions):
                    out.writerow([layer, position, f"{mean[layer, j]:.6f}", f"{std[layer, j]:.6f}"])

    write_atomic(Path(path), write)


def top_cells(grid, positions, k=5) -> list[dict]:
    """The k cells of highest mean AUC, best first (ties: lower layer, then earlier position)."""
    mean = _check_shape(grid.mean, positions, "grid.mean")
    std = _check_shape(grid.std, positions, "grid.std")
    order = np.argsort(-mean, axis=None, kind="stable")[:k]
    cells = []
    for flat in order:
        layer, j = np.unravel_index(flat, mean.shape)
        cells.append(
            {
                "layer": int(layer),
                "token": str(positions[j]),
                "auc_mean": float(mean[layer, j]),
                "auc_std": float(std[layer, j]),
            }
        )
    return cells


def write_top_cells(grid, positions, path, k=5) -> list[dict]:
    """Write top_cells(grid, positions, k) as a JSON list; return it."""
    cells = top_cells(grid, positions, k)
    write_json(Path(path), cells)
    return cells


def plot_matrix(frame, title: str, png_path, vmin: float, vmax: float, cmap: str = "Blues", bold=None):
    """An annotated matrix (a DataFrame: rows down, columns across) as a PNG: tables of AUCs and their differences.

    bold: optional boolean DataFrame of the same shape; those cells are written in bold (the best per column).
    NaN cells stay blank.
    """
    from matplotlib.figure import Figure

    values = frame.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(6.0, 2.2 + 1.1 * n_cols), 1.0 + 0.32 * n_rows), layout="constrained")
    ax = fig.subplots()
    from matplotlib import colormaps

    colours = colormaps[cmap].with_extremes(bad="0.85")  # blank (NaN) cells in grey, not as the low end
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xlabel(frame.columns.name or "")
    ax.set_ylabel(frame.index.name or "")
    ax.set_xticks(range(n_cols), [str(c) for c in frame.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in frame.index])
    ax.tick_params(labelsize=8)
    diverging = cmap in ("RdBu_r", "coolwarm", "bwr")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            weight = "bold" if bold is not None and bool(bold.iat[i, j]) else "normal"
            shade = (value - vmin) / (vmax - vmin)  # dark cells get white text
            dark = abs(shade - 0.5) > 0.35 if diverging else shade > 0.6
            color = "white" if dark else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, weight=weight, color=color)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    write_atomic(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    return fig
