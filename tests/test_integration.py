"""The real models on small subsets: SmolLM2 (tokenizer, answers on real datasets), Gemma-3-270M end to end."""

import html
import json

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


# --- Gemma-3-270M: a base model (no chat template), so answers end at the first line break --------------------


def test_gemma3_tokenizer_is_the_right_one(gemma3):
    assert gemma3.tokenizer("Hello world, the capital of France")["input_ids"] == [
        2, 9259, 1902, 236764, 506, 5279, 529, 7001,
    ]
    assert gemma3.tokenizer.eos_token_id == 1 and not gemma3.is_chat
    assert type(gemma3.model).__name__ == "Gemma3ForCausalLM"


def test_gemma3_end_to_end(gemma3, tmp_path):
    """generate, extract and probe on 32 built-in questions: answers stop at the line break, never run into a
    second turn, and the sites read Gemma's MLP, attention and blocks."""
    from truthmap.stages.activations import open_store
    from truthmap.analysis.report import red_flags, write_report
    from truthmap.lm.sites import site_hooks

    config = RunConfig(model="gemma3-270m", n_samples=32, runs_dir=str(tmp_path), batch_size=16, extraction_tries=1,
                       seeds=(0, 5))
    run = pipeline.generate(config, lm=gemma3)
    table = pd.read_parquet(run.answers)
    assert table["stopped"].mean() >= 0.75  # before the stop rule: none of them stopped
    assert not table["answer"].str.contains("Q:").any()
    assert not table["answer"].str.strip().str.contains("\n").any()
    assert json.loads(run.run_json.read_text())["settings"]["stop_text"] == "\n"
    assert 0 < table["correct"].sum() < len(table)
    assert exact_tokens_decode_to_exact_answer(table, gemma3.tokenizer) >= len(table) // 2

    hooks = site_hooks(gemma3.model, "mlp")
    assert len(hooks) == 18 and {type(module).__name__ for module, _ in hooks} == {"Gemma3MLP"}
    pipeline.extract(config, lm=gemma3)
    acts, meta = open_store(run.activations("mlp"))
    assert acts.shape == (32, 18, 15, 640) and meta["clipped"] == 0  # the MLP output, before its norm, fits float16
    pipeline.probe(config)
    summary = json.loads(run.probe_files("mlp").summary.read_text())
    valid = table[table["exact_answer_valid"]]  # the rows probed: errors are the positives
    assert (summary["errors"], summary["correct"]) == (int((~valid["correct"]).sum()), int(valid["correct"].sum()))
    cells = pd.read_csv(run.probe_files("mlp").heatmap_csv, dtype={"layer": str})
    cells = cells[cells["layer"] != "embed"].set_index(["layer", "token"])["auc_mean"]  # [18 layers x 15 tokens]
    best = summary["best"]  # the heatmap's highest cell, inside its own interval
    assert len(cells) == 18 * 15 and cells[str(best["layer"]), best["token"]] == pytest.approx(cells.max(), abs=1e-6)
    assert best["auc_low"] <= best["auc_mean"] <= best["auc_high"]
    assert not any("token limit" in flag for flag in red_flags(run))
    page = write_report(run.path).read_text()
    assert html.escape(summary["verdict"]) in page  # the fair verdict: its cell chosen on validation rows
    assert f"probe at {summary['verdict_details']['probe']['cell']} (chosen on validation rows" in summary["verdict"]
