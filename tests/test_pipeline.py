"""The answers stage end to end on a tiny model, through the Python API and the CLI."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap import pipeline
from truthmap.cli import app
from truthmap.config import RunConfig
from truthmap.errors import StoreError
from truthmap.rundir import ANSWER_COLUMNS, POSITIONS, position_column


@pytest.fixture
def custom_csv(tmp_path):
    path = tmp_path / "qa.csv"
    rows = [f"What is item {i}?,\"[\"\"capital\"\", \"\"item {i}\"\"]\"" for i in range(30)]
    path.write_text("question,answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def config_for(tmp_path, custom_csv, **changes):
    return RunConfig(
        dataset="custom", custom_path=str(custom_csv), runs_dir=str(tmp_path / "runs"), batch_size=4,
        extraction_tries=2, **changes,
    )


def test_answers_table_has_the_contract_columns(tiny, tmp_path, custom_csv):
    run = pipeline.generate(config_for(tmp_path, custom_csv), lm=tiny)
    table = pd.read_parquet(run.answers)
    assert list(table.columns) == [c for c in ANSWER_COLUMNS if c in table.columns]
    assert set(ANSWER_COLUMNS) == set(table.columns)
    assert len(table) == 24  # 80 % of 30 rows go to train
    assert (table["answer_len"] == table["answer_ids"].map(len)).all()
    assert (table[position_column("last_q")] == table["prompt_len"] - 1).all()
    assert (table[position_column("-1")] == table["prompt_len"] + table["answer_len"] - 1).all()
    invalid = table[~table["exact_answer_valid"]]
    assert (invalid[[position_column(p) for p in POSITIONS if p.startswith("exact")]] == -1).all().all()
    meta = json.loads(run.run_json.read_text())
    assert meta["settings"]["dataset"] == "custom" and "torch" in meta["versions"]


def test_killed_generation_resumes_to_the_same_table(tiny, tmp_path, custom_csv, monkeypatch):
    import truthmap.stages.generate as generate_module

    whole = pd.read_parquet(pipeline.generate(config_for(tmp_path / "a", custom_csv), lm=tiny).answers)
    real = generate_module.generate_batch
    calls = []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_batch", dies_on_third_batch)
    config = config_for(tmp_path / "b", custom_csv)
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(config, lm=tiny)
    assert len(list(pipeline.run_dir(config).generation_parts.glob("part-*.parquet"))) == 2
    monkeypatch.setattr(generate_module, "generate_batch", real)
    resumed = pd.read_parquet(pipeline.generate(config, lm=tiny).answers)
    pd.testing.assert_frame_equal(resumed, whole)


def read_store(directory):
    from truthmap.stages.activations import open_embedding, open_store

    acts, meta = open_store(directory)
    return np.asarray(acts, dtype=np.float32), np.asarray(open_embedding(directory, meta), dtype=np.float32), meta


def test_generate_records_the_store_a_second_pass_reads(tiny, tmp_path, custom_csv, monkeypatch):
    """The cells recorded while decoding (KV cache) are those of a forward pass over prompt + answer, up to float
    rounding: at most one float16 step apart. extract then finds the site done, and reads another by a second pass."""
    import truthmap.stages.generate as generate_module
    from truthmap.stages.activations import extract_activations

    # The random model never ends an answer: end some early, at a length its first token picks, as a stop text
    # would (the token that holds it is dropped), so that rows leave the batch at different steps.
    monkeypatch.setattr(generate_module, "stop_at_text",
                        lambda tokenizer, text: lambda ids: len(ids) - 1 if len(ids) >= 2 + ids[0] % 9 else None)
    config = config_for(tmp_path, custom_csv, max_new_tokens=8)
    run = pipeline.generate(config, lm=tiny)
    table = pd.read_parquet(run.answers)
    assert (table["answer_len"] == 8).any() and (table["answer_len"] < 7).any()  # the limit, and stops before it
    one, one_embed, meta = read_store(run.activations("mlp"))
    assert meta["one_pass"] is True and meta["written"] == len(table) == 24 and "rows_written" not in meta
    assert json.loads(run.run_json.read_text())["activations_while_generating"] == "mlp"
    extract_activations(tiny, table, tmp_path / "second", "mlp", 4, meta["answers"])
    two, two_embed, two_meta = read_store(tmp_path / "second")
    assert two_meta["one_pass"] is False and two_meta["answers"] == meta["answers"]
    np.testing.assert_allclose(one, two, rtol=2e-3, atol=2e-3)  # [samples, layers, 15, hidden]
    np.testing.assert_array_equal(one_embed, two_embed)  # a lookup of the same tokens

    before = (run.activations("mlp") / "acts.f16").stat().st_mtime_ns
    pipeline.extract(config, lm=tiny)  # the site generate recorded: done
    assert (run.activations("mlp") / "acts.f16").stat().st_mtime_ns == before
    pipeline.extract(dataclasses.replace(config, site="resid"), lm=tiny)  # another site: a second pass
    assert read_store(run.activations("resid"))[2]["one_pass"] is False


def kill_answers_stage(monkeypatch, where: str):
    """Make the answers stage stop (KeyboardInterrupt) at its second batch, at `where`; returns the undo."""
    import truthmap.stages.activations as activations
    import truthmap.stages.generate as generate_module
    import truthmap.stages.locate as locate

    name, module = {"generating": ("generate_batch", generate_module), "locating": ("extract_spans", locate),
                    "between the cells and the checkpoint": ("write_answer_cells", activations),
                    "writing answers.parquet": ("write_answers", generate_module)}[where]
    real, calls = getattr(module, name), []

    def stops(*args, **kwargs):
        calls.append(1)
        if where == "writing answers.parquet" or len(calls) == 2:
            if where == "between the cells and the checkpoint":
                real(*args, **kwargs)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stops)
    return lambda: monkeypatch.setattr(module, name, real)


@pytest.mark.parametrize("where", ["generating", "locating", "between the cells and the checkpoint",
                                   "writing answers.parquet"])
def test_a_killed_answers_stage_resumes_to_the_same_files(tiny, tmp_path, custom_csv, monkeypatch, where):
    whole = pipeline.generate(config_for(tmp_path / "a", custom_csv, max_new_tokens=8), lm=tiny)
    config = config_for(tmp_path / "b", custom_csv, max_new_tokens=8)
    undo = kill_answers_stage(monkeypatch, where)
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(config, lm=tiny)
    undo()
    run = pipeline.generate(config, lm=tiny)
    assert run.answers.read_bytes() == whole.answers.read_bytes()
    for name in ("acts.f16", "embed.f16", "meta.json"):
        assert (run.activations("mlp") / name).read_bytes() == (whole.activations("mlp") / name).read_bytes(), name


def test_answers_resumed_with_another_site_get_its_cells_by_a_forward_pass(tiny, tmp_path, custom_csv, monkeypatch):
    """Batches checkpointed while recording mlp have no resid cells: a forward pass reads them on resume."""
    from truthmap.stages.activations import extract_activations

    config = config_for(tmp_path, custom_csv, max_new_tokens=8)
    undo = kill_answers_stage(monkeypatch, "generating")
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(config, lm=tiny)
    undo()
    meta = json.loads((pipeline.run_dir(config).activations("mlp") / "meta.json").read_text())
    assert meta["written"] == 4 and len(meta["rows_written"]) == 4  # one batch
    run = pipeline.generate(dataclasses.replace(config, site="resid"), lm=tiny)
    table = pd.read_parquet(run.answers)
    resid, _, meta = read_store(run.activations("resid"))
    assert meta["written"] == 24 and meta["one_pass"] is True
    extract_activations(tiny, table, tmp_path / "second", "resid", 4, meta["answers"])
    np.testing.assert_allclose(resid, read_store(tmp_path / "second")[0], rtol=2e-3, atol=2e-3)


def test_resume_with_other_settings_is_refused(tiny, tmp_path, custom_csv):
    pipeline.generate(config_for(tmp_path, custom_csv), lm=tiny)
    with pytest.raises(StoreError, match=r"custom/train was made with max_new_tokens=100, not 7\. Use another "):
        pipeline.generate(config_for(tmp_path, custom_csv, max_new_tokens=7), lm=tiny)


def test_resume_with_another_extraction_prompt_is_refused(tiny, tmp_path, custom_csv, monkeypatch):
    from truthmap.stages import generate
    made = generate.EXTRACTION_PROMPT_VERSION
    run = pipeline.generate(config_for(tmp_path, custom_csv), lm=tiny)
    assert json.loads(run.run_json.read_text())["settings"]["extraction_prompt"] == made
    monkeypatch.setattr(generate, "EXTRACTION_PROMPT_VERSION", made + 1)
    with pytest.raises(StoreError, match=rf"custom/train was made with extraction prompt {made}, and this truthmap "
                                         rf"has prompt {made + 1} \(the exact answers would mix two prompts\)\. Use "):
        pipeline.generate(config_for(tmp_path, custom_csv), lm=tiny)


runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "trivia"], "Error: Unknown dataset 'trivia'. Did you mean: triviaqa?"),
        (["--model", "nope"], "Error: Unknown model 'nope'"),
        (["--model", "missing.gguf"], "Error: GGUF file not found: missing.gguf"),
        (["--split", "dev"], "Error: Unknown split 'dev'. Available: train, test."),
        (["--dataset", "custom"], "Error: Dataset 'custom' needs a file: pass --custom-path"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(tmp_path, args, message):
    result = runner.invoke(app, ["generate", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 1
    assert result.output.startswith(message)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_missing_data_file(tmp_path):
    result = runner.invoke(app, ["generate", "--dataset", "triviaqa", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "topics.dpr.trivia.dev.txt" in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_missing_column_and_non_utf8(tmp_path):
    bad_column = tmp_path / "a.csv"
    bad_column.write_text("q,answer\nx,y\n")
    result = runner.invoke(app, ["generate", "--dataset", "custom", "--custom-path", str(bad_column)])
    assert result.exit_code == 1 and "question" in result.output and str(bad_column) in result.output
    latin = tmp_path / "b.csv"
    latin.write_bytes("question,answer\nS\xe3o Paulo?,Brazil\n".encode("latin-1"))
    result = runner.invoke(app, ["generate", "--dataset", "custom", "--custom-path", str(latin)])
    assert result.exit_code == 1 and "UTF-8" in result.output and len(result.output.strip().splitlines()) == 1


def test_every_command_has_help_with_an_example():
    for command in ["generate", "extract", "probe", "run", "datasets"]:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example: truthmap" in result.output


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from truthmap.cli import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
