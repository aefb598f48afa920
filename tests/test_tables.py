"""tables.read_table: the one reader of user files (custom datasets, import, score)."""

import gzip
import re

import pandas as pd
import pytest

from truthmap.errors import DataError
from truthmap.tables import read_table


def test_csv_with_a_byte_order_mark_reads_its_first_column_and_counts_the_header_as_line_1(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes("\ufeffquestion,answer\nQ1?,A1\n\nQ2?,A2\n".encode("utf-8"))
    assert read_table(path, ("question", "answer")) == [(2, {"question": "Q1?", "answer": "A1"}),
                                                        (4, {"question": "Q2?", "answer": "A2"})]


def test_jsonl_gzipped_and_parquet_give_the_same_rows(tmp_path):
    (tmp_path / "qa.jsonl.gz").write_bytes(gzip.compress(b'{"question": "Q1?", "answer": "A1"}\n'))
    pd.DataFrame({"question": ["Q1?"], "answer": ["A1"]}).to_parquet(tmp_path / "qa.parquet")
    assert read_table(tmp_path / "qa.jsonl.gz") == [(1, {"question": "Q1?", "answer": "A1"})]
    assert read_table(tmp_path / "qa.parquet") == [("row 1", {"question": "Q1?", "answer": "A1"})]


def test_errors_name_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A"}\n{"question": \n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))} line 2: not valid JSON"):
        read_table(bad)
    short = tmp_path / "short.jsonl"
    short.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q2?"}\n')
    with pytest.raises(DataError, match=r"short\.jsonl line 2 has no column 'answer'; columns found: question"):
        read_table(short, ("question", "answer"))
    frame = tmp_path / "f.parquet"
    pd.DataFrame({"question": ["Q?"]}).to_parquet(frame)
    with pytest.raises(DataError, match=r"f\.parquet has no column 'answer'; columns found: question"):
        read_table(frame, ("question", "answer"))
    with pytest.raises(DataError, match=r"^Answers file .*a\.txt has extension '\.txt'; use \.csv, \.jsonl or \.parquet"):
        (tmp_path / "a.txt").write_text("x")
        read_table(tmp_path / "a.txt", what="Answers file")
    with pytest.raises(DataError, match=r"^Input file .*none\.csv does not exist"):
        read_table(tmp_path / "none.csv", what="Input file")


def test_a_custom_dataset_may_be_a_parquet_file(tmp_path):
    from truthmap.datasets import CustomSource, load_records

    path = tmp_path / "qa.parquet"
    pd.DataFrame({"question": [f"Q{i}?" for i in range(10)], "answer": [["a", "b"]] * 10}).to_parquet(path)
    records = load_records("custom", "train", None, None, 0, CustomSource(path))
    assert len(records) == 8 and all(r.answers == ["a", "b"] for r in records)  # 80% of 10 for train
