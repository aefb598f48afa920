"""Sampling baselines: error scores from K sampled answers per question, the answers `truthmap resample` writes.

- Semantic entropy (Kuhn et al., ICLR 2023; Farquhar et al., Nature 2024): the K answers are grouped into
  clusters of the same meaning, and the entropy of the clusters is the score. Discrete: each cluster weighs its
  share of the K answers. Weighted by likelihood: each cluster weighs the summed probability of its answers, an
  answer's probability being the exp of its mean token log-probability (length-normalised, as Farquhar et al.).
- Distinct answers: the number of clusters.
- Self-consistency: the share of the K answers in the greedy answer's cluster; the score is 1 minus it.

Two answers mean the same when their normalised exact answers agree, or when the dataset's correctness rule,
given one as the gold answer, accepts the other (for short answers, the same as a bidirectional entailment check;
no NLI model is used). An answer without an exact answer is represented by its whole text; a refusal by NO ANSWER.
Every score is an error score: higher means more likely wrong. No model or torch here.
"""

from __future__ import annotations

import math

import numpy as np

# score column -> label in the detection table
SAMPLING_NAMES = {
    "semantic_entropy": "Semantic entropy",
    "semantic_entropy_weighted": "Semantic entropy (likelihood)",
    "distinct_answers": "Distinct answers",
    "self_consistency": "Self-consistency",
}


def rule_match(rule):
    """same(a, b) of two answer texts under a correctness rule (datasets.rules.RULES' signature: record, text):
    either one, taken as the gold answer, is accepted in the other. A rule that cannot read an answer (a number
    rule on words) does not match."""
    from truthmap.datasets.spec import Record

    def same(a: str, b: str) -> bool:
        for gold, text in ((a, b), (b, a)):
            try:
                if rule(Record(id="", question="", answers=[gold]), text):
                    return True
            except (ValueError, TypeError, IndexError):
                continue
        return False

    return same


def cluster(texts, same=None) -> list[int]:
    """A cluster number per text: a text joins the first cluster whose first member it matches (normalised text
    equal, or same(a, b)), else opens a new one (the greedy clustering of Kuhn et al.)."""
    from truthmap.analysis.error_types import normalize_answer

    heads: list[tuple[str, str]] = []  # (text, normalised) of each cluster's first member
    out = []
    for text in texts:
        norm = normalize_answer(text)
        found = next((i for i, (head, head_norm) in enumerate(heads)
                      if norm == head_norm or (same is not None and norm and head_norm and same(text, head))), None)
        if found is None:
            heads.append((text, norm))
            found = len(heads) - 1
        out.append(found)
    return out


def entropy(weights) -> float:
    """Shannon entropy (nats) of non-negative weights, normalised to sum to 1."""
    p = np.asarray(weights, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def discrete_entropy(clusters) -> float:
    """Entropy of the clusters' shares of the answers: 0 for one cluster, log K for K distinct answers."""
    return entropy(np.bincount(np.asarray(clusters)))


def weighted_entropy(clusters, logprobs) -> float:
    """Entropy of the clusters weighted by their answers' summed probability (logprobs: one per answer, the mean
    token log-probability), normalised over the clusters."""
    clusters = np.asarray(clusters)
    logprobs = np.asarray(logprobs, dtype=np.float64)
    top = logprobs.max()  # log-sum-exp: long answers' probabilities underflow
    weight = np.bincount(clusters, weights=np.exp(logprobs - top))
    return entropy(weight)


def mean_logprob(logprobs) -> float:
    values = np.asarray(list(logprobs), dtype=np.float64)
    return float(values.mean()) if values.size else 0.0


def answer_text(source: str, valid: bool, exact_answer: str, answer: str) -> str:
    """The text an answer stands for in a cluster: its exact answer, NO ANSWER for a refusal, else its whole text."""
    from truthmap.analysis.error_types import vote_text

    voted = vote_text(source, bool(valid), exact_answer)
    return str(answer) if voted is None else voted


def question_scores(greedy_text: str, texts, logprobs, same=None) -> dict[str, float]:
    """The four scores of one question from its greedy answer's text and its K answers' texts and mean token
    log-probabilities."""
    clusters = cluster([greedy_text, *texts], same)
    greedy, samples = clusters[0], np.asarray(clusters[1:])
    _, samples = np.unique(samples, return_inverse=True)  # clusters numbered 0.. among the samples alone
    return {
        "semantic_entropy": discrete_entropy(samples),
        "semantic_entropy_weighted": weighted_entropy(samples, logprobs),
        "distinct_answers": float(len(set(samples.tolist()))),
        "self_consistency": 1.0 - float(np.mean(np.asarray(clusters[1:]) == greedy)),
    }


def sampling_scores(greedy, answers, same=None):
    """A frame: id and the four scores, one row per question of greedy (answers.parquet rows) that has samples in
    answers (resamples/answers.parquet: id, sample, answer, exact_answer, exact_answer_valid,
    exact_answer_source, answer_logprobs)."""
    import pandas as pd

    def texts(frame):
        return [answer_text(*v) for v in zip(frame["exact_answer_source"], frame["exact_answer_valid"],
                                             frame["exact_answer"], frame["answer"])]

    by_question = {i: group.sort_values("sample") for i, group in answers.groupby("id", sort=False)}
    rows = []
    for question_id, greedy_text in zip(greedy["id"], texts(greedy)):
        group = by_question.get(question_id)
        if group is None:
            continue
        logprobs = [mean_logprob(lp) for lp in group["answer_logprobs"]]
        rows.append({"id": question_id} | question_scores(greedy_text, texts(group), logprobs, same))
    return pd.DataFrame(rows, columns=["id", *SAMPLING_NAMES])


def sampling_results(scores, test, common: dict, cost: dict | None = None, probe: dict | None = None) -> list[dict]:
    """Rows of the detection table: each score's AUC and 95 % interval on the test rows (detection.ProbeData)
    that have samples; cost: the sampling's cost per answer, added to every row. probe: {"method", "scores"
    [seeds, test rows]}: each row also gets "versus_probe", the probe against it on the same rows (paired)."""
    from truthmap.analysis.detection import field_metrics, interval_over_test_rows
    from truthmap.analysis.evaluation import auc
    from truthmap.analysis.verdict import probe_versus

    indexed = scores.set_index("id")
    known = np.array([i in indexed.index for i in test.ids])
    y = test.is_error[known]
    rows = []
    for column, label in SAMPLING_NAMES.items():
        row = common | {"method": label, "auc_mean": math.nan, "auc_std": math.nan}
        if len(set(y.tolist())) == 2:
            values = indexed.loc[[i for i, k in zip(test.ids, known) if k], column].to_numpy(dtype=float)
            low, high = interval_over_test_rows(values[None], y)
            row |= {"auc_mean": auc(y, values), "auc_low": low, "auc_high": high, "scored_rows": int(known.sum())}
            row |= field_metrics(y, values[None])  # AUPRC, PRR, FPR@95, AURC, as every other row of the table
            if probe is not None:
                row["versus_probe"] = {"probe": probe["method"]} | probe_versus(probe["scores"][:, known], values, y)
        rows.append(row | ({"cost": cost} if cost else {}))
    return rows


# Sources of an exact answer that cost an extraction model call (rundir's exact_answer_source): the rest came from
# a gold alias or a label, with no model.
EXTRACTED_SOURCES = ("extracted", "no_answer", "not_found", "token_mismatch")


def sampling_cost(answers, state: dict, extraction: dict) -> dict:
    """What the sampling baselines cost per question, measured on the sampled answers: generations (K), extraction
    calls (the samples whose exact answer a model located), generated tokens (the K answers'), and the seconds
    this machine spent sampling, labelling and locating them (resamples.json's "sampling_seconds"; None when the
    samples were made before it was recorded)."""
    questions = max(1, answers["id"].nunique())
    extracted = answers["exact_answer_source"].isin(EXTRACTED_SOURCES).sum()
    seconds = state.get("sampling_seconds")
    return {
        "generations": round(len(answers) / questions, 2),
        "extractions": round(float(extracted) / questions, 2),
        "generated_tokens": round(float(answers["answer_ids"].map(len).sum()) / questions, 1),
        "seconds": round(seconds / questions, 4) if seconds is not None else None,
        "extraction_model": extraction.get("extraction_model") or "the answering model",
    }
