"""Stage 1: the model's answers to every question, greedy and batched, checkpointed after each batch.

Where an answer ends: at the model's end token, and with a plain (base) prompt also at the first line break, as
in the paper. A base model has no end-of-turn token: asked "Q: ...\\nA:", it answers, then writes the next "Q:" and
answers that too; its label and exact answer must come from the first line only. A line break may sit inside a
token (".\\n", "\\n\\n"), so the rule reads the decoded text, and the answer keeps the tokens wholly before the line
break: answer_ids, answer_logprobs and the answer text stay one and the same sequence.

With a site, the decoding records that site's output at every token it feeds (sites.record), and each batch is
handed, with its recording, to the caller's after_batch before its checkpoint: the stage that composes this one
(stages.answer_shard) labels, locates and writes the batch's activations there.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from truthmap.batches import load_in_order, run_batches
from truthmap.config import RunConfig
from truthmap.lm.decoding import generate_batch
from truthmap.lm.models import encode_prompt, stop_token_ids
from truthmap.rundir import STORE_DTYPE, RunDir, file_sha256
from truthmap.runstate import Checkpoints
from truthmap.stages.locate import EXTRACTION_PROMPT_VERSION

# ------------------------------------------------------------------------------ what decides the answers


def answers_settings(config: RunConfig, spec) -> dict:
    """What decides the content of answers.parquet; resuming with any of it changed is refused.

    generate adds stop_text (generate.answer_stop) once the model, and so the prompt style, is known."""
    return {
        "model": config.model,
        "dataset": config.dataset,
        "dataset_version": spec.version,
        "split": config.split,
        "n_samples": config.n_samples,
        "seed": config.seed,
        "prompt_style": config.prompt_style,
        "max_new_tokens": config.max_new_tokens or spec.max_new_tokens,
        # The file's content, not its path: a file edited in place is another dataset, and the same file given
        # by an absolute or a relative path is the same one. (Runs made before this recorded custom_path.)
        **({"custom_sha256": file_sha256(Path(config.custom_path).expanduser()),
            "custom_columns": [config.question_column, config.answer_column]} if config.dataset == "custom" else {}),
    } | locating_settings(config)


LOCATING_KEYS = ("locate", "extractor", "extraction_model", "extraction_tries", "extraction_prompt")


def locating_settings(config: RunConfig) -> dict:
    """What decides the exact answers of answers.parquet (not the generations: another locating reuses those)."""
    tries = config.extraction_tries if config.extractor == "free" else None
    values = (config.locate, config.extractor, config.extraction_model, tries, EXTRACTION_PROMPT_VERSION)
    return dict(zip(LOCATING_KEYS, values))


def generation_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in LOCATING_KEYS}


# ------------------------------------------------------------------------------------------ the answers


def generate_answers(lm, ids: list[str], prompts: list[str], max_new_tokens: int, batch_size: int,
                     checkpoints: Checkpoints, stop_text: str | None = None, site: str | None = None,
                     after_batch=None):
    """Answer each prompt; returns a frame of id, prompt_ids, answer_ids, answer_logprobs, stopped, answer.

    stop_text (answer_stop's): the text that ends an answer besides the end token, or None.
    Batches that finished before a kill are read back from `checkpoints`; only the rest is generated.
    after_batch(frame, recording): called on each batch (those read back too, with no recording) before it is
    checkpointed, so that what it writes (labels, exact answers, activations) is never behind the checkpoints;
    recording is the decoding's sites.Recording at `site` (None without a site).
    """
    import pandas as pd
    import torch

    from truthmap.lm.sites import record

    wanted = set(ids)
    finished = [part[part["id"].isin(wanted)] for part in checkpoints.batches()]
    done = {i for part in finished for i in part["id"]}
    todo = [(i, encode_prompt(lm.tokenizer, p, lm.is_chat)) for i, p in zip(ids, prompts) if i not in done]
    stop_ids = stop_token_ids(lm.tokenizer, lm.model)
    stop_check = stop_at_text(lm.tokenizer, stop_text)
    for part in finished:
        if after_batch is not None and len(part):
            after_batch(part.reset_index(drop=True), None)

    def answer(batch):
        prompt_ids = [p for _, p in batch]
        prefix, first = batch_prefix(lm, prompt_ids, site)
        recorder = record(lm.model, site, prompt_ids, prefix_len=len(prefix.ids) if prefix else 0, first=first,
                          dtype=getattr(torch, STORE_DTYPE))  # cast now as the store would: the same bytes
        with recorder if site else nullcontext() as recording:
            generations = generate_batch(lm.model, lm.tokenizer, prompt_ids, max_new_tokens, stop_ids,
                                         stop_check=stop_check, recording=recording, prefix=prefix)
        frame = pd.DataFrame({"id": [i for i, _ in batch], "prompt_ids": prompt_ids,
                              **generation_columns(lm.tokenizer, generations)})
        if after_batch is not None:
            after_batch(frame, recording)
        return frame

    run_batches(todo, answer, checkpoints, batch_size=batch_size, description="Generating answers",
                key=lambda item: item[0], done=done, length=lambda item: len(item[1]), total=len(ids),
                after_batch=give_back_freed_memory)
    return load_in_order(checkpoints, ids).reset_index()


def give_back_freed_memory() -> None:
    """Hand the heap that a batch freed back to the OS (glibc keeps it otherwise): the KV cache and the recording
    are many tensors too small for their own mapping, and the process would stay at its largest batch's size,
    on top of which the probes then build (bench/compare: 700 MB after generating 1,000 WinoBias answers)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


MIN_PREFIX = 8  # shorter shared prefixes are not worth a separate forward pass


def batch_prefix(lm, prompts: list[list[int]], site: str | None):
    """The batch's shared first tokens (a chat template's system turn: 25 of SmolLM2's 50-token prompts), encoded
    once and reused by every row (decoding.Prefix), and with a site its output there at token 0 ([layers, width]).
    (None, None) when the prompts share fewer than MIN_PREFIX tokens or the model's cache cannot be shared.

    Every row keeps RECORD_WINDOW + 1 tokens of its own, so that the recorded positions other than token 0 (the
    last prompt tokens, sites.Recording) are fed in the batch's own prefill.
    """
    import torch

    from truthmap.lm.decoding import encode_prefix, shared_prefix_length
    from truthmap.lm.sites import RECORD_WINDOW, capture

    length = shared_prefix_length(prompts, keep=RECORD_WINDOW + 1)
    if length < MIN_PREFIX:
        return None, None
    with capture(lm.model, site, torch.zeros(1, 1, dtype=torch.long)) if site else nullcontext() as captured:
        prefix = encode_prefix(lm.model, prompts[0][:length])
    if prefix is None:
        return None, None
    return prefix, captured.stack()[0, :, 0] if site else None


def answer_stop(spec, chat: bool) -> str | None:
    """The text that ends an answer besides the end token: None with a chat template (its end-of-turn token ends
    the answer), else the dataset's `base_stop` (a line break unless its entry says otherwise)."""
    return None if chat else spec.base_stop


def stop_at_text(tokenizer, stop_text: str | None):
    """A stop_check for decoding.generate_batch (None without a stop text): once the decoded answer holds
    stop_text after its leading whitespace, keep the tokens whose text ends before it.

    Leading whitespace is skipped so that an answer that opens with a line break ("A:\\n Paris") is not cut to
    nothing. A token that straddles the stop text (".\\n") is dropped with it: keeping it would put text after the
    line break into the answer, and re-tokenizing the part before it would give tokens the model did not write.
    """
    if not stop_text:
        return None

    def check(token_ids: list[int]) -> int | None:
        text = tokenizer.decode(token_ids)
        cut = text.find(stop_text, len(text) - len(text.lstrip()))
        if cut < 0:
            return None
        keep = len(token_ids)
        while keep and len(tokenizer.decode(token_ids[:keep])) > cut:
            keep -= 1
        return keep

    return check


def generation_columns(tokenizer, generations) -> dict[str, list]:
    """The columns every table of generated answers has (greedy or resampled)."""
    return {
        "answer_ids": [g.token_ids for g in generations],
        "answer_logprobs": [g.logprobs for g in generations],
        "stopped": [g.stopped for g in generations],
        "answer": [tokenizer.decode(g.token_ids) for g in generations],
    }


# ------------------------------------------------------------------------------------------ what the stage writes


def write_answers(run: RunDir, config: RunConfig, settings: dict, records, prompts, frame, lm, started,
                  site: str | None = None, extra: dict | None = None) -> None:
    """answers.parquet (records + located answers, label.label_and_locate's frame) and run.json (with `extra`'s
    keys)."""
    import time

    import pandas as pd

    from truthmap.rundir import ANSWER_COLUMNS, package_versions, write_parquet, write_run_json
    from truthmap.stages.locate import gold_agreement

    ids = [r.id for r in records]
    table = pd.DataFrame(
        {
            "id": ids,
            "question": [r.question for r in records],
            "prompt": prompts,
            "gold": [list(r.answers) for r in records],
            "group": [r.group for r in records],
        }
    ).merge(frame, on="id")
    write_parquet(run.answers, table[list(ANSWER_COLUMNS)])
    write_run_json(
        run,
        {
            "settings": settings,
            "config": config.to_dict(),
            "model_source": lm.source,
            "model_identity": getattr(lm, "identity", None),  # which weights made the answers (models.model_identity)
            "chat_template": lm.is_chat,
            "device": lm.device,
            "dtype": lm.dtype,
            "n_samples": len(table),
            "exact_answer_agreement": gold_agreement(table),
            "activations_while_generating": site,  # the store of this site came from the answers' own decoding
            "seconds": round(time.time() - started, 1),
            "versions": package_versions(),
            **(extra or {}),
        },
    )


def summarize_answers(run: RunDir) -> dict:
    from truthmap.rundir import ANSWERS_FIX, read_json, read_parquet

    table = read_parquet(run.answers, ["correct", "stopped", "exact_answer_valid", "exact_answer_source"], ANSWERS_FIX)
    no_answer = table["exact_answer_source"] == "no_answer"
    wrong = ~table["correct"] & ~no_answer
    made = read_json(run.run_json)
    return {
        "answers": str(run.answers),
        "samples": len(table),
        "correct": int(table["correct"].sum()),
        "incorrect": int((~table["correct"]).sum()),
        "stopped": int(table["stopped"].sum()),  # answers that ended before the token limit
        "valid_exact_answer": int(table["exact_answer_valid"].sum()),
        "exact_answer_sources": table["exact_answer_source"].value_counts().to_dict(),
        # Answers that name no answer are their own kind: left out of probes and baselines, as in the paper.
        "no_answer": int(no_answer.sum()),
        "wrong_with_exact_answer": f"{int(table['exact_answer_valid'][wrong].sum())} of {int(wrong.sum())}",
        "locate": made["settings"].get("locate", "gold"),
        "gold_agreement": made.get("exact_answer_agreement"),
    }
