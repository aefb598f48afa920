"""Stage 2: is each answer correct? The dataset entry names the rule; this applies it row by row."""

from __future__ import annotations

from truthmap.datasets import is_correct


def label_answers(spec, records, answers: list[str]) -> list[bool]:
    return [bool(is_correct(spec, record, answer)) for record, answer in zip(records, answers)]
