"""The error types of Orgad et al. (2025, Section 5), read off K answers sampled for one question.

Each question's K resampled answers (the greedy one is not among them, as in the paper) are counted into:
- correct: answers the dataset's rule accepts;
- refusals: wrong answers whose exact answer the extractor reported as NO ANSWER;
- wrong clusters: the other wrong answers with a located exact answer, grouped by their normalised text
  (lower case, no punctuation, articles or extra spaces);
- unlocated: wrong answers without an exact answer. They count in K but in no cluster, as in the paper's code.

From these counts, with K-relative thresholds (the paper used K = 30, where they read 15, 10 and 5):

| type | paper | condition |
|---|---|---|
| refuses_to_answer | A | refusals >= K/2 |
| consistently_correct | B | correct >= K/2 |
| consistently_correct_always | B1 | correct == K |
| consistently_correct_mostly | B2 | K/2 <= correct < K |
| consistently_incorrect | C | largest wrong cluster >= K/2 |
| consistently_incorrect_never_correct | C1 | C and correct == 0 |
| consistently_incorrect_sometimes_correct | C2 | C and correct > 0 |
| two_competing_answers | D | correct >= K/6, largest wrong >= K/6, and they differ by <= K/6 |
| many_answers | E | distinct answers (wrong clusters, plus one if any is correct) >= K/3, and >= 3 |
| many_answers_never_correct | E1 | E and correct == 0 |
| many_answers_sometimes_correct | E2 | E and correct > 0 |

Types may overlap (a question can be B2 and D), as in the paper. The paper's text names the types in words and
gives the numbers for K = 30; its code (`src/resamples_utils.py`, `get_types_of_mistakes`) fixes them. Where this
module departs from that code, and why:
- Thresholds are fractions of K compared as real numbers, so that any K works. The code uses floor division
  (K // 2, K // 3, K // 6): the same numbers at K = 30, but at K = 5 its "consistently correct" would need only
  2 of 5 correct answers, and its competing-answers margin K // 6 would be 0.
- A: the code asks that NO ANSWER be the largest wrong cluster and outnumber the correct answers (so 4 refusals
  of 30 can be A). We ask for refusals in at least half of the answers: the same "consistently" bar as B and C,
  and closer to the text's "refuses to answer".
- B2: the code also requires at least one wrong answer with a located exact answer, so 20 correct and 10
  unlocated wrong answers are neither B1 nor B2 there. Here B1 and B2 split B exactly, as the text's
  "always" / "mostly correct" do.
- C: refusals are their own count, never a wrong cluster; the code reaches much the same by excluding A from C.
- D: the code asks for more than K // 6 of each answer (6 of 30); we ask for at least K/6 (5 of 30), one bar
  for all three conditions of D.
- E: the code counts distinct wrong answers and lowers the bar by one when the correct answer was also given
  (9 wrong + the correct one); counting the correct answer as one more distinct answer is the same. The code
  also counts NO ANSWER as a distinct wrong answer; a refusal is no answer here. E also needs 3 distinct answers
  at least, which only matters below K = 9: at K = 3, K/3 alone would make one answer "many".
- Clusters: the code merges two wrong answers when one contains the other ("Paris" and "Paris, France"). That
  merge depends on the order the answers come in and pulls short answers into everything that contains them,
  so here only equal normalised texts merge.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field

NO_ANSWER = "NO ANSWER"  # what the extractor returns for a refusal (truthmap.stages.locate.NO_ANSWER)

# Thresholds, as fractions of K (the number of resampled answers per question).
CONSISTENT_SHARE = 1 / 2  # A, B, C: at least half of the answers
MANY_ANSWERS_SHARE = 1 / 3  # E: at least K/3 distinct answers (10 of 30)
MANY_ANSWERS_MIN = 3  # E: and more than the two of D, whatever K (at K = 3, K/3 alone would call 1 answer many)
COMPETING_SHARE = 1 / 6  # D: each of the two answers at least K/6 times, and counts at most K/6 apart (5 of 30)

ERROR_TYPES = {
    "refuses_to_answer": "A",
    "consistently_correct": "B",
    "consistently_correct_always": "B1",
    "consistently_correct_mostly": "B2",
    "consistently_incorrect": "C",
    "consistently_incorrect_never_correct": "C1",
    "consistently_incorrect_sometimes_correct": "C2",
    "two_competing_answers": "D",
    "many_answers": "E",
    "many_answers_never_correct": "E1",
    "many_answers_sometimes_correct": "E2",
}


@dataclass
class AnswerCounts:
    """What the K answers to one question were."""

    k: int
    correct: int = 0
    refusals: int = 0
    unlocated: int = 0
    wrong: Counter = field(default_factory=Counter)  # normalised exact answer -> how many wrong answers gave it

    @property
    def largest_wrong(self) -> int:
        return max(self.wrong.values(), default=0)

    @property
    def distinct_answers(self) -> int:
        return len(self.wrong) + (self.correct > 0)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: 'The Nile.' and 'nile' agree."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def count_answers(correct: list[bool], exact_answers: list[str | None]) -> AnswerCounts:
    """correct[i]: the rule accepted answer i; exact_answers[i]: its exact answer, NO_ANSWER, or None if not found."""
    counts = AnswerCounts(k=len(correct))
    for is_right, exact in zip(correct, exact_answers, strict=True):
        if is_right:
            counts.correct += 1
        elif isinstance(exact, str) and exact.strip().upper() == NO_ANSWER:
            counts.refusals += 1
        elif not isinstance(exact, str) or not normalize_answer(exact):  # None (pandas may hold it as NaN)
            counts.unlocated += 1
        else:
            counts.wrong[normalize_answer(exact)] += 1
    return counts


def error_types(counts: AnswerCounts) -> dict[str, bool]:
    """Which of ERROR_TYPES the counts fall in (several, one or none)."""
    k, right, wrong = counts.k, counts.correct, counts.largest_wrong
    half, sixth = CONSISTENT_SHARE * k, COMPETING_SHARE * k
    consistently_correct = k > 0 and right >= half
    consistently_incorrect = k > 0 and wrong >= half
    many = counts.distinct_answers >= max(MANY_ANSWERS_SHARE * k, MANY_ANSWERS_MIN)
    return {
        "refuses_to_answer": k > 0 and counts.refusals >= half,
        "consistently_correct": consistently_correct,
        "consistently_correct_always": k > 0 and right == k,
        "consistently_correct_mostly": consistently_correct and right < k,
        "consistently_incorrect": consistently_incorrect,
        "consistently_incorrect_never_correct": consistently_incorrect and right == 0,
        "consistently_incorrect_sometimes_correct": consistently_incorrect and right > 0,
        "two_competing_answers": k > 0 and right >= sixth and wrong >= sixth and abs(right - wrong) <= sixth,
        "many_answers": many,
        "many_answers_never_correct": many and right == 0,
        "many_answers_sometimes_correct": many and right > 0,
    }


def classify(correct: list[bool], exact_answers: list[str | None]) -> dict[str, bool]:
    return error_types(count_answers(correct, exact_answers))


TABLE_COLUMNS = [
    "id", "k", "n_correct", "n_refusals", "n_unlocated", "n_distinct_wrong", "largest_wrong", "largest_wrong_answer",
    *ERROR_TYPES,
]


def type_table(questions: dict[str, tuple[list[bool], list[str | None]]]):
    """One row per question id: the counts, the largest wrong answer and a bool column per error type."""
    import pandas as pd

    rows = []
    for question_id, (correct, exact_answers) in questions.items():
        counts = count_answers(correct, exact_answers)
        top = counts.wrong.most_common(1)
        rows.append(
            {
                "id": question_id,
                "k": counts.k,
                "n_correct": counts.correct,
                "n_refusals": counts.refusals,
                "n_unlocated": counts.unlocated,
                "n_distinct_wrong": len(counts.wrong),
                "largest_wrong": counts.largest_wrong,
                "largest_wrong_answer": top[0][0] if top else "",
                **error_types(counts),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def type_counts(table) -> dict[str, int]:
    """How many questions fall in each type, and how many in none."""
    flags = table[list(ERROR_TYPES)].to_numpy(dtype=bool)
    return {name: int(flags[:, i].sum()) for i, name in enumerate(ERROR_TYPES)} | {
        "none": int((~flags.any(axis=1)).sum()),
        "questions": len(table),
    }


def vote_text(source: str, valid: bool, exact_answer: str) -> str | None:
    """The exact answer an answer stands for in the error types and the vote: NO_ANSWER for a refusal, None when
    it has none."""
    if source == "no_answer":
        return NO_ANSWER
    return exact_answer if valid else None
