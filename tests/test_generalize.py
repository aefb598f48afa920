"""Cross-dataset generalization on runs with known error directions."""

import numpy as np
import pandas as pd
import pytest

from test_detection import SIGNAL_LAYER, SIGNAL_POSITION, fake_run
from truthmap.analysis.generalize import generalization

HIDDEN = 6


def runs_with_directions(root, directions: dict[str, int]):
    runs = {}
    for k, (name, axis) in enumerate(directions.items()):
        direction = np.eye(HIDDEN)[axis]
        train, _ = fake_run(root, "train", 600, 10 * k, direction, dataset=name)
        test, _ = fake_run(root, "test", 100, 10 * k + 1, direction, dataset=name)
        runs[name] = (train, test)
    return runs


def test_shared_direction_transfers_and_orthogonal_does_not(tmp_path):
    runs = runs_with_directions(tmp_path, {"a": 0, "b": 0, "c": 1})
    result = generalization(runs, "mlp", SIGNAL_POSITION, (0, 5, 26), tmp_path / "out")
    auc = result["auc_table"]
    assert list(auc.index) == ["a", "b", "c"] and list(auc.columns) == ["a", "b", "c"]
    assert auc.loc["a", "a"] > 0.9 and auc.loc["a", "b"] > 0.9 and auc.loc["b", "a"] > 0.9
    assert 0.4 <= auc.loc["a", "c"] <= 0.6 and 0.4 <= auc.loc["c", "a"] <= 0.6
    assert auc.loc["c", "c"] > 0.9
    baseline = pd.read_json(tmp_path / "out" / "generalization.json", typ="series")["baseline_auc"]
    relative = pd.read_csv(tmp_path / "out" / "auc_minus_baseline.csv", index_col=0)
    assert relative.loc["a", "c"] == pytest.approx(auc.loc["a", "c"] - baseline["c"], abs=1e-4)
    assert pd.read_json(tmp_path / "out" / "generalization.json", typ="series")["layers"]["a"] == [SIGNAL_LAYER] * 3
    for stem in ("auc", "auc_minus_baseline", "auc_minus_control"):
        assert (tmp_path / "out" / f"{stem}.png").stat().st_size > 1000
    controls = pd.read_csv(tmp_path / "out" / "text_controls.csv")
    assert set(controls["control"]) == {"text_exact_answer", "text_answer", "text_question"}
    assert controls["auc"].between(0.3, 0.7).all()  # the fake runs' words are drawn at random
    best = controls.groupby(["train_on", "test_on"])["auc"].max()
    minus = pd.read_csv(tmp_path / "out" / "auc_minus_control.csv", index_col=0)
    assert minus.loc["a", "b"] == pytest.approx(auc.loc["a", "b"] - best[("a", "b")], abs=1e-4)


def test_a_control_transfers_what_the_words_carry(tmp_path):
    runs = {}
    for k, name in enumerate(["a", "b"]):
        train, _ = fake_run(tmp_path, "train", 300, 10 * k, dataset=name, text_signal=True)
        test, _ = fake_run(tmp_path, "test", 100, 10 * k + 1, dataset=name, text_signal=True)
        runs[name] = (train, test)
    result = generalization(runs, "mlp", SIGNAL_POSITION, (0, 5), tmp_path / "out")
    controls = pd.read_csv(tmp_path / "out" / "text_controls.csv").set_index(["control", "train_on", "test_on"])
    assert controls.loc[("text_exact_answer", "a", "b"), "auc"] > 0.95
    assert result["control_table"].abs().max().max() < 0.1  # the probe transfers no more than the words do


def test_a_dataset_without_enough_errors_leaves_its_row_and_column_blank(tmp_path):
    runs = runs_with_directions(tmp_path, {"a": 0, "b": 0})
    train, _ = fake_run(tmp_path, "train", 200, 7, error_rate=0.0, dataset="none")
    test, _ = fake_run(tmp_path, "test", 50, 8, error_rate=0.0, dataset="none")
    runs["none"] = (train, test)
    result = generalization(runs, "mlp", SIGNAL_POSITION, (0, 5), tmp_path / "out")
    auc = result["auc_table"]
    assert auc.loc["none"].isna().all() and auc["none"].isna().all()
    assert auc.loc["a", "b"] > 0.9
    assert "Too few errors" in result["blank"]["train on none"] and "one class only" in result["blank"]["test on none"]
