"""`truthmap run` end to end in-process on a tiny model saved to disk: generate, extract, probe, heatmap."""

import html
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap.cli import app


@pytest.fixture
def study(tmp_path):
    """A saved tiny model and a custom dataset on which about half of its greedy answers are right."""
    from tiny import half_right_qa, save_tiny_model, tiny_lm

    lm = tiny_lm(seed=3)
    model_dir = save_tiny_model(lm, tmp_path / "tiny-model")
    questions = [f"What is the capital of {word}? {i}" for i, word in enumerate(["France", "Norway", "Peru"] * 30)]
    path = half_right_qa(lm, tmp_path / "qa.csv", questions)

    return model_dir, path


def run_args(study, tmp_path) -> list[str]:
    model_dir, data = study
    return ["run", "--model", str(model_dir), "--dataset", "custom", "--custom-path", str(data),
            "--runs-dir", str(tmp_path / "runs"), "--batch-size", "8", "--seeds", "0,1"]


def test_run_writes_the_heatmap_and_skips_finished_stages(study, tmp_path):
    args = run_args(study, tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "tiny-model" / "custom" / "train"
    table = pd.read_parquet(out / "answers.parquet")
    assert 0 < table["correct"].sum() < len(table) and table["exact_answer_valid"].mean() > 0.8
    probes = out / "probes" / "mlp"
    for name in ["heatmap.png", "heatmap.svg", "heatmap.csv", "top_cells.json", "probes.json"]:
        assert (probes / name).stat().st_size > 0
    summary = json.loads((probes / "probes.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["rows_with_valid_exact_answer"] == table["exact_answer_valid"].sum()
    cells = pd.read_csv(probes / "heatmap.csv")
    assert len(cells) == (1 + 2) * 15 and cells["auc_mean"].between(0, 1).all()  # the embedding row and 2 layers
    assert f"Heatmap: {probes / 'heatmap.png'}" in result.output and "Best cell: layer" in result.output

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert [p for p in after if after[p] != before.get(p)] == []  # nothing redone


def test_probe_before_extract_says_what_to_run(tmp_path):
    result = CliRunner().invoke(app, ["probe", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: No answers in ") and "truthmap generate" in result.output


def test_table_fit_detector_and_score_end_to_end(study, tmp_path):
    model_dir, data = study
    runs = tmp_path / "runs"
    common = ["--model", str(model_dir), "--runs-dir", str(runs), "--batch-size", "8", "--seeds", "0,1"]
    result = CliRunner().invoke(app, ["table", "--datasets", "custom", "--custom-path", str(data), *common])
    assert result.exit_code == 0, result.output
    tables = runs / "tiny-model" / "tables"
    frame = pd.read_csv(tables / "detection_table.csv", index_col=0)
    assert list(frame.columns) == ["custom", "custom_std"] and "p(True)-exact" in frame.index
    assert frame.loc[["Logits-mean", "Probas-min", "p(True)"], "custom"].between(0, 1).all()
    test_run = runs / "tiny-model" / "custom" / "test"
    assert len(pd.read_parquet(test_run / "baselines.parquet")) == len(pd.read_parquet(test_run / "answers.parquet"))
    assert not (runs / "tiny-model" / "custom" / "train" / "baselines.parquet").exists()  # scored on test only
    assert "| method | custom |" in result.output

    fitted = CliRunner().invoke(app, ["fit-detector", "--dataset", "custom", "--token", "-1", "--layer", "1",
                                      "--model", str(model_dir), "--runs-dir", str(runs)])
    assert fitted.exit_code == 0, fitted.output
    detector = runs / "tiny-model" / "custom" / "train" / "detector_mlp"
    config = json.loads((detector / "config.json").read_text())
    assert config["layer"] == 1 and (detector / "model.safetensors").is_file()
    assert config["test"]["rows"] == len(pd.read_parquet(runs / "tiny-model" / "custom" / "test" / "answers.parquet")
                                         .query("exact_answer_valid"))
    assert f"AUROC | {config['test']['auroc']['value']:.3f} [" in (detector / "README.md").read_text()
    for split in ("train", "test"):
        scores = pd.read_parquet(runs / "tiny-model" / "custom" / split / "detector_scores.parquet")
        assert scores["error_probability"].between(0, 1).all() and (scores["in_train"] == (split == "train")).all()

    scored = CliRunner().invoke(app, ["score", "--detector", str(detector), "--model", str(model_dir),
                                      "--question", "What is the capital of Peru? 2", "--answer", "Lima"])
    assert scored.exit_code == 0, scored.output
    assert 0 <= json.loads(scored.stdout)["error_probability"] <= 1
    pairs = tmp_path / "pairs.jsonl"
    pd.DataFrame({"question": ["What is the capital of Peru? 2", "Capital of Norway?"], "answer": ["Lima", "Oslo"]}).to_json(
        pairs, orient="records", lines=True)
    batch = CliRunner().invoke(app, ["score", "--detector", str(detector), "--input", str(pairs)])
    assert batch.exit_code == 0, batch.output
    out = pd.read_json(tmp_path / "pairs.scored.jsonl", lines=True)
    assert out["error_probability"].between(0, 1).all() and len(out) == 2
    assert out["error_probability"][0] == pytest.approx(json.loads(scored.stdout)["error_probability"], abs=1e-6)


def test_run_prints_each_red_flag_as_a_warning_line(tmp_path, monkeypatch):
    from truthmap import pipeline
    best = {"layer": 11, "token": "exact_answer_first", "auc_mean": 1.0, "auc_std": 0.0}
    flags = ["150 of 150 answers (100%) ran to the 48-token limit without stopping: ...", "best cell ... too good"]
    monkeypatch.setattr(pipeline, "run_all", lambda config: {"heatmap": "h.png", "best": best, "samples": 150,
                                                             "report": "r.html", "warnings": flags})
    result = CliRunner().invoke(app, ["run", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-4:] == ["Best cell: layer 11, token exact_answer_first, AUC 1.000 ± 0.000",
                          f"Warning: {flags[0]}", f"Warning: {flags[1]}", "Report: r.html"]
    assert '"warnings"' not in result.output


def test_run_writes_controls_embedding_row_selectivity_and_intervals(study, tmp_path):
    result = CliRunner().invoke(app, run_args(study, tmp_path))
    assert result.exit_code == 0, result.output
    probes = tmp_path / "runs" / "tiny-model" / "custom" / "train" / "probes" / "mlp"
    cells = pd.read_csv(probes / "heatmap.csv", dtype={"layer": str})
    assert list(cells["layer"].unique()) == ["embed", "0", "1"]  # the input embedding below layer 0
    assert (cells["auc_low"] <= cells["auc_mean"] + 1e-9).all()
    assert (cells["auc_mean"] <= cells["auc_high"] + 1e-9).all()
    summary = json.loads((probes / "probes.json").read_text())
    assert set(summary["controls"]) == {"text_exact_answer", "text_answer", "text_question"}
    control = summary["controls"][summary["best_control"]]
    assert control["auc_low"] <= control["auc_mean"] <= control["auc_high"]
    selectivity = pd.read_csv(probes / "selectivity.csv", dtype={"layer": str})
    merged = cells.merge(selectivity, on=["layer", "token"])
    assert (merged["selectivity"] - (merged["auc_mean"] - control["auc_mean"])).abs().max() < 1e-5
    assert (probes / "selectivity.svg").stat().st_size > 0
    top = json.loads((probes / "top_cells.json").read_text())
    assert {"auc_low", "auc_high", "selectivity", "beats_control"} <= set(top[0])
    assert summary["verdict"] == summary["verdict_details"]["text"] and summary["verdict"].startswith("custom: probe at layer")
    assert set(summary["verdict_details"]["controls"]) == {*summary["controls"], "input_embedding"}
    assert f"Verdict: {summary['verdict']}" in result.output
    report = (tmp_path / "runs" / "tiny-model" / "custom" / "train" / "report.html").read_text()
    assert html.escape(summary["verdict"]) in report and "Selectivity" in report and "Controls of the verdict" in report
