"""Text-only controls, selectivity and the bootstrap intervals, on constructed data."""

from types import SimpleNamespace

import numpy as np
import pytest

from truthmap.analysis.controls import (
    CONTROLS,
    CONTROL_C,
    best_control,
    control_grid,
    control_scores,
    selectivity,
    transfer_control_aucs,
    verdict,
)
from truthmap.analysis.evaluation import (
    auc_rows,
    bootstrap_aucs,
    bootstrap_weights,
    interval,
    split_masks,
    weighted_aucs,
)
from truthmap.analysis.probes import probe_grid

SEEDS = (0, 5, 26)
WORDS = ["Paris", "Oslo", "Lima", "Rome", "Bern", "Kyiv", "Riga", "Baku", "Doha", "Male"]


@pytest.fixture(params=[0, 1])
def seed(request):
    return request.param


def constructed(seed, n=300, label_in_text=True):
    """Rows with an answer naming a city and activations [n, 2 layers, 3 positions, 16].

    label_in_text: the answer is wrong exactly when its city is one of the first three, and the activations carry
    that city too (a one-hot of it in the first 10 dims, plus noise): the probe reads nothing the words do not give.
    Otherwise: cities are drawn independently of the label, which lives only in a hidden direction (dim 12)."""
    rng = np.random.default_rng(seed)
    city = rng.integers(0, len(WORDS), n)
    is_error = city < 3 if label_in_text else rng.random(n) < 0.3
    acts = rng.normal(size=(n, 2, 3, 16))
    acts[np.arange(n), :, :, city] += 6.0  # the city, in every cell
    if not label_in_text:
        acts[:, :, :, 12] += 2.5 * is_error[:, None, None]  # the label, along a direction no text shows
    texts = {
        "text_exact_answer": [WORDS[c] for c in city],
        "text_answer": [f"The capital is {WORDS[c]}, I think." for c in city],
        "text_question": [f"Question {rng.integers(0, 1000)}: which capital?" for _ in range(n)],
    }
    return acts, is_error, texts


def grid_and_controls(acts, is_error, texts):
    grid = probe_grid(acts, is_error, seeds=SEEDS, progress=False, threads=1)
    train = split_masks(len(is_error), None, SEEDS, is_error)
    controls = control_grid(texts, is_error, train, bootstrap_weights(is_error))
    return grid, controls


def test_label_from_a_word_the_control_finds_it_and_selectivity_is_near_zero(seed):
    acts, is_error, texts = constructed(seed, label_in_text=True)
    grid, controls = grid_and_controls(acts, is_error, texts)
    assert controls["text_exact_answer"]["auc_mean"] > 0.95 and controls["text_answer"]["auc_mean"] > 0.95
    assert abs(controls["text_question"]["auc_mean"] - 0.5) < 0.15  # the question says nothing
    assert best_control(controls) in ("text_exact_answer", "text_answer")
    sel = selectivity(grid, controls)
    assert grid.mean.min() > 0.9  # the probe reads the city too ...
    assert np.abs(sel["mean"]).max() < 0.06  # ... and no more than the words give away
    assert not sel["clears"].any()  # no cell's interval lies above the control
    assert (sel["low"] <= sel["mean"] + 1e-9).all() and (sel["mean"] <= sel["high"] + 1e-9).all()


def test_label_in_a_hidden_direction_the_control_is_at_chance(seed):
    acts, is_error, texts = constructed(seed, n=400, label_in_text=False)
    grid, controls = grid_and_controls(acts, is_error, texts)
    for name in CONTROLS:
        assert abs(controls[name]["auc_mean"] - 0.5) < 0.1, (name, controls[name]["auc_mean"])
        low, mean, high = (controls[name][k] for k in ("auc_low", "auc_mean", "auc_high"))
        assert low < 0.5 < high or abs(mean - 0.5) < 0.05
    sel = selectivity(grid, controls)
    assert grid.mean.min() > 0.9 and sel["mean"].min() > 0.3 and sel["clears"].all() and (sel["low"] > 0).all()
    best = {"layer": 0, "token": "last_q", "auc_mean": float(grid.mean[0, 0]),
            "auc_low": float(grid.low[0, 0]), "auc_high": float(grid.high[0, 0])}
    assert "the probe beats it" in verdict(best, controls, "constructed")


def test_controls_use_the_probe_splits_and_score_held_out_rows_only():
    acts, is_error, texts = constructed(0, n=120)
    train = split_masks(len(is_error), None, SEEDS, is_error)
    from truthmap.analysis.evaluation import grouped_split

    for s, seed in enumerate(SEEDS):  # the very splits of probe_grid
        expected = grouped_split(120, None, 0.2, seed, stratify=is_error)[0]
        np.testing.assert_array_equal(np.flatnonzero(train[s]), expected)
    controls = control_grid(texts, is_error, train)  # no weights: no interval
    assert "auc_low" not in controls["text_answer"] and len(controls["text_answer"]["aucs"]) == len(SEEDS)


def test_a_control_that_cannot_be_fitted_is_blank_with_a_note():
    is_error = np.array([True, False] * 20)
    train = split_masks(40, None, (0,), is_error)
    texts = {"text_exact_answer": [""] * 40, "text_answer": ["a b"] * 20 + ["c d"] * 20}
    controls = control_grid(texts, is_error, train)
    empty = controls["text_exact_answer"]
    assert np.isnan(empty["auc_mean"]) and "empty vocabulary" in empty["note"]
    assert best_control(controls) == "text_answer"


def test_control_scores_equal_the_scikit_learn_pipeline_fitted_on_each_split():
    """Counting each text's n-grams once must give what a TfidfVectorizer union fitted per split gives: the split's
    own vocabulary and idf, n-grams seen only in other rows or in the scored texts ignored."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    rng = np.random.default_rng(0)
    words = WORDS + ["Zürich", "São Paulo", "N'Djamena", "x-ray", "42"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(120)]
    is_error = rng.random(120) < 0.4
    others = ["Quito and Accra", "Paris, Lima", "", "ünïcode 7"]  # n-grams that no fitted row has
    masks = split_masks(120, None, SEEDS, is_error)
    ours = control_scores(texts, is_error, masks, score_texts=others + texts)
    for s, mask in enumerate(masks):
        reference = make_pipeline(
            make_union(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
                       TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True,
                                       token_pattern=r"(?u)\b\w+\b")),
            LogisticRegression(C=CONTROL_C, max_iter=1000),
        ).fit([t for t, m in zip(texts, mask) if m], is_error[mask])
        np.testing.assert_allclose(ours[s], reference.decision_function(others + texts), rtol=1e-6, atol=1e-6)


def test_transfer_control_trains_on_one_set_and_scores_another():
    _, y_train, train_texts = constructed(0, n=200)
    _, y_test, test_texts = constructed(1, n=100)
    masks = split_masks(200, None, SEEDS, y_train)
    aucs = transfer_control_aucs("text_exact_answer", train_texts["text_exact_answer"], y_train, masks,
                                 test_texts["text_exact_answer"], y_test)
    assert len(aucs) == len(SEEDS) and min(aucs) > 0.95


# ------------------------------------------------------------------------------------------------ the bootstrap


def test_weighted_auc_equals_the_auc_of_the_repeated_rows(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(60) < 0.3
    scores = np.round(rng.normal(size=(4, 60)), 1)  # ties, within and across classes
    np.testing.assert_allclose(weighted_aucs(scores, y, np.ones((1, 60)))[0], auc_rows(scores, y), atol=1e-6)
    counts = rng.integers(0, 3, size=60)
    repeated = np.repeat(np.arange(60), counts)
    np.testing.assert_allclose(
        weighted_aucs(scores, y, counts[None].astype(float))[0], auc_rows(scores[:, repeated], y[repeated]), atol=1e-6
    )


def test_bootstrap_weights_redraw_each_class_from_itself():
    y = np.array([True] * 7 + [False] * 33)
    w = bootstrap_weights(y, n_boot=200, seed=3)
    assert w.shape == (200, 40)
    assert (w[:, y].sum(1) == 7).all() and (w[:, ~y].sum(1) == 33).all()
    np.testing.assert_array_equal(w, bootstrap_weights(y, n_boot=200, seed=3))  # the probes and controls share it


def test_intervals_cover_the_point_and_narrow_with_more_rows():
    widths = []
    for n in (100, 1600):
        rng = np.random.default_rng(0)
        y = rng.random(n) < 0.3
        scores = (y + rng.normal(scale=1.2, size=n))[None, None, :].repeat(2, axis=1)  # [1 cell, 2 seeds, n]
        train = split_masks(n, None, (0, 1), y)
        boot = bootstrap_aucs(scores, y, train, bootstrap_weights(y))
        low, high = interval(boot)
        point = np.mean([auc_rows(scores[:, s, ~m], y[~m])[0] for s, m in enumerate(train)])
        assert low[0] < point < high[0]
        widths.append(high[0] - low[0])
    assert widths[1] < widths[0] / 2.5  # 16x the rows: about a quarter of the width


def test_verdict_without_intervals_and_without_controls():
    best = {"layer": 3, "token": "exact_answer_last", "auc_mean": 0.8}
    assert verdict(best, {}) == "best cell layer 3, exact_answer_last, AUC 0.800; no text-only control could be fitted."
    controls = {"text_answer": {"label": "Text @ answer", "auc_mean": 0.7}}
    assert verdict(best, controls, "d").endswith("selectivity +0.100 (no interval).")


def test_selectivity_of_a_grid_without_replicates_has_no_interval():
    grid = SimpleNamespace(mean=np.full((2, 3), 0.8), std=np.zeros((2, 3)))
    sel = selectivity(grid, {"a": {"label": "A", "auc_mean": 0.6}, "b": {"label": "B", "auc_mean": float("nan")}})
    assert sel["control"] == "a" and np.allclose(sel["mean"], 0.2) and "low" not in sel and "clears" not in sel


def test_probe_outputs_without_an_embedding_store(tmp_path):
    """A store extracted before the embedding row: the heatmap and CSVs go without it, the rest is written."""
    import pandas as pd

    from truthmap.runner.probing import write_probe_outputs

    acts, is_error, texts = constructed(0, n=120, label_in_text=False)
    grid, controls = grid_and_controls(acts, is_error, texts)
    positions = 15  # the pipeline's POSITIONS: pad the constructed 3 positions out to 15
    pad = lambda a, axis=-1: np.concatenate([a] * 5, axis=axis)  # noqa: E731
    grid = SimpleNamespace(mean=pad(grid.mean), std=pad(grid.std), low=pad(grid.low), high=pad(grid.high),
                           boot=pad(grid.boot))
    summary = write_probe_outputs(tmp_path, grid, None, controls, "t", "constructed")
    assert summary["embedding_best"] is None and summary["verdict"].startswith("constructed: best cell layer")
    cells = pd.read_csv(tmp_path / "heatmap.csv", dtype={"layer": str})
    assert list(cells["layer"].unique()) == ["0", "1"] and len(cells) == 2 * positions
    assert len(pd.read_csv(tmp_path / "selectivity.csv")) == 2 * positions
    assert (tmp_path / "selectivity.png").exists() and (tmp_path / "top_cells.json").exists()
