"""Stage 3: the exact answer inside each generation, and the token positions the probes read.

Classification datasets: the label the answer chose. Open answers: an LLM extracts the span with a few-shot
prompt, the same way for right and wrong answers ("blind"); the paper's way (a gold alias for correct answers, the
extractor for the others) is `locate="gold"`. The gold alias of correct answers is kept either way, as a check.

The default extractor is constrained while it decodes: it can write only a run of the answer's own tokens, or NO
ANSWER, so every extraction is valid and its tokens are known. The free-form extractor (up to `tries` tries,
greedy then sampled, valid only if the text occurs in the answer) stays for comparison. The few-shot prefix of
the extraction prompt is encoded once and its KV cache reused by every batch.
Character spans become token indices through the tokenizer's offset mapping, never by decoding prefixes.
"""

from __future__ import annotations

import re

from truthmap.batches import run_batches
from truthmap.datasets import gold_span, label_span
from truthmap.lm.decoding import generate_batch
from truthmap.lm.models import encode_prompt, stop_token_ids
from truthmap.rundir import EXACT_POSITIONS, POSITIONS, position_column
from truthmap.runstate import Checkpoints

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
        "In which country is the city of Austin?",
        "Austin is located in the state of Texas, United States, on the Colorado River.",
        "United States",
    ),
    (
        "Who was the first man to walk on the moon?",
        "The first person to walk on the Moon was Neil Armstrong, commander of Apollo 11, in July 1969.",
        "Neil Armstrong",
    ),
)
EXACT_ANSWER_LEAD = "Exact answer:"
# Part of a run's settings: bump it when the extraction prompt changes, so that a rerun does not mix exact answers
# located by two prompts.
EXTRACTION_PROMPT_VERSION = 2
EXTRACTION_MAX_NEW_TOKENS = 16
# Small models sometimes copy a whole sentence back; that is no exact answer, so it counts as a failed try.
EXTRACTION_MAX_WORDS = 10


def extraction_prompt_ids(tokenizer, chat: bool, question: str, answer: str) -> list[int]:
    """Few-shot as chat turns for instruct models (small models follow turns better), as plain text otherwise.

    Either way the prompt ends with "Exact answer:", so the extraction's first token is a word after a space,
    as it is inside the long answer: a model copying a span then starts with the answer's own token.
    The question comes after the long answer, just before "Exact answer:": read last, it tells a small extractor
    which of the answer's names is asked for (the country, not the state beside it). SmolLM2's blind spans
    overlap the gold alias on 133 instead of 123 of 143 right answers with it (the built-in dataset's test
    split, not used to choose: 105 instead of 99 of 118).
    """
    def question_and_answer(q, a):
        return f"Long answer: {a}\nQuestion: {q}"

    if chat:
        # The instruction goes in the first user turn: as a system turn, SmolLM2 answers NO ANSWER five times
        # as often and extracts a fifth as many spans.
        messages = []
        for q, a, exact in EXTRACTION_EXAMPLES:
            messages += [{"role": "user", "content": question_and_answer(q, a)},
                         {"role": "assistant", "content": f"{EXACT_ANSWER_LEAD} {exact}"}]
        messages[0]["content"] = EXTRACTION_INSTRUCTION + "\n\n" + messages[0]["content"]
        messages.append({"role": "user", "content": question_and_answer(question, answer)})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text + EXACT_ANSWER_LEAD, add_special_tokens=False)["input_ids"]
    shots = "\n\n".join(f"{question_and_answer(q, a)}\n{EXACT_ANSWER_LEAD} {exact}" for q, a, exact in EXTRACTION_EXAMPLES)
    text = f"{EXTRACTION_INSTRUCTION}\n\n{shots}\n\n{question_and_answer(question, answer)}\n{EXACT_ANSWER_LEAD}"
    return encode_prompt(tokenizer, text, False)


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


def extract_spans(lm, rows: list[tuple], batch_size: int, checkpoints: Checkpoints, method: str = "constrained",
                  tries: int = 1, seed: int = 0, prefix=None, progress: bool = True) -> dict:
    """rows: (id, question, answer, answer_ids). Returns {id: (source, char span or None)}.

    answer_ids: the answer's tokens as the extractor's tokenizer has them; None re-encodes the text (an
    extractor with a tokenizer other than the answering model's).

    method "constrained": one greedy pass that can only write a run of the answer's own tokens or NO ANSWER, so
    every extraction is valid. "free": the model writes freely, up to `tries` times (greedy, then sampled), and
    an extraction counts only if it occurs in the answer; "not_found" after that.
    prefix: extraction_prefix(lm), when the caller keeps it over many calls (None: encoded here).
    """
    import pandas as pd

    done = checkpoints.load()
    results = {r.id: (r.source, None if r.start < 0 else (r.start, r.end)) for r in done.itertuples()}
    prompts = {row[0]: extraction_prompt_ids(lm.tokenizer, lm.is_chat, row[1], row[2]) for row in rows
               if row[0] not in results}
    prefix = (prefix or extraction_prefix(lm)) if prompts else None

    def extract(batch):
        batch_prompts = [prompts[row[0]] for row in batch]
        shared = prefix if prefix and all(p[: len(prefix.ids)] == prefix.ids for p in batch_prompts) else None
        if method == "constrained":
            found = _extract_constrained(lm, batch, batch_prompts, shared)
        else:
            found = _extract_free(lm, batch, batch_prompts, shared, tries, seed)
        results.update(found)
        return pd.DataFrame(
            {
                "id": list(found),
                "source": [source for source, _ in found.values()],
                "start": [span[0] if span else -1 for _, span in found.values()],
                "end": [span[1] if span else -1 for _, span in found.values()],
            }
        )

    run_batches(rows, extract, checkpoints, batch_size=batch_size, key=lambda row: row[0], done=set(results),
                length=lambda row: len(prompts[row[0]]), description="Extracting exact answers", progress=progress)
    return results


def extraction_prefix(lm):
    """The extraction prompts' shared first tokens (instruction and few-shot examples), encoded once.

    Found as the common start of two prompts that share nothing of their own; a batch whose prompts do not all
    start with it (a question that merges with the last shared token) is encoded whole instead.
    """
    from truthmap.lm.decoding import encode_prefix

    one = extraction_prompt_ids(lm.tokenizer, lm.is_chat, "Who?", "A.")
    other = extraction_prompt_ids(lm.tokenizer, lm.is_chat, "7 x", "9 y")
    common = next((i for i, (a, b) in enumerate(zip(one, other)) if a != b), min(len(one), len(other)))
    return encode_prefix(lm.model, one[: max(common - 1, 1)])  # one token back: it may merge with what follows


def _extract_constrained(lm, batch, prompts, prefix) -> dict:
    answers = [[int(t) for t in row[3]] if row[3] is not None
               else lm.tokenizer(row[2], add_special_tokens=False)["input_ids"] for row in batch]
    stop_ids = _line_end_ids(lm)  # a base model ends its exact answer with the line, as the few-shot examples do
    starts = [span_starts(lm.tokenizer, answer, row[1]) for answer, row in zip(answers, batch)]
    chooser = SpanChooser(lm.tokenizer, answers, starts, _no_answer_ids(lm.tokenizer), stop_ids)
    generate_batch(lm.model, lm.tokenizer, prompts, EXTRACTION_MAX_NEW_TOKENS, stop_ids, prefix=prefix, choose=chooser)
    found = {}
    for k, (row_id, _, answer, _) in enumerate(batch):
        tokens = chooser.span(k)
        if tokens is None:
            found[row_id] = ("no_answer", None)
            continue
        offsets = answer_offsets(lm.tokenizer, answer, answers[k])
        span = None if offsets is None else tokens_to_chars(answer, offsets, *tokens)
        found[row_id] = ("extracted", span) if span else ("token_mismatch", None)
    return found


def _line_end_ids(lm) -> list[int]:
    """The model's stop tokens and the line break: the exact answer is one line."""
    newline = lm.tokenizer("\n", add_special_tokens=False)["input_ids"]
    return stop_token_ids(lm.tokenizer, lm.model) + (newline if len(newline) == 1 else [])


def _extract_free(lm, batch, prompts, prefix, tries: int, seed: int) -> dict:
    stop_ids = _line_end_ids(lm)  # stopping at the first line break saves most of the decoding
    prompt_of = {row[0]: prompt for row, prompt in zip(batch, prompts)}
    found = {}
    for attempt in range(tries):
        pending = [row for row in batch if row[0] not in found]
        if not pending:
            break
        temperature = 0.0 if attempt == 0 else 1.0
        outputs = generate_batch(lm.model, lm.tokenizer, [prompt_of[row[0]] for row in pending],
                                 EXTRACTION_MAX_NEW_TOKENS, stop_ids, temperature, seed + attempt, prefix=prefix)
        for row, output in zip(pending, outputs):
            parsed = parse_extraction(lm.tokenizer.decode(output.token_ids, skip_special_tokens=True), row[2])
            if parsed is not None:
                found[row[0]] = parsed
    return {row[0]: found.get(row[0], ("not_found", None)) for row in batch}


def _no_answer_ids(tokenizer) -> list[int]:
    return tokenizer(NO_ANSWER, add_special_tokens=False)["input_ids"]


class SpanChooser:
    """A decoding rule under which each row can write only a contiguous run of its answer's tokens, or NO ANSWER.

    The first token chooses where the span starts: the most probable of the allowed starts (`span_starts`; either
    leading space: the answer's own first token has none, a word after "Exact answer:" has one) or the first
    token of NO ANSWER. The row then copies on along its answer, and at each length k the model's probability of ending
    there is noted: log p(span of k tokens, then stop). The span kept is the most probable one, so a model
    that would copy on (copying is easy) still ends where it most expected to stop.

    State of a row: the (branch, next index) pairs still consistent with what it wrote; branch 0 is its
    answer, branch 1 the NO ANSWER tokens.
    """

    def __init__(self, tokenizer, answers: list[list[int]], starts: list[list[int]], no_answer: list[int],
                 stop_ids: list[int]):
        self.tokenizer = tokenizer
        self.branches = [(answer, no_answer) for answer in answers]
        self.starts = starts
        self.states: list[set | None] = [None] * len(answers)  # None: nothing written yet
        self.written = [0] * len(answers)
        self.logprob = [0.0] * len(answers)  # of the tokens written so far
        self.best: list[tuple[float, tuple[int, int] | None]] = [(float("-inf"), None)] * len(answers)
        self.stop_ids = sorted(set(stop_ids))
        self.sentencepiece = "\u2581" in "".join(tokenizer.convert_ids_to_tokens(tokenizer(" a b")["input_ids"]))

    def __call__(self, logits, rows):
        import torch

        logprobs = torch.log_softmax(logits.double(), dim=-1)  # [rows, vocab]
        stop_logprobs = logprobs[:, self.stop_ids].logsumexp(-1).tolist()
        chosen = []
        for k, row in enumerate(rows.tolist()):
            if self.written[row]:
                self._note_end(row, self.logprob[row] + stop_logprobs[k])
            # Copying on only lowers the span's probability: past the best end so far, no later end can win.
            moves = self._moves(row) if self.logprob[row] > self.best[row][0] else {}
            if not moves:
                chosen.append(self.stop_ids[0])
                continue
            options = list(moves)
            token = options[int(logits[k, options].argmax())]
            self.states[row] = moves[token]
            self.written[row] += 1
            self.logprob[row] += float(logprobs[k, token])
            chosen.append(token)
        return torch.tensor(chosen, device=logits.device)

    def _moves(self, row) -> dict:
        """token -> the row's state after writing it."""
        answer, no_answer = self.branches[row]
        moves = {}
        if self.states[row] is None:
            for index in self.starts[row]:
                token = answer[index]
                for option in (token, *self._respaced(token)):
                    moves.setdefault(option, set()).add((0, index + 1))
            moves.setdefault(no_answer[0], set()).add((1, 1))
            return moves
        for branch, at in self.states[row]:
            tokens = self.branches[row][branch]
            if at < len(tokens):
                moves.setdefault(tokens[at], set()).add((branch, at + 1))
        return moves

    def _note_end(self, row, score: float) -> None:
        answer, no_answer = self.branches[row]
        starts = [at - self.written[row] for branch, at in self.states[row] if branch == 0]
        if starts:
            span = (min(starts), min(starts) + self.written[row] - 1)
        elif (1, len(no_answer)) in self.states[row]:
            span = None
        else:
            return  # part of NO ANSWER: no place to end
        if score > self.best[row][0]:
            self.best[row] = (score, span)

    def _respaced(self, token: int) -> list[int]:
        """The same word with the other leading space: "Hart" for " Hart" and " Hart" for "Hart", if in the vocabulary."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece[:1] in ("Ġ", "\u2581"):
            other = piece[1:]
        else:
            other = ("\u2581" if self.sentencepiece else "Ġ") + piece
        found = self.tokenizer.convert_tokens_to_ids(other) if other else None
        return [found] if isinstance(found, int) and found != self.tokenizer.unk_token_id else []

    def span(self, row) -> tuple[int, int] | None:
        """First and last answer token of the most probable span (the earliest run, if it occurs twice); None for
        NO ANSWER."""
        return self.best[row][1]


# Words that start no exact answer: articles, and pronouns, which point at an answer without naming it.
NOT_A_START = {"the", "a", "an", "this", "that", "it", "he", "she", "they", "i", "we", "you"}


def span_starts(tokenizer, answer_ids: list[int], question: str) -> list[int]:
    """Token indices where an exact answer may start: the first token of a word that is neither a word of the
    question nor an article or pronoun.

    A small extractor often copies the question's subject ("Egypt" from "The capital of Egypt is Cairo") or the
    sentence from its start ("The currency in Russia is the ruble"); the answer to a question is not one of its
    own words. When every word of the answer is in the question, any word
    may start the span, and an answer of punctuation alone may start anywhere.
    """
    pieces = [tokenizer.decode([token]) for token in answer_ids]
    starts = [i for i, piece in enumerate(pieces) if i == 0 or piece[:1].isspace() or pieces[i - 1][-1:].isspace()
              or (piece[:1].isalnum() and not pieces[i - 1][-1:].isalnum())]
    bounds = starts + [len(pieces)]
    words = {start: re.sub(r"\W", "", "".join(pieces[start:end]).lower()) for start, end in zip(bounds, bounds[1:])}
    asked = set(re.findall(r"\w+", question.lower())) | NOT_A_START
    return ([i for i in starts if words[i] and words[i] not in asked] or [i for i in starts if words[i]]
            or list(range(len(answer_ids))))


def tokens_to_chars(answer: str, offsets, first: int, last: int) -> tuple[int, int] | None:
    """Character span of tokens first..last, without surrounding spaces and punctuation tokens at either end."""
    def bare(i):
        return not answer[offsets[i][0] : offsets[i][1]].strip(_PUNCTUATION)

    while first < last and bare(last):
        last -= 1
    while first < last and bare(first):
        first += 1
    start, end = offsets[first][0], offsets[last][1]
    text = answer[start:end]
    start, end = start + len(text) - len(text.lstrip()), end - len(text) + len(text.rstrip())
    return (start, end) if end > start else None


_PUNCTUATION = " \t\n.,;:!?\"'()[]{}“”‘’"


def exact_answer_columns(frame, tokenizer, spans: dict, golds: dict | None = None) -> dict[str, list]:
    """From {id: (source, span)} and the answers frame, the exact-answer and position columns of answers.parquet.

    golds: {id: span} of the gold alias in correct answers, kept beside the exact answer (the paper's way of
    locating, and the check of the blind one).
    """
    columns = {k: [] for k in ("exact_answer", "exact_answer_valid", "exact_answer_source", "exact_start", "exact_end",
                               "gold_start", "gold_end", "gold_first_token", "gold_last_token")}
    columns |= {position_column(p): [] for p in POSITIONS}
    for row in frame.itertuples():
        source, span = spans[row.id]
        gold = (golds or {}).get(row.id)
        offsets = answer_offsets(tokenizer, row.answer, row.answer_ids) if span or gold else None
        exact_tokens = span_to_tokens(offsets, *span) if span and offsets is not None else None
        if span is not None and exact_tokens is None:
            source, span = "token_mismatch", None
        gold_tokens = span_to_tokens(offsets, *gold) if gold and offsets is not None else None
        columns["exact_answer"].append(row.answer[span[0] : span[1]] if span else "")
        columns["exact_answer_valid"].append(exact_tokens is not None)
        columns["exact_answer_source"].append(source)
        columns["exact_start"].append(span[0] if span else -1)
        columns["exact_end"].append(span[1] if span else -1)
        columns["gold_start"].append(gold[0] if gold_tokens else -1)
        columns["gold_end"].append(gold[1] if gold_tokens else -1)
        prompt_len = len(row.prompt_ids)
        columns["gold_first_token"].append(prompt_len + gold_tokens[0] if gold_tokens else -1)
        columns["gold_last_token"].append(prompt_len + gold_tokens[1] if gold_tokens else -1)
        positions = token_positions(prompt_len, len(row.answer_ids), exact_tokens)
        for name, index in positions.items():
            columns[position_column(name)].append(index)
    return columns


def locate_answers(spec, records, answers: list[str], answer_ids: list, correct: list[bool], locate: str, extract) -> dict:
    """{id: (source, span)} for every answer: its label, its gold alias (locate="gold", correct answers), or what
    `extract` finds; extract(rows) takes (id, question, answer, answer_ids) rows (extract_spans, or its shards)."""
    spans = direct_spans(spec, records, answers, correct, locate)
    pending = [(r.id, r.question, a, ids) for r, a, ids in zip(records, answers, answer_ids) if r.id not in spans]
    if spec.exact_answer != "match":
        return spans | {row[0]: ("not_found", None) for row in pending}
    return spans | (extract(pending) if pending else {})


def direct_spans(spec, records, answers: list[str], correct: list[bool], locate: str = "blind") -> dict:
    """Spans found without a model: the label for classification datasets; with locate="gold", the gold alias
    in correct answers (the paper's way; blind, the extractor locates right and wrong answers alike)."""
    spans = {}
    if spec.exact_answer == "label":
        for record, answer in zip(records, answers):
            span = label_span(spec, record, answer)
            spans[record.id] = ("label", span) if span else ("not_found", None)
    elif locate == "gold":
        spans = {key: ("gold_match", span) for key, span in gold_spans(records, answers, correct).items()}
    return spans


def gold_spans(records, answers: list[str], correct: list[bool]) -> dict:
    """{id: character span of the earliest gold alias} for the correct answers that contain one."""
    found = {}
    for record, answer, is_right in zip(records, answers, correct):
        if is_right and (span := gold_span(record, answer)) is not None:
            found[record.id] = span
    return found


def gold_agreement(table) -> dict:
    """How the located exact answers of correct answers compare with their gold alias, in tokens.

    same: the same first and last token; overlapping: at least one token in common. Over the correct answers
    whose gold alias was found; a NO ANSWER or invalid exact answer counts as disagreeing.
    """
    rows = table[table["correct"] & (table["gold_first_token"] >= 0)]
    first, last = rows[position_column("exact_answer_first")], rows[position_column("exact_answer_last")]
    valid = rows["exact_answer_valid"]
    same = valid & (first == rows["gold_first_token"]) & (last == rows["gold_last_token"])
    overlapping = valid & (first <= rows["gold_last_token"]) & (last >= rows["gold_first_token"])
    n = len(rows)
    return {
        "correct_with_gold": n,
        "same_tokens": int(same.sum()),
        "overlapping": int(overlapping.sum()),
        "same_share": round(float(same.mean()), 3) if n else None,
        "overlapping_share": round(float(overlapping.mean()), 3) if n else None,
    }
