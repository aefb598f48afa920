"""Read dataset files into Records: one small loader per file format, and `load_records` around them.

Every loader reads a whole source file and returns its rows in file order, with `id` set to the row number
(0-based, header excluded) and `group` to a row-local key or None. `load_records` then names them
"{dataset}-{split}-{row:05d}", so a rerun maps to the same rows, and applies the paper's sampling:
- a dataset whose train and test entries name the same file (hotpotqa, hotpotqa_with_context,
  natural_questions_with_context, and the file-less geography and custom) is split by a seeded shuffle of its
  rows (seed 42, so the split never depends on the run's seed): 50/50, 80/20 for custom;
- at most 10,000 records per split, drawn with seed 42, as the paper's `train_test_split(..., random_state=42)`;
- then `n_samples`, drawn with the run's `seed`. A draw takes whole groups (WinoBias pro/anti pairs).

Departures from the paper's code, and why:
- HotpotQA: the paper drew 10k random rows (with replacement) of the HF train and validation splits. Only the dev
  set is on disk, so we split it 50/50; the same for the 500 with-context questions.
- Natural Questions with context: the paper's `nq_wc_dataset.csv` is not available; we use the NQ-open oracle file
  (question + the gold passage chunk) and split it 50/50.
- IMDB: the paper shuffled with an unseeded numpy state; we draw the 10k with seed 42.
- WinoBias: the pro- and anti-stereotype versions of a sentence sit half a type block apart in the files (row i of
  the 396 "pro" rows of a type pairs with row i of the 396 "anti" rows that follow). Adjacent rows 2k and 2k+1 are
  linked too: the same two occupations with opposite answers. A group holds all four rows. The paper had no groups: its `n_samples` took the first rows of the file.
- TriviaQA: the paper drew 10k of the 87,622 unfiltered-train questions; the train file here holds DPR's 8,837
  held-out unfiltered-train questions, all used. Test is unfiltered-dev, capped to 10k with seed 42 as in the paper
  (the same seed, but not the same rows: the files list the questions in another order).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib
import io
import json
import os
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from truthmap.datasets.registry import get_spec
from truthmap.datasets.spec import DatasetSpec, Record
from truthmap.errors import ConfigError, DataError, TruthmapWarning, check_name
from truthmap.tables import read_csv, read_jsonl, read_table, read_text

SPLITS = ("train", "test")
MAX_PER_SPLIT = 10_000
SAMPLING_SEED = 42  # the paper's random_state, for the fixed splits and the 10k cap
TRAIN_FRACTION = {"custom": 0.8}  # for datasets split from one source; 0.5 otherwise
DATA_DIR_ENV = "TRUTHMAP_DATA_DIR"
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)  # what literal_eval may raise
_DATA_DIR_HINT = f"pass --data-dir or set {DATA_DIR_ENV} to the folder that holds the dataset files"


@dataclass(frozen=True)
class CustomSource:
    """A user file of questions and answers: CSV or JSONL, chosen by extension."""

    path: str | Path
    question_column: str = "question"
    answer_column: str = "answer"


# ---------------------------------------------------------------------------------------------------------- reading


# The readers of user tables (tables.py), under the names the loaders below use.
_read_text, _read_csv, _read_jsonl = read_text, read_csv, read_jsonl


def _field(path: Path, line: int | str, row: dict, column: str) -> str:
    """A required, non-empty text field; `line` is a line number or a place such as "item 3"."""
    value = row.get(column)
    if value is None or not str(value).strip():
        where = f"line {line}" if isinstance(line, int) else line
        raise DataError(f"{path} {where}: column {column!r} is empty; fill it in or remove the row.")
    return str(value).strip()


def _literal_list(path: Path, line: int, column: str, text: str) -> list:
    try:
        value = ast.literal_eval(text)
    except _LITERAL_ERRORS:
        value = None
    if not isinstance(value, list) or not value:
        raise DataError(f"{path} line {line}: column {column!r} should be a non-empty list literal, got {text[:80]!r}.")
    return value


def _aliases(path: Path, line: int, column: str, value) -> list[str]:
    """Answer aliases: a list, or a string holding a JSON or Python list literal, or else one plain answer."""
    if isinstance(value, str) and value.strip().startswith("["):
        # A list of aliases, in JSON or as a Python literal. One that parses as neither is an error, not a gold
        # answer that happens to start with "[": as a literal string it would label every right answer wrong.
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(value)
                break
            except _LITERAL_ERRORS:
                continue
        else:
            raise DataError(
                f"{path} line {line}: column {column!r} starts with '[' but is not a valid JSON list (got "
                f"{value[:80]!r}); write it as [\"a\", \"b\"], or as one answer without the leading '['."
            )
    values = value if isinstance(value, list) else [value]
    aliases = [str(v).strip() for v in values if v is not None and str(v).strip()]
    if not aliases:
        raise DataError(f"{path} line {line}: column {column!r} has no answer (got {value!r}); give at least one.")
    return aliases


# ---------------------------------------------------------------------------------------------------------- loaders


def _load_triviaqa(path: Path, custom: CustomSource | None) -> list[Record]:
    # TSV without header, csv quoting; the answers are a Python list literal of aliases.
    records = []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t")
    for values in reader:
        if not values:
            continue
        if len(values) != 2:
            raise DataError(f"{path} line {reader.line_num}: expected 2 tab-separated fields, got {len(values)}.")
        aliases = _literal_list(path, reader.line_num, "answers", values[1])
        question = _field(path, reader.line_num, {"question": values[0]}, "question")
        records.append(Record(id=str(len(records)), question=question, answers=[str(a).strip() for a in aliases]))
    if not records:
        raise DataError(f"{path} is empty; expected lines of question<TAB>answers.")
    return records


def _load_hotpotqa(path: Path, custom: CustomSource | None) -> list[Record]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg}); expected a JSON list.") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty JSON list of {{question, answer}} objects.")
    return [
        Record(id=str(i), question=_field(path, f"item {i}", row, "question"),
               answers=[_field(path, f"item {i}", row, "answer")], extra={"type": str(row.get("type", ""))})
        for i, row in enumerate(rows)
    ]


def _load_hotpotqa_with_context(path: Path, custom: CustomSource | None) -> list[Record]:
    records = []
    for i, (line, row) in enumerate(_read_jsonl(path)):
        spans = [span for obj in row.get("answers_objects", []) for span in obj.get("spans", [])]
        # The paper wrote every sentence of every paragraph on its own line; sentences here are joined by 2 spaces.
        sentences = [
            sentence.strip()
            for paragraph in row.get("contexts", [])
            for sentence in re.split(r" {2,}", paragraph.get("paragraph_text", ""))
            if sentence.strip()
        ]
        records.append(Record(
            id=str(i), question=_field(path, line, row, "question_text"),
            answers=_aliases(path, line, "answers_objects", spans), context="\n".join(sentences),
            extra={"question_id": str(row.get("question_id", ""))},
        ))
    return records


def _load_nq_with_context(path: Path, custom: CustomSource | None) -> list[Record]:
    records = []
    for i, (line, row) in enumerate(_read_jsonl(path)):
        ctxs = row.get("ctxs") or [{}]
        records.append(Record(
            id=str(i), question=_field(path, line, row, "question"),
            answers=_aliases(path, line, "answers", row.get("answers")),
            context=_field(path, line, ctxs[0], "text"), extra={"title": str(ctxs[0].get("title", ""))},
        ))
    return records


def _load_movies(path: Path, custom: CustomSource | None) -> list[Record]:
    return [
        Record(id=str(i), question=_field(path, line, row, "Question"), answers=[_field(path, line, row, "Answer")])
        for i, (line, row) in enumerate(_read_csv(path, ("Question", "Answer")))
    ]


def _load_winobias(path: Path, custom: CustomSource | None) -> list[Record]:
    columns = ("type", "stereotype", "pronoun", "sentence", "answer", "incorrect_answer", "q", "q_instruct")
    rows = _read_csv(path, columns)
    records = []
    for i, (line, row) in enumerate(rows):
        sentence, q_instruct = _field(path, line, row, "sentence"), _field(path, line, row, "q_instruct")
        records.append(Record(
            id=str(i), question=f"{sentence} {q_instruct}", answers=[_field(path, line, row, "answer")],
            wrong_answers=[_field(path, line, row, "incorrect_answer")],
            extra={"sentence": sentence, "q": _field(path, line, row, "q"), "q_instruct": q_instruct,
                   "pronoun": row["pronoun"], "stereotype": row["stereotype"], "type": row["type"]},
        ))
    # Pair row i of a type's "pro" block with row i of the "anti" block after it; check they are the same item.
    start = 0
    while start < len(records):
        size = sum(1 for r in records[start:] if r.extra["type"] == records[start].extra["type"])
        half = size // 2
        for k in range(half):
            pro, anti = records[start + k], records[start + half + k]
            same = (pro.answers, pro.wrong_answers) == (anti.answers, anti.wrong_answers)
            if size % 2 or not same or (pro.extra["stereotype"], anti.extra["stereotype"]) != ("pro", "anti"):
                raise DataError(
                    f"{path} line {rows[start + k][0]}: no anti-stereotype partner at line {rows[start + half + k][0]}"
                    " (expected each type's 'pro' rows followed by their 'anti' versions in the same order); "
                    "use the WinoBias files from shared/data."
                )
            # Rows 2k and 2k+1 share both occupations with opposite answers, so their correctness is
            # anti-correlated: they join the group of their pro/anti versions (groups of four rows).
            pro.group = anti.group = f"quad-{start + k - k % 2:05d}"
        start += size
    return records


def _load_winogrande(path: Path, custom: CustomSource | None) -> list[Record]:
    records = []
    for i, (line, row) in enumerate(_read_csv(path, ("Question", "Answer", "Wrong_Answer"))):
        question = _field(path, line, row, "Question")
        # The base prompt restates the sentence without its trailing "Who/What does the blank refer to ...?".
        sentence = re.split(r"\s*(?:Who|What) does the blank refer to in the sentence\?", question)[0].strip()
        records.append(Record(
            id=str(i), question=question, answers=[_field(path, line, row, "Answer")],
            wrong_answers=[_field(path, line, row, "Wrong_Answer")], extra={"sentence": sentence},
        ))
    return records


def _load_mnli(path: Path, custom: CustomSource | None) -> list[Record]:
    labels = ("entailment", "neutral", "contradiction")
    records = []
    for i, (line, row) in enumerate(_read_csv(path, ("Question", "Answer"))):
        label = _field(path, line, row, "Answer").lower()
        if label not in labels:
            raise DataError(f"{path} line {line}: column 'Answer' is {label!r}; expected one of {', '.join(labels)}.")
        records.append(Record(
            id=str(i), question=_field(path, line, row, "Question"), answers=[label],
            wrong_answers=[other for other in labels if other != label], extra={"origin": row.get("Origin", "")},
        ))
    return records


def _load_imdb(path: Path, custom: CustomSource | None) -> list[Record]:
    names = {"0": "negative", "1": "positive"}
    records = []
    for i, (line, row) in enumerate(_read_csv(path, ("review_id", "label", "text"))):
        label = row["label"].strip()
        if label not in names:
            raise DataError(f"{path} line {line}: column 'label' is {label!r}; expected 0 (negative) or 1 (positive).")
        records.append(Record(
            id=str(i), question=_field(path, line, row, "text"), answers=[names[label]],
            wrong_answers=[names[str(1 - int(label))]],
            extra={"review_id": row["review_id"], "rating": row.get("rating", "")},
        ))
    return records


def _number_aliases(value: float) -> list[str]:
    """How the gold number is written: "9" for 9.0, "2.5", plus "1,200" for large integers (for gold_span)."""
    if value == int(value):
        aliases = [str(int(value))]
        if abs(value) >= 1000:
            aliases.append(f"{int(value):,}")
        return aliases
    return [repr(value)]


def _load_math(path: Path, custom: CustomSource | None) -> list[Record]:
    records = []
    for i, (line, row) in enumerate(_read_csv(path, ("question", "answer"))):
        # The paper evaluated the list literal and kept its first element; literal_eval does that without eval.
        first = _literal_list(path, line, "answer", row["answer"])[0]
        if isinstance(first, bool) or not isinstance(first, (int, float)):
            raise DataError(f"{path} line {line}: column 'answer' should start with a number, got {row['answer']!r}.")
        records.append(Record(
            id=str(i), question=_field(path, line, row, "question"), answers=_number_aliases(float(first)),
            extra={"value": float(first), "source": row.get("source", ""), "source_id": row.get("id", "")},
        ))
    return records


def _load_geography(path: Path | None, custom: CustomSource | None) -> list[Record]:
    # Imported here: the built-in data lives in its own module, which this one must not need at import time.
    items = importlib.import_module("truthmap.datasets.builtin").geography_records()
    return [
        dataclasses.replace(item, id=str(i), extra={**item.extra, "source_id": item.id}) for i, item in enumerate(items)
    ]


def _load_custom(path: Path, custom: CustomSource) -> list[Record]:
    qcol, acol = custom.question_column, custom.answer_column
    rows = read_table(path, (qcol, acol), what="Custom file")
    return [
        Record(id=str(i), question=_field(path, line, row, qcol), answers=_aliases(path, line, acol, _plain(row[acol])))
        for i, (line, row) in enumerate(rows)
    ]


def _plain(value):
    """A list cell of a Parquet file arrives as a numpy array; the alias parser takes lists and strings."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else value


LOADERS: dict[str, Callable[[Path | None, CustomSource | None], list[Record]]] = {
    "geography": _load_geography,
    "triviaqa": _load_triviaqa,
    "hotpotqa": _load_hotpotqa,
    "hotpotqa_with_context": _load_hotpotqa_with_context,
    "movies": _load_movies,
    "winobias": _load_winobias,
    "winogrande": _load_winogrande,
    "mnli": _load_mnli,
    "imdb": _load_imdb,
    "math": _load_math,
    "natural_questions_with_context": _load_nq_with_context,
    "custom": _load_custom,
}


# --------------------------------------------------------------------------------------------------------- sampling


def _groups(records: list[Record]) -> dict[str, list[int]]:
    """Positions of records by group (a record without a group is its own group), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for pos, record in enumerate(records):
        groups.setdefault(record.group or f"\0{record.id}", []).append(pos)
    return groups


def split_records(records: list[Record], split: str, train_fraction: float) -> list[Record]:
    """One side of a fixed seeded split of whole groups, in file order."""
    groups = _groups(records)
    keys = list(groups)
    random.Random(SAMPLING_SEED).shuffle(keys)
    n_train = round(len(keys) * train_fraction)
    chosen = keys[:n_train] if split == "train" else keys[n_train:]
    return [records[pos] for pos in sorted(pos for key in chosen for pos in groups[key])]


def subsample(records: list[Record], n: int, seed: int) -> list[Record]:
    """At most `n` records drawn as whole groups with `seed`, in file order (at least one group).

    Groups are taken in a seeded order and skipped when they would overflow `n`, so a larger `n` with the same
    seed extends a smaller draw.
    """
    if len(records) <= n:
        return list(records)
    groups = _groups(records)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    chosen: list[int] = []
    for key in keys:
        if len(chosen) + len(groups[key]) <= n:
            chosen.extend(groups[key])
        if len(chosen) == n:
            break
    if not chosen:  # n is smaller than any group: one whole group beats splitting it
        chosen = list(groups[keys[0]])
    return [records[pos] for pos in sorted(chosen)]


# ------------------------------------------------------------------------------------------------------------- API


def _source_path(spec: DatasetSpec, split: str, data_dir: str | Path | None) -> Path:
    root = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if root is None:
        raise DataError(f"Dataset '{spec.name}' reads files from a data directory, but none was given: "
                        f"{_DATA_DIR_HINT}.")
    root = Path(root).expanduser()
    if root.is_file():
        raise DataError(f"Data directory {root} is a file, not a directory: {_DATA_DIR_HINT}.")
    if not root.is_dir():
        raise DataError(f"Data directory {root} does not exist: {_DATA_DIR_HINT}.")
    path = (root / spec.files[split]).resolve()
    if not path.is_file():
        raise DataError(f"Dataset '{spec.name}' ({split}) needs the file {path}, which does not exist: "
                        f"{_DATA_DIR_HINT} (see shared/data/README.md).")
    return path


def load_records(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    custom: CustomSource | None = None,
) -> list[Record]:
    """The records of one split: at most 10,000 (seed 42), then `n_samples` of them (seeded by `seed`)."""
    spec = get_spec(name)
    check_name("split", split, SPLITS)
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ConfigError(f"n_samples must be a positive integer or None; got {n_samples!r}.")
    if spec.loader == "custom":
        if custom is None:
            raise ConfigError("Dataset 'custom' needs a CustomSource (a CSV or JSONL file); pass --custom-path.")
        path = Path(custom.path).expanduser()
        if path.is_dir():
            raise DataError(f"Custom file {path.resolve()} is a directory; give the path of a .csv or .jsonl file.")
        if not path.is_file():
            raise DataError(f"Custom file {path.resolve()} does not exist; check the path.")
    elif custom is not None:
        raise ConfigError(f"A custom file was given, but the dataset is '{name}'; use the dataset 'custom' for it.")
    else:
        path = _source_path(spec, split, data_dir) if any(spec.files.values()) else None

    try:
        records = LOADERS[spec.loader](path, custom)
    except (AttributeError, IndexError, KeyError, TypeError) as err:
        if path is None:  # built-in data: a bug, not a file problem
            raise
        raise DataError(f"{path} does not have the layout dataset '{name}' expects ({type(err).__name__}: {err}); "
                        "see shared/data/README.md for the formats.") from None
    if spec.files.get("train") == spec.files.get("test"):  # one source for both splits
        records = split_records(records, split, TRAIN_FRACTION.get(spec.name, 0.5))
    for record in records:  # fresh objects from the loader: renaming in place is safe, and quick for 25k rows
        record.id = f"{spec.name}-{split}-{int(record.id):05d}"
        record.group = f"{spec.name}-{split}-{record.group}" if record.group else None
    records = subsample(records, MAX_PER_SPLIT, SAMPLING_SEED)
    if n_samples is not None and n_samples > len(records):
        warnings.warn(TruthmapWarning(
            f"--n-samples {n_samples} is more than the {len(records)} questions of dataset '{name}' ({split} split); "
            f"using all {len(records)}."
        ), stacklevel=2)
    if n_samples is not None:
        records = subsample(records, n_samples, seed)
    if not records:
        raise DataError(f"Dataset '{name}' split '{split}' is empty{f' (from {path})' if path else ''}; "
                        "add rows to the source or use the other split.")
    return records
