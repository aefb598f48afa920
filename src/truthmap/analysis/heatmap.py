"""The layer x token heatmap of error-probe AUCs (as Orgad et al. 2025, Figure 2), its CSV and the best cells;
the input embedding's row below layer 0, and the selectivity map (AUC minus the best text-only control).

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


EMBED_ROW = "embed"  # the input embedding's row, below layer 0: a name no layer index can take


def plot_heatmap(mean, positions, title, png_path, svg_path, row_labels=None, marked=None, diverging=False, note=""):
    """Draw mean AUC [rows, positions] with the first row at the bottom; write PNG and SVG; return the Figure.

    row_labels: one per row (default: the layer numbers); an "embed" first row is set apart by a line.
    marked: optional bool [rows, positions]; those cells get a small grey dot (cells whose interval does not clear
    the best text-only control). diverging: a selectivity map, AUC minus a control: red above 0, blue below,
    white at 0. note: a second title line (what the dots mean).
    Uses matplotlib's object API (Figure, no pyplot), so no global backend or open-figure state is touched;
    PNG is rendered by Agg.
    """
    from matplotlib.figure import Figure

    mean = _check_shape(mean, positions, "mean")
    n_layers, n_positions = mean.shape
    labels = [str(layer) for layer in range(n_layers)] if row_labels is None else [str(r) for r in row_labels]
    fig = Figure(figsize=(1.2 + 0.42 * n_positions, 1.6 + 0.2 * n_layers), layout="constrained")
    ax = fig.subplots()
    if diverging:
        span = max(0.1, float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 0.1)
        colours = {"cmap": "RdBu_r", "vmin": -span, "vmax": span}
    else:
        colours = {"cmap": "Blues", "vmin": 0.5, "vmax": 1.0}
    image = ax.imshow(mean, origin="lower", aspect="auto", interpolation="nearest", **colours)
    ax.set_xticks(range(n_positions), [token_label(p) for p in positions], rotation=60, ha="right")
    layer_ticks = range(0, n_layers, max(1, -(-n_layers // 32)))  # every layer up to 32 layers
    ax.set_yticks(layer_ticks, [labels[i] for i in layer_ticks])
    if labels[0] == EMBED_ROW:
        ax.axhline(0.5, color="0.3", linewidth=0.8)
    if marked is not None:
        rows, cols = np.nonzero(np.asarray(marked, dtype=bool))
        ax.scatter(cols, rows, s=2, c="0.45", marker="o", linewidths=0)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.colorbar(image, ax=ax, label="AUC minus best text control" if diverging else "AUC")
    write_atomic(Path(png_path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    write_atomic(Path(svg_path), lambda tmp: fig.savefig(tmp, format="svg"))
    return fig


def with_embedding(grid, embed=None):
    """(rows, labels): the grid's arrays (mean, std, low, high, boot where present) with the embedding grid's one row
    stacked below layer 0, and the row labels ("embed", "0", "1", ...). Without embed, the grid as it is."""
    from types import SimpleNamespace

    labels = [str(layer) for layer in range(np.asarray(grid.mean).shape[0])]
    names = [k for k in ("mean", "std", "low", "high", "boot") if getattr(grid, k, None) is not None]
    if embed is None:
        return SimpleNamespace(**{k: np.asarray(getattr(grid, k)) for k in names}), labels
    names = [k for k in names if getattr(embed, k, None) is not None]
    rows = {
        k: np.concatenate([np.asarray(getattr(embed, k)), np.asarray(getattr(grid, k))], axis=int(k == "boot"))
        for k in names  # boot is [replicates, rows, positions]
    }
    return SimpleNamespace(**rows), [EMBED_ROW] + labels


def write_heatmap_csv(grid, positions, path, row_labels=None) -> None:
    """Long format, one row per cell: layer (a number, or "embed" for the input embedding, first), token (position
    name), auc_mean, auc_std, and auc_low, auc_high (the 95 % interval) when the grid has them."""
    mean = _check_shape(grid.mean, positions, "grid.mean")
    std = _check_shape(grid.std, positions, "grid.std")
    labels = list(range(mean.shape[0])) if row_labels is None else list(row_labels)
    bounds = [_check_shape(getattr(grid, k), positions, f"grid.{k}") for k in ("low", "high")
              if getattr(grid, k, None) is not None]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer", "token", "auc_mean", "auc_std"] + (["auc_low", "auc_high"] if bounds else []))
            for layer, label in enumerate(labels):
                for j, position in enumerate(positions):
                    extra = [f"{b[layer, j]:.6f}" for b in bounds]
                    out.writerow([label, position, f"{mean[layer, j]:.6f}", f"{std[layer, j]:.6f}", *extra])

    write_atomic(Path(path), write)


def write_selectivity_csv(selectivity: dict, positions, path, row_labels) -> None:
    """One row per cell: layer, token, selectivity (AUC minus the best control's), its 95 % interval, and
    clears_control (the cell's AUC interval lies above the control's AUC), from controls.selectivity."""
    mean = _check_shape(selectivity["mean"], positions, "selectivity")
    extra = [k for k in ("low", "high", "clears") if k in selectivity]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            names = {"low": "selectivity_low", "high": "selectivity_high", "clears": "clears_control"}
            out.writerow(["layer", "token", "selectivity", *(names[k] for k in extra), "control"])
            for i, label in enumerate(row_labels):
                for j, position in enumerate(positions):
                    values = [selectivity[k][i, j] for k in extra]
                    cells = [str(bool(v)).lower() if k == "clears" else f"{v:.6f}" for k, v in zip(extra, values)]
                    out.writerow([label, position, f"{mean[i, j]:.6f}", *cells, selectivity["control"]])

    write_atomic(Path(path), write)


def top_cells(grid, positions, k=5, control_auc=None) -> list[dict]:
    """The k cells of highest mean AUC, best first (ties: lower layer, then earlier position).

    With the grid's interval (low, high) each cell also gets auc_low and auc_high; with control_auc (the best
    text-only control's AUC) its selectivity and beats_control (its interval lies above that AUC)."""
    mean = _check_shape(grid.mean, positions, "grid.mean")
    std = _check_shape(grid.std, positions, "grid.std")
    low, high = getattr(grid, "low", None), getattr(grid, "high", None)
    order = np.argsort(-mean, axis=None, kind="stable")[:k]
    cells = []
    for flat in order:
        layer, j = np.unravel_index(flat, mean.shape)
        cell = {
            "layer": int(layer),
            "token": str(positions[j]),
            "auc_mean": float(mean[layer, j]),
            "auc_std": float(std[layer, j]),
        }
        if low is not None and high is not None:
            cell |= {"auc_low": float(low[layer, j]), "auc_high": float(high[layer, j])}
        if control_auc is not None and np.isfinite(control_auc):
            cell["selectivity"] = float(mean[layer, j] - control_auc)
            if "auc_low" in cell:
                cell["beats_control"] = bool(cell["auc_low"] > control_auc)
        cells.append(cell)
    return cells


def write_top_cells(grid, positions, path, k=5, control_auc=None) -> list[dict]:
    """Write top_cells(grid, positions, k, control_auc) as a JSON list; return it."""
    cells = top_cells(grid, positions, k, control_auc)
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
