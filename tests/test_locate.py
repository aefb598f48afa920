import pytest

from truthmap import locate
from truthmap.locate import answer_offsets, parse_extraction, span_to_tokens, token_positions
from truthmap.rundir import POSITIONS, Checkpoints


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
    from truthmap.decoding import Generation

    replies = iter([["Lyon", "Oslo"], ["Berlin"], ["Madrid"], ["Rome"], ["Bonn"]])
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new, stops, temperature, seed):
        calls.append((len(prompts), temperature, seed))
        return [Generation(tokenizer(t, add_special_tokens=False)["input_ids"], [], True) for t in next(replies)]

    monkeypatch.setattr(locate, "generate_batch", fake_generate)
    rows = [("a", "Capital of France?", "I think it is Berlin."), ("b", "Capital?", "It is Oslo.")]
    checkpoints = Checkpoints(tmp_path / "parts", {"k": 1})
    found = locate.extract_with_llm(tiny, rows, 8, checkpoints, tries=5, seed=7)
    assert found == {"a": ("extracted", (14, 20)), "b": ("extracted", (6, 10))}
    assert calls == [(2, 0.0, 7), (1, 1.0, 8)]  # greedy first, then sampled for the one still missing
    again = locate.extract_with_llm(tiny, rows, 8, Checkpoints(tmp_path / "parts", {"k": 1}), tries=5, seed=7)
    assert again == found and len(calls) == 2  # resumed from the checkpoint, no new generation


def test_extraction_gives_up_after_the_tries(tiny, tmp_path, monkeypatch):
    from truthmap.decoding import Generation

    monkeypatch.setattr(
        locate, "generate_batch", lambda m, t, prompts, *a: [Generation([], [], True) for _ in prompts]
    )
    found = locate.extract_with_llm(tiny, [("a", "Q?", "text")], 4, Checkpoints(tmp_path, {}), tries=3, seed=0)
    assert found == {"a": ("not_found", None)}


def test_extraction_prompt_ends_with_assistant_header(tiny):
    ids = locate.extraction_prompt_ids(tiny.tokenizer, True, "Capital of France?", "Paris, surely.")
    text = tiny.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("Exact answer:") == len(locate.EXTRACTION_EXAMPLES) + 1
