"""Stage 3: the exact answer inside each generation, and the token positions the probes read.

Correct answers: the earliest gold alias in the text. Classification datasets: the label the answer chose.
Other incorrect answers: an LLM extracts the span with a few-shot prompt, up to `tries` times (greedy first, then
sampled); an extraction is valid only if it occurs in the answer (case-insensitive) or is "NO ANSWER".
Character spans become token indices through the tokenizer's offset mapping, never by decoding prefixes.
"""

from __future__ import annotations

import re

from truthmap.datasets import gold_span, label_span
from truthmap.decoding import batches, generate_batch
from truthmap.models import encode_prompt, stop_token_ids
from truthmap.progress import progress_bar
from truthmap.rundir import EXACT_POSITIONS, POSITIONS, Checkpoints, position_column

NO_ANSWER = "NO ANSWER"
EXTRACTION_INSTRUCTION = (
    "Copy the exact answer from the long answer: only the few words that answer the question, nothing else. "
    f"If the long answer does not answer the question, write {NO_ANSWER}."
)
EXTRACTION_EXAMPLES = (
    (
        "Which musical featured the song The Street Where You Live?",
        'The song "The Street Where You Live" is from the Lerner and Loewe musical "My Fair Lady". '
        "It is one of the best-known songs of the show.",
        "My Fair Lady",
    ),
    ("What is the capital of Peru?", "The capital of Peru is Lima, a large city on the Pacific coast.", "Lima"),
    ("In which country is the city of Kandy?", "I'm sorry, I don't have information about that city.", NO_ANSWER),
    (
        "Who was the first man to walk on the moon?",
        "The first person to walk on the Moon was Neil Armstrong, commander of Apollo 11, in July 1969.",
        "Neil Armstrong",
    ),
)
EXTRACTION_MAX_NEW_TOKENS = 16
# Small models sometimes copy a whole sentence back; that is no exact answer, so it counts as a failed try.
EXTRACTION_MAX_WORDS = 10


def extraction_prompt_ids(tokenizer, chat: bool, question: str, answer: str) -> list[int]:
    """Few-shot as chat turns for instruct models (small models follow turns better), as plain text otherwise."""
    def user_turn(q, a):
        return f"Question: {q}\nLong answer: {a}\nExact answer:"

    if chat:
        # The instruction goes in the first user turn: as a system turn, SmolLM2 answers NO ANSWER five times
        # as often and extracts a fifth as many spans.
        messages = []
        for q, a, exact in EXTRACTION_EXAMPLES:
            messages += [{"role": "user", "content": user_turn(q, a)}, {"role": "assistant", "content": exact}]
        messages[0]["content"] = EXTRACTION_INSTRUCTION + "\n\n" + messages[0]["content"]
        messages.append({"role": "user", "content": user_turn(question, answer)})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    shots = "\n\n".join(f"{user_turn(q, a)} {exact}" for q, a, exact in EXTRACTION_EXAMPLES)
    return encode_prompt(tokenizer, f"{EXTRACTION_INSTRUCTION}\n\n{shots}\n\n{user_turn(question, answer)}", False)


def parse_extraction(output: str, answer: str) -> tuple[str, tuple[int, int] | None] | None:
    """(source, span) for a valid extraction, None for an invalid one."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else ""
    text = re.sub(r"^exact answer:\s*", "", text, flags=re.I).strip().strip("\"'“”").rstrip(".").strip()
    if not text:
        return None
    if text.upper() == NO_ANSWER:
        return "no_answer", None
    if len(text.split()) > EXTRACTION_MAX_WORDS:
        return None
    found = re.search(re.escape(text), answer, flags=re.IGNORECASE)
    return ("extracted", found.span()) if found else None


def answer_offsets(tokenizer, answer: str, answer_ids: list[int]) -> list[tuple[int, int]] | None:
    """Character span of each generated token, or None when it cannot be known.

    The tokenizer's offset mapping of the re-encoded text, when re-encoding gives the generated tokens back.
    Models sometimes generate a split the tokenizer would not choose ("ĠA" + "aland" for "ĠAal" + "and"); then
    the spans come from each generated token's bytes.
    """
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == list(answer_ids):
        return [tuple(span) for span in encoded["offset_mapping"]]
    return _offsets_from_bytes(tokenizer, answer, answer_ids)


def _offsets_from_bytes(tokenizer, answer: str, answer_ids: list[int]) -> list[tuple[int, int]] | None:
    byte_level = "ByteLevel" in repr(tokenizer.backend_tokenizer.decoder)
    pieces = [_token_bytes(token, byte_level) for token in tokenizer.convert_ids_to_tokens(list(answer_ids))]
    if any(p is None for p in pieces) or b"".join(pieces).decode("utf-8", errors="replace") != answer:
        return None
    char_of_byte = [i for i, char in enumerate(answer) for _ in char.encode("utf-8")]
    offsets, at = [], 0
    for piece in pieces:
        start = char_of_byte[at] if at < len(char_of_byte) else len(answer)
        end = char_of_byte[at + len(piece) - 1] + 1 if piece else start
        offsets.append((start, end))
        at += len(piece)
    return offsets


_BYTE_OF_CHAR = None


def _token_bytes(token: str, byte_level: bool) -> bytes | None:
    """The bytes a token stands for: GPT-2 byte-level alphabet, or SentencePiece ("▁" = space, <0xNN> = a byte)."""
    global _BYTE_OF_CHAR
    if byte_level:
        if _BYTE_OF_CHAR is None:
            printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
            extra = [b for b in range(256) if b not in printable]
            _BYTE_OF_CHAR = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
        if any(char not in _BYTE_OF_CHAR for char in token):
            return None
        return bytes(_BYTE_OF_CHAR[char] for char in token)
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last token overlapping the character span [start, end)."""
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    return (hits[0], hits[-1]) if hits else None


def token_positions(prompt_len: int, answer_len: int, exact_tokens: tuple[int, int] | None) -> dict[str, int]:
    """Absolute indices into prompt_ids + answer_ids for every probed position, clamped to the sequence.

    last_q is the prompt's last token (for chat models, the end of the assistant header), the one whose
    next-token prediction is the answer's first token. Exact-answer positions are -1 without an exact answer.
    """
    length = prompt_len + answer_len
    last = length - 1
    found = {
        "last_q": prompt_len - 1,
        "first_answer": min(prompt_len, last),
        "second_answer": min(prompt_len + 1, last),
        **{str(-k): max(length - k, 0) for k in range(8, 0, -1)},
    }
    if exact_tokens is None:
        return found | {p: -1 for p in EXACT_POSITIONS}
    first, final = prompt_len + exact_tokens[0], prompt_len + exact_tokens[1]
    return found | {
        "exact_answer_before_first": first - 1,
        "exact_answer_first": first,
        "exact_answer_last": final,
        "exact_answer_after_last": min(final + 1, last),
    }


def extract_with_llm(lm, rows: list[tuple[str, str, str]], batch_size: int, checkpoints: Checkpoints, tries: int, seed: int):
    """rows: (id, question, answer). Returns {id: (source, span)} with source "not_found" after `tries` failures."""
    import pandas as pd

    done = checkpoints.load()
    results = {r.id: (r.source, None if r.start < 0 else (r.start, r.end)) for r in done.itertuples()}
    todo = [row for row in rows if row[0] not in results]
    # The exact answer is one line: stopping at the first newline saves most of the decoding.
    newline = lm.tokenizer("\n", add_special_tokens=False)["input_ids"]
    stop_ids = stop_token_ids(lm.tokenizer, lm.model) + (newline if len(newline) == 1 else [])
    with progress_bar(total=len(rows), initial=len(rows) - len(todo), description="Extracting exact answers") as advance:
        for batch in batches(todo, batch_size):
            found = {}
            for attempt in range(tries):
                pending = [row for row in batch if row[0] not in found]
                if not pending:
                    break
                prompts = [extraction_prompt_ids(lm.tokenizer, lm.is_chat, q, a) for _, q, a in pending]
                temperature = 0.0 if attempt == 0 else 1.0
                outputs = generate_batch(
                    lm.model, lm.tokenizer, prompts, EXTRACTION_MAX_NEW_TOKENS, stop_ids, temperature, seed + attempt
                )
                for (row_id, _, answer), output in zip(pending, outputs):
                    parsed = parse_extraction(lm.tokenizer.decode(output.token_ids, skip_special_tokens=True), answer)
                    if parsed is not None:
                        found[row_id] = parsed
            batch_results = {row[0]: found.get(row[0], ("not_found", None)) for row in batch}
            checkpoints.write(
                pd.DataFrame(
                    {
                        "id": list(batch_results),
                        "source": [s for s, _ in batch_results.values()],
                        "start": [span[0] if span else -1 for _, span in batch_results.values()],
                        "end": [span[1] if span else -1 for _, span in batch_results.values()],
                    }
                )
            )
            results.update(batch_results)
            advance(len(batch))
    return results


def exact_answer_columns(frame, tokenizer, spans: dict) -> dict[str, list]:
    """From {id: (source, span)} and the answers frame, the exact-answer and position columns of answers.parquet."""
    columns = {k: [] for k in ("exact_answer", "exact_answer_valid", "exact_answer_source", "exact_start", "exact_end")}
    columns |= {position_column(p): [] for p in POSITIONS}
    for row in frame.itertuples():
        source, span = spans[row.id]
        exact_tokens = None
        if span is not None:
            offsets = answer_offsets(tokenizer, row.answer, row.answer_ids)
            exact_tokens = span_to_tokens(offsets, *span) if offsets is not None else None
            if exact_tokens is None:
                source, span = "token_mismatch", None
        columns["exact_answer"].append(row.answer[span[0] : span[1]] if span else "")
        columns["exact_answer_valid"].append(exact_tokens is not None)
        columns["exact_answer_source"].append(source)
        columns["exact_start"].append(span[0] if span else -1)
        columns["exact_end"].append(span[1] if span else -1)
        positions = token_positions(len(row.prompt_ids), len(row.answer_ids), exact_tokens)
        for name, index in positions.items():
            columns[position_column(name)].append(index)
    return columns


def direct_spans(spec, records, answers: list[str], correct: list[bool]) -> dict:
    """Spans found without a model: labels for classification datasets, gold aliases for correct answers."""
    spans = {}
    for record, answer, is_right in zip(records, answers, correct):
        if spec.exact_answer == "label":
            span = label_span(spec, record, answer)
            spans[record.id] = ("label", span) if span else ("not_found", None)
        elif is_right and (span := gold_span(record, answer)) is not None:
            spans[record.id] = ("gold_match", span)
    return spans
