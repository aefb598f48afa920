"""Answer selection on hand-made scores: each method picks the expected candidate; the report counts right."""

import math

import numpy as np
import pandas as pd
import pytest

from truthmap.analysis.error_types import ERROR_TYPES
from truthmap.errors import DataError
from truthmap.analysis.selection import (
    fold_of_groups,
    mean_logprob,
    out_of_fold_error_probabilities,
    pick_highest_logprob,
    pick_lowest_error,
    pick_majority,
    plot_selection,
    select_answers,
    selection_report,
)

NAN = math.nan


@pytest.mark.parametrize(
    "probabilities, expected",
    [([0.3, NAN, 0.1, 0.2], 2), ([0.3, 0.1, 0.1], 1), ([NAN, NAN], 0), ([NAN, 0.9], 1)],
)
def test_probe_picks_the_lowest_error_probability(probabilities, expected):
    assert pick_lowest_error(probabilities) == expected


@pytest.mark.parametrize(
    "exact_answers, expected",
    [
        (["Paris", "Lyon", "lyon.", None, "NO ANSWER", "NO ANSWER", "NO ANSWER"], 1),  # refusals do not vote
        (["Lyon", "Paris", "Paris", "Lyon"], 0),  # a tie: the group that comes first
        (["Lyon", "Paris", "the Paris"], 1),
        ([None, "NO ANSWER"], 0),  # nobody votes: the greedy answer
    ],
)
def test_majority_picks_the_first_member_of_the_largest_group(exact_answers, expected):
    assert pick_majority(exact_answers) == expected


def test_logprob_picks_the_highest_mean():
    assert mean_logprob([-1.0, -3.0]) == -2.0 and math.isnan(mean_logprob([]))
    assert pick_highest_logprob([-2.0, -0.5, NAN, -0.5]) == 1
    assert pick_highest_logprob([NAN]) == 0


def candidates_frame():
    """Two questions, a greedy answer (0) and three samples each."""
    rows = [
        # id, candidate, correct, error probability, exact answer, mean logprob
        ("q1", 0, False, 0.9, "Lyon", -0.2),
        ("q1", 1, True, 0.1, "Paris", -0.9),
        ("q1", 2, False, 0.8, "Lyon", -0.5),
        ("q1", 3, True, 0.3, "paris", -0.8),
        ("q2", 0, True, 0.2, "Rome", -1.0),
        ("q2", 1, False, 0.6, "Milan", -0.1),
        ("q2", 2, False, NAN, "Milan", -2.0),
        ("q2", 3, False, 0.7, None, -3.0),
    ]
    return pd.DataFrame(rows, columns=["id", "candidate", "correct", "error_probability", "exact_answer", "mean_logprob"])


def test_select_answers_on_hand_made_scores():
    chosen = select_answers(candidates_frame().sample(frac=1, random_state=0))  # any row order
    chosen = chosen.set_index("id")
    assert chosen.loc["q1", ["greedy_choice", "probe_choice", "majority_choice", "logprob_choice"]].tolist() == [0, 1, 0, 0]
    assert chosen.loc["q2", ["greedy_choice", "probe_choice", "majority_choice", "logprob_choice"]].tolist() == [0, 0, 1, 1]
    assert chosen.loc["q1", ["greedy", "probe", "majority", "logprob", "oracle"]].tolist() == [False, True, False, False, True]
    assert chosen.loc["q2", ["greedy", "probe", "majority", "logprob", "oracle"]].tolist() == [True, True, False, False, True]


def test_a_question_without_its_greedy_answer_is_refused():
    with pytest.raises(DataError, match="Question 'q1' has no greedy answer"):
        select_answers(candidates_frame().iloc[1:])


def test_report_overall_and_per_type(tmp_path):
    chosen = select_answers(candidates_frame())
    types = pd.DataFrame({"id": ["q1", "q2"]} | {name: [False, False] for name in ERROR_TYPES})
    types.loc[0, "two_competing_answers"] = True
    report = selection_report(chosen, types).set_index("group")
    assert report.loc["all", ["n", "greedy", "probe", "majority", "logprob", "oracle"]].tolist() == [2, 0.5, 1.0, 0.0, 0.0, 1.0]
    assert report.loc["two_competing_answers", ["code", "n", "greedy", "probe"]].tolist() == ["D", 1, 0.0, 1.0]
    assert report.loc["refuses_to_answer", "n"] == 0 and math.isnan(report.loc["refuses_to_answer", "probe"])
    plot_selection(report.reset_index(), "test", tmp_path / "selection.png")
    assert (tmp_path / "selection.png").read_bytes()[:4] == b"\x89PNG"


def test_folds_keep_groups_together_and_are_balanced():
    groups = ["a", "a", None, None, "b", "b", None, NAN, None, None]
    folds = fold_of_groups(groups, 3, seed=0)
    assert folds[0] == folds[1] and folds[4] == folds[5]
    assert sorted(np.bincount(fold_of_groups([None] * 10, 5, seed=1))) == [2] * 5
    assert (fold_of_groups(groups, 3, seed=0) == folds).all()


def test_cross_fitted_probe_scores_errors_higher():
    rng = np.random.default_rng(0)
    is_error = np.arange(60) % 2 == 0
    acts = rng.normal(size=(60, 4)) + 3.0 * is_error[:, None]  # [rows, hidden], errors shifted
    folds = fold_of_groups([None] * 60, 5, seed=0)
    usable = np.ones(60, dtype=bool)
    probabilities = out_of_fold_error_probabilities(acts, is_error, usable, folds, acts, folds, 5)
    assert probabilities[is_error].mean() > 0.8 and probabilities[~is_error].mean() < 0.2
