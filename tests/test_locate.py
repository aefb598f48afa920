import pytest

from truthmap.stages import locate
from truthmap.stages.locate import answer_offsets, parse_extraction, span_to_tokens, token_positions
from truthmap.rundir import POSITIONS
from truthmap.runstate import Checkpoints


def exact_tokens(tokenizer, answer, exact, occurrence=0):
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    start = -1
    for _ in range(occurrence + 1):
        start = answer.index(exact, start + 1)
    offsets = answer_offsets(tokenizer, answer, ids)
    return ids, span_to_tokens(offsets, start, start + len(exact))


@pytest.mark.parametrize(
    "answer, exact",
    [
        ("The capital of France is Paris.", "Paris"),  # one word in a sentence
        ("It is São Paulo, in Brazil.", "São Paulo"),  # multi-token, unicode
        ("Tromsø", "Tromsø"),  # the whole answer, unicode at the very end
        ("   Hartford is the answer", "Hartford"),  # leading spaces
        ("The answer is Hartford, a city", "Hartford, a city"),  # runs to the very end
        ("Kraków Reykjavík Zürich", "Reykjavík"),
    ],
)
def test_exact_tokens_decode_to_the_exact_answer(tiny, answer, exact):
    tokenizer = tiny.tokenizer
    ids, (first, last) = exact_tokens(tokenizer, answer, exact)
    decoded = tokenizer.decode(ids[first : last + 1])
    assert exact in decoded
    # minimal: dropping the first or the last token loses part of the answer
    assert exact not in tokenizer.decode(ids[first + 1 : last + 1])
    assert exact not in tokenizer.decode(ids[first:last])


def test_repeated_answer_uses_the_occurrence_given(tiny):
    answer = "Paris, yes: Paris."
    ids, first_hit = exact_tokens(tiny.tokenizer, answer, "Paris", 0)
    _, second_hit = exact_tokens(tiny.tokenizer, answer, "Paris", 1)
    assert first_hit[0] == 0 and second_hit[0] > first_hit[1]


def test_positions_are_absolute_and_clamped():
    found = token_positions(prompt_len=10, answer_len=6, exact_tokens=(2, 3))
    assert set(found) == set(POSITIONS)
    assert found["last_q"] == 9 and found["first_answer"] == 10 and found["second_answer"] == 11
    assert (found["exact_answer_before_first"], found["exact_answer_first"]) == (11, 12)
    assert (found["exact_answer_last"], found["exact_answer_after_last"]) == (13, 14)
    assert found["-1"] == 15 and found["-8"] == 8


def test_positions_at_the_end_and_for_short_answers():
    at_end = token_positions(prompt_len=5, answer_len=3, exact_tokens=(1, 2))
    assert at_end["exact_answer_last"] == 7 and at_end["exact_answer_after_last"] == 7  # clamped
    one_token = token_positions(prompt_len=5, answer_len=1, exact_tokens=(0, 0))
    assert one_token["second_answer"] == 5 and one_token["exact_answer_before_first"] == 4
    tiny_seq = token_positions(prompt_len=2, answer_len=1, exact_tokens=None)
    assert tiny_seq["-8"] == 0 and tiny_seq["exact_answer_first"] == -1


def test_token_mismatch_is_detected(tiny):
    ids = tiny.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert answer_offsets(tiny.tokenizer, "Paris", ids + ids) is None


@pytest.mark.parametrize("left, right", [("The answer is H", "artford, a city"), ("It is Troms", "ø in Norway")])
def test_offsets_of_a_split_the_tokenizer_would_not_choose(tiny, left, right):
    tokenizer = tiny.tokenizer
    ids = tokenizer(left, add_special_tokens=False)["input_ids"] + tokenizer(right, add_special_tokens=False)["input_ids"]
    answer = tokenizer.decode(ids)
    assert answer == left + right and tokenizer(answer, add_special_tokens=False)["input_ids"] != ids
    offsets = answer_offsets(tokenizer, answer, ids)
    assert [answer[s:e] for s, e in offsets] == [tokenizer.decode([i]) for i in ids]
    word = (left.split()[-1] + right.split()[0]).rstrip(",")
    start = answer.index(word)
    first, last = span_to_tokens(offsets, start, start + len(word))
    assert word in tokenizer.decode(ids[first : last + 1])


@pytest.mark.parametrize(
    "output, expected",
    [
        ("Paris", ("extracted", (25, 30))),
        ("  paris.\nmore text", ("extracted", (25, 30))),
        ('"Paris"', ("extracted", (25, 30))),
        ("Exact answer: Paris", ("extracted", (25, 30))),
        ("NO ANSWER", ("no_answer", None)),
        ("London", None),
        ("The capital of France is Paris.", ("extracted", (0, 30))),  # trailing period dropped
        ("one two three four five six seven eight nine ten eleven", None),
        ("", None),
    ],
)
def test_parse_extraction(output, expected):
    assert parse_extraction(output, "The capital of France is Paris.") == expected


def test_extraction_retries_until_valid_and_checkpoints(tiny, tmp_path, monkeypatch):
    from truthmap.lm.decoding import Generation

    replies = iter([["Lyon", "Oslo"], ["Berlin"], ["Madrid"], ["Rome"], ["Bonn"]])
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new, stops, temperature, seed, prefix=None):
        calls.append((len(prompts), temperature, seed))
        return [Generation(tokenizer(t, add_special_tokens=False)["input_ids"], [], True) for t in next(replies)]

    monkeypatch.setattr(locate, "generate_batch", fake_generate)
    rows = [("a", "Capital of France?", "I think it is Berlin.", None), ("b", "Capital?", "It is Oslo.", None)]
    checkpoints = Checkpoints(tmp_path / "parts", {"k": 1})
    found = locate.extract_spans(tiny, rows, 8, checkpoints, "free", tries=5, seed=7)
    assert found == {"a": ("extracted", (14, 20)), "b": ("extracted", (6, 10))}
    assert calls == [(2, 0.0, 7), (1, 1.0, 8)]  # greedy first, then sampled for the one still missing
    again = locate.extract_spans(tiny, rows, 8, Checkpoints(tmp_path / "parts", {"k": 1}), "free", tries=5, seed=7)
    assert again == found and len(calls) == 2  # resumed from the checkpoint, no new generation


def test_extraction_gives_up_after_the_tries(tiny, tmp_path, monkeypatch):
    from truthmap.lm.decoding import Generation

    monkeypatch.setattr(
        locate, "generate_batch", lambda m, t, prompts, *a, **k: [Generation([], [], True) for _ in prompts]
    )
    found = locate.extract_spans(tiny, [("a", "Q?", "text", None)], 4, Checkpoints(tmp_path, {}), "free", tries=3, seed=0)
    assert found == {"a": ("not_found", None)}


def test_extraction_prompt_ends_with_assistant_header(tiny):
    ids = locate.extraction_prompt_ids(tiny.tokenizer, True, "Capital of France?", "Paris, surely.")
    text = tiny.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\nExact answer:")
    assert text.count("Exact answer:") == len(locate.EXTRACTION_EXAMPLES) + 1
    # The question is read last, right before the extraction: it says which of the answer's names is asked for.
    assert text.endswith("Long answer: Paris, surely.\nQuestion: Capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\nExact answer:")
    plain = tiny.tokenizer.decode(locate.extraction_prompt_ids(tiny.tokenizer, False, "Capital of France?", "Paris."))
    assert plain.endswith("\n\nLong answer: Paris.\nQuestion: Capital of France?\nExact answer:")


def contiguous_in(span_ids, answer_ids) -> bool:
    n = len(span_ids)
    return any(list(answer_ids[i : i + n]) == list(span_ids) for i in range(len(answer_ids) - n + 1))


@pytest.mark.parametrize("seed", range(6))
def test_constrained_extractor_only_writes_spans_of_the_answer(seed):
    """Property: whatever random weights prefer, every extraction is a run of the answer's tokens or NO ANSWER."""
    import random

    from tiny import tiny_lm
    from truthmap.lm.decoding import generate_batch
    from truthmap.lm.models import stop_token_ids

    lm = tiny_lm(seed=seed)
    tokenizer = lm.tokenizer
    rng = random.Random(seed)
    vocab = [t for t in range(3, len(tokenizer))]
    answers = [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(12)]
    questions = ["What is the capital of France?"] * len(answers)
    no_answer = locate._no_answer_ids(tokenizer)
    stops = stop_token_ids(tokenizer, lm.model)
    starts = [locate.span_starts(tokenizer, a, q) for a, q in zip(answers, questions)]
    chooser = locate.SpanChooser(tokenizer, answers, starts, no_answer, stops)
    prompts = [locate.extraction_prompt_ids(tokenizer, True, q, tokenizer.decode(a)) for q, a in zip(questions, answers)]
    written = generate_batch(lm.model, tokenizer, prompts, 16, stops, choose=chooser)
    for k, (answer, generation) in enumerate(zip(answers, written)):
        span = chooser.span(k)
        if span is None:
            assert generation.token_ids[: len(no_answer)] == no_answer
            continue
        first, last = span
        assert 0 <= first <= last < len(answer)
        assert first in starts[k]
        kept = answer[first : last + 1]
        assert contiguous_in(generation.token_ids[1 : len(kept)], answer[first + 1 :])  # what it wrote after the start
        assert contiguous_in(kept, answer)
    assert any(chooser.span(k) is not None for k in range(len(answers)))
    assert all(chooser.span(k) is None for k, answer in enumerate(answers) if not answer)  # nothing to copy


def test_span_chooser_keeps_the_most_probable_end():
    """It copies on, but keeps the length at which stopping was most probable: here after two tokens."""
    import torch

    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    answer = tokenizer("is Hartford, a city", add_special_tokens=False)["input_ids"]
    stop = tokenizer.eos_token_id
    chooser = locate.SpanChooser(tokenizer, [answer], [[1]], [5, 6], [stop])
    vocab = len(tokenizer)
    for step, stop_logit in enumerate([-9.0, -9.0, 3.0, -1.0, -9.0, -9.0]):
        logits = torch.zeros(1, vocab)
        logits[0, stop] = stop_logit
        if step < len(answer):
            logits[0, answer[min(step + 1, len(answer) - 1)]] = 2.0
        chosen = chooser(logits, torch.tensor([0]))
        if int(chosen[0]) == stop:
            break
    assert chooser.span(0) == (1, 2)


def test_span_starts_skip_question_words_articles_and_word_middles(tiny):
    tokenizer = tiny.tokenizer
    answer = "The capital of France is Paris."
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    offsets = answer_offsets(tokenizer, answer, ids)
    starts = locate.span_starts(tokenizer, ids, "What is the capital of France?")
    assert [answer[offsets[i][0] : offsets[i][1]].strip() for i in starts][:1] == ["Paris"]
    assert all(answer[offsets[i][0] : offsets[i][1]].strip() not in ("The", "capital", "France") for i in starts)
    # Every word in the question: any word may start the span.
    assert locate.span_starts(tokenizer, tokenizer("France", add_special_tokens=False)["input_ids"], "France?") == [0]


def test_cached_prefix_gives_the_same_tokens_as_the_whole_prompt(tiny):
    from truthmap.lm.decoding import encode_prefix, generate_batch
    from truthmap.lm.models import stop_token_ids

    rows = [("Capital of France?", "The capital of France is Paris."), ("Where is Tromsø?", "Tromsø is in Norway."),
            ("?", "Hartford")]
    prompts = [locate.extraction_prompt_ids(tiny.tokenizer, True, q, a) for q, a in rows]
    prefix = locate.extraction_prefix(tiny)
    assert all(p[: len(prefix.ids)] == prefix.ids for p in prompts) and len(prefix.ids) > 50
    stops = stop_token_ids(tiny.tokenizer, tiny.model)
    whole = generate_batch(tiny.model, tiny.tokenizer, prompts, 12, stops)
    cached = generate_batch(tiny.model, tiny.tokenizer, prompts, 12, stops, prefix=prefix)
    assert [g.token_ids for g in cached] == [g.token_ids for g in whole]
    assert all(abs(a - b) < 1e-4 for g, h in zip(whole, cached) for a, b in zip(g.logprobs, h.logprobs))
    again = generate_batch(tiny.model, tiny.tokenizer, prompts[:1], 12, stops, prefix=prefix)  # the cache is reusable
    assert again[0].token_ids == whole[0].token_ids
    with pytest.raises(ValueError, match="start with the prefix"):
        generate_batch(tiny.model, tiny.tokenizer, [[5, 6]], 4, stops, prefix=encode_prefix(tiny.model, [7, 8]))


def test_constrained_extraction_is_valid_and_resumes(tiny, tmp_path, monkeypatch):
    rows = [(str(i), "What is the capital of France?", a, tiny.tokenizer(a, add_special_tokens=False)["input_ids"])
            for i, a in enumerate(["The capital of France is Paris.", "Tromsø is in Norway.", "", "Hartford, a city"])]
    found = locate.extract_spans(tiny, rows, 3, Checkpoints(tmp_path, {"k": 1}), "constrained")
    assert found["2"] == ("no_answer", None)  # an empty answer has nothing to copy
    for row_id, _, answer, _ in rows:
        source, span = found[row_id]
        assert source in ("extracted", "no_answer")
        if span:
            assert 0 <= span[0] < span[1] <= len(answer) and answer[span[0] : span[1]].strip() == answer[span[0] : span[1]]
    calls = []
    monkeypatch.setattr(locate, "generate_batch", lambda *a, **k: calls.append(1))
    assert locate.extract_spans(tiny, rows, 3, Checkpoints(tmp_path, {"k": 1}), "constrained") == found
    assert calls == []  # resumed from the checkpoints


@pytest.mark.parametrize("flag, value, expected", [
    ("--locate", "both", "Unknown locate method 'both'. Available: blind, gold."),
    ("--extractor", "llm", "Unknown extractor 'llm'. Available: constrained, free."),
])
def test_locating_options_are_checked(tmp_path, flag, value, expected):
    from typer.testing import CliRunner

    from truthmap.cli import app

    result = CliRunner().invoke(app, ["generate", flag, value, "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {expected}"
