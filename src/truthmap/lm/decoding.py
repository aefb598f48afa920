"""Batched decoding shared by the stages that make the model write: answers, extractions, resamples.

Left padding puts every prompt's last token at the same column, so one forward pass serves a batch. Rows leave
the batch (and the KV cache) as soon as they stop: on CPU a step costs in proportion to the rows it carries, and
answers differ a lot in length, so a batch no longer runs at the pace of its longest answer. The log-probability
of each chosen token is read from the current step's logits, so memory holds one [batch, vocab] row, not every
step's full vocabulary (what `output_scores=True` would keep).

A prompt prefix shared by every row (the extractor's few-shot examples) can be encoded once (`encode_prefix`) and
its keys and values reused by every batch: each row then costs only its own tokens.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

from truthmap.errors import ConfigError


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, without the stop token
    logprobs: list[float]  # log-probability of each of token_ids under the model (temperature 1)
    stopped: bool  # ended on a stop token rather than on max_new_tokens


@dataclass
class Prefix:
    ids: list[int]  # the shared first tokens of every prompt it serves
    cache: object  # the model's KV cache after those tokens, batch 1


def encode_prefix(model, ids: list[int]) -> Prefix | None:
    """The prefix's cache, or None for a model whose cache cannot be copied over a batch (then prompts go whole)."""
    import torch

    accepts = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in accepts else "past_key_values"
    input_ids = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                    **({"logits_to_keep": 1} if "logits_to_keep" in accepts else {}))
    cache = out[cache_name]
    return Prefix(list(ids), cache) if hasattr(cache, "batch_repeat_interleave") else None


def shared_prefix_length(prompts: list[list[int]], keep: int = 1) -> int:
    """How many first tokens every prompt shares, leaving each at least `keep` tokens of its own."""
    shortest = min(len(p) for p in prompts)
    same = next((i for i in range(shortest) if any(p[i] != prompts[0][i] for p in prompts)), shortest)
    return max(0, min(same, shortest - keep))


def _greedy(logits, rows):
    return logits.argmax(-1)


def _sampler(temperature: float):
    """Draws from softmax(logits / T) with torch's global generator (seeded by the caller)."""
    import torch

    def choose(logits, rows):
        return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)

    return choose


def _row_sampler(temperature: float, row_seeds: list[int]):
    """Draws each row's next token with that row's own generator (Gumbel-max: argmax of logits/T + Gumbel noise).

    The draws of a row never depend on the batch, so a seed gives the same answer at any batch size. Batching
    still moves logits by float noise (~1e-5 in float32); Gumbel-max flips a token only when the two best
    perturbed scores lie that close, where an inverse-CDF draw flips whenever its uniform lands that close to any
    of the vocabulary's bin edges (hundreds of times likelier).
    """
    import torch

    generators = [torch.Generator().manual_seed(s) for s in row_seeds]  # CPU: same draws on any device

    def choose(logits, rows):
        vocab = logits.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=generators[r], dtype=torch.float64) for r in rows.tolist()])
        gumbel = -torch.log(-torch.log(uniform)).to(logits.device)  # [rows, vocab]; u = 0 gives -inf, never drawn
        return (logits.double() / temperature + gumbel).argmax(-1)

    return choose


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 0.0,
    seed: int | None = None,
    row_seeds: list[int] | None = None,
    prefix: Prefix | None = None,
    choose=None,
    stop_check=None,
    recording=None,
) -> list[Generation]:
    """Greedy when temperature == 0, else sampling from the full distribution at that temperature.

    row_seeds (one per prompt, temperature > 0): each row samples with its own generator, so its answer does not
    depend on the batch it shares. seed (temperature > 0, no row_seeds): one generator for the whole batch.
    prefix: every prompt starts with prefix.ids, whose cache is reused instead of encoding them again.
    choose(logits [rows, vocab], rows) -> token ids: a decoding rule of the caller's (a constraint), instead.
    stop_check(token_ids) -> int | None, called on a row's tokens after each step: None to go on, else how many of
    them to keep; the row then ends as on a stop token (a stop text such as a line break, see generate.py).
    recording (sites.record, around this call): told after each forward pass which rows it served; rows still
    writing after the last step are fed their last token once more, so every answer token has been fed.
    """
    import torch

    if row_seeds is not None and (temperature <= 0 or len(row_seeds) != len(prompts)):
        raise ConfigError(f"row_seeds needs temperature > 0 and one seed per prompt; got temperature "
                          f"{temperature} and {len(row_seeds)} seeds for {len(prompts)} prompts.")
    if choose is not None:
        pass
    elif temperature <= 0:
        choose = _greedy
    elif row_seeds is not None:
        choose = _row_sampler(temperature, row_seeds)
    else:
        if seed is not None:
            torch.manual_seed(seed)
        choose = _sampler(temperature)
    generations = [Generation([], [], False) for _ in prompts]
    ended = set()  # rows that stop_check ended: _decode drops them after this step, as rows on a stop token
    steps = _decode(model, tokenizer.pad_token_id, prompts, max_new_tokens, set(stop_ids), choose, prefix, ended,
                    feed_last=recording is not None)
    for rows, chosen, logprobs in steps:
        if recording is not None:
            recording.took(rows)
        if chosen is None:  # the pass that only fed the last tokens
            continue
        for row, token, logprob in zip(rows, chosen, logprobs):
            if token in stop_ids:
                generations[row].stopped = True
            else:
                generations[row].token_ids.append(token)
                generations[row].logprobs.append(logprob)
                if stop_check is not None and (keep := stop_check(generations[row].token_ids)) is not None:
                    generation = generations[row]
                    generation.token_ids, generation.logprobs = generation.token_ids[:keep], generation.logprobs[:keep]
                    generation.stopped = True
                    ended.add(row)
    return generations


def _decode(model, pad_id: int, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], choose,
            prefix: Prefix | None = None, ended: set[int] = frozenset(), feed_last: bool = False):
    """Per step: (rows still writing, the tokens chosen for them, those tokens' log-probabilities), as lists.
    feed_last: after the last step, one more pass feeds the rows still writing their last token, and yields
    (those rows, None, None).

    A row leaves the batch, and its keys and values the cache, after the step that chose a stop token, or once
    the caller has put it in `ended` (read after each step's yield).
    With a prefix, each row's own tokens are left-padded after it: the pads sit between the prefix and the row,
    hidden by the mask, and positions count only real tokens, so every row sees what an unpadded prompt would.
    """
    import torch

    device = model.device
    cache = None
    if prefix is not None:
        if any(p[: len(prefix.ids)] != prefix.ids or len(p) == len(prefix.ids) for p in prompts):
            raise ValueError("Every prompt must start with the prefix's tokens and go on after them.")
        prompts = [p[len(prefix.ids) :] for p in prompts]
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(prompts))
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id))  # [batch, prompt]
    if prefix is not None:
        attention_mask = torch.cat([attention_mask.new_ones(len(prompts), len(prefix.ids)), attention_mask], dim=1)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]  # pads: hidden by the mask
    rows = torch.arange(len(prompts))
    accepts = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in accepts else "past_key_values"  # renamed in transformers 5.24
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    with torch.inference_mode():
        for step in range(max_new_tokens + feed_last):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                        **{cache_name: cache}, **keep_last)
            if step == max_new_tokens:
                yield rows.tolist(), None, None
                return
            cache, logits = out[cache_name], out.logits[:, -1].float()  # [rows, vocab]
            chosen = choose(logits, rows)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
            chosen, logprobs = chosen.cpu(), logprobs.cpu()
            yield rows.tolist(), chosen.tolist(), logprobs.tolist()
            writing = torch.tensor([t not in stop_ids and r not in ended
                                    for r, t in zip(rows.tolist(), chosen.tolist())])
            if (step == max_new_tokens - 1 and not feed_last) or not writing.any():
                return
            if not writing.all():
                index = writing.nonzero().squeeze(1)
                rows, chosen = rows[index], chosen[index]
                index = index.to(device)
                cache.batch_select_indices(index)
                attention_mask, positions = attention_mask[index], positions[index]
            input_ids = chosen[:, None].to(device)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1


def left_pad(sequences: list[list[int]], pad_id: int):
    """Token ids and attention mask, [batch, longest]; each row right-aligned so all end at the last column."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids, attention_mask


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
