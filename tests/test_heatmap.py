import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from truthmap.errors import ProbeError
from truthmap.analysis.heatmap import TOKEN_LABELS, plot_heatmap, top_cells, write_heatmap_csv, write_top_cells
from truthmap.rundir import POSITIONS

LAYERS = 6


def make_grid():
    """mean[layer, j] = 0.5 + layer / 20 + j / 1000: unique values, best at the top layer, last position."""
    layers, cols = np.meshgrid(np.arange(LAYERS), np.arange(len(POSITIONS)), indexing="ij")
    mean = 0.5 + layers / 20 + cols / 1000
    return SimpleNamespace(mean=mean, std=mean / 100)


def test_token_labels_cover_every_position():
    assert set(TOKEN_LABELS) == set(POSITIONS)
    labels = [TOKEN_LABELS[p] for p in POSITIONS]
    assert len(set(labels)) == len(labels)
    assert all(len(label) <= 12 for label in labels)
    assert TOKEN_LABELS["last_q"] == "last q"
    assert TOKEN_LABELS["-1"] == "end \N{MINUS SIGN}1"


def test_plot_heatmap_writes_png_and_svg_with_layer_0_at_the_bottom(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imread

    mean = np.full((LAYERS, len(POSITIONS)), 0.5)
    mean[0] = 1.0  # layer 0 dark blue, all others white
    png, svg = tmp_path / "heatmap.png", tmp_path / "heatmap.svg"
    fig = plot_heatmap(mean, POSITIONS, "smollm2 / triviaqa: error probe AUC", png, svg)

    assert imread(png).ndim == 3
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.png", "heatmap.svg"]  # no temp files left

    ax, colorbar_ax = fig.axes
    image = ax.images[0]
    assert image.get_cmap().name == "Blues"
    assert image.get_clim() == (0.5, 1.0)
    assert colorbar_ax.get_ylabel() == "AUC"
    assert ax.get_title() == "smollm2 / triviaqa: error probe AUC"
    assert [t.get_text() for t in ax.get_xticklabels()] == [TOKEN_LABELS[p] for p in POSITIONS]
    assert all(t.get_rotation() == 60 for t in ax.get_xticklabels())
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(layer) for layer in range(LAYERS)]

    # In the rendered pixels, the dark row (layer 0) is the bottom row of cells.
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)  # [rows from the top, cols, rgb]
    height = pixels.shape[0]

    def brightness(layer):
        x, y = ax.transData.transform((len(POSITIONS) // 2, layer))  # display coordinates, y up
        return pixels[int(height - y), int(x)].sum()

    assert brightness(0) < brightness(1) == brightness(LAYERS - 1)
    assert ax.transData.transform((0, 0))[1] < ax.transData.transform((0, LAYERS - 1))[1]


def test_plot_heatmap_overwrites_and_checks_shape(tmp_path):
    png, svg = tmp_path / "h.png", tmp_path / "h.svg"
    png.write_text("old")
    plot_heatmap(make_grid().mean, POSITIONS, "t", png, svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ProbeError, match=r"mean has shape \(6, 15\) but there are 14 positions"):
        plot_heatmap(make_grid().mean, POSITIONS[:-1], "t", png, svg)


def test_write_heatmap_csv(tmp_path):
    grid = make_grid()
    path = tmp_path / "heatmap.csv"
    write_heatmap_csv(grid, POSITIONS, path)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["layer", "token", "auc_mean", "auc_std"]
    assert len(rows) == LAYERS * len(POSITIONS)
    assert rows[0]["layer"] == "0" and rows[0]["token"] == "last_q"
    assert rows[-1]["layer"] == str(LAYERS - 1) and rows[-1]["token"] == "-1"
    for row in rows:
        j = POSITIONS.index(row["token"])
        assert float(row["auc_mean"]) == pytest.approx(grid.mean[int(row["layer"]), j], abs=1e-6)
        assert float(row["auc_std"]) == pytest.approx(grid.std[int(row["layer"]), j], abs=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["heatmap.csv"]


def test_top_cells_and_json(tmp_path):
    grid = make_grid()
    best = top_cells(grid, POSITIONS, k=3)
    assert [(c["layer"], c["token"]) for c in best] == [(5, "-1"), (5, "-2"), (5, "-3")]
    assert best[0]["auc_mean"] == pytest.approx(grid.mean[5, -1])
    assert best[0]["auc_std"] == pytest.approx(grid.std[5, -1])
    assert all(isinstance(c["layer"], int) and isinstance(c["auc_mean"], float) for c in best)
    assert len(top_cells(grid, POSITIONS)) == 5

    path = tmp_path / "top_cells.json"
    assert write_top_cells(grid, POSITIONS, path, k=3) == best
    assert json.loads(path.read_text()) == best


def grid_with_interval():
    grid = make_grid()
    return SimpleNamespace(mean=grid.mean, std=grid.std, low=grid.mean - 0.05, high=grid.mean + 0.05,
                           boot=np.repeat(grid.mean[None], 4, axis=0))


def test_embedding_row_sits_below_layer_0_in_the_csv_and_the_figure(tmp_path):
    from truthmap.analysis.heatmap import EMBED_ROW, with_embedding

    grid = grid_with_interval()
    embed = SimpleNamespace(mean=np.full((1, len(POSITIONS)), 0.55), std=np.zeros((1, len(POSITIONS))),
                            low=np.full((1, len(POSITIONS)), 0.5), high=np.full((1, len(POSITIONS)), 0.6),
                            boot=np.full((4, 1, len(POSITIONS)), 0.55))
    rows, labels = with_embedding(grid, embed)
    assert labels == [EMBED_ROW] + [str(layer) for layer in range(LAYERS)] and EMBED_ROW == "embed"
    assert rows.mean.shape == (LAYERS + 1, len(POSITIONS)) and rows.boot.shape == (4, LAYERS + 1, len(POSITIONS))
    np.testing.assert_array_equal(rows.mean[1:], grid.mean)

    write_heatmap_csv(rows, POSITIONS, tmp_path / "heatmap.csv", labels)
    lines = list(csv.DictReader((tmp_path / "heatmap.csv").open()))
    assert list(lines[0]) == ["layer", "token", "auc_mean", "auc_std", "auc_low", "auc_high"]
    assert lines[0]["layer"] == "embed" and lines[len(POSITIONS)]["layer"] == "0"
    assert float(lines[0]["auc_low"]) == pytest.approx(0.5)

    marked = np.zeros(rows.mean.shape, dtype=bool)
    marked[0] = True  # the embedding row does not clear the control
    png, svg = tmp_path / "h.png", tmp_path / "h.svg"
    fig = plot_heatmap(rows.mean, POSITIONS, "t", png, svg, labels, marked=marked, note="· n")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["embed", "0"]
    assert ax.get_title() == "t\n· n"
    dots = ax.collections[0].get_offsets()
    assert len(dots) == len(POSITIONS) and set(np.asarray(dots)[:, 1]) == {0}  # dots on the bottom row only


def test_selectivity_map_is_diverging_and_centred_on_zero(tmp_path):
    from truthmap.analysis.heatmap import write_selectivity_csv

    values = np.linspace(-0.2, 0.4, LAYERS * len(POSITIONS)).reshape(LAYERS, len(POSITIONS))
    fig = plot_heatmap(values, POSITIONS, "s", tmp_path / "s.png", tmp_path / "s.svg", diverging=True)
    image = fig.axes[0].images[0]
    assert image.get_cmap().name == "RdBu_r" and image.get_clim() == pytest.approx((-0.4, 0.4))
    assert fig.axes[1].get_ylabel() == "AUC minus best text control"

    sel = {"control": "text_answer", "mean": values, "low": values - 0.1, "high": values + 0.1, "clears": values > 0.1}
    write_selectivity_csv(sel, POSITIONS, tmp_path / "selectivity.csv", [str(i) for i in range(LAYERS)])
    lines = list(csv.DictReader((tmp_path / "selectivity.csv").open()))
    assert list(lines[0]) == ["layer", "token", "selectivity", "selectivity_low", "selectivity_high", "clears_control",
                              "control"]
    assert lines[0]["clears_control"] == "false" and lines[-1]["clears_control"] == "true"
    assert float(lines[-1]["selectivity"]) == pytest.approx(0.4) and lines[0]["control"] == "text_answer"


def test_top_cells_give_the_interval_and_the_selectivity():
    grid = grid_with_interval()  # best cell 0.764, interval [0.714, 0.814]
    best = top_cells(grid, POSITIONS, k=2, control_auc=0.70)
    assert best[0]["auc_low"] == pytest.approx(0.714) and best[0]["auc_high"] == pytest.approx(0.814)
    assert best[0]["selectivity"] == pytest.approx(0.064) and best[0]["beats_control"] is True
    assert top_cells(grid, POSITIONS, k=1, control_auc=0.72)[0]["beats_control"] is False  # interval reaches 0.72
    assert "selectivity" not in top_cells(grid, POSITIONS, k=1)[0]
