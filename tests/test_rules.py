"""Correctness rules and answer spans, on hand-made answers."""

import pytest

from truthmap.datasets import REGISTRY, RULES, Record, get_spec, gold_span, is_correct, label_span
from truthmap.datasets.rules import CHOOSERS
from truthmap.errors import ConfigError


def rec(answers, wrong=()):
    return Record(id="t-test-00000", question="q", answers=list(answers), wrong_answers=list(wrong))


def correct(name, record, text):
    return is_correct(get_spec(name), record, text)


def test_every_entry_names_a_known_rule():
    for spec in REGISTRY.values():
        assert spec.rule in RULES, spec.name
        if spec.exact_answer == "label":
            assert spec.rule in CHOOSERS, spec.name
        else:
            assert spec.exact_answer == "match", spec.name


# ------------------------------------------------------------------------------------------- alias substring (QA)

SUNSET = rec(["Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard", "Sunset Blvd."])


@pytest.mark.parametrize("name", ["triviaqa", "hotpotqa", "hotpotqa_with_context", "movies",
                                  "natural_questions_with_context", "geography", "custom"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The musical was Sunset Boulevard.", True),
        ("SUNSET BLVD premiered then.", True),  # case-insensitive
        ("It was Cats.", False),
        ("", False),
        ("Sunset", False),  # a part of an alias is not the alias
    ],
)
def test_alias_substring(name, text, expected):
    assert correct(name, SUNSET, text) is expected


def test_alias_substring_unicode_and_spaces():
    roentgen = rec(["Wilhelm Conrad Röntgen"])
    assert correct("natural_questions_with_context", roentgen, "It went to WILHELM CONRAD RÖNTGEN in 1901.")
    assert not correct("natural_questions_with_context", roentgen, "It went to Wilhelm Conrad Rontgen.")
    # movie_qa_train.csv has answers with a leading space (" Therese Giehse"): it must still match.
    assert correct("movies", rec([" Therese Giehse"]), "Therese Giehse played her.")


def test_empty_alias_never_matches():
    assert not correct("triviaqa", rec(["", "  "]), "anything at all")


def test_nq_without_judge_counts_a_paraphrase_wrong():
    # The paper asked an LLM judge here; a pure rule keeps only the substring match.
    assert not correct("natural_questions_with_context", rec(["Chapter One: The Vanishing of Will Byers"]),
                       "The Vanishing of Will Byers")


# ------------------------------------------------------------------------------------------------------------ mnli

NLI = rec(["neutral"], ["entailment", "contradiction"])


@pytest.mark.parametrize(
    ("text", "expected", "span_text"),
    [
        ("Neutrality. The hypothesis is not implied.", True, "Neutrality"),
        ("The hypothesis represents neutral.", True, "neutral"),
        ("It is a contradiction, not neutrality.", False, "contradiction"),
        ("The premise entails it, so not neutral.", False, "entail"),
        ("I cannot tell.", False, None),
        ("neutality", True, "neutality"),  # the paper's typo variant
    ],
)
def test_mnli_first_label(text, expected, span_text):
    spec = get_spec("mnli")
    assert is_correct(spec, NLI, text) is expected
    span = label_span(spec, NLI, text)
    assert (text[span[0]:span[1]] if span else None) == span_text


# ------------------------------------------------------------------------------------------------------------ imdb

POS = rec(["positive"], ["negative"])


@pytest.mark.parametrize(
    ("text", "expected", "span"),
    [
        ("Positive. A great film.", True, (0, 8)),
        ("Label: positive", True, (7, 15)),
        (" negative, though some positive moments", False, (1, 9)),
        ("neutral, but the ending is positive", True, (27, 35)),  # first word "neutral," is not exactly "neutral"
        ("neutral. It is positive in places", False, None),  # the paper's exact first word "neutral": no answer
        ("Neutral overall, positive ending", True, (17, 25)),  # the paper's check was case-sensitive
        ("Label: neutral positive", False, None),
        ("", False, None),
        ("I liked it.", False, None),
    ],
)
def test_imdb(text, expected, span):
    spec = get_spec("imdb")
    assert is_correct(spec, POS, text) is expected
    assert label_span(spec, POS, text) == span


# ---------------------------------------------------------------------------------------- winobias, winogrande

DEV = rec(["developer"], ["designer"])


@pytest.mark.parametrize(
    ("text", "expected", "span"),
    [
        ("The pronoun 'he' refers to the developer.", True, (31, 40)),
        ("The Developer, not the designer.", True, (4, 13)),
        ("The designer, not the developer.", False, (4, 12)),
        ("designer", False, (0, 8)),
        ("Someone else.", False, None),
    ],
)
def test_winobias_first_option(text, expected, span):
    spec = get_spec("winobias")
    assert is_correct(spec, DEV, text) is expected
    assert label_span(spec, DEV, text) == span


def test_winogrande_prefix_options_longer_wins():
    spec = get_spec("winogrande")
    sam, samantha = rec(["Sam"], ["Samantha"]), rec(["Samantha"], ["Sam"])
    assert not is_correct(spec, sam, "Samantha was tired.")
    assert is_correct(spec, samantha, "Samantha was tired.")  # the paper counted this tie as wrong
    assert is_correct(spec, sam, "Sam, not Samantha.")
    assert label_span(spec, samantha, "Samantha was tired.") == (0, 8)


# ------------------------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize(
    ("answers", "text", "expected"),
    [
        (["9"], "He can buy 9 games.", True),
        (["9"], "He can buy 9.0 games.", True),
        (["9"], "$9.00", True),
        (["9"], "He can buy 19 games.", False),  # the paper's substring rule said True
        (["9"], "1.9", False),
        (["1200", "1,200"], "It costs 1,200 dollars.", True),
        (["1200", "1,200"], "It costs 1200.", True),
        (["1200", "1,200"], "It costs 1,2000.", False),
        (["-12"], "The change is -12 degrees.", True),
        (["-12"], "It fell by 12 degrees.", False),
        (["2.5"], "2.50 hours", True),
        (["28.26"], "First 28, then 28.26.", True),
        (["9"], "nine", False),
        (["9"], "", False),
    ],
)
def test_math_number(answers, text, expected):
    assert correct("math", rec(answers), text) is expected


# ------------------------------------------------------------------------------------------------------- gold_span


@pytest.mark.parametrize(
    ("answers", "text", "span_text"),
    [
        (["Paris"], "Paris. Yes, Paris.", "Paris"),  # repeated: the earliest
        (["Paris"], "I think PARIS.", "PARIS"),
        (["Sunset Blvd", "Sunset Blvd."], "Sunset Blvd. it is", "Sunset Blvd."),  # tie: the longest
        (["Boulevard", "Sunset Boulevard"], "Sunset Boulevard", "Sunset Boulevard"),  # earliest beats longer later
        (["Wilhelm Conrad Röntgen"], "Der Preis ging an wilhelm conrad RÖNTGEN.", "wilhelm conrad RÖNTGEN"),
        (["9"], "Not 19 but 9.", "9"),  # a whole word beats a piece of a longer number
        (["us"], "Because of US policy", "US"),
        (["us"], "thus", "us"),  # no whole word: the substring still counts
        (["Rome"], "Paris", None),
    ],
)
def test_gold_span(answers, text, span_text):
    span = gold_span(rec(answers), text)
    assert (text[span[0]:span[1]] if span else None) == span_text
    if span_text == "9":
        assert span == (11, 12)


def test_gold_span_offsets_survive_case_folding():
    # 'İ'.lower() is two characters: a span found in lowered text would be shifted.
    text = "İİ Paris"
    assert gold_span(rec(["paris"]), text) == (3, 8)
    assert label_span(get_spec("winobias"), rec(["paris"], ["rome"]), text) == (3, 8)


@pytest.mark.parametrize("text", ["Sunset Blvd", "west sunset boulevard!", "thus", "x Sunset Blvd. y"])
def test_every_correct_alias_answer_has_a_gold_span(text):
    for record in (SUNSET, rec(["us"])):
        if correct("triviaqa", record, text):
            assert gold_span(record, text) is not None


def test_label_span_refuses_match_datasets():
    with pytest.raises(ConfigError, match=r"label_span needs a classification dataset; 'triviaqa' has "
                                          r"exact_answer='match': use gold_span"):
        label_span(get_spec("triviaqa"), SUNSET, "Sunset Blvd")
