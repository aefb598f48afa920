"""What a dataset entry is: a small declarative record, plus the plain records it loads."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Record:
    """One question. `answers` are the gold aliases (QA) or the gold label (classification)."""

    id: str
    question: str
    answers: list[str]
    wrong_answers: list[str] = field(default_factory=list)  # the other options of a classification item
    context: str = ""  # passage for the with-context datasets; "" otherwise
    group: str | None = None  # rows sharing a group are linked (WinoBias pairs) and never split apart
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry. Code appears only as named loader and rule functions."""

    name: str
    version: int  # bump when a prompt, rule or loader changes what a run produces
    description: str
    loader: str  # key in datasets.loaders.LOADERS
    files: dict[str, str]  # split -> file under the data directory ("" for built-in data)
    instruct_prompt: str  # str.format template over Record fields: {question}, {context}, ...
    base_prompt: str  # plain prompt for base models, "Q: ... A:" style as in the paper
    rule: str  # key in datasets.rules.RULES: decides correctness
    exact_answer: str = "match"  # "match": gold alias or LLM extraction; "label": the label found in the answer
    max_new_tokens: int = 100
    # With the base prompt, the answer also ends at this text, as in the paper (a base model has no end-of-turn
    # token and goes on to invent the next "Q:"); None: only at the end token. Chat prompts ignore it.
    base_stop: str | None = "\n"
    grouped: bool = False  # records carry `group`; splits and subsamples keep groups whole
