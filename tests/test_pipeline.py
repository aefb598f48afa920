"""The answers stage end to end on a tiny model, through the Python API and the CLI."""

import json

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
    import truthmap.generate as generate_module

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


def test_resume_with_other_settings_is_refused(tiny, tmp_path, custom_csv):
    pipeline.generate(config_for(tmp_path, custom_csv), lm=tiny)
    with pytest.raises(StoreError, match=r"custom/train was made with max_new_tokens=100, not 7\. Use another "):
        pipeline.generate(config_for(tmp_path, custom_csv, max_new_tokens=7), lm=tiny)


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
