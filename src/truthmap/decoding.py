"""Batched decoding shared by the stages that make the model write: answers, extractions, resamples.

Left padding puts every prompt's last token at the same column, so one `generate` call serves a batch. The
log-probability of each chosen token is read on the fly from the current step's scores, so memory stays at one
[batch, vocab] row instead of every step's full vocabulary (what `output_scores=True` would keep).
"""

from __future__ import annotations

from dataclasses import dataclass

from truthmap.errors import ConfigError


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, without the stop token
    logprobs: list[float]  # log-probability of each of token_ids under the decoding distribution
    stopped: bool  # ended on a stop token rather than on max_new_tokens


def _logprob_recorder():
    import torch
    from transformers import LogitsProcessor

    class RecordLogprobs(LogitsProcessor):
        """Sees each step's scores; the token chosen from them shows up as input_ids[:, -1] one step later."""

        def __init__(self):
            self.previous = None  # [batch, vocab] log-softmax of the last step
            self.steps = []  # per step: [batch]

        def __call__(self, input_ids, scores):
            self._collect(input_ids[:, -1])
            self.previous = torch.log_softmax(scores.float(), dim=-1)
            return scores

        def _collect(self, chosen):
            if self.previous is not None:
                self.steps.append(self.previous.gather(1, chosen[:, None]).squeeze(1).cpu())

        def finish(self, sequences):
            self._collect(sequences[:, -1])
            return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(sequences), 0)

    return RecordLogprobs()


def _row_sampler(temperature: float, row_seeds: list[int]):
    import torch
    from transformers import LogitsProcessor

    class SamplePerRow(LogitsProcessor):
        """Draws each row's next token with that row's own generator (Gumbel-max: argmax of logits/T + Gumbel noise).

        The draws of a row never depend on the batch, so a seed gives the same answer at any batch size. Batching
        still moves logits by float noise (~1e-5 in float32); Gumbel-max flips a token only when the two best
        perturbed scores lie that close, where an inverse-CDF draw flips whenever its uniform lands that close to
        any of the vocabulary's bin edges (hundreds of times likelier). Returns -inf everywhere but the drawn token.
        """

        def __init__(self):
            self.generators = [torch.Generator().manual_seed(s) for s in row_seeds]  # CPU: same draws on any device

        def __call__(self, input_ids, scores):
            vocab = scores.shape[-1]
            uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
            gumbel = -torch.log(-torch.log(uniform)).to(scores.device)  # [batch, vocab]; u = 0 gives -inf, never drawn
            drawn = (scores.double() / temperature + gumbel).argmax(-1)  # [batch]
            forced = torch.full_like(scores, float("-inf"))
            return forced.scatter_(1, drawn[:, None], 0.0)

    return SamplePerRow()


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 0.0,
    seed: int | None = None,
    row_seeds: list[int] | None = None,
) -> list[Generation]:
    """Greedy when temperature == 0, else sampling from the full distribution at that temperature.

    row_seeds (one per prompt, temperature > 0): each row samples with its own generator, so its answer does not
    depend on the batch it shares. The logprobs are then the model's own (temperature 1), as a greedy answer's.
    """
    import torch
    from transformers import LogitsProcessorList

    pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = left_pad(prompts, pad_id)  # [batch, prompt]
    width = input_ids.shape[1]
    recorder = _logprob_recorder()
    processors = [recorder]
    sampling = temperature > 0
    if row_seeds is not None:
        if not sampling or len(row_seeds) != len(prompts):
            raise ConfigError(f"row_seeds needs temperature > 0 and one seed per prompt; got temperature "
                              f"{temperature} and {len(row_seeds)} seeds for {len(prompts)} prompts.")
        # The sampler forces its token; `generate` then decodes greedily, which applies no temperature of its own.
        processors.append(_row_sampler(temperature, row_seeds))
        sampling = False
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        sequences = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_k=0 if sampling else None,
            top_p=1.0 if sampling else None,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList(processors),
        )  # [batch, width + steps]
    logprobs = recorder.finish(sequences)  # [batch, steps]
    new_tokens = sequences[:, width:].cpu()
    return [_trim(new_tokens[row].tolist(), logprobs[row].tolist(), set(stop_ids)) for row in range(len(prompts))]


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


def _trim(tokens: list[int], logprobs: list[float], stop_ids: set[int]) -> Generation:
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(tokens[:index], logprobs[:index], True)
    return Generation(tokens, logprobs, False)


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
