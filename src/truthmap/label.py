"""Stage 2: is each answer correct, and where is its exact answer? The dataset entry names the rule; this applies
it row by row, and `label_and_locate` adds the exact answer and the probed positions, the one way every answer is
labelled and located: greedy answers (locally or on any executor's shard) and resampled ones alike."""

from __future__ import annotations

from truthmap.datasets import is_correct


def label_answers(spec, records, answers: list[str]) -> list[bool]:
    return [bool(is_correct(spec, record, answer)) for record, answer in zip(records, answers)]


def label_and_locate(spec, records, frame, tokenizer, locate: str, extract, answer_tokens: bool = True):
    """frame (id, prompt_ids, answer_ids, answer; row k answers records[k], whose id is the row's) with the columns
    labelling and locating add: correct, the exact answer and gold alias (locate.exact_answer_columns), every
    probed position, prompt_len and answer_len.

    locate: "blind" or "gold" (locate.direct_spans); extract(rows) finds the spans no label or gold alias gives
    (locate.extract_spans on the extractor). answer_tokens=False: the extractor's tokenizer is another one, so it
    re-encodes the answers' text rather than copy their tokens.
    """
    from truthmap.locate import locate_answers

    answers = list(frame["answer"])
    correct = label_answers(spec, records, answers)
    answer_ids = list(frame["answer_ids"]) if answer_tokens else [None] * len(frame)
    spans = locate_answers(spec, records, answers, answer_ids, correct, locate, extract)
    return located_frame(frame.assign(correct=correct), records, spans, tokenizer)


def located_frame(frame, records, spans: dict, tokenizer):
    """frame (with `correct`) plus the exact answer and gold alias columns of {id: (source, span)}, every probed
    position, prompt_len and answer_len."""
    from truthmap.locate import exact_answer_columns, gold_spans

    golds = gold_spans(records, list(frame["answer"]), list(frame["correct"]))
    frame = frame.assign(**exact_answer_columns(frame, tokenizer, spans, golds))
    return frame.assign(prompt_len=frame["prompt_ids"].map(len), answer_len=frame["answer_ids"].map(len))
