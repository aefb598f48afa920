"""The error-type taxonomy on hand-made answer sets: one per type, and each threshold on both sides."""

import pytest

from truthmap.analysis.error_types import ERROR_TYPES, NO_ANSWER, classify, count_answers, normalize_answer, type_counts, type_table

K = 30  # the paper's K: the thresholds read 15 (half), 10 (a third) and 5 (a sixth)


def answers(correct=0, refusals=0, wrong=(), unlocated=None):
    """K answers: `correct` right ones, `refusals` NO ANSWERs, the wrong exact answers given, the rest unlocated."""
    exact = ["gold"] * correct + [NO_ANSWER] * refusals + list(wrong)
    rest = K - len(exact) if unlocated is None else unlocated
    return [True] * correct + [False] * (len(exact) - correct + rest), exact + [None] * rest


def types_of(**kwargs) -> set[str]:
    return {name for name, hit in classify(*answers(**kwargs)).items() if hit}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(refusals=15), {"refuses_to_answer"}),
        (dict(refusals=14), set()),
        (dict(correct=30), {"consistently_correct", "consistently_correct_always"}),
        (dict(correct=29, wrong=["Lyon"]), {"consistently_correct", "consistently_correct_mostly"}),
        (dict(correct=15), {"consistently_correct", "consistently_correct_mostly"}),
        (dict(correct=14), set()),
        (dict(wrong=["Lyon"] * 15), {"consistently_incorrect", "consistently_incorrect_never_correct"}),
        (dict(wrong=["Lyon"] * 14), set()),
        (dict(correct=1, wrong=["Lyon"] * 15), {"consistently_incorrect", "consistently_incorrect_sometimes_correct"}),
        (dict(correct=5, wrong=["Lyon"] * 5), {"two_competing_answers"}),
        (dict(correct=4, wrong=["Lyon"] * 5), set()),  # the correct answer under K/6
        (dict(correct=5, wrong=["Lyon"] * 4), set()),  # the wrong answer under K/6
        (dict(correct=10, wrong=["Lyon"] * 5), {"two_competing_answers"}),  # 5 apart: still competing
        (dict(correct=11, wrong=["Lyon"] * 5), set()),  # 6 apart
        (dict(wrong=[f"city {i}" for i in range(10)]), {"many_answers", "many_answers_never_correct"}),
        (dict(wrong=[f"city {i}" for i in range(9)]), set()),
        (dict(correct=1, wrong=[f"city {i}" for i in range(9)]), {"many_answers", "many_answers_sometimes_correct"}),
        (dict(correct=1, wrong=[f"city {i}" for i in range(8)]), set()),
    ],
)
def test_each_type_and_its_boundary_at_k_30(kwargs, expected):
    assert types_of(**kwargs) == expected


def test_types_overlap_as_in_the_paper():
    assert types_of(correct=15, wrong=["Lyon"] * 10) == {
        "consistently_correct", "consistently_correct_mostly", "two_competing_answers",
    }
    assert types_of(correct=15, wrong=[f"city {i}" for i in range(9)]) == {
        "consistently_correct", "consistently_correct_mostly", "many_answers", "many_answers_sometimes_correct",
    }
    assert types_of(correct=15, wrong=["Lyon"] * 15) == {
        "consistently_correct", "consistently_correct_mostly", "consistently_incorrect",
        "consistently_incorrect_sometimes_correct", "two_competing_answers",
    }


def test_refusals_and_unlocated_answers_are_no_wrong_cluster():
    counts = count_answers(*answers(refusals=20, wrong=["Lyon"] * 4))
    assert (counts.k, counts.correct, counts.refusals, counts.unlocated, counts.largest_wrong) == (30, 0, 20, 6, 4)
    assert "consistently_incorrect" not in types_of(refusals=20, wrong=["Lyon"] * 4)
    assert types_of(wrong=["Lyon"] * 14, unlocated=16) == set()


def test_exact_answers_cluster_after_normalisation():
    assert normalize_answer("The Nile.") == normalize_answer("nile") == "nile"
    counts = count_answers([False] * 4, ["The Nile.", "nile", "NILE ", "Amazon"])
    assert counts.wrong == {"nile": 3, "amazon": 1}
    assert count_answers([False], ["..."]).unlocated == 1  # nothing left after normalising


def test_thresholds_scale_with_k():
    assert classify([True, True, False], ["gold", "gold", "Lyon"])["consistently_correct"]
    assert not classify([True, False, False], ["gold", "Lyon", "Rome"])["consistently_correct"]
    assert classify([True, False, False], ["gold", "Lyon", "Rome"])["many_answers"]  # 3 distinct >= 3/3
    assert classify([False, False], ["Lyon", "Lyon"])["consistently_incorrect_never_correct"]
    assert not classify([True, False, False], ["gold", "Lyon", "Lyon"])["many_answers"]  # 2 answers are never many


def test_no_answers_fall_in_no_type():
    assert not any(classify([], []).values())


def test_table_and_counts():
    table = type_table({"q1": answers(correct=30), "q2": answers(wrong=["Lyon"] * 20), "q3": answers(refusals=3)})
    assert list(table["id"]) == ["q1", "q2", "q3"]
    assert table.loc[1, "largest_wrong_answer"] == "lyon" and table.loc[1, "largest_wrong"] == 20
    counts = type_counts(table)
    assert counts["consistently_correct_always"] == 1 and counts["consistently_incorrect"] == 1
    assert counts["none"] == 1 and counts["questions"] == 3
    assert set(ERROR_TYPES) <= set(counts)
