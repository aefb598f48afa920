"""The study file (flags > file > defaults), `truthmap runs`, --debug, and help that ends with an example."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_report import make_run
from truthmap import pipeline
from truthmap.cli import app
from truthmap.config import DEFAULT_SEEDS, RunConfig, load_study
from truthmap.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_study(tmp_path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_a_study_runs_every_dataset_and_site_with_flags_over_the_file_over_defaults(tmp_path):
    study = write_study(tmp_path, 'datasets = ["geography", "triviaqa"]\nsites = ["mlp", "attn"]\nn_samples = 50\n'
                                  'seeds = [1, 2]\nbatch_size = 4\n')
    configs = load_study(study, {"batch_size": 8})
    assert [(c.dataset, c.site) for c in configs] == [("geography", "mlp"), ("geography", "attn"),
                                                       ("triviaqa", "mlp"), ("triviaqa", "attn")]
    assert {(c.n_samples, c.seeds, c.batch_size, c.model) for c in configs} == {(50, (1, 2), 8, "smollm2")}
    assert [(c.dataset, c.site) for c in load_study(study, {"dataset": "movies"})] == [("movies", "mlp"), ("movies", "attn")]
    assert load_study(None, {}) == [RunConfig()]


def test_the_example_study_file_loads():
    configs = load_study(REPO / "study.example.toml")
    assert len(configs) == len({(c.dataset, c.site) for c in configs}) >= 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n-samples = 5\n", r"Unknown key 'n-samples' in .*study.toml. Did you mean: n_samples\? Known keys: model, "),
        ("[run]\nmodel = 'x'\n", r"Unknown key 'run' in .*study.toml."),
        ("n_samples = '5'\n", r"Key 'n_samples' in .*study.toml must be an integer, got '5'."),
        ("seeds = [1, true]\n", r"Key 'seeds' in .*study.toml must be a list of integers, got \[1, True\]."),
        ("datasets = []\n", r"Key 'datasets' in .*study.toml must be a non-empty list of strings, got \[\]."),
        ("site = 'mlp'\nsites = ['attn']\n", r"study.toml sets both 'site' and 'sites'; keep one."),
        ("model = \n", r"study.toml is not valid TOML: "),
        ("split = 'dev'\n", r"Unknown split 'dev'\. Available: train, test\."),
    ],
)
def test_a_bad_study_file_is_refused_naming_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path, text))


@pytest.fixture
def recorded_runs(monkeypatch):
    """`truthmap run` without a model: pipeline.run_all records its configs and returns a plausible result."""
    seen = []

    def fake_run_all(config):
        seen.append(config)
        best = {"layer": 1, "token": "-1", "auc_mean": 0.8, "auc_std": 0.01}
        return {"heatmap": "h.png", "best": best, "samples": 3, "report": f"{config.dataset}/report.html"}

    monkeypatch.setattr(pipeline, "run_all", fake_run_all)
    return seen


def test_run_config_flags_override_the_file(tmp_path, recorded_runs):
    study = write_study(tmp_path, 'datasets = ["geography", "triviaqa"]\nn_samples = 50\nbatch_size = 4\nseeds = [1, 2]\n')
    result = CliRunner().invoke(app, ["run", "--config", str(study), "--batch-size", "16", "--seeds", "7,8"])
    assert result.exit_code == 0, result.output
    assert [(c.dataset, c.n_samples, c.batch_size, c.seeds) for c in recorded_runs] == [
        ("geography", 50, 16, (7, 8)), ("triviaqa", 50, 16, (7, 8))]  # --batch-size 16 equals the default, still wins
    assert "Report: geography/report.html" in result.output and "Report: triviaqa/report.html" in result.output


def test_run_without_a_file_uses_flags_and_defaults(recorded_runs):
    result = CliRunner().invoke(app, ["run", "--n-samples", "9"])
    assert result.exit_code == 0, result.output
    assert recorded_runs == [RunConfig(n_samples=9, seeds=DEFAULT_SEEDS)]


def test_run_with_a_missing_study_file_says_so_in_one_line(tmp_path, recorded_runs):
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1 and recorded_runs == []
    assert result.output == f"Error: Cannot read the configuration file {tmp_path / 'nope.toml'}: No such file or directory.\n"


def test_run_saves_the_resolved_configuration_per_site(tmp_path):
    from truthmap.rundir import RunDir, read_json

    run = RunDir(tmp_path, "smollm2", "geography", "train")
    pipeline.save_resolved_config(run, RunConfig(runs_dir=str(tmp_path), n_samples=5))
    pipeline.save_resolved_config(run, RunConfig(runs_dir=str(tmp_path), n_samples=5, site="attn"))
    saved = read_json(run.resolved_config)
    assert list(saved) == ["mlp", "attn"] and saved["attn"]["n_samples"] == 5 and saved["mlp"]["seeds"] == list(DEFAULT_SEEDS)
    before = run.resolved_config.stat().st_mtime_ns
    pipeline.save_resolved_config(run, RunConfig(runs_dir=str(tmp_path), n_samples=5))
    assert run.resolved_config.stat().st_mtime_ns == before  # unchanged: not rewritten


def test_runs_lists_each_run_with_its_stages(tmp_path):
    make_run(tmp_path, "geography", n=30)
    make_run(tmp_path, "triviaqa", n=12, full=False)
    (tmp_path / "smollm2" / "movies" / "test" / "work" / "generations").mkdir(parents=True)  # a run just begun
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert lines == [
        ["model", "dataset", "split", "samples", "correct", "answers", "activations", "probes", "detector", "report"],
        ["smollm2", "geography", "train", "30", "20", "done", "-", "mlp", "scored", "-"],
        ["smollm2", "movies", "test", "-", "-", "started", "-", "-", "-", "-"],
        ["smollm2", "triviaqa", "train", "12", "8", "done", "-", "-", "-", "-"],
    ]


def test_runs_on_an_empty_directory(tmp_path):
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "none")])
    assert result.exit_code == 0 and result.output == f"No runs under {tmp_path / 'none'}.\n"


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch, tmp_path):
    import truthmap.report

    def broken(runs_dir):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(truthmap.report, "find_runs", broken)
    result = CliRunner().invoke(app, ["runs"])
    assert result.exit_code == 1
    assert result.output == "Error: RuntimeError: disk on fire (rerun with --debug for the traceback)\n"
    debug = CliRunner().invoke(app, ["--debug", "runs"])
    assert debug.exit_code == 1 and isinstance(debug.exception, RuntimeError)
    assert CliRunner().invoke(app, ["runs"]).output == result.output  # --debug does not stick to later calls


def test_debug_shows_the_traceback_in_a_real_process(tmp_path):
    command = [sys.executable, "-m", "truthmap.cli"]
    plain = subprocess.run(command + ["report", str(tmp_path / "a" / "b" / "c")], capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.startswith("Error: No answers.parquet in ")
    assert "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
    debug = subprocess.run(command + ["--debug", "report", str(tmp_path / "a" / "b" / "c")], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("truthmap.errors.StoreError: No answers.parquet in ")


def test_every_command_has_help_ending_with_an_example():
    import typer.main

    group = typer.main.get_command(app)
    assert app.pretty_exceptions_enable is False  # tracebacks stay plain and only come with --debug
    for name, command in group.commands.items():
        example = command.help.strip().splitlines()[-1]
        assert example.startswith(f"Example: truthmap {name}"), (name, example)
        assert CliRunner().invoke(app, [name, "--help"]).exit_code == 0
    assert "--debug" in CliRunner().invoke(app, ["--help"]).output


@pytest.mark.parametrize("heading", ["## Configuration file", "## Report", "## Listing runs"])
def test_the_readme_documents_these_commands(heading):
    assert heading in (REPO / "README.md").read_text()
