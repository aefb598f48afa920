"""Sampling baselines (sampling_baselines.py): entropies of hand-made clusters, clustering by the alias rule, and
the sampled answers of `truthmap resample` reused, not generated again."""

import math

import numpy as np
import pandas as pd
import pytest

from truthmap import pipeline
from truthmap.runner import resample as resampling
from truthmap.datasets.rules import RULES
from truthmap.analysis.sampling_baselines import (
    SAMPLING_NAMES,
    cluster,
    discrete_entropy,
    question_scores,
    rule_match,
    sampling_results,
    sampling_scores,
    weighted_entropy,
)

K = 3


def test_discrete_entropy_of_hand_made_clusters():
    assert discrete_entropy([0] * 10) == 0.0  # one cluster
    assert discrete_entropy(list(range(10))) == pytest.approx(math.log(10))  # all distinct
    assert discrete_entropy([0, 0, 1, 1]) == pytest.approx(math.log(2))
    # shares 1/2, 1/4, 1/4: 1/2 log 2 + 2 * 1/4 log 4 = 1.5 log 2
    assert discrete_entropy([0, 1, 0, 2]) == pytest.approx(1.5 * math.log(2))


def test_weighted_entropy_weighs_clusters_by_likelihood():
    assert weighted_entropy([0, 0, 0], [-0.1, -5.0, -2.0]) == 0.0
    # two clusters of equal summed probability: log 2, whatever their sizes
    half = math.log(0.5)
    assert weighted_entropy([0, 1, 1], [half, half - math.log(2), half - math.log(2)]) == pytest.approx(math.log(2))
    # probabilities 0.9 and 0.1 (one answer each): the binary entropy of 0.1
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert weighted_entropy([0, 1], [math.log(0.9), math.log(0.1)]) == pytest.approx(expected)
    # log-probabilities far below exp's range still give the normalised weights
    assert weighted_entropy([0, 1], [-2000.0, -2000.0]) == pytest.approx(math.log(2))


def test_alias_rule_joins_answers_that_name_the_same_thing():
    texts = ["Paris", "the city of Paris", "paris.", "Lyon", "The Paris", "Marseille", "lyon"]
    assert cluster(texts) == [0, 1, 0, 2, 0, 3, 2]  # normalised text alone: "the city of paris" stands apart
    assert cluster(texts, rule_match(RULES["alias_substring"])) == [0, 0, 0, 1, 0, 2, 1]


def test_a_number_rule_that_cannot_read_a_word_does_not_match():
    same = rule_match(RULES["math_number"])
    assert same("42", "It is 42.") and not same("forty", "It is 42.")


def test_question_scores_of_a_constructed_case():
    same = rule_match(RULES["alias_substring"])
    scores = question_scores("Paris", ["Paris, France", "Lyon", "paris", "Nice"], [-0.1, -1.0, -0.2, -3.0], same)
    assert scores["distinct_answers"] == 3
    assert scores["semantic_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert scores["self_consistency"] == pytest.approx(0.5)  # 1 - 2 of 4 samples in the greedy answer's cluster
    weights = np.array([math.exp(-0.1) + math.exp(-0.2), math.exp(-1.0), math.exp(-3.0)])
    p = weights / weights.sum()
    assert scores["semantic_entropy_weighted"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_sampling_scores_reads_exact_answers_refusals_and_whole_answers():
    greedy = pd.DataFrame({"id": ["q1"], "exact_answer_source": ["extracted"], "exact_answer_valid": [True],
                           "exact_answer": ["Oslo"], "answer": ["It is Oslo."]})
    answers = pd.DataFrame({
        "id": ["q1"] * 3, "sample": [2, 0, 1],
        "exact_answer_source": ["no_answer", "extracted", "not_found"],
        "exact_answer_valid": [False, True, False], "exact_answer": ["", "oslo", ""],
        "answer": ["I don't know.", "Oslo!", "Hmm, hard to say"],
        "answer_logprobs": [[-1.0], [-0.5, -0.5], [-2.0]],
    })
    scores = sampling_scores(greedy, answers)
    assert list(scores.columns) == ["id", *SAMPLING_NAMES]
    assert scores.iloc[0]["distinct_answers"] == 3 and scores.iloc[0]["self_consistency"] == pytest.approx(2 / 3)


def test_the_answers_of_resample_are_reused_not_generated_again(greedy_run, tiny, monkeypatch):
    pipeline.resample(greedy_run, n_resamples=K, temperature=1.0, seed=0, lm=tiny, layer=1, token="-1")
    written = pd.read_parquet(pipeline.run_dir(greedy_run).resample_files.answers)
    real, calls = resampling.generate_batch, []

    def spy(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(resampling, "generate_batch", spy)
    row = {"dataset": "custom", "method": "Logits-mean", "n_train": 0, "n_test": 0, "test_errors": 0}
    rows = resampling.sampling_rows(greedy_run, [row], K, 1.0, lambda: tiny)
    assert calls == []
    assert [r["method"] for r in rows] == list(SAMPLING_NAMES.values())
    assert all(r["cost"]["generations"] == K and r["temperature"] == 1.0 for r in rows)
    questions = written["id"].nunique()
    assert rows[0]["cost"]["generated_tokens"] == pytest.approx(written["answer_ids"].map(len).sum() / questions,
                                                                abs=0.05)
    assert rows[0]["cost"]["seconds"] > 0
    assert all(0 <= r["auc_mean"] <= 1 for r in rows if np.isfinite(r["auc_mean"]))
    # killed after sampling, before answers.parquet: the checkpoints give the same answers, nothing is generated
    files = pipeline.run_dir(greedy_run).resample_files
    files.answers.unlink()
    files.state.unlink()
    again = resampling.sampling_rows(greedy_run, [row], K, 1.0, lambda: tiny)
    assert calls == [] and [r["auc_mean"] for r in again] == [r["auc_mean"] for r in rows]
    pd.testing.assert_frame_equal(pd.read_parquet(files.answers), written)


def test_sampling_rows_carry_the_field_metrics_of_their_scores():
    """Each sampling row holds AUPRC, PRR, FPR@95 and AURC of its own scores, as metrics.py computes them."""
    from types import SimpleNamespace

    from truthmap.analysis.metrics import all_metrics

    ids = [f"q{i}" for i in range(8)]
    is_error = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    scores = pd.DataFrame({"id": ids, **{column: np.arange(8.0)[::-1] if column == "semantic_entropy" else np.arange(8.0)
                                         for column in SAMPLING_NAMES}})
    rows = sampling_results(scores, SimpleNamespace(ids=ids, is_error=is_error), {"dataset": "toy"})
    entropy = next(r for r in rows if r["method"] == SAMPLING_NAMES["semantic_entropy"])
    expected = all_metrics(is_error, np.arange(8.0)[::-1])
    assert entropy["auc_mean"] == pytest.approx(expected["auroc"])
    for name in ("auprc", "prr", "fpr_at_95_recall", "aurc"):
        assert entropy[name] == pytest.approx(expected[name]), name
