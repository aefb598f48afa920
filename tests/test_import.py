"""`truthmap import`: answers made elsewhere become a normal run, equal to the run that generated them."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap.cli import app
from truthmap.rundir import POSITIONS, position_column

QUESTIONS = [f"What is the capital of {word}? {i}" for i, word in enumerate(["France", "Norway", "Peru"] * 16)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny model on disk, and its finished `truthmap run` over a custom dataset of 48 questions."""
    from tiny import half_right_qa, save_tiny_model, tiny_lm

    root = tmp_path_factory.mktemp("generated")
    lm = tiny_lm(seed=3)
    model_dir = save_tiny_model(lm, root / "tiny-model")
    data = half_right_qa(lm, root / "qa.csv", QUESTIONS)
    runs = root / "runs"
    result = CliRunner().invoke(app, ["run", "--model", str(model_dir), "--dataset", "custom", "--custom-path", str(data),
                                      "--runs-dir", str(runs), "--batch-size", "8", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    return model_dir, runs / "tiny-model" / "custom" / "train"


def answers_file(run, path, token_ids=True, **extra):
    """The generated answers written as an engine would write them: one JSON object per line."""
    table = pd.read_parquet(run / "answers.parquet")
    frame = pd.DataFrame({"id": table["id"], "question": table["question"], "prompt": table["prompt"],
                          "gold": table["gold"].map(list), "answer": table["answer"]})
    if token_ids:
        frame["answer_token_ids"] = table["answer_ids"].map(lambda ids: [int(t) for t in ids])
    for column, values in extra.items():
        frame[column] = values
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def import_args(model_dir, path, runs, *more):
    return ["import", str(path), "--model", str(model_dir), "--dataset", "custom", "--runs-dir", str(runs),
            "--batch-size", "8", *more]


def test_round_trip_gives_the_generated_run_back(generated, tmp_path):
    model_dir, original = generated
    path = answers_file(original, tmp_path / "answers.jsonl")
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, import_args(model_dir, path, runs))
    assert result.exit_code == 0, result.output
    summary, n = json.loads(result.stdout), len(pd.read_parquet(original / "answers.parquet"))
    assert summary["imported"] == summary["rows"] == n and sum(summary["skipped"].values()) == 0
    assert summary["answer_tokens"] == {"given": n, "re_encoded_from_text": 0}
    store = runs / "tiny-model" / "custom" / "train" / "activations" / "mlp"
    meta = json.loads((store / "meta.json").read_text())  # written by the import's own pass: extract has nothing to do
    assert meta["one_pass"] and meta["written"] == n and "rows_written" not in meta
    ran = CliRunner().invoke(app, ["run", "--model", str(model_dir), "--dataset", "custom", "--runs-dir", str(runs),
                                   "--batch-size", "8", "--seeds", "0,1"])
    assert ran.exit_code == 0, ran.output
    imported = runs / "tiny-model" / "custom" / "train"

    before, after = (pd.read_parquet(run / "answers.parquet") for run in (original, imported))
    assert list(after.columns) == list(before.columns)
    for column in ["id", "correct", "prompt_ids", "answer_ids", "exact_answer", "exact_answer_source",
                   *(position_column(p) for p in POSITIONS)]:
        assert before[column].map(lambda v: list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v).equals(
            after[column].map(lambda v: list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)), column
    assert 0 < before["correct"].sum() < len(before) and before["exact_answer_valid"].sum() > 10
    differences = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(before["answer_logprobs"], after["answer_logprobs"])]
    assert max(differences) < 1e-4
    stores = [np.fromfile(run / "activations" / "mlp" / "acts.f16", dtype=np.float16).astype(np.float32)
              for run in (original, imported)]
    assert np.abs(stores[0] - stores[1]).max() <= 2e-3 * np.abs(stores[0]).max()  # decoding vs one forward pass
    heatmaps = [pd.read_csv(run / "probes" / "mlp" / "heatmap.csv") for run in (original, imported)]
    assert (heatmaps[0]["auc_mean"] - heatmaps[1]["auc_mean"]).abs().max() < 0.005
    made = json.loads((imported / "run.json").read_text())
    assert made["import"]["sha256"] == made["settings"]["import_sha256"] and made["import"]["rows"] == n
    # Both runs know which weights made them: the sha256 of the saved model's weights file.
    original_made = json.loads((original / "run.json").read_text())
    assert made["model_identity"] == original_made["model_identity"]
    assert len(made["model_identity"]["weights_sha256"]) == 64
    assert (imported / "report.html").stat().st_size > 0
    fitted = CliRunner().invoke(app, ["fit-detector", "--model", str(model_dir), "--dataset", "custom", "--runs-dir",
                                      str(runs), "--token", "-1", "--layer", "1", "--seeds", "0,1"])
    assert fitted.exit_code == 0, fitted.output
    assert json.loads((imported / "detector_mlp" / "config.json").read_text())["model_identity"] == made["model_identity"]


def test_answer_text_alone_is_re_encoded(generated, tmp_path):
    """Without token ids the text is encoded again: the same run as with the ids the tokenizer gives that text.
    (A random model's own answers often split text as its tokenizer would not, hence the answer_token_ids column.)"""
    from tiny import tiny_tokenizer

    model_dir, _ = generated
    answers = ["The capital of France is Paris.", "Tromsø is in Norway.", "the answer is Hartford, a city."]
    rows = [{"id": str(i), "question": "In which country is the city of Tromsø?", "answer": a, "gold": ["Norway"]}
            for i, a in enumerate(answers)]
    ids = [tiny_tokenizer()(a, add_special_tokens=False)["input_ids"] for a in answers]
    tables = []
    for name, extra in (("text", [{}] * 3), ("ids", [{"answer_token_ids": i} for i in ids])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r | e) + "\n" for r, e in zip(rows, extra)))
        result = CliRunner().invoke(app, import_args(model_dir, path, tmp_path / name, "--locate", "gold"))
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["answer_tokens"]["given"] == (3 if name == "ids" else 0)
        tables.append(pd.read_parquet(tmp_path / name / "tiny-model" / "custom" / "train" / "answers.parquet"))
    assert [list(a) for a in tables[0]["answer_ids"]] == ids
    assert list(tables[0]["correct"]) == [False, True, False]
    for column in ("answer_logprobs", "pos_exact_answer_first", "pos_exact_answer_last", "answer"):
        assert tables[0][column].map(list if column == "answer_logprobs" else str).equals(
            tables[1][column].map(list if column == "answer_logprobs" else str)), column


def test_rerun_over_another_file_is_refused_in_one_line(generated, tmp_path):
    model_dir, original = generated
    path = answers_file(original, tmp_path / "answers.jsonl")
    runs = tmp_path / "runs"
    assert CliRunner().invoke(app, import_args(model_dir, path, runs)).exit_code == 0
    again = CliRunner().invoke(app, import_args(model_dir, path, runs))
    n = len(pd.read_parquet(original / "answers.parquet"))
    assert again.exit_code == 0 and json.loads(again.stdout)["imported"] == n  # done: nothing redone
    other = answers_file(original, tmp_path / "other.jsonl", correct=[True] * n)
    refused = CliRunner().invoke(app, import_args(model_dir, other, runs))
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1 and "from another answers file" in refused.output


def test_bad_rows_are_counted_by_kind_or_stop_a_strict_import(generated, tmp_path):
    model_dir, original = generated
    rows = [
        {"id": "a", "question": "Capital of Peru?", "answer": "Lima", "gold": ["Lima"]},
        {"id": "b", "question": "", "answer": "Oslo", "gold": ["Oslo"]},  # missing question
        {"id": "c", "question": "Capital of Chile?", "answer": "  ", "gold": ["Santiago"]},  # empty answer
        {"id": "a", "question": "Capital of Peru?", "answer": "Lima", "gold": ["Lima"]},  # duplicate id
        {"id": "d", "question": "Capital of Chile?", "answer": "Santiago"},  # no label
        {"id": "e", "question": "Capital of Chile?", "answer": "x", "answer_token_ids": [5] * 2100, "gold": ["x"]},
        {"id": "f", "question": "Capital of Italy?", "answer": "Rome", "gold": ["Rome"], "exact_answer": "Paris"},
        {"id": "g", "question": "Capital of France?", "answer": "It is Paris.", "correct": False, "gold": ["Paris"],
         "exact_answer": "paris"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, import_args(model_dir, path, runs, "--locate", "gold"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped"] == {"missing_question": 1, "empty_answer": 1, "duplicate_id": 1, "no_label": 1,
                                  "too_long": 1, "exact_answer_not_in_answer": 1}
    assert summary["skipped_rows"]["duplicate_id"] == [4] and summary["skipped_rows"]["too_long"] == [6]
    assert summary["imported"] == 2 and summary["labels"]["given_disagreeing_with_rule"] == 1
    table = pd.read_parquet(runs / "tiny-model" / "custom" / "train" / "answers.parquet").set_index("id")
    assert list(table.index) == ["a", "g"] and list(table["correct"]) == [True, False]  # a given label wins
    g = table.loc["g"]
    assert (g["exact_answer"], g["exact_answer_source"], g["exact_start"]) == ("Paris", "given", 6)
    assert g["answer_logprobs"].shape == (len(g["answer_ids"]),) and (g["answer_logprobs"] < 0).all()

    strict = CliRunner().invoke(app, import_args(model_dir, path, tmp_path / "strict", "--strict"))
    assert strict.exit_code == 1 and strict.output.count("\n") == 1
    assert "row 2 (id 'b') has no question" in strict.output


def test_missing_columns_and_unknown_formats_are_one_line_errors(tmp_path):
    cases = {"a.jsonl": '{"question": "q?"}\n', "b.jsonl": '{"question": "q?", "answer": "a"}\n', "c.txt": "x"}
    expected = {"a.jsonl": "has no column 'answer'", "b.jsonl": "neither gold aliases", "c.txt": "use .csv, .jsonl"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(app, ["import", str(tmp_path / name), "--runs-dir", str(tmp_path / "runs")])
        assert result.exit_code == 1 and expected[name] in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "runs").exists()  # refused before anything was written, or any model loaded


def test_csv_and_parquet_files_read_as_jsonl(tmp_path):
    from truthmap.runner.importer import ImportSource, read_rows

    frame = pd.DataFrame({"question": ["Capital of Peru?"], "answer": [" Lima"], "gold": ['["Lima", "lima"]'],
                          "correct": ["true"], "answer_token_ids": ["[1, 2, 3]"]})
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.assign(gold=[["Lima", "lima"]], correct=[True], answer_token_ids=[[1, 2, 3]]).to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.parquet"):
        (row,) = read_rows(tmp_path / name, ImportSource(str(tmp_path / name)))
        assert (row.id, row.answer, row.gold, row.correct, row.answer_ids) == ("row-1", " Lima", ["Lima", "lima"], True,
                                                                               [1, 2, 3])


def test_vllm_example_writes_the_file_import_reads(tmp_path):
    """examples/vllm_answers.py cannot run here (vLLM needs a GPU); its writer is tested on vLLM-shaped outputs."""
    import importlib.util
    import types
    from pathlib import Path

    from truthmap.runner.importer import ImportSource, read_rows

    script = Path(__file__).resolve().parents[1] / "examples" / "vllm_answers.py"
    spec = importlib.util.spec_from_file_location("vllm_answers", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports vllm only inside main()
    completion = types.SimpleNamespace(text="The capital of Peru is Lima.", token_ids=[11, 12, 13, 2], finish_reason="stop")
    output = types.SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[completion])
    records = [types.SimpleNamespace(id="7", question="What is the capital of Peru?", answers=["Lima"])]
    path = module.write_answers(tmp_path / "answers.jsonl", records, ["What is the capital of Peru?"], [output])
    (row,) = read_rows(path, ImportSource(str(path)))
    assert (row.id, row.question, row.answer, row.gold) == ("7", "What is the capital of Peru?",
                                                            "The capital of Peru is Lima.", ["Lima"])
    assert (row.prompt_ids, row.answer_ids, row.stopped) == ([1, 2, 3], [11, 12, 13, 2], True)


def test_model_identity_is_the_weights_hash_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import types

    from truthmap import rundir

    from truthmap.lm import models
    monkeypatch.setenv("TRUTHMAP_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    weights = directory / "model.safetensors"
    weights.write_bytes(b"weights v1")
    identity = models.model_identity("m", models.ModelSource(str(directory)))
    assert identity == {"model": "m", "weights": "model.safetensors", "weights_sha256": rundir.file_sha256(weights)}
    hashed = []
    monkeypatch.setattr(rundir, "file_sha256", lambda path: hashed.append(path) or "x")
    assert models.model_identity("m", models.ModelSource(str(directory))) == identity and hashed == []  # cached
    weights.write_bytes(b"weights v2!")  # another size: hashed again
    assert models.model_identity("m", models.ModelSource(str(directory)))["weights_sha256"] == "x" and len(hashed) == 1
    gguf = models.model_identity("m.gguf", models.ModelSource(str(directory), "model.safetensors"))
    assert gguf["weights_sha256"] == "x" and len(hashed) == 1

    hub = models.model_identity("org/name", models.ModelSource("org/name"),
                                types.SimpleNamespace(config=types.SimpleNamespace(_commit_hash="abc123")))
    assert hub == {"model": "org/name", "hub_id": "org/name", "revision": "abc123"}
    assert models.describe_identity(hub) == "org/name at revision abc123"
    assert not models.same_weights(hub, hub | {"revision": "def456"}) and models.same_weights(hub, None)


def test_detector_refuses_another_revision_in_one_line(tiny):
    import dataclasses

    from truthmap.analysis.detector import Detector
    from truthmap.errors import ModelError

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 2, 32)), np.arange(40) % 2 == 0
    detector = Detector(token="-1", layer=1, seeds=(0,)).fit(X, y)
    detector.info = {"model": "tiny", "model_identity": {"model": "tiny", "hub_id": "org/tiny", "revision": "aaa111"}}
    detector.check_model(dataclasses.replace(tiny, identity={"model": "tiny", "hub_id": "org/tiny", "revision": "aaa111"}))
    other = dataclasses.replace(tiny, identity={"model": "tiny", "hub_id": "org/tiny", "revision": "bbb222"})
    with pytest.raises(ModelError, match=r"^This detector was fitted on org/tiny at revision aaa111, not org/tiny at "
                                         r"revision bbb222: [^\n]*$"):
        detector.check_model(other)


def test_a_killed_import_resumes_to_the_same_store_and_answers(generated, tmp_path, monkeypatch):
    """Killed after the first batch's cells were written: the rerun writes the rest, byte for byte the uninterrupted
    import's store and answers."""
    import truthmap.stages.activations as activations

    model_dir, original = generated
    path = answers_file(original, tmp_path / "answers.jsonl")
    whole = CliRunner().invoke(app, import_args(model_dir, path, tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    mark_written, calls = activations.mark_written, []

    def killed_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        mark_written(*args)

    monkeypatch.setattr(activations, "mark_written", killed_on_second_batch)
    killed = CliRunner().invoke(app, import_args(model_dir, path, tmp_path / "killed"))
    assert killed.exit_code != 0 and len(calls) == 2
    run = tmp_path / "killed" / "tiny-model" / "custom" / "train"
    assert not (run / "answers.parquet").exists()
    assert 0 < len(json.loads((run / "activations" / "mlp" / "meta.json").read_text())["rows_written"]) <= 8
    monkeypatch.setattr(activations, "mark_written", mark_written)
    resumed = CliRunner().invoke(app, import_args(model_dir, path, tmp_path / "killed"))
    assert resumed.exit_code == 0, resumed.output
    done = tmp_path / "whole" / "tiny-model" / "custom" / "train"
    for name in ("acts.f16", "embed.f16"):
        assert (run / "activations" / "mlp" / name).read_bytes() == (done / "activations" / "mlp" / name).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(run / "answers.parquet"), pd.read_parquet(done / "answers.parquet"))


def test_import_writes_the_store_of_the_site_it_is_given(generated, tmp_path):
    model_dir, original = generated
    path = answers_file(original, tmp_path / "answers.jsonl")
    result = CliRunner().invoke(app, import_args(model_dir, path, tmp_path / "runs", "--site", "resid"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny-model" / "custom" / "train"
    assert sorted(p.name for p in (run / "activations").iterdir()) == ["resid"]
    meta = json.loads((run / "activations" / "resid" / "meta.json").read_text())
    assert meta["site"] == "resid" and meta["written"] == len(pd.read_parquet(run / "answers.parquet"))
    assert json.loads((run / "run.json").read_text())["activations_while_generating"] == "resid"
