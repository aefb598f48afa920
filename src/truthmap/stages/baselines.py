"""Baselines of the detection table: error scores that need no probe.

Token aggregates come from the log-probability of each generated token, stored with the answer (no second
generation): Logits-{mean,min,max} aggregate the log-probabilities, Probas-{mean,min,max} the probabilities,
over all answer tokens or ("-exact") over the exact-answer tokens only. The paper's code aggregates raw
pre-softmax logits instead; over log-probabilities, -min and -max rank answers exactly as Probas-min and -max do.

p(True) (Kadavath et al., 2022) asks the model whether a proposed answer is true and reads the probability of
"True" against "False" at the first token of its reply; "-exact" proposes the exact answer instead of the whole
generation. Every score is an error score: higher means more likely wrong, the direction of the probes.
"""

from __future__ import annotations

import math
import time

import numpy as np

AGGREGATES = ("mean", "min", "max")
P_TRUE_QUESTION = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer true or false? Reply with one word: True or False."
)
P_TRUE_BASE_SUFFIX = "\nThe proposed answer is"


def token_score_names() -> list[str]:
    return [f"{kind}_{agg}{suffix}" for suffix in ("", "_exact") for kind in ("logits", "probas") for agg in AGGREGATES]


def token_scores(logprobs, exact_tokens: tuple[int, int] | None) -> dict[str, float]:
    """Error scores of one answer from its tokens' log-probabilities; exact_tokens is [start, end) or None."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    spans = {"": logprobs, "_exact": logprobs[slice(*exact_tokens)] if exact_tokens else logprobs[:0]}
    scores = {}
    for suffix, values in spans.items():
        for kind, transform in (("logits", lambda v: v), ("probas", np.exp)):
            for agg in AGGREGATES:
                confidence = getattr(np, agg)(transform(values)) if values.size else math.nan
                scores[f"{kind}_{agg}{suffix}"] = -float(confidence)
    return scores


def exact_token_span(row) -> tuple[int, int] | None:
    """The exact answer's tokens as [start, end) within answer_ids, from the stored absolute positions."""
    if not row.exact_answer_valid:
        return None
    return row.pos_exact_answer_first - row.prompt_len, row.pos_exact_answer_last - row.prompt_len + 1


def p_true_prompt_ids(tokenizer, chat: bool, question: str, answer: str) -> list[int]:
    from truthmap.lm.models import encode_prompt

    text = P_TRUE_QUESTION.format(question=question, answer=answer)
    return encode_prompt(tokenizer, text if chat else text + P_TRUE_BASE_SUFFIX, chat)


def option_token_ids(tokenizer, word: str) -> list[int]:
    """First tokens of the ways a reply can start with `word` ("True", " True", "true" ...), deduplicated."""
    ids = {tokenizer(variant, add_special_tokens=False)["input_ids"][0] for variant in (word, " " + word, word.lower(), " " + word.lower())}
    return sorted(ids)


def p_true_error_scores(lm, questions: list[str], answers: list[str], batch_size: int, description: str) -> np.ndarray:
    """1 - p(True) for each (question, proposed answer); NaN where the proposed answer is empty."""
    import torch

    from truthmap.lm.decoding import batches, left_pad
    from truthmap.progress import progress_bar

    true_ids, false_ids = option_token_ids(lm.tokenizer, "True"), option_token_ids(lm.tokenizer, "False")
    scores = np.full(len(questions), np.nan)
    todo = [i for i, a in enumerate(answers) if a]
    prompts = {i: p_true_prompt_ids(lm.tokenizer, lm.is_chat, questions[i], answers[i]) for i in todo}
    todo.sort(key=lambda i: -len(prompts[i]))
    head = lm.model.get_output_embeddings()
    with progress_bar(len(todo), description) as advance:
        for batch in batches(todo, batch_size):
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], lm.tokenizer.pad_token_id)
            with torch.inference_mode():
                hidden = lm.model.base_model(
                    input_ids=input_ids.to(lm.model.device), attention_mask=attention_mask.to(lm.model.device)
                ).last_hidden_state[:, -1]
                logprobs = torch.log_softmax(head(hidden).float(), dim=-1)
            p_true = logprobs[:, true_ids].logsumexp(-1).exp()
            p_false = logprobs[:, false_ids].logsumexp(-1).exp()
            scores[batch] = (1 - p_true / (p_true + p_false)).cpu().numpy()
            advance(len(batch))
    return scores


def baseline_scores(lm, table, batch_size: int):
    """Every baseline's error score for each row of an answers table: the content of baselines.parquet."""
    import pandas as pd

    rows = list(table.itertuples())
    frame = pd.DataFrame([token_scores(r.answer_logprobs, exact_token_span(r)) for r in rows])
    questions = list(table["question"])
    exact = [r.exact_answer if r.exact_answer_valid else "" for r in rows]
    frame["p_true"] = p_true_error_scores(lm, questions, list(table["answer"]), batch_size, "p(True)")
    frame["p_true_exact"] = p_true_error_scores(lm, questions, exact, batch_size, "p(True) with the exact answer")
    frame.insert(0, "id", list(table["id"]))
    return frame


BASELINE_NAMES = {
    **{name: name.replace("_exact", "-exact").replace("_", "-").capitalize() for name in token_score_names()},
    "p_true": "p(True)",
    "p_true_exact": "p(True)-exact",
}


# ------------------------------------------------------------------------------------------------- the stage


def run_baselines(config, get_lm):
    """baselines.parquet: token-probability aggregates and p(True) for every answer; get_lm() loads the model.
    The caller skips it when every answer has its row (baselines_made, baselines_wanted)."""
    import dataclasses

    from truthmap.config import run_dir
    from truthmap.rundir import answers_table, read_json, write_parquet

    run = run_dir(config)
    table = answers_table(run)
    lm = dataclasses.replace(get_lm(), is_chat=read_json(run.run_json)["chat_template"])
    started = time.perf_counter()
    write_parquet(run.baselines, baseline_scores(lm, table, config.batch_size))
    from truthmap.rundir import record_seconds  # p(True)'s cost, beside the detection table

    record_seconds(run.costs, "baselines", time.perf_counter() - started, len(table))
    return run


def baselines_made(config, run) -> dict | None:
    import pandas as pd

    return {"ids": set(pd.read_parquet(run.baselines, columns=["id"])["id"])} if run.baselines.exists() else None


def baselines_wanted(config, run) -> dict:
    from truthmap.rundir import answers_table

    return {"ids": set(answers_table(run)["id"])}
