"""What a careful user still hit (issue 19), each through the CLI as a user types it: the exit code, the exact
line, no traceback, and for wrong results that nothing wrong is written. Numbered as the items of the issue."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_report import make_run
from truthmap.lm import models
from truthmap.rundir import RunDir

from helpers import cli, one_line

REPO = Path(__file__).resolve().parents[1]
STOP_HINT = "Finished batches and stages are saved: run the same command again to resume from there."


def write_qa(path: Path, n: int, extra: str = "") -> Path:
    rows = [f"What is the capital of France? {i},Paris" for i in range(n)]
    path.write_text("question,answer\n" + "\n".join(rows) + "\n" + extra, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    from tiny import save_tiny_model, tiny_lm

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would mix into the CLI's output
    return save_tiny_model(tiny_lm(seed=3), tmp_path_factory.mktemp("model") / "tiny-model")


@pytest.fixture
def study(tmp_path, model_dir):
    """Options of a small custom run on the tiny model (10 rows: 8 in train, 2 batches of 4), and its directory."""
    data = write_qa(tmp_path / "qa.csv", 10)
    runs = tmp_path / "runs"
    args = ["--model", model_dir, "--dataset", "custom", "--custom-path", data, "--runs-dir", runs,
            "--batch-size", 4, "--max-new-tokens", 8, "--extraction-tries", 1]
    return args, RunDir(runs, "tiny-model", "custom", "train"), data


def stop_generation_at_second_batch(monkeypatch, how):
    import truthmap.stages.generate as generate_module

    real, calls = generate_module.generate_batch, []

    def stops(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            how()
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_batch", stops)
    return lambda: monkeypatch.setattr(generate_module, "generate_batch", real)


def ctrl_c():
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------- 1-5: wrong results, exit 0


def test_1_a_malformed_json_answer_list_stops_with_its_line(tmp_path, study):
    args, run, data = study
    data.write_text('question,answer\nWhat is the capital of France?,"[""Paris"", ""paris"""\n', encoding="utf-8")
    line = one_line(cli("generate", *args))
    assert line == (f"Error: {data} line 2: column 'answer' starts with '[' but is not a valid JSON list "
                    """(got '["Paris", "paris"'); write it as ["a", "b"], or as one answer without the leading '['.""")
    assert not (tmp_path / "runs").exists()  # nothing written, not even an empty run directory


def test_2_a_custom_file_edited_in_place_is_refused_and_a_relative_path_is_the_same_file(tmp_path, study, monkeypatch):
    args, run, data = study
    first = cli("generate", *args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["samples"] == 8
    made = run.answers.read_bytes()

    monkeypatch.chdir(tmp_path)
    relative = [("qa.csv" if a == data else a) for a in args]
    again = cli("generate", *relative)
    assert again.exit_code == 0 and json.loads(again.output)["samples"] == 8, again.output

    write_qa(data, 13)  # edited in place: 3 more rows
    line = one_line(cli("generate", *relative))
    assert line.startswith(f"Error: {run.path} was made from another content of the custom file (sha256 ")
    assert line.endswith("...: edited since). Use another --runs-dir, or delete that directory to start over.")
    assert run.answers.read_bytes() == made


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_3_max_new_tokens_below_1_is_refused_as_batch_size_is(tmp_path, command, value):
    line = one_line(cli(command, "--max-new-tokens", value, "--runs-dir", tmp_path / "runs"))
    assert line == f"Error: Invalid --max-new-tokens {value}: expected an integer >= 1."
    assert one_line(cli(command, "--batch-size", value, "--runs-dir", tmp_path / "runs")) == (
        f"Error: Invalid --batch-size {value}: expected an integer >= 1.")
    assert not (tmp_path / "runs").exists()


def test_4_extraction_killed_then_resumed_with_another_dtype_is_refused_then_resumes_to_the_same_bytes(
        study, monkeypatch):
    import truthmap.stages.activations as activations

    args, run, data = study
    # generate recorded the mlp store while generating; extract adds another site by a second pass.
    common = ["--model", args[1], "--dataset", "custom", "--runs-dir", run.path.parents[2], "--batch-size", 4,
              "--site", "resid"]
    assert cli("generate", *args).exit_code == 0
    clean_root = run.path.parents[2].with_name("clean")
    shutil.copytree(run.path.parents[2], clean_root)
    clean = cli("extract", *common[:5], clean_root, *common[6:])
    assert clean.exit_code == 0, clean.output
    store = run.activations("resid")

    real, calls = activations.read_positions, []

    def killed_at_second_batch(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(activations, "read_positions", killed_at_second_batch)
    line = one_line(cli("extract", *common), exit_code=130)
    assert line == f"Stopped by Ctrl-C during Extracting resid activations (4 of 8 samples done). {STOP_HINT}"
    monkeypatch.setattr(activations, "read_positions", real)
    half = ((store / "acts.f16").read_bytes(), (store / "meta.json").read_bytes())
    assert json.loads(half[1])["written"] == 4

    with monkeypatch.context() as patched:
        patched.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        line = one_line(cli("extract", *common, "--dtype", "bfloat16"))
    assert line == (f"Error: {store} was made with model_dtype='float32', not 'bfloat16'. "
                    "Use another --runs-dir, or delete that directory to start over.")
    assert ((store / "acts.f16").read_bytes(), (store / "meta.json").read_bytes()) == half  # nothing mixed in

    resumed = cli("extract", *common)
    assert resumed.exit_code == 0, resumed.output
    clean_store = RunDir(clean_root, "tiny-model", "custom", "train").activations("resid")
    assert (store / "acts.f16").read_bytes() == (clean_store / "acts.f16").read_bytes()
    assert json.loads((store / "meta.json").read_text())["device"] == "cpu"


def test_4_activations_of_another_model_with_the_same_name_are_refused(tmp_path, study, monkeypatch):
    args, run, data = study
    assert cli("generate", *args).exit_code == 0
    other = shutil.copytree(args[1], tmp_path / "elsewhere" / "tiny-model")  # the same run directory, other weights
    with monkeypatch.context() as patched:
        patched.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        line = one_line(cli("extract", "--model", other, "--dataset", "custom", "--runs-dir", run.path.parents[2],
                            "--site", "resid"))
    assert line == (f"Error: {run.path} holds the answers of model '{args[1]}', not '{other}': activations must come "
                    f"from the model that answered. Use --model {args[1]}.")
    assert not run.activations("resid").exists()
    monkeypatch.chdir(args[1].parent)  # the same model by a relative path is the same model
    same = cli("extract", "--model", "tiny-model", "--dataset", "custom", "--runs-dir", run.path.parents[2],
               "--site", "resid")
    assert same.exit_code == 0, same.output


def test_5_a_second_run_on_the_same_directory_stops_at_once_naming_the_first(study):
    args, run, data = study
    code = ("import sys, time\nfrom truthmap.rundir import RunDir\nfrom truthmap.runstate import run_lock\n"
            "with run_lock(RunDir(sys.argv[1], 'tiny-model', 'custom', 'train')):\n"
            "    print('locked', flush=True)\n    time.sleep(120)\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-c", code, str(run.path.parents[2])], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert first.stdout.readline() == "locked\n"
        line = one_line(cli("generate", *args))
        assert line == (f"Error: {run.path} is in use by another truthmap run (pid {first.pid}); wait for it to "
                        "finish, or stop it, then run this again.")
        assert not run.answers.exists() and not run.generation_parts.exists()
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.wait()
    after = cli("generate", *args)
    assert after.exit_code == 0, after.output
    assert not run.lock.exists()


# ------------------------------------------------------------------------------- 6-10: errors that say what is wrong


@pytest.fixture
def detector_file(tmp_path):
    from truthmap.analysis.detector import Detector

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 2, 8)), np.arange(40) % 2 == 0
    X[y, 1] += 1.0
    return Detector(token="-1", layer=1, seeds=(0,)).fit(X, y).save(tmp_path / "detector.json")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.pop("probe"), "field 'probe' is missing"),
        (lambda d: d.update(layer=99), "field 'layer' is 99; expected a layer from 0 to 1 (n_layers - 1)"),
        (lambda d: d.update(token="nonsense"),
         "field 'token' is 'nonsense'; expected a token position such as exact_answer_last or -1"),
        (lambda d: d.pop("weights_sha256"), "field 'weights_sha256' is missing"),
        (lambda d: d["probe"].update(classes=[True, True]),
         "field 'probe.classes' is [True, True]; expected two class labels, such as [false, true]"),
    ],
)
def test_6_a_hand_edited_detector_is_refused_on_load_naming_the_field(detector_file, edit, problem):
    data = json.loads(detector_file.read_text())
    edit(data)
    detector_file.write_text(json.dumps(data))
    line = one_line(cli("score", "--detector", detector_file, "--question", "Capital of Peru?", "--answer", "Lima"))
    assert line == f"Error: {detector_file} is not a valid detector: {problem}. Refit it with `truthmap fit-detector`."


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda w: w.pop("mean"), "array 'mean' is missing"),
        (lambda w: w.update(coef=w["coef"][:5]), "array 'coef' has shape (5,); expected (8,), from the field 'hidden' "
                                                 "of detector.json"),
        (lambda w: w.update(intercept=np.float64("nan")), "array 'intercept' holds NaN or inf"),
    ],
)
def test_6_a_hand_edited_weights_file_is_refused_on_load_naming_the_array(detector_file, edit, problem):
    from truthmap.rundir import file_sha256

    weights_file = detector_file.with_suffix(".npz")
    with np.load(weights_file) as npz:
        weights = dict(npz)
    edit(weights)
    np.savez(weights_file, **weights)
    data = json.loads(detector_file.read_text())
    detector_file.write_text(json.dumps(data | {"weights_sha256": file_sha256(weights_file)}))  # an edit that matches
    line = one_line(cli("score", "--detector", detector_file, "--question", "Capital of Peru?", "--answer", "Lima"))
    assert line == f"Error: {weights_file} is not a valid detector: {problem}. Refit it with `truthmap fit-detector`."


def test_7_a_truncated_answers_file_is_named_and_runs_lists_the_others(tmp_path):
    runs = tmp_path / "runs"
    damaged = RunDir.from_path(make_run(runs, "geography", full=False))
    make_run(runs, "triviaqa", n=12, full=False)
    damaged.answers.write_bytes(damaged.answers.read_bytes()[:300])

    line = one_line(cli("probe", "--runs-dir", runs))
    fix = ("delete it and rerun `truthmap generate` (or `truthmap run`) with the same options to rebuild it from the "
           "checkpoints in work/.")
    assert line == f"Error: {damaged.answers} is damaged (Parquet magic bytes not found in footer); {fix}"

    listed = cli("runs", "--runs-dir", runs)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[1].split() == ["smollm2", "geography", "train", "-", "-", "DAMAGED", "-", "-", "-", "-"]
    assert lines[2].split() == ["smollm2", "triviaqa", "train", "12", "8", "done", "-", "-", "-", "-"]
    assert lines[3].startswith(f"Damaged: {damaged.answers} is damaged (Parquet magic bytes not found in footer); ")


def test_7_a_truncated_checkpoint_part_is_named_and_deleting_it_redoes_that_batch(study, monkeypatch):
    args, run, data = study
    restore = stop_generation_at_second_batch(monkeypatch, ctrl_c)
    line = one_line(cli("generate", *args), exit_code=130)
    assert line == f"Stopped by Ctrl-C during Generating answers (4 of 8 samples done). {STOP_HINT}"
    restore()
    part = run.generation_parts / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    line = one_line(cli("generate", *args))
    assert line == (f"Error: {part} is damaged (Parquet magic bytes not found in footer); delete it and rerun the "
                    "same command: that batch is made again.")
    part.unlink()
    resumed = cli("generate", *args)
    assert resumed.exit_code == 0 and json.loads(resumed.output)["samples"] == 8, resumed.output


def test_7_a_new_checkpoint_part_never_takes_the_number_of_one_kept(tmp_path):
    from truthmap.runstate import Checkpoints

    checkpoints = Checkpoints(tmp_path, {"seed": 0})
    for batch in range(3):
        checkpoints.write(pd.DataFrame({"id": [f"q{batch}"]}))
    (tmp_path / "part-000000.parquet").unlink()  # a damaged part, deleted as its error says
    checkpoints.write(pd.DataFrame({"id": ["q0"]}))
    assert sorted(checkpoints.done_ids()) == ["q0", "q1", "q2"]


def test_8_a_corrupt_activations_meta_json_is_named(tmp_path):
    runs = tmp_path / "runs"
    run = RunDir.from_path(make_run(runs, "geography", full=False))
    store = run.activations("mlp")
    store.mkdir(parents=True)
    (store / "meta.json").write_text("")
    (store / "acts.f16").write_bytes(b"")
    line = one_line(cli("probe", "--runs-dir", runs))
    assert line == (f"Error: {store / 'meta.json'} is damaged (not valid JSON: Expecting value: line 1 column 1 "
                    "(char 0)); delete it and rerun `truthmap extract` with the same options to extract these "
                    "activations again.")
    listed = cli("runs", "--runs-dir", runs)
    assert listed.exit_code == 0 and "mlp DAMAGED" in listed.output.splitlines()[1]


def test_9_a_directory_as_custom_file_and_a_file_as_model_say_what_they_are(tmp_path):
    runs = tmp_path / "runs"
    line = one_line(cli("generate", "--dataset", "custom", "--custom-path", tmp_path, "--runs-dir", runs))
    assert line == f"Error: Custom file {tmp_path} is a directory; give the path of a .csv or .jsonl file."
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    line = one_line(cli("generate", "--model", weights, "--n-samples", 2, "--runs-dir", runs))
    assert line == (f"Error: Model {weights} is a file, not a model: give a directory saved by save_pretrained "
                    "(with config.json), a .gguf file, or a hub id like 'org/name'.")
    assert not runs.exists()


def test_10_a_resume_with_another_setting_is_refused_before_the_model_loads(study, monkeypatch):
    args, run, data = study
    restore = stop_generation_at_second_batch(monkeypatch, ctrl_c)
    assert cli("generate", *args).exit_code == 130
    restore()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    other = [("7" if a == 8 else a) for a in args]  # --max-new-tokens 7
    expected = (f"Error: {run.generation_parts} was made with max_new_tokens=8, not 7. "
                "Use another --runs-dir, or delete that directory to start over.")
    assert one_line(cli("generate", *other)) == expected
    assert one_line(cli("run", *other)) == expected
    expected = (f"Error: {run.generation_parts} was made with dtype='float32', not 'bfloat16'. "
                "Use another --runs-dir, or delete that directory to start over.")
    assert one_line(cli("generate", *args, "--dtype", "bfloat16")) == expected  # batches in two dtypes would mix
    assert one_line(cli("run", *args, "--dtype", "bfloat16")) == expected


# ----------------------------------------------------------------------------------------- 11-12: silent surprises


def test_11_more_samples_than_the_file_and_an_extra_csv_field_are_said(study):
    args, run, data = study
    write_qa(data, 10, extra="What is the capital of Peru?,Lima,Peru\n")
    result = cli("generate", *args, "--n-samples", 50)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        f"Warning: {data} line 12 has 3 fields but the header names 2; the extra fields are ignored. Quote a value "
        "that holds a comma, or name the column in the header.",
        "Warning: --n-samples 50 is more than the 9 questions of dataset 'custom' (train split); using all 9.",
    ]


def test_11_score_input_with_question_is_an_error(tmp_path):
    line = one_line(cli("score", "--detector", tmp_path / "d.json", "--input", tmp_path / "pairs.csv",
                        "--question", "Capital of Peru?"))
    assert line == ("Error: --input scores the rows of a file, --question one answer: give one or the other (in batch "
                    "mode the file's columns exact_answer and gold play the roles of --exact-answer and --gold).")


def test_12_sigterm_says_where_the_run_stopped_and_the_same_command_resumes(study, monkeypatch):
    args, run, data = study
    handler = signal.getsignal(signal.SIGTERM)
    restore = stop_generation_at_second_batch(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    line = one_line(cli("generate", *args), exit_code=143)
    assert line == f"Stopped by SIGTERM during Generating answers (4 of 8 samples done). {STOP_HINT}"
    assert len(list(run.generation_parts.glob("part-*.parquet"))) == 1 and not run.lock.exists()
    restore()
    resumed = cli("generate", *args)
    assert resumed.exit_code == 0 and json.loads(resumed.output)["samples"] == 8, resumed.output
    assert signal.getsignal(signal.SIGTERM) == handler  # the CLI's handler lives only while a command runs
