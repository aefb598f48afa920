"""The fair verdict (verdict.py) on constructed scores and on constructed activations."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from truthmap.analysis.verdict import MIN_TEST_PER_CLASS, Family, fair_verdict, run_verdict


@pytest.fixture(params=[0, 1])
def seed(request):
    return request.param


def rows(seed, n=400, errors=200):
    """Labels [n] (errors first, shuffled), one split: the first half of a permutation trains, the rest tests."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=bool)
    y[rng.permutation(n)[:errors]] = True
    train = np.zeros((1, n), dtype=bool)
    train[0, rng.permutation(n)[: n // 2]] = True
    return rng, y, train


def scored(rng, y, signal):
    """Error scores whose AUC grows with signal."""
    return signal * y + rng.normal(size=y.size)


def test_the_cell_is_chosen_on_validation_not_on_test_rows(seed):
    rng, y, train = rows(seed)
    steady, lucky = scored(rng, y, 1.0), scored(rng, y, 3.0)  # lucky wins on the test rows by far
    probe = Family("probe", "Probe", ["layer 4, -1", "layer 9, -2"], np.array([[0.80, 0.70]]),
                   np.stack([steady, lucky])[:, None])
    control = Family("text_answer", "Text @ answer", ["Text @ answer"], np.array([[0.60]]), scored(rng, y, 0.5)[None, None])
    v = fair_verdict(y, train, probe, [control], "constructed")
    test = ~train[0]
    assert roc_auc_score(y[test], lucky[test]) > roc_auc_score(y[test], steady[test]) + 0.1
    assert v["probe"]["cell"] == "layer 4, -1" and v["probe"]["validation_auc"] == 0.8
    assert v["probe"]["auc_mean"] == round(roc_auc_score(y[test], steady[test]), 4)
    gap = roc_auc_score(y[test], steady[test]) - roc_auc_score(y[test], control.scores[0, 0, test])
    assert v["difference"]["mean"] == round(gap, 4)
    assert v["difference"]["low"] <= v["difference"]["mean"] <= v["difference"]["high"]
    assert "combined" not in v  # no out-of-fold scores given: no incremental question
    assert v["text"].startswith("constructed: probe at layer 4, -1 (chosen on validation rows of the train part)")


def test_the_embedding_row_is_a_control_and_can_be_the_bar(seed):
    rng, y, train = rows(seed)
    probe = Family("probe", "Probe", ["layer 1, -1"], np.array([[0.9]]), scored(rng, y, 2.0)[None, None])
    text = Family("text_answer", "Text @ answer", ["Text @ answer"], np.array([[0.6]]), scored(rng, y, 0.3)[None, None])
    embed = Family("input_embedding", "Input embedding", ["last_q", "exact_answer_last"], np.array([[0.65, 0.85]]),
                   np.stack([scored(rng, y, 0.1), scored(rng, y, 1.8)])[:, None])
    v = fair_verdict(y, train, probe, [text, embed], "d")
    assert v["bar"] == v["bar"] | {"name": "input_embedding", "label": "Input embedding", "member": "exact_answer_last"}
    assert set(v["controls"]) == {"text_answer", "input_embedding"}
    assert v["controls"]["input_embedding"]["validation_auc"] == 0.85
    test = ~train[0]
    assert v["bar"]["auc_mean"] == round(roc_auc_score(y[test], embed.scores[1, 0, test]), 4)
    assert "bar: Input embedding at exact_answer_last" in v["text"]


def test_too_few_test_errors_is_too_small_to_conclude():
    rng, y, train = rows(0, n=200, errors=24)
    test_errors = int(y[~train[0]].sum())
    assert test_errors < MIN_TEST_PER_CLASS
    probe = Family("probe", "Probe", ["layer 1, -1"], np.array([[0.9]]), scored(rng, y, 3.0)[None, None])
    text = Family("text_answer", "Text @ answer", ["Text @ answer"], np.array([[0.6]]), scored(rng, y, 0.0)[None, None])
    v = fair_verdict(y, train, probe, [text])
    assert v["conclusion"] == "too small" and v["test_errors"] == test_errors
    assert (f"Verdict: too small to conclude: the test rows hold {test_errors} errors and "
            f"{int((~y[~train[0]]).sum())} right answers (need 20 of each; use more samples).") in v["text"]


def test_incremental_question_combines_out_of_fold_scores(seed):
    """Probe and control carry independent halves of the signal: together they beat the control alone."""
    rng = np.random.default_rng(seed)
    n = 600
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (a + b + 0.3 * rng.normal(size=n)) > 0
    train = np.zeros((1, n), dtype=bool)
    train[0, : n // 2] = True
    probe = Family("probe", "Probe", ["layer 1, -1"], np.array([[0.7]]), a[None, None], oof=a[None, None])
    control = Family("text_answer", "Text @ answer", ["Text @ answer"], np.array([[0.7]]), b[None, None],
                     oof=b[None, None])
    v = fair_verdict(y, train, probe, [control])
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = np.column_stack([a, b])
    scaler = StandardScaler().fit(X[: n // 2])
    model = LogisticRegression(C=1.0).fit(scaler.transform(X[: n // 2]), y[: n // 2])
    expected = roc_auc_score(y[n // 2 :], model.decision_function(scaler.transform(X[n // 2 :])))
    assert v["combined"]["auc_mean"] == round(expected, 4)
    assert v["gain"]["mean"] == round(expected - roc_auc_score(y[n // 2 :], b[n // 2 :]), 4)
    assert v["gain"]["low"] > 0 and "the probe adds to the bar" in v["text"]


def test_run_verdict_on_constructed_activations():
    """The label lives in a hidden direction that no text shows: the probe beats every control, the embedding
    row (which carries only the answer's city) among them."""
    from truthmap.rundir import POSITIONS

    rng = np.random.default_rng(0)
    n, words = 240, ["Paris", "Oslo", "Lima", "Rome", "Bern", "Kyiv"]
    city = rng.integers(0, len(words), n)
    correct = rng.random(n) < 0.5
    acts = rng.normal(size=(n, 2, len(POSITIONS), 8)).astype(np.float32)
    acts[:, 1, :, 3] += 3.0 * ~correct[:, None]
    embed = rng.normal(size=(n, 1, len(POSITIONS), 8)).astype(np.float32)
    embed[np.arange(n), 0, :, city % 8] += 4.0
    table = pd.DataFrame({"correct": correct, "group": [None] * n, "exact_answer": [words[c] for c in city],
                          "answer": [f"It is {words[c]}." for c in city], "question": ["Which city?"] * n})
    out = run_verdict(table, np.arange(n), acts, embed, (0, 5), "constructed")
    v = out["verdict_details"]
    assert set(v["controls"]) == {"text_exact_answer", "text_answer", "text_question", "input_embedding"}
    assert v["probe"]["cell"].startswith("layer 1,") and v["probe"]["auc_mean"] > 0.9
    assert v["conclusion"] == "beats" and out["verdict"] == v["text"]
    assert v["combined"]["auc_mean"] > v["bar"]["auc_mean"]


def test_probe_versus_a_baseline_is_paired_on_the_same_rows(seed):
    from truthmap.analysis.detection import best_probe_row
    from truthmap.analysis.verdict import probe_versus

    rng, y, _ = rows(seed)
    baseline = scored(rng, y, 1.0)
    same = probe_versus(np.stack([baseline, baseline]), baseline, y)
    assert same["difference"] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # paired: identical scores never differ
    better = scored(rng, y, 3.0)
    v = probe_versus(better[None], baseline, y)
    assert v["probe_auc"] == round(roc_auc_score(y, better), 4) and v["baseline_auc"] == round(roc_auc_score(y, baseline), 4)
    assert 0 < v["difference"]["low"] < v["difference"]["mean"] < v["difference"]["high"]
    table = [{"method": "Probe @ -1", "validation_auc": [0.7, 0.8], "auc_mean": 0.9},
             {"method": "Probe @ last_q", "validation_auc": [0.8, 0.8], "auc_mean": 0.6},
             {"method": "Text @ answer", "auc_mean": 0.99}, {"method": "Probe @ -2", "auc_mean": float("nan")}]
    assert best_probe_row(table)["method"] == "Probe @ last_q"  # validation, not the test AUC, picks the row
