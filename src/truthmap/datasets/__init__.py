"""Datasets: the registry of entries, their loaders, prompts and correctness rules.

    from truthmap.datasets import get_spec, load_records, build_prompt, is_correct
    spec = get_spec("triviaqa")
    records = load_records("triviaqa", "test", data_dir="/path/to/data", n_samples=20)
    prompt = build_prompt(spec, records[0], "instruct")
"""

from truthmap.datasets.loaders import LOADERS, CustomSource, load_records
from truthmap.datasets.registry import DEFAULT_DATASET, REGISTRY, build_prompt, get_spec, list_datasets
from truthmap.datasets.rules import RULES, gold_span, is_correct, label_span
from truthmap.datasets.spec import DatasetSpec, Record

__all__ = [
    "DEFAULT_DATASET",
    "LOADERS",
    "REGISTRY",
    "RULES",
    "CustomSource",
    "DatasetSpec",
    "Record",
    "build_prompt",
    "get_spec",
    "gold_span",
    "is_correct",
    "label_span",
    "list_datasets",
    "load_records",
]
