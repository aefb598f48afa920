"""`truthmap answer`: the same answers as generate, scored from the decoding's own activations."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap.runner.flagged import REFUSAL, answer, selective_accuracy
from truthmap.cli import app
from truthmap.config import RunConfig
from truthmap.analysis.detector import Detector


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model on disk, a custom dataset of its questions, and a calibrated detector for it (directory)."""
    from tiny import half_right_qa, save_tiny_model, tiny_lm

    from truthmap.stages.activations import read_positions
    from truthmap.lm.models import load_model

    tmp = tmp_path_factory.mktemp("answer")
    model_dir = save_tiny_model(tiny_lm(), tmp / "tiny-model")
    lm = load_model(str(model_dir))
    questions = [f"What is the capital of {w}? {i}" for i, w in enumerate(["France", "Norway", "Peru", "Spain"] * 3)]
    data = half_right_qa(lm, tmp / "qa.csv", questions)
    texts = [lm.tokenizer(f"Paris is {'the ' * k}capital", add_special_tokens=False)["input_ids"] for k in range(40)]
    X = read_positions(lm, texts, [[len(t) - 1] for t in texts], "mlp")[:, :, 0]  # [40, layers, hidden]
    y = np.arange(40) % 2 == 0
    info = {"model": str(model_dir), "model_identity": lm.identity, "dataset": "custom", "chat_template": True,
            "extraction_tries": 1}
    detector = Detector(token="-1", layer=1, info=info).fit(X[:20], y[:20]).calibrate(X[20:], y[20:])
    folder = detector.save_pretrained(tmp / "detector")
    return {"lm": lm, "model": model_dir, "data": data, "questions": questions, "detector": folder, "tmp": tmp}


def test_answer_gives_generates_answers_and_scores_probabilities(saved):
    from truthmap import pipeline
    from truthmap.stages.activations import read_positions

    lm = saved["lm"]
    config = RunConfig(model=str(saved["model"]), dataset="custom", custom_path=str(saved["data"]),
                       runs_dir=str(saved["tmp"] / "runs"), batch_size=4, max_new_tokens=6, extraction_tries=1)
    run = pipeline.generate(config, activations=False)
    generated = pd.read_parquet(run.answers)
    spec, records = pipeline.load_config_records(config)
    result = answer(detector=saved["detector"], records=records, spec=spec, lm=lm, batch_size=4, max_new_tokens=6)
    rows = result.rows
    assert list(rows["id"]) == list(generated["id"]) and list(rows["answer"]) == list(generated["answer"])
    assert [list(a) for a in rows["answer_ids"]] == [list(a) for a in generated["answer_ids"]]
    detector = Detector.from_pretrained(saved["detector"])
    # The cell from the decoding is the cell a forward pass over the same tokens reads (float16 as recorded).
    sequences = [list(p) + list(a) for p, a in zip(rows["prompt_ids"], rows["answer_ids"])]
    cells = read_positions(lm, sequences, [[len(s) - 1] for s in sequences], "mlp")[:, :, 0]
    np.testing.assert_allclose(rows["error_probability"], detector.predict_proba(cells)[:, 1], atol=1e-3)
    # score on the same texts: where the text encodes back to the same tokens, the same probability.
    scored = detector.score_texts(list(rows["question"]), list(rows["answer"]), lm)
    same = [k for k in range(len(rows)) if lm.tokenizer(rows["answer"][k], add_special_tokens=False)["input_ids"]
            == list(rows["answer_ids"][k])]
    assert len(same) >= 3
    for k in same:
        assert rows["error_probability"][k] == pytest.approx(scored[k]["error_probability"], abs=1e-3)
    assert rows["correct"].notna().all()  # the custom dataset's gold answers grade them


def test_abstain_replaces_flagged_answers_and_selective_accuracy(saved):
    detector = Detector.from_pretrained(saved["detector"])
    questions = saved["questions"][:6]
    plain = answer(questions, detector, lm=saved["lm"], max_new_tokens=6, golds=["Paris"] * 6, min_recall=0.5)
    kept = answer(questions, detector, lm=saved["lm"], max_new_tokens=6, golds=["Paris"] * 6, min_recall=0.5,
                  abstain=True)
    flagged = plain.rows["error_logit"] >= detector.threshold(min_recall=0.5)
    assert list(plain.rows["flag"]) == list(flagged) and plain.threshold == detector.threshold(min_recall=0.5)
    assert list(kept.rows["abstained"]) == list(flagged)
    assert (kept.rows.loc[flagged, "answer"] == REFUSAL).all()
    assert list(kept.rows.loc[~flagged, "answer"]) == list(plain.rows.loc[~flagged, "answer"])
    assert plain.selective["kept"] == int((~flagged).sum()) and plain.selective["rows"] == 6


def test_selective_accuracy_by_hand():
    rows = pd.DataFrame({"correct": [True, False, True, False], "flag": [False, True, False, False]})
    assert selective_accuracy(rows) == {"kept": 3, "rows": 4, "share_kept": 0.75, "accuracy_kept": round(2 / 3, 4),
                                        "accuracy_all": 0.5}


def test_answer_cli(saved, tmp_path):
    args = ["answer", "--detector", str(saved["detector"]), "--max-new-tokens", "6"]
    result = CliRunner().invoke(app, [*args, "--question", "What is the capital of France? 0", "--max-fpr", "0.2"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert set(row) >= {"answer", "error_probability", "flag", "abstained"} and 0 <= row["error_probability"] <= 1
    assert "Answered 1 questions; flagged" in result.stderr
    questions = tmp_path / "q.parquet"
    pd.DataFrame({"question": saved["questions"][:3], "gold": ["Paris", "Oslo", "Lima"]}).to_parquet(questions)
    out = tmp_path / "answers.jsonl"
    written = CliRunner().invoke(app, [*args, "--input", str(questions), "--output", str(out), "--min-recall", "0.5"])
    assert written.exit_code == 0, written.output
    assert len(pd.read_json(out, lines=True)) == 3 and "Selective accuracy:" in written.stderr


@pytest.mark.parametrize("extra, message", [
    (["--question", "Q?", "--max-fpr", "1.5"],
     "Error: Invalid --max-fpr 1.5: a target rate must lie strictly between 0 and 1, such as 0.05."),
    (["--question", "Q?", "--min-recall", "0.99"],
     "Error: A threshold at recall 0.99 needs at least 100 errors in the calibration rows; they hold 10. Fit on "
     "more questions, or pick a lower recall."),
    (["--question", "Q?", "--model", "smollm2"], "Error: This detector was fitted on model"),
    ([], "Error: Give the questions one way: --question TEXT, --input FILE or --dataset NAME."),
    (["--question", "Q?", "--abstain"], "Error: --abstain replaces the flagged answers: pick the flag's threshold"),
    (["--question", "Q?", "--dataset", "geography"],
     "Error: Give the questions one way: --question TEXT, --input FILE or --dataset NAME (got --question and "
     "--dataset)."),
])
def test_answer_cli_bad_input_is_one_line(saved, extra, message, monkeypatch):
    from truthmap.lm import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = CliRunner().invoke(app, ["answer", "--detector", str(saved["detector"]), *extra])
    assert result.exit_code == 1 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_input_without_the_question_column_is_one_line(saved, tmp_path):
    table = tmp_path / "q.csv"
    pd.DataFrame({"prompt": ["Capital of Peru?"]}).to_csv(table, index=False)
    result = CliRunner().invoke(app, ["answer", "--detector", str(saved["detector"]), "--input", str(table)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {table} has no column 'question'; columns found: prompt. Name the right "
                             "column (e.g. --question-column/--answer-column) or fix the header.\n")


def test_exact_answer_detector_locates_in_the_same_batch(saved):
    """At an exact-answer token the constrained extractor finds the span in the batch the answer was written in;
    the probability is that of the cell at the span's last token, as score reads it given the same span."""
    detector = Detector.from_pretrained(saved["detector"])
    detector.token, detector.info = "exact_answer_last", detector.info | {"extractor": "constrained", "locate": "blind"}
    questions = saved["questions"][:8]
    rows = answer(questions, detector, lm=saved["lm"], max_new_tokens=6, batch_size=4).rows
    found = rows["exact_answer"].str.len() > 0
    assert found.any() and rows.loc[found, "error_probability"].notna().all()
    assert rows.loc[~found, "error_probability"].isna().all()
    lm = saved["lm"]
    same = [k for k in np.flatnonzero(found) if lm.tokenizer(rows["answer"][k], add_special_tokens=False)["input_ids"]
            == list(rows["answer_ids"][k])]
    assert same
    scored = detector.score_texts([questions[k] for k in same], [rows["answer"][k] for k in same], lm,
                                  exact_answers=[rows["exact_answer"][k] for k in same])
    for k, s in zip(same, scored):
        assert rows["error_probability"][k] == pytest.approx(s["error_probability"], abs=1e-3)


def test_score_prints_the_flag_at_the_target_picked(saved):
    args = ["score", "--detector", str(saved["detector"]), "--question", "What is the capital of France? 0",
            "--answer", "Paris"]
    result = CliRunner().invoke(app, [*args, "--min-recall", "0.5"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    threshold = Detector.from_pretrained(saved["detector"]).threshold(min_recall=0.5)
    assert row["flag"] == (row["error_logit"] >= threshold)
    refused = CliRunner().invoke(app, [*args, "--max-fpr", "0"])
    assert refused.exit_code == 1
    assert refused.output == ("Error: Invalid --max-fpr 0.0: a target rate must lie strictly between 0 and 1, such as "
                              "0.05.\n")
