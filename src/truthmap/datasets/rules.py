"""Correctness rules, by name, and the spans of exact answers.

Each rule follows the paper's code (technion-cs-nlp/LLMsKnow, `src/compute_correctness.py`):
- alias_substring (triviaqa, hotpotqa, hotpotqa_with_context, movies, natural_questions_with_context, geography,
  custom): correct when any gold alias occurs in the answer, case-insensitive.
- first_option (winobias, winogrande): the option the answer mentions first is its choice; correct when that is
  the gold option.
- nli_first_label (mnli): the first label mentioned, counting the paper's variants (entail, contradict,
  neutrality, and its typo "neutality").
- sentiment_first_label (imdb): the first of "positive"/"negative"; a reply whose first word is "neutral" chose
  nothing, as in the paper.
- math_number: correct when a number in the answer equals the gold number.

Departures from the paper's code, and why:
- All matching is case-insensitive through `re.IGNORECASE`, not `str.lower()`, so that a span found in lowered text
  is also a span in the original (lowering can change a string's length, e.g. 'İ').
- Empty aliases are ignored: '' is a substring of every answer.
- When two options match at the same place (one is a prefix of the other: "Sam" / "Samantha"), the longer wins.
  The paper counted such a tie as wrong.
- natural_questions_with_context: the paper asked Mistral-7B-Instruct to judge answers the substring rule rejected.
  A rule here is a pure function of the text, so only the substring match remains: some correct paraphrases are
  counted wrong.
- winogrande: the paper cleaned "A) ... B) ..." replies of Llama models (a model-name special case). Not done here.
- imdb: the paper looked for labels only up to a second "Label: " in the reply; we search the whole reply.
- math: the paper tested `str(gold) in answer` (so gold 9 matched "19"). We compare whole numbers in the answer
  ("1,200" and "1200.0" both equal 1200), which removes those false positives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from truthmap.datasets.spec import DatasetSpec, Record
from truthmap.errors import ConfigError

Choice = tuple[str, int, int]  # (label chosen, start, end) in the answer text

NLI_VARIANTS = {
    "neutral": ("neutrality", "neutral", "neutality"),
    "entailment": ("entailment", "entail"),
    "contradiction": ("contradiction", "contradict"),
}
SENTIMENTS = ("negative", "positive")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?")  # -12, 1,200, 2.5; not the 9 of 19


def _search(alias: str, text: str, whole_word: bool = False) -> re.Match | None:
    pattern = re.escape(alias)
    if whole_word:
        pattern = rf"(?<!\w){pattern}(?!\w)"
    return re.search(pattern, text, re.IGNORECASE)


def _first_mention(text: str, candidates: Iterable[tuple[str, str]], whole_word: bool = False) -> Choice | None:
    """The earliest (label, start, end) among (label, surface string) candidates; ties go to the longer string."""
    best = None
    for label, surface in candidates:
        surface = surface.strip()
        if not surface:
            continue
        match = _search(surface, text, whole_word)
        if match and (best is None or (match.start(), -match.end()) < (best[1], -best[2])):
            best = (label, match.start(), match.end())
    return best


def gold_span(record: Record, answer_text: str) -> tuple[int, int] | None:
    """[start, end) of the earliest gold alias in the answer, case-insensitive; ties go to the longest alias.

    An occurrence that stands as a whole word wins over one inside a longer word ("9" in "then 9", not in "19"),
    so that a short alias does not land inside another word; without any whole-word occurrence, the earliest
    substring counts, which keeps every answer that alias_substring accepts locatable.
    """
    candidates = [(alias, alias) for alias in record.answers]
    found = _first_mention(answer_text, candidates, whole_word=True) or _first_mention(answer_text, candidates)
    return (found[1], found[2]) if found else None


def alias_substring(record: Record, answer_text: str) -> bool:
    return any(alias.strip() and _search(alias.strip(), answer_text) for alias in record.answers)


def choose_option(record: Record, answer_text: str) -> Choice | None:
    """The option (gold or wrong) mentioned first."""
    options = [*record.answers, *record.wrong_answers]
    return _first_mention(answer_text, [(option, option) for option in options])


def choose_nli_label(record: Record, answer_text: str) -> Choice | None:
    return _first_mention(answer_text, [(label, v) for label, variants in NLI_VARIANTS.items() for v in variants])


def choose_sentiment(record: Record, answer_text: str) -> Choice | None:
    reply = answer_text[len("Label: ") :] if answer_text.startswith("Label: ") else answer_text
    words = reply.split()
    # The paper mapped an exact first word "neutral" (after stripping '.' and '</s>' characters) to no answer.
    if words and words[0].strip(".</s>") == "neutral":
        return None
    return _first_mention(answer_text, [(label, label) for label in SENTIMENTS])


def _chose_gold(choose: Callable[[Record, str], Choice | None]) -> Callable[[Record, str], bool]:
    def rule(record: Record, answer_text: str) -> bool:
        choice = choose(record, answer_text)
        gold = {answer.strip().lower() for answer in record.answers}
        return choice is not None and choice[0].strip().lower() in gold

    rule.__name__ = f"chose_gold_{choose.__name__}"
    return rule


def math_number(record: Record, answer_text: str) -> bool:
    gold = float(record.answers[0].replace(",", ""))
    for match in _NUMBER.finditer(answer_text):
        if abs(float(match.group().replace(",", "")) - gold) <= 1e-6 * max(1.0, abs(gold)):
            return True
    return False


RULES: dict[str, Callable[[Record, str], bool]] = {
    "alias_substring": alias_substring,
    "first_option": _chose_gold(choose_option),
    "nli_first_label": _chose_gold(choose_nli_label),
    "sentiment_first_label": _chose_gold(choose_sentiment),
    "math_number": math_number,
}
# How a classification rule finds the label an answer chose; keyed like RULES.
CHOOSERS: dict[str, Callable[[Record, str], Choice | None]] = {
    "first_option": choose_option,
    "nli_first_label": choose_nli_label,
    "sentiment_first_label": choose_sentiment,
}


def is_correct(spec: DatasetSpec, record: Record, answer_text: str) -> bool:
    """Whether `answer_text` answers `record` correctly, by the dataset's rule."""
    if spec.rule not in RULES:
        raise ConfigError(f"Dataset '{spec.name}' names rule {spec.rule!r}, which is unknown; use one of: "
                          f"{', '.join(RULES)}.")
    return bool(RULES[spec.rule](record, answer_text))


def label_span(spec: DatasetSpec, record: Record, answer_text: str) -> tuple[int, int] | None:
    """[start, end) of the label the answer chose (the first mentioned, case-insensitive); None if it chose none."""
    if spec.exact_answer != "label" or spec.rule not in CHOOSERS:
        raise ConfigError(f"label_span needs a classification dataset; '{spec.name}' has "
                          f"exact_answer={spec.exact_answer!r}: use gold_span for it.")
    choice = CHOOSERS[spec.rule](record, answer_text)
    return (choice[1], choice[2]) if choice else None
