"""Stage 2: is each answer correct, and where is its exact answer? The dataset entry names the rule; this applies
it row by row, and `label_and_locate` adds the exact answer and the probed positions, the one way every answer is
labelled and located: greedy answers (locally or on any executor's shard) and resampled ones alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from truthmap.datasets import is_correct


def label_answers(spec, records, answers: list[str]) -> list[bool]:
    return [bool(is_correct(spec, record, answer)) for record, answer in zip(records, answers)]


@dataclass
class Extraction:
    """How the exact answers that no label or gold alias gives are extracted (locate.extract_spans): the one
    wiring of an extractor, whoever locates (generation on any shard, import, resampling, scoring).

    extractor() and checkpoints() are called on first use only, so answers that need no extractor load no model
    and leave no checkpoints of it; prefix(): the extraction prompt's encoded prefix, kept over many calls."""

    extractor: Callable  # () -> models.LoadedModel
    checkpoints: Callable  # () -> runstate.Checkpoints
    batch_size: int
    method: str = "constrained"  # or "free"
    tries: int = 1
    seed: int = 0
    prefix: Callable | None = None
    progress: bool = True
    opened: list = field(default_factory=list)  # the checkpoints, once opened (they cache the parts they read)

    def __call__(self, rows: list[tuple]) -> dict:
        """{id: (source, span)} of (id, question, answer, answer_ids) rows."""
        from truthmap.stages import locate
        extractor = self.extractor()  # first: an extractor that fails to load leaves no settings.json behind
        if not self.opened:
            self.opened.append(self.checkpoints())
        return locate.extract_spans(extractor, rows, self.batch_size, self.opened[0], self.method,
                                    self.tries, self.seed, self.prefix() if self.prefix else None,
                                    progress=self.progress)


def label_and_locate(spec, records, frame, tokenizer, locate: str, extract, answer_tokens: bool = True,
                     correct: list[bool] | None = None, given: dict | None = None):
    """frame (id, prompt_ids, answer_ids, answer; row k answers records[k], whose id is the row's) with the columns
    labelling and locating add: correct, the exact answer and gold alias (locate.exact_answer_columns), every
    probed position, prompt_len and answer_len.

    locate: "blind" or "gold" (locate.direct_spans); extract(rows) finds the spans no label or gold alias gives
    (an Extraction). answer_tokens=False: the extractor's tokenizer is another one, so it re-encodes the answers'
    text rather than copy their tokens. correct: labels already known (default: the dataset's rule); given:
    {id: (source, span)} of exact answers already known (`truthmap import`), which are not located again.
    """
    from truthmap.stages.locate import locate_answers

    answers = list(frame["answer"])
    correct = label_answers(spec, records, answers) if correct is None else list(correct)
    answer_ids = list(frame["answer_ids"]) if answer_tokens else [None] * len(frame)
    given = given or {}
    pending = [k for k, record in enumerate(records) if record.id not in given]
    spans = dict(given) | locate_answers(spec, [records[k] for k in pending], [answers[k] for k in pending],
                                         [answer_ids[k] for k in pending], [correct[k] for k in pending], locate,
                                         extract)
    return located_frame(frame.assign(correct=correct), records, spans, tokenizer)


def located_frame(frame, records, spans: dict, tokenizer):
    """frame (with `correct`) plus the exact answer and gold alias columns of {id: (source, span)}, every probed
    position, prompt_len and answer_len."""
    from truthmap.stages.locate import exact_answer_columns, gold_spans

    golds = gold_spans(records, list(frame["answer"]), list(frame["correct"]))
    frame = frame.assign(**exact_answer_columns(frame, tokenizer, spans, golds))
    return frame.assign(prompt_len=frame["prompt_ids"].map(len), answer_len=frame["answer_ids"].map(len))
