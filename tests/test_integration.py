"""The real SmolLM2 on small subsets: the tokenizer, and the answers stage on real datasets."""

import pandas as pd
import pytest

from truthmap import pipeline
from truthmap.config import RunConfig
from truthmap.rundir import position_column

pytestmark = pytest.mark.integration


def test_gguf_tokenizer_is_the_right_one(smollm2):
    tokenizer = smollm2.tokenizer
    assert tokenizer("Hello world, the capital of France", add_special_tokens=False)["input_ids"] == [
        19556, 905, 28, 260, 3575, 282, 4649,
    ]
    assert tokenizer.eos_token_id == 2 and smollm2.is_chat


def exact_tokens_decode_to_exact_answer(table, tokenizer):
    valid = table[table["exact_answer_valid"]]
    for row in valid.itertuples():
        sequence = list(row.prompt_ids) + list(row.answer_ids)
        first, last = getattr(row, "pos_exact_answer_first"), getattr(row, "pos_exact_answer_last")
        assert row.prompt_len <= first <= last < len(sequence)
        decoded = tokenizer.decode(sequence[first : last + 1])
        assert row.exact_answer.lower() in decoded.lower(), (row.id, row.exact_answer, decoded)
    return len(valid)


@pytest.mark.parametrize("dataset", ["triviaqa", "winobias", "mnli"])
def test_answers_on_paper_datasets(smollm2, shared_data, tmp_path, dataset):
    config = RunConfig(dataset=dataset, n_samples=8, data_dir=str(shared_data), runs_dir=str(tmp_path), batch_size=8)
    table = pd.read_parquet(pipeline.generate(config, lm=smollm2).answers)
    assert len(table) == 8
    assert (table[position_column("first_answer")] == table["prompt_len"]).all()
    assert exact_tokens_decode_to_exact_answer(table, smollm2.tokenizer) >= 1


def test_builtin_dataset_gives_both_classes(smollm2, tmp_path):
    config = RunConfig(n_samples=32, runs_dir=str(tmp_path), batch_size=16)
    table = pd.read_parquet(pipeline.generate(config, lm=smollm2).answers)
    assert 0 < table["correct"].sum() < len(table)
    assert exact_tokens_decode_to_exact_answer(table, smollm2.tokenizer) >= len(table) // 2
