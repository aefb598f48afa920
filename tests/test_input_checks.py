"""Issue 38: refuse before the work, and name what is wrong. Each item of the issue through the CLI as a user types
it (the exit code and the exact line), numbered as in the issue; every bad input is refused before a model loads
(the `no_model` fixture makes loading one fail the test)."""

import errno
import fcntl
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from truthmap.rundir import RunDir

from helpers import cli, one_line

MODEL_LOADED = "a model was loaded before the input was checked"


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: the checks must have refused the input before."""
    from truthmap.lm import models
    def refuse(*args, **kwargs):
        raise AssertionError(MODEL_LOADED)

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    from tiny import save_tiny_model, tiny_lm

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would mix into the CLI's output
    return save_tiny_model(tiny_lm(seed=3), tmp_path_factory.mktemp("model") / "tiny-model")


def write_qa(path: Path, n: int = 10) -> Path:
    rows = [f"What is the capital of France? {i},Paris" for i in range(n)]
    path.write_text("question,answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def generate_args(model_dir, data, runs, *more):
    return ["generate", "--model", model_dir, "--dataset", "custom", "--custom-path", data, "--runs-dir", runs,
            "--batch-size", 4, "--max-new-tokens", 8, *more]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, model_dir):
    """A finished `truthmap generate` of 8 questions on the tiny model (its mlp store recorded in the same pass)."""
    root = tmp_path_factory.mktemp("generated")
    data = write_qa(root / "qa.csv")
    result = cli(*generate_args(model_dir, data, root / "runs"))
    assert result.exit_code == 0, result.output
    return root / "runs", data


@pytest.fixture
def runs_copy(generated, tmp_path):
    """A copy of the generated runs directory, this test's to change."""
    runs, data = generated
    shutil.copytree(runs, tmp_path / "runs")
    return tmp_path / "runs", data, RunDir(tmp_path / "runs", "tiny-model", "custom", "train")


def import_args(model_dir, path, runs, *more):
    return ["import", path, "--model", model_dir, "--dataset", "custom", "--runs-dir", runs, "--batch-size", 4, *more]


def write_answers(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def answer_row(**changes) -> dict:
    return {"id": "q0", "question": "What is the capital of France?", "gold": ["Paris"], "answer": "Paris"} | changes


# ------------------------------------------------------------------------------------- 1-3: wrong results, exit 0


def test_1_booleans_are_not_token_ids(tmp_path, model_dir, no_model):
    path = write_answers(tmp_path / "answers.jsonl", [answer_row(answer_token_ids=[True, False, 50])])
    line = one_line(cli(*import_args(model_dir, path, tmp_path / "runs")))
    assert line == (f"Error: {path} row 1: column 'answer_token_ids' holds True, not a token id; write a list of "
                    "integer token ids like [12, 345].")


def test_1_a_special_token_inside_an_answer_is_kept_with_one_warning_line(tmp_path, model_dir):
    """A model may write a special token inside its answer (the tiny one does; generate keeps it, and an import of
    generate's answers gives the same run back), so it is kept; but never silently: ids of another tokenizer
    look the same."""
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    paris = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    path = write_answers(tmp_path / "answers.jsonl", [answer_row(id="ok", answer_token_ids=[*paris, end]),
                                                      answer_row(id="odd", answer_token_ids=[start, *paris, end])])
    result = cli(*import_args(model_dir, path, tmp_path / "runs", "--locate", "gold"))
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"Warning: 1 of 2 answers of {path} hold a special token inside their 'answer_token_ids' (first: row 2, "
        f"'<|im_start|>', id {start}); kept, as generate keeps what a model writes. If model {str(model_dir)!r} did "
        "not write them, the ids are another tokenizer's."]
    answers = pd.read_parquet(RunDir(tmp_path / "runs", "tiny-model", "custom", "train").answers)
    assert [list(ids) for ids in answers["answer_ids"]] == [paris, [start, *paris]]  # the end token dropped


def test_2_a_detector_whose_scale_has_a_zero_is_refused_on_load(tmp_path, no_model):
    from truthmap.analysis.detector import Detector
    from truthmap.rundir import file_sha256

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 2, 8)), np.arange(40) % 2 == 0
    path = Detector(token="-1", layer=1, seeds=(0,)).fit(X, y).save(tmp_path / "detector.json")
    weights_file = path.with_suffix(".npz")
    with np.load(weights_file) as npz:
        weights = dict(npz)
    weights["scale"][3] = 0.0
    np.savez(weights_file, **weights)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"weights_sha256": file_sha256(weights_file)}))
    line = one_line(cli("score", "--detector", path, "--question", "Capital of Peru?", "--answer", "Lima"))
    assert line == (f"Error: {weights_file} is not a valid detector: array 'scale' holds 0 or a negative value "
                    "(it divides the activations). Refit it with `truthmap fit-detector`.")


def test_3_a_dtype_other_than_a_finished_stage_s_is_refused_naming_how_to_get_it(runs_copy, model_dir, no_model):
    runs, data, run = runs_copy
    store = run.activations("mlp")
    made = store.joinpath("acts.f16").read_bytes()
    extract = one_line(cli("extract", "--model", model_dir, "--dataset", "custom", "--runs-dir", runs,
                           "--dtype", "bfloat16"))
    assert extract == (f"Error: {store} is finished and was made with --dtype float32, not bfloat16: a finished "
                       f"stage is not made again. For --dtype bfloat16, use another --runs-dir, or delete {store} "
                       "and rerun.")
    generate = one_line(cli(*generate_args(model_dir, data, runs, "--dtype", "bfloat16")))
    assert generate == (f"Error: {run.answers} is finished and was made with --dtype float32, not bfloat16: a "
                        f"finished stage is not made again. For --dtype bfloat16, use another --runs-dir, or delete "
                        f"{run.path} and rerun.")
    device = one_line(cli("run", "--model", model_dir, "--dataset", "custom", "--custom-path", data, "--runs-dir",
                          runs, "--batch-size", 4, "--max-new-tokens", 8, "--dtype", "float16"))
    assert device.startswith(f"Error: {run.answers} is finished and was made with --dtype float32, not float16")
    assert store.joinpath("acts.f16").read_bytes() == made
    same = cli("extract", "--model", model_dir, "--dataset", "custom", "--runs-dir", runs, "--dtype", "float32")
    assert same.exit_code == 0, same.output  # the finished store's own settings: nothing to do, no model loaded


def test_3_resample_refuses_an_extraction_model_the_greedy_answers_were_not_located_with(runs_copy, model_dir,
                                                                                       tmp_path, no_model):
    from tiny import save_tiny_model, tiny_lm

    runs, data, run = runs_copy
    other = save_tiny_model(tiny_lm(seed=4), tmp_path / "other-model")
    line = one_line(cli("resample", "--run", run.path, "--layer", 1, "--token", "-1", "--n-questions", 2,
                        "--extraction-model", other))
    assert line == (f"Error: The answers of {run.path} were located with --extraction-model {model_dir}, and its "
                    f"resamples are located as they were: drop --extraction-model {other}, or make a greedy run with "
                    "it (another --runs-dir).")


# ------------------------------------------------------------------ 4-12: errors that say what is wrong, in time


@pytest.mark.parametrize(("column", "ids", "bad"), [("answer_token_ids", [50, 99999999], 99999999),
                                                    ("answer_token_ids", [-3, 50], -3),
                                                    ("prompt_token_ids", [1, 50, -1], -1)])
def test_4_a_token_id_outside_the_vocabulary_names_row_and_column(tmp_path, model_dir, no_model, column, ids, bad):
    from tiny import tiny_tokenizer

    path = write_answers(tmp_path / "answers.jsonl", [answer_row(**{column: ids})])
    line = one_line(cli(*import_args(model_dir, path, tmp_path / "runs")))
    assert line == (f"Error: {path} row 1 (id 'q0'): column {column!r} holds the id {bad}, outside the vocabulary "
                    f"of model {str(model_dir)!r} (ids 0 to {len(tiny_tokenizer()) - 1}); give the token ids of that "
                    "model's tokenizer.")


def test_5_a_csv_with_a_byte_order_mark_is_imported(tmp_path, model_dir):
    path = tmp_path / "answers.csv"
    text = "question,answer,gold\nWhat is the capital of France?,Paris,Paris\nWhat is 2+2?,5,4\n"
    path.write_text(text, encoding="utf-8-sig")  # as spreadsheet programs save it
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    result = cli(*import_args(model_dir, path, tmp_path / "runs", "--locate", "gold"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["rows"], summary["imported"], summary["correct"]) == (2, 2, 1)


@pytest.mark.parametrize("command", [["generate"], ["run"], ["extract"], ["resample"], ["probe"], ["import", "a.jsonl"],
                                     ["table", "--datasets", "geography"],
                                     ["generalize", "--datasets", "geography", "triviaqa"]])
def test_6_a_device_torch_does_not_have_is_refused_before_the_model_loads(tmp_path, command, no_model, monkeypatch):
    import torch

    line = one_line(cli(*command, "--device", "tpu", "--runs-dir", tmp_path / "runs"))
    assert line == "Error: Invalid --device 'tpu': not a torch device; use cpu, cuda, cuda:N or mps."
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_line(cli(*command, "--device", "cuda", "--runs-dir", tmp_path / "runs"))
    assert line == ("Error: Invalid --device 'cuda': this torch has no CUDA device (torch.cuda.is_available() is "
                    "False); use --device cpu, or leave --device out.")
    assert not (tmp_path / "runs").exists()


def test_6_a_cuda_device_beyond_the_machine_s_is_refused(tmp_path, no_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = one_line(cli("generate", "--device", "cuda:2", "--runs-dir", tmp_path / "runs"))
    assert line == "Error: Invalid --device 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1."


def test_6_score_checks_the_device_before_the_model_loads(tmp_path, no_model):
    from truthmap.analysis.detector import Detector

    rng = np.random.default_rng(0)
    path = Detector(token="-1", layer=1, seeds=(0,)).fit(rng.normal(size=(40, 2, 8)), np.arange(40) % 2 == 0).save(
        tmp_path / "detector.json")
    line = one_line(cli("score", "--detector", path, "--question", "Capital of Peru?", "--answer", "Lima",
                        "--device", "tpu"))
    assert line == "Error: Invalid --device 'tpu': not a torch device; use cpu, cuda, cuda:N or mps."


def test_7_a_missing_extraction_model_is_refused_first_and_leaves_no_settings(tmp_path, model_dir, no_model):
    data = write_qa(tmp_path / "qa.csv")
    missing = tmp_path / "no-such-model"
    line = one_line(cli(*generate_args(model_dir, data, tmp_path / "runs", "--extraction-model", missing)))
    assert line == (f"Error: --extraction-model: Unknown model '{missing}': not 'smollm2' or 'gemma3-270m', not a "
                    "local directory or .gguf file, and not a hub id like 'org/name'.")
    assert not (tmp_path / "runs").exists()  # no work/*/settings.json to refuse the corrected rerun


def test_8_report_on_a_truncated_answers_file_names_it(runs_copy):
    runs, data, run = runs_copy
    run.answers.write_bytes(run.answers.read_bytes()[:300])
    line = one_line(cli("report", "--run", run.path))
    assert line == (f"Error: {run.answers} is damaged (Parquet magic bytes not found in footer); delete it and rerun "
                    "`truthmap generate` (or `truthmap run`) with the same options to rebuild it from the checkpoints "
                    "in work/.")


def test_9_a_store_that_cannot_fit_is_refused_before_it_is_written(tmp_path, model_dir, monkeypatch):
    import truthmap.stages.activations as activations

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: usage._replace(free=500))
    data = write_qa(tmp_path / "qa.csv")
    store = RunDir(tmp_path / "runs", "tiny-model", "custom", "train").activations("mlp")
    line = one_line(cli(*generate_args(model_dir, data, tmp_path / "runs")))
    # 8 answers x 15 positions x 32 floats of 2 bytes, for 2 layers and the embedding row: 23,040 bytes
    assert line == (f"Error: Not enough disk space for {store}: the store needs 23.0 KB, and 500 bytes are free "
                    "there. Free some space (or use another --runs-dir) and run the same command again: finished work "
                    "resumes.")
    assert not (store / "acts.f16").exists()


def test_9_a_full_disk_names_the_file_and_that_a_rerun_resumes(tmp_path, model_dir, monkeypatch):
    import truthmap.rundir as rundir

    real = rundir.os.replace

    def full(source, target):
        if str(target).endswith(".parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(rundir.os, "replace", full)
    data = write_qa(tmp_path / "qa.csv")
    run = RunDir(tmp_path / "runs", "tiny-model", "custom", "train")
    line = one_line(cli(*generate_args(model_dir, data, tmp_path / "runs")))
    part = run.work.extractions.part(0)  # the first parquet a batch writes: its exact answers
    assert line == (f"Error: No space left on the disk to write {part}. Free some space (or use another --runs-dir) "
                    "and run the same command again: finished work resumes.")
    monkeypatch.setattr(rundir.os, "replace", real)
    again = cli(*generate_args(model_dir, data, tmp_path / "runs"))
    assert again.exit_code == 0 and json.loads(again.stdout)["samples"] == 8, again.output


def test_10_import_of_another_site_on_a_finished_import_writes_its_store(tmp_path, generated, model_dir):
    runs, _ = generated
    table = pd.read_parquet(RunDir(runs, "tiny-model", "custom", "train").answers)
    path = write_answers(tmp_path / "answers.jsonl", [
        {"id": i, "question": q, "gold": list(g), "answer": a} for i, q, g, a in
        zip(table["id"], table["question"], table["gold"], table["answer"])])
    imported = RunDir(tmp_path / "runs", "tiny-model", "custom", "train")
    first = cli(*import_args(model_dir, path, tmp_path / "runs"))
    assert first.exit_code == 0, first.output
    assert not imported.store("resid").meta.exists()
    again = cli(*import_args(model_dir, path, tmp_path / "runs", "--site", "resid"))
    assert again.exit_code == 0, again.output
    meta = json.loads(imported.store("resid").meta.read_text())
    assert meta["written"] == meta["shape"][2] == len(table) and meta["site"] == "resid"


@pytest.mark.parametrize("command", [["table", "--datasets", "custom"],
                                     ["generalize", "--datasets", "geography", "custom"],
                                     ["run", "--dataset", "custom"], ["generate", "--dataset", "custom"]])
def test_11_a_malformed_custom_file_is_refused_before_the_model_loads(tmp_path, model_dir, no_model, command):
    data = tmp_path / "qa.csv"
    data.write_text('question,answer\nWhat is the capital of France?,Paris\nWhat is 2+2?,"[""4"""\n')
    line = one_line(cli(*command, "--custom-path", data, "--model", model_dir, "--runs-dir", tmp_path / "runs"))
    assert line == (f"Error: {data} line 3: column 'answer' starts with '[' but is not a valid JSON list "
                    """(got '["4"'); write it as ["a", "b"], or as one answer without the leading '['.""")


def test_11_import_of_a_dataset_whose_prompt_needs_more_than_the_question_is_refused_first(tmp_path, model_dir,
                                                                                         no_model):
    path = write_answers(tmp_path / "answers.jsonl", [answer_row(correct=True)])
    line = one_line(cli(*import_args(model_dir, path, tmp_path / "runs")[:-4], "--dataset", "winobias"))
    assert line == (f"Error: The winobias prompt needs more than the question; give each row's prompt in a 'prompt' "
                    f"column of {path}.")


def test_12_import_counts_csv_lines_as_generate_does(tmp_path, model_dir, no_model):
    path = tmp_path / "answers.csv"
    path.write_text('question,answer,gold\nWhat is 2+2?,4,"[""4"""\n', encoding="utf-8")
    line = one_line(cli(*import_args(model_dir, path, tmp_path / "runs")))
    assert line == (f"Error: {path} line 2: column 'gold' starts with '[' but is not a valid JSON list "
                    """(got '["4"'); write it as ["a", "b"], or as one answer without the leading '['.""")


def test_12_a_run_being_imported_is_in_use_not_missing(tmp_path):
    run = RunDir(tmp_path / "runs", "tiny-model", "custom", "train")
    run.path.mkdir(parents=True)
    with open(run.lock, "a+") as held:  # as an import that has not yet written run.json holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        line = one_line(cli("probe", "--run", run.path))
    assert line == (f"Error: {run.path} is in use by another truthmap run (pid 4242); wait for it to finish, or stop "
                    "it, then run this again.")
