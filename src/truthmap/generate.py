"""Stage 1: the model's answers to every question, greedy and batched, checkpointed after each batch."""

from __future__ import annotations

from truthmap.decoding import batches, generate_batch
from truthmap.models import encode_prompt, stop_token_ids
from truthmap.progress import progress_bar
from truthmap.rundir import Checkpoints


def generate_answers(lm, ids: list[str], prompts: list[str], max_new_tokens: int, batch_size: int, checkpoints: Checkpoints):
    """Answer each prompt; returns a frame of id, prompt_ids, answer_ids, answer_logprobs, stopped, answer.

    Batches that finished before a kill are read back from `checkpoints`; only the rest is generated.
    """
    import pandas as pd

    done = checkpoints.done_ids()
    todo = [(i, encode_prompt(lm.tokenizer, p, lm.is_chat)) for i, p in zip(ids, prompts) if i not in done]
    todo.sort(key=lambda item: -len(item[1]))  # similar lengths share a batch: less padding
    stop_ids = stop_token_ids(lm.tokenizer, lm.model)
    with progress_bar(total=len(ids), initial=len(done), description="Generating answers") as advance:
        for batch in batches(todo, batch_size):
            generations = generate_batch(lm.model, lm.tokenizer, [p for _, p in batch], max_new_tokens, stop_ids)
            checkpoints.write(
                pd.DataFrame(
                    {
                        "id": [i for i, _ in batch],
                        "prompt_ids": [p for _, p in batch],
                        **generation_columns(lm.tokenizer, generations),
                    }
                )
            )
            advance(len(batch))
    frame = checkpoints.load().drop_duplicates("id", keep="last").set_index("id")
    return frame.loc[ids].reset_index()


def generation_columns(tokenizer, generations) -> dict[str, list]:
    """The columns every table of generated answers has (greedy or resampled)."""
    return {
        "answer_ids": [g.token_ids for g in generations],
        "answer_logprobs": [g.logprobs for g in generations],
        "stopped": [g.stopped for g in generations],
        "answer": [tokenizer.decode(g.token_ids) for g in generations],
    }
