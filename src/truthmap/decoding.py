"""Batched decoding shared by the stages that make the model write: answers, extractions, resamples.

Left padding puts every prompt's last token at the same column, so one `generate` call serves a batch. The
log-probability of each chosen token is read on the fly from the current step's scores, so memory stays at one
[batch, vocab] row instead of every step's full vocabulary (what `output_scores=True` would keep).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[Generation]:
    """Greedy when temperature == 0, else sampling from the full distribution at that temperature."""
    import torch
    from transformers import LogitsProcessorList

    pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = left_pad(prompts, pad_id)  # [batch, prompt]
    width = input_ids.shape[1]
    recorder = _logprob_recorder()
    sampling = temperature > 0
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
            logits_processor=LogitsProcessorList([recorder]),
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
