"""The one reader of user tables: CSV, JSONL and Parquet files (CSV and JSONL also gzipped), chosen by extension.

Custom datasets (--custom-path), `truthmap import` and `truthmap score --input` read their files here, so every
command takes the same formats and reports a bad file the same way: one line naming the file and the line, where
a CSV's header is line 1 and its first row line 2 (as an editor shows it); a Parquet row is named "row N".
Text is read as UTF-8, with or without a byte-order mark (what Excel writes).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import warnings
import zlib
from pathlib import Path

from truthmap.errors import DataError, TruthmapWarning

FORMATS = (".csv", ".jsonl", ".parquet")  # each text format also as .gz


def table_format(path: Path) -> str | None:
    """".csv", ".jsonl" or ".parquet" by the file's extension (a .gz after the first two), or None."""
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    found = suffix.removesuffix(".gz")
    return found if found in FORMATS and (found != ".parquet" or suffix == found) else None


def read_table(path: Path, columns: tuple[str, ...] = (), what: str = "File") -> list[tuple[int | str, dict]]:
    """(place, row) pairs of the file's rows, in file order. place: the line a CSV or JSONL row ends on, or "row N"
    of a Parquet file. columns: names the file must have (a CSV's header, every JSONL object); what: how
    errors name the file ("Custom file", "Answers file")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; give a .csv, .jsonl or .parquet file.")
    kind = table_format(path)
    if kind == ".csv":
        return read_csv(path, columns)
    if kind == ".jsonl":
        rows = read_jsonl(path)
        for line, row in rows:
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(
                    f"{path} line {line} has no column {missing[0]!r}; columns found: {', '.join(row)}. "
                    "Name the right column (e.g. --question-column/--answer-column) or fix the file."
                )
        return rows
    if kind == ".parquet":
        return read_parquet_rows(path, columns)
    raise DataError(f"{what} {path} has extension {path.suffix!r}; use .csv, .jsonl or .parquet.")


def read_text(path: Path) -> str:
    """The file as text; gzip by extension. Any decoding problem becomes a DataError naming the place."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"Cannot read {path}: {err}; check that it is a readable (gzip) file.") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        where = "of the decompressed text " if path.suffix == ".gz" else ""
        raise DataError(
            f"{path} is not valid UTF-8: byte {err.start} {where}(line {line}) is {raw[err.start:err.start + 1]!r}; "
            "re-save the file as UTF-8."
        ) from None


def read_csv(path: Path, columns: tuple[str, ...], delimiter: str = ",") -> list[tuple[int, dict[str, str]]]:
    """(line, row) pairs of a CSV with a header that must hold `columns`; line is where the row ends (1-based)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty: expected a header row with columns {', '.join(columns)}.")
        header = [name.strip() for name in header]
        missing = [name for name in columns if name not in header]
        if missing:
            raise DataError(
                f"{path} has no column {missing[0]!r}; columns found: {', '.join(header)}. "
                "Name the right column (e.g. --question-column/--answer-column) or fix the header."
            )
        rows, extra = [], []
        for values in reader:
            if any(v.strip() for v in values):
                rows.append((reader.line_num, dict(zip(header, values))))
                if len(values) > len(header) and any(v.strip() for v in values[len(header):]):
                    extra.append((reader.line_num, len(values)))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({err}); fix the quoting there.") from None
    if extra:
        (line, count), more = extra[0], f" (and {len(extra) - 1} more lines)" if len(extra) > 1 else ""
        warnings.warn(TruthmapWarning(
            f"{path} line {line} has {count} fields but the header names {len(header)}{more}; the extra fields are "
            "ignored. Quote a value that holds a comma, or name the column in the header."
        ), stacklevel=3)
    if not rows:
        raise DataError(f"{path} has a header but no rows; add rows or choose another file.")
    return rows


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line, object) pairs of a file of one JSON object per line; blank lines are skipped."""
    rows = []
    # split on "\n" only: splitlines() would also cut at U+2028 and friends, which JSON strings may hold raw
    for line_no, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_no}: not valid JSON ({err.msg}); fix or remove that line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}.")
        rows.append((line_no, row))
    if not rows:
        raise DataError(f"{path} is empty; add one JSON object per line.")
    return rows


def read_parquet_rows(path: Path, columns: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """("row N", row) pairs of a Parquet file (N from 1); list cells arrive as numpy arrays."""
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"Cannot read {path} as Parquet: {first}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r}; columns found: {', '.join(map(str, frame.columns))}. "
                        "Name the right column (e.g. --question-column/--answer-column) or fix the file.")
    if not len(frame):
        raise DataError(f"{path} has no rows; add rows or choose another file.")
    return [(f"row {k}", row) for k, row in enumerate(frame.to_dict("records"), start=1)]
