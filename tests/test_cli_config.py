"""The study file (flags > file > defaults), `truthmap runs`, --debug, and help that ends with an example."""

import re
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
    import truthmap.analysis.report

    def broken(runs_dir):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(truthmap.analysis.report, "find_runs", broken)
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
def test_the_guide_documents_these_commands(heading):
    assert heading in (REPO / "docs" / "guide" / "run-a-study.md").read_text()


def test_every_command_is_in_the_docs_command_list_and_the_readme_stays_short():
    listed = (REPO / "docs" / "reference" / "commands.md").read_text()
    assert [name for name in cli_commands() if f"| `truthmap {name}` |" not in listed] == []
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250 and "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\(([^)#:]+)[^)]*\)", readme)  # relative links and images, not http:// ones
    assert links and [link for link in links if not (REPO / link).exists()] == []


# One option table: panels in --help, RunConfig's defaults, renamed flags, token names, one way to address a run.


def help_text(command: str) -> str:
    """The command's --help as one line of words: rich draws boxes and wraps lines at the terminal's width."""
    shown = CliRunner().invoke(app, [command, "--help"]).output
    return " ".join(shown.replace("│", " ").split())


def cli_commands():
    import typer.main

    return typer.main.get_command(app).commands


def test_every_command_groups_its_options_in_panels_of_its_help():
    for name, command in cli_commands().items():
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        assert all(p.rich_help_panel for p in options), (name, [p.name for p in options if not p.rich_help_panel])
        shown = help_text(name)
        for panel in {p.rich_help_panel for p in options}:
            assert f"╭─ {panel} ─" in shown, (name, panel, shown)
        for option in options:
            assert option.opts[0] in shown, (name, option.opts[0])


# The two defaults that are not RunConfig's, on purpose: answers made elsewhere label by their gold aliases, and
# score and answer use the detector's own model.
NOT_RUNCONFIG_DEFAULTS = {("import", "dataset"): "custom", ("score", "model"): None, ("answer", "model"): None}


def test_every_default_the_cli_shows_is_runconfigs():
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(RunConfig)} | {"seeds": ",".join(map(str, DEFAULT_SEEDS))}
    checked = 0
    for name, command in cli_commands().items():
        for param in command.params:
            if param.name in defaults:
                expected = NOT_RUNCONFIG_DEFAULTS.get((name, param.name), defaults[param.name])
                assert param.default == expected, (name, param.name, param.default)
                checked += 1
    assert checked > 80


@pytest.fixture
def captured(monkeypatch):
    """pipeline's table, resample and extract replaced by recorders of their arguments (they stop the command)."""
    seen = {}

    def record(stage):
        def stop(config, *args, **kwargs):
            seen[stage] = (config, args, kwargs)
            raise RuntimeError("recorded")
        return stop

    for stage in ("table", "resample", "extract", "probe"):
        monkeypatch.setattr(pipeline, stage, record(stage))
    return seen


def test_table_and_resample_use_runconfigs_defaults(captured):
    CliRunner().invoke(app, ["table", "--datasets", "geography", "triviaqa"])
    config, (datasets, test_questions), _ = captured["table"]
    assert config == RunConfig(n_samples=300) and datasets == ["geography", "triviaqa"] and test_questions is None
    CliRunner().invoke(app, ["table", "--datasets", "geography", "--n-questions", "40", "--n-test-questions", "20"])
    config, (_, test_questions), _ = captured["table"]
    assert (config.n_samples, test_questions) == (40, 20)
    CliRunner().invoke(app, ["resample", "--n-questions", "7"])
    config, (resampling,), kwargs = captured["resample"]
    assert config.extraction_tries == RunConfig.extraction_tries == 5 and resampling.n_questions == 7 and not kwargs


@pytest.mark.parametrize(("command", "old", "new"), [
    (["table", "--datasets", "geography"], "--n-samples", "--n-questions"),
    (["table", "--datasets", "geography"], "--test-samples", "--n-test-questions"),
    (["generalize", "--datasets", "geography", "triviaqa"], "--n-samples", "--n-questions"),
    (["generalize", "--datasets", "geography", "triviaqa"], "--test-samples", "--n-test-questions"),
    (["resample"], "--n-samples", "--n-questions"),
])
def test_a_flag_whose_meaning_changed_is_refused_naming_the_new_one(captured, command, old, new):
    result = CliRunner().invoke(app, [*command, old, "50"])
    assert result.exit_code == 1 and captured == {}
    assert result.output == f"Error: {old} is now {new} in `truthmap {command[0]}`: rerun with {new} 50.\n"


def test_token_lists_its_names_in_help_and_in_the_error():
    from truthmap.rundir import POSITIONS

    for command in ("fit-detector", "generalize", "resample"):
        assert ", ".join(POSITIONS) in help_text(command), command
    result = CliRunner().invoke(app, ["fit-detector", "--token", "exact_last"])
    assert result.exit_code == 1
    assert result.output == ("Error: Unknown token 'exact_last'. Did you mean: exact_answer_last, exact_answer_first, "
                             "exact_answer_after_last? "
                             f"Available: {', '.join(POSITIONS)}.\n")


def test_run_addresses_a_run_as_model_dataset_and_split_do(tmp_path, captured):
    run = make_run(tmp_path / "elsewhere", "triviaqa", full=False)
    for command in ("extract", "probe"):
        CliRunner().invoke(app, [command, "--run", str(run)])
        by_dir = captured.pop(command)[0]
        CliRunner().invoke(app, [command, "--dataset", "triviaqa", "--runs-dir", str(tmp_path / "elsewhere")])
        assert by_dir == captured.pop(command)[0]
        assert pipeline.run_dir(by_dir).path == run
    both = CliRunner().invoke(app, ["probe", "--run", str(run), "--dataset", "triviaqa"])
    assert both.output == f"Error: --run {run} already names the run: drop --dataset, or drop --run.\n"
    bare = CliRunner().invoke(app, ["extract", "--run", str(tmp_path / "m" / "d" / "train")])
    assert bare.exit_code == 1 and bare.output == (
        f"Error: No run.json in {tmp_path / 'm' / 'd' / 'train'}: --run takes a run directory made by generate, run "
        "or import (runs/<model>/<dataset>/<split>).\n")


def test_report_takes_the_same_addresses(tmp_path):
    run = make_run(tmp_path / "runs", full=False)
    expected = f"Report: {run / 'report.html'}\n"
    for address in (["--run", str(run)], [str(run)], ["--runs-dir", str(tmp_path / "runs"), "--dataset", "geography"]):
        result = CliRunner().invoke(app, ["report", *address])
        assert result.exit_code == 0 and result.output == expected, (address, result.output)
    both = CliRunner().invoke(app, ["report", str(run), "--run", str(run)])
    assert both.exit_code == 1 and both.output.startswith("Error: Give the run directory once: ")


def test_score_help_names_only_its_own_flags():
    shown = help_text("score")
    assert "--dataset" not in shown and "--custom-path" not in shown
    assert "Batch mode: the question column of the --input file." in shown


def test_table_asks_for_sampling_baselines_only_when_told(captured):
    CliRunner().invoke(app, ["table", "--datasets", "geography"])
    assert captured["table"][2] == {"temperature": 1.0, "n_resamples": None}
    CliRunner().invoke(app, ["table", "--datasets", "geography", "--sampling-baselines"])
    assert captured["table"][2] == {"temperature": 1.0, "n_resamples": 10}  # K = 10 when asked
    CliRunner().invoke(app, ["table", "--datasets", "geography", "--sampling-baselines", "--n-resamples", "4",
                             "--temperature", "0.7"])
    assert captured["table"][2] == {"temperature": 0.7, "n_resamples": 4}
