import pytest

from truthmap.lm.decoding import generate_batch
from truthmap.lm.models import encode_prompt, stop_token_ids

QUESTIONS = [
    "What is the capital of France?",
    "In which country is the city of Tromsø?",
    "Zürich?",
    "What is the capital of France? The capital of France is Paris. Answer:",
    "Question: 0123",
    "Kraków and Reykjavík are cities.",
    "What?",
    "In which country is the city of São Paulo? Long answer:",
    "Exact answer:",
    "system user assistant",
]


def generations(lm, batch_size):
    prompts = [encode_prompt(lm.tokenizer, q, lm.is_chat) for q in QUESTIONS]
    stops = stop_token_ids(lm.tokenizer, lm.model)
    out = []
    for start in range(0, len(prompts), batch_size):
        out += generate_batch(lm.model, lm.tokenizer, prompts[start : start + batch_size], 12, stops)
    return out


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_generation_matches_batch_size_one(tiny, batch_size):
    single = generations(tiny, 1)
    batched = generations(tiny, batch_size)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    for b, s in zip(batched, single):
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)
        assert b.stopped == s.stopped


def test_logprobs_are_the_greedy_tokens_log_softmax(tiny):
    import torch

    prompt = encode_prompt(tiny.tokenizer, QUESTIONS[0], True)
    gen = generate_batch(tiny.model, tiny.tokenizer, [prompt], 6, [10**9])[0]
    assert len(gen.token_ids) == 6 and not gen.stopped
    ids = torch.tensor([prompt + gen.token_ids])
    logits = tiny.model(ids).logits[0, len(prompt) - 1 : -1]  # [answer, vocab]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
    assert gen.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    assert gen.token_ids == logits.argmax(-1).tolist()


def test_generation_stops_on_stop_token_and_drops_it(tiny):
    prompt = encode_prompt(tiny.tokenizer, QUESTIONS[1], True)
    free = generate_batch(tiny.model, tiny.tokenizer, [prompt], 8, [10**9])[0]
    stop_at = free.token_ids[2]
    gen = generate_batch(tiny.model, tiny.tokenizer, [prompt], 8, [stop_at])[0]
    first = free.token_ids.index(stop_at)
    assert gen.stopped and gen.token_ids == free.token_ids[:first]
    assert len(gen.logprobs) == len(gen.token_ids)


def test_stopped_rows_leave_the_batch(tiny):
    """A row that stopped is not carried through later steps: the model sees fewer rows, answers unchanged."""
    prompts = [encode_prompt(tiny.tokenizer, q, True) for q in QUESTIONS[:4]]
    free = generate_batch(tiny.model, tiny.tokenizer, prompts, 8, [10**9])
    stop_at = free[0].token_ids[1]  # row 0 stops at its second token
    rows_seen = []
    hook = tiny.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        gens = generate_batch(tiny.model, tiny.tokenizer, prompts, 8, [stop_at])
    finally:
        hook.remove()
    singles = [generate_batch(tiny.model, tiny.tokenizer, [p], 8, [stop_at])[0] for p in prompts]
    assert [g.token_ids for g in gens] == [g.token_ids for g in singles]
    assert gens[0].stopped and gens[0].token_ids == free[0].token_ids[:1]
    still_writing = [sum(not g.stopped or len(g.token_ids) >= step for g in gens) for step in range(len(rows_seen))]
    assert rows_seen == still_writing and rows_seen[-1] < len(prompts)
