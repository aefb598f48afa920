"""Answer selection (Orgad et al. 2025, Section 6): pick one answer among the greedy one and K resampled ones.

Candidate 0 of each question is the greedy answer, candidates 1..K the resampled ones. Three ways to pick:
- probe: the lowest error probability of the error probe (candidates it cannot score, NaN, never win);
- majority: the most frequent exact answer (normalised as in error_types); refusals and answers without an
  exact answer do not vote. Unlike the paper's code, which counts every correct answer as one vote for "the
  correct answer" (it knows the gold answer), votes here are texts only, as a user without the gold answer has;
- logprob: the highest mean token log-probability of the whole answer.
Ties go to the earliest candidate (the greedy answer first); a question where no candidate can be scored keeps
its greedy answer. The report gives each method's accuracy against greedy decoding, over all questions and per
error type, with "oracle": the share of questions where any candidate is correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from truthmap.analysis.error_types import ERROR_TYPES, NO_ANSWER, normalize_answer
from truthmap.errors import DataError

METHODS = ("greedy", "probe", "majority", "logprob")


def pick_lowest_error(error_probabilities: Sequence[float]) -> int:
    scored = [(p, i) for i, p in enumerate(error_probabilities) if not math.isnan(p)]
    return min(scored)[1] if scored else 0


def pick_highest_logprob(mean_logprobs: Sequence[float]) -> int:
    scored = [(-lp, i) for i, lp in enumerate(mean_logprobs) if not math.isnan(lp)]
    return min(scored)[1] if scored else 0


def vote_key(exact_answer: str | None) -> str | None:
    """What a candidate votes for: its normalised exact answer; None for a refusal or no exact answer."""
    if not isinstance(exact_answer, str) or exact_answer.strip().upper() == NO_ANSWER:  # None (pandas: NaN)
        return None
    return normalize_answer(exact_answer) or None


def pick_majority(exact_answers: Sequence[str | None]) -> int:
    """The first candidate of the largest group of equal exact answers (ties: the group that comes first)."""
    groups: dict[str, list[int]] = {}
    for i, exact in enumerate(exact_answers):
        if (key := vote_key(exact)) is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        return 0
    return min(groups.values(), key=lambda members: (-len(members), members[0]))[0]


def mean_logprob(logprobs: Sequence[float]) -> float:
    return float(sum(logprobs) / len(logprobs)) if len(logprobs) else math.nan


def fold_of_groups(groups: Sequence, n_folds: int, seed: int):
    """A fold number per row; rows of one group (None: a group of its own) share a fold. Seeded, balanced."""
    import numpy as np

    from truthmap.analysis.evaluation import no_group  # None, NaN or pd.NA: how a null group comes back from parquet

    keys = [("row", i) if no_group(g) else ("group", g) for i, g in enumerate(groups)]
    distinct = list(dict.fromkeys(keys))
    order = np.random.default_rng(seed).permutation(len(distinct))
    fold_of_key = {distinct[j]: rank % n_folds for rank, j in enumerate(order)}
    return np.array([fold_of_key[k] for k in keys], dtype=np.int64)


def out_of_fold_error_probabilities(train_acts, train_is_error, train_usable, folds, score_acts, score_folds,
                                    n_folds: int):
    """Error probability of each row of score_acts from an ErrorProbe fitted without that row's fold.

    The probe of fold f is trained on the usable greedy rows outside fold f (train_acts [n, hidden], is_error
    and usable [n], folds [n]) and scores the rows of score_acts [m, hidden] whose score_folds is f. So no
    question is scored by a probe that saw its own greedy answer's label (cross-fitting).
    """
    import numpy as np

    from truthmap.analysis.probes import ErrorProbe

    scores = np.full(len(score_acts), np.nan)
    for fold in range(n_folds):
        train = train_usable & (folds != fold)
        target = score_folds == fold
        if not target.any():
            continue
        probe = ErrorProbe().fit(np.asarray(train_acts[train], dtype=np.float32), train_is_error[train])
        scores[target] = probe.predict_proba(np.asarray(score_acts[target], dtype=np.float32))[:, 1]
    return scores


def select_answers(candidates):
    """candidates: one row per (id, candidate) with columns correct, error_probability, exact_answer (None when
    there is none) and mean_logprob; candidate 0 is the greedy answer. Returns one row per question: the index
    chosen by each method (`<method>_choice`), its correctness (`<method>`) and `oracle`."""
    import pandas as pd

    rows = []
    for question_id, group in candidates.sort_values(["id", "candidate"], kind="stable").groupby("id", sort=False):
        if group["candidate"].iloc[0] != 0:
            raise DataError(f"Question {question_id!r} has no greedy answer (candidate 0) among its candidates.")
        correct = group["correct"].tolist()
        choices = {
            "greedy": 0,
            "probe": pick_lowest_error(group["error_probability"].tolist()),
            "majority": pick_majority(group["exact_answer"].tolist()),
            "logprob": pick_highest_logprob(group["mean_logprob"].tolist()),
        }
        rows.append(
            {"id": question_id}
            | {f"{m}_choice": int(group["candidate"].iloc[i]) for m, i in choices.items()}
            | {m: bool(correct[i]) for m, i in choices.items()}
            | {"oracle": any(correct)}
        )
    return pd.DataFrame(rows)


def selection_report(chosen, types):
    """Accuracy of each method over all questions and per error type.

    chosen: select_answers' frame; types: error_types.type_table's frame (joined on id).
    Rows: group ("all" or a type), code (the paper's letter), n, greedy, probe, majority, logprob, oracle.
    """
    import pandas as pd

    merged = chosen.merge(types[["id", *ERROR_TYPES]], on="id", how="left")
    groups = [("all", "", pd.Series(True, index=merged.index))]
    groups += [(name, code, merged[name].fillna(False).astype(bool)) for name, code in ERROR_TYPES.items()]
    rows = []
    for name, code, member in groups:
        part = merged[member]
        rows.append(
            {"group": name, "code": code, "n": len(part)}
            | {m: float(part[m].mean()) if len(part) else math.nan for m in (*METHODS, "oracle")}
        )
    return pd.DataFrame(rows)


def plot_selection(report, title: str, png_path) -> None:
    """Grouped bars: accuracy of each method, for all questions and each error type with questions in it."""
    from matplotlib.figure import Figure

    from truthmap.rundir import write_atomic

    shown = report[report["n"] > 0].reset_index(drop=True)
    labels = [f"{row.code or 'all'}\n(n={row.n})" for row in shown.itertuples()]
    width = 0.8 / len(METHODS)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(shown)), 3.6), layout="constrained")
    ax = fig.subplots()
    for j, method in enumerate(METHODS):
        positions = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(shown))]
        ax.bar(positions, shown[method], width, label=method)
    ax.scatter(range(len(shown)), shown["oracle"], marker="_", s=300, color="black", label="oracle", zorder=3)
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    write_atomic(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
