"""report.html from a hand-made run directory: sections, escaping, examples, and a real headless browser."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap.cli import app
from truthmap.errors import StoreError
from truthmap.analysis.report import EXAMPLES_CAP, TOP_ERRORS, write_report
from truthmap.rundir import POSITIONS, RunDir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def make_answers(n: int) -> pd.DataFrame:
    """Every third answer is wrong; row 1 carries markup that must be escaped."""
    correct = [i % 3 != 0 for i in range(n)]
    answers = [f"The capital is {'Paris' if ok else 'Lyon'}." for ok in correct]
    questions = [f"What is the capital of France? ({i})" for i in range(n)]
    if n > 1:
        questions[1] = "<script>alert('x')</script> & co?"
    return pd.DataFrame({
        "id": [f"q{i}" for i in range(n)],
        "question": questions,
        "gold": [["Paris", "Paris, France"] for _ in range(n)],
        "answer": answers,
        "correct": correct,
        "exact_answer_valid": [i % 5 != 4 for i in range(n)],
        "exact_answer_source": ["gold_match" if ok else "extracted" for ok in correct],
        "exact_start": [15] * n,
        "exact_end": [15 + (5 if ok else 4) for ok in correct],
    })


def _png(path: Path) -> None:
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [0, 1])
    fig.savefig(path, format="png", dpi=40)


def make_run(root: Path, dataset: str = "geography", n: int = 30, full: bool = True) -> Path:
    """A run directory as the stages write it: answers and run.json; with `full`, every optional artifact too."""
    run = RunDir(root, "smollm2", dataset, "train")
    run.path.mkdir(parents=True)
    make_answers(n).to_parquet(run.answers, index=False)
    config = {"model": "smollm2", "dataset": dataset, "split": "train", "n_samples": n, "seeds": [0, 5]}
    run.run_json.write_text(json.dumps({"config": config, "model_source": "/models/smollm2.gguf", "device": "cpu",
                                        "dtype": "float32", "versions": {"truthmap": "0.1.0", "torch": "2.13.0"}}))
    if not full:
        return run.path
    from truthmap.analysis.heatmap import plot_heatmap

    probes = run.probes("mlp")
    mean = 0.5 + np.arange(4 * len(POSITIONS)).reshape(4, len(POSITIONS)) / 200
    plot_heatmap(mean, POSITIONS, "fake", probes / "heatmap.png", probes / "heatmap.svg")
    best = {"layer": 3, "token": "-1", "auc_mean": 0.795, "auc_std": 0.01}
    (probes / "top_cells.json").write_text(json.dumps([best, best | {"layer": 2, "auc_mean": 0.72}]))
    (probes / "probes.json").write_text(json.dumps({"best": best, "rows_with_valid_exact_answer": 24, "errors": 8,
                                                    "correct": 16, "n_train": 19, "n_test": 5, "seeds": [0, 5]}))
    ids = [f"q{i}" for i in range(n)]
    pd.DataFrame({"id": ids, "error_probability": np.linspace(0, 1, n), "in_train": [i % 2 == 0 for i in range(n)]}
                 ).to_parquet(run.detector_scores, index=False)
    run.tables.mkdir(parents=True)
    pd.DataFrame({"method": ["logits_mean", "probe"], dataset: [0.61, 0.79]}).to_csv(run.tables / "detection_table.csv", index=False)
    _png(run.tables / "detection_table.png")
    run.generalization.mkdir(parents=True)
    matrix = pd.DataFrame([[0.8, 0.6], [0.55, 0.75]], index=[dataset, "triviaqa"], columns=[dataset, "triviaqa"])
    matrix.to_csv(run.generalization / "auc.csv")
    (matrix - 0.5).to_csv(run.generalization / "auc_minus_baseline.csv")
    _png(run.generalization / "auc_minus_baseline.png")
    run.resamples.mkdir()
    pd.DataFrame({"error_type": ["consistently incorrect", "many answers"], "count": [5, 3]}).to_csv(run.resamples / "error_types.csv", index=False)
    pd.DataFrame({"error_type": ["many answers"], "auc": [0.7]}).to_csv(run.resamples / "type_probes.csv", index=False)
    pd.DataFrame({"strategy": ["greedy", "probe"], "accuracy": [0.4, 0.5]}).to_csv(run.resamples / "selection.csv", index=False)
    _png(run.resamples / "selection.png")
    return run.path


@pytest.fixture
def full_run(tmp_path):
    return make_run(tmp_path / "runs")


def test_report_holds_every_section_self_contained_and_escaped(full_run):
    page = write_report(full_run).read_text()
    for anchor in ["summary", "heatmap-mlp", "detection", "generalization", "resamples", "examples", "configuration"]:
        assert f'<section id="{anchor}">' in page
    for name in ["detection_table.csv", "auc.csv", "auc_minus_baseline.png", "error_types.csv", "type_probes.csv",
                 "selection.csv", "selection.png"]:
        assert f"<h3>{name}</h3>" in page
    assert page.count('src="data:image/svg+xml;base64,') == 1 and page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co?" in page
    assert "The capital is <mark>Paris</mark>." in page and "The capital is <mark>Lyon</mark>." in page
    assert "layer 3, token -1, AUC 0.795 ± 0.010" in page and "2.13.0" in page
    assert 'data-filter="top"' in page and page.count("data-rank=") == 10  # the 10 errors of 30 rows, all scored


def test_report_leaves_out_what_the_run_does_not_have(tmp_path):
    page = write_report(make_run(tmp_path, full=False)).read_text()
    assert '<section id="summary">' in page and '<section id="examples">' in page
    for absent in ["heatmap-mlp", "detection", "generalization", "resamples"]:
        assert f'<section id="{absent}">' not in page
    assert 'data-filter="incorrect"' in page and 'data-filter="top"' not in page and "error probability" not in page


def test_an_invalid_span_is_shown_unmarked(tmp_path):
    page = write_report(make_run(tmp_path, full=False)).read_text()
    row_4 = next(line for line in page.splitlines() if line.startswith('<tr data-correct="1"><td>4</td>'))
    assert "<mark>" not in row_4 and "The capital is Paris." in row_4


def test_report_is_rewritten_only_when_its_content_changes(full_run):
    path = write_report(full_run)
    before = path.stat().st_mtime_ns
    assert write_report(full_run).stat().st_mtime_ns == before
    (full_run / "probes" / "mlp" / "top_cells.json").write_text("[]")
    assert write_report(full_run).stat().st_mtime_ns != before


def test_examples_are_capped_and_keep_the_top_scored_errors(tmp_path):
    n = EXAMPLES_CAP + 100
    path = make_run(tmp_path, n=n)
    page = write_report(path).read_text()
    assert page.count("<tr data-correct=") == EXAMPLES_CAP
    assert f"This page holds {EXAMPLES_CAP} of the {n} answers" in page
    assert page.count("data-rank=") == TOP_ERRORS
    assert f"<td>{n - 1 - (n - 1) % 3}</td>" in page  # the last error, highest score, is kept beyond the cap


def test_report_of_a_path_that_is_not_a_run_says_where_runs_are(full_run):
    with pytest.raises(StoreError, match=r"No answers.parquet in .*geography: not a run directory\. Did you mean: "):
        write_report(full_run.parent)


def test_report_command_prints_the_path(full_run):
    result = CliRunner().invoke(app, ["report", str(full_run)])
    assert result.exit_code == 0, result.output
    assert result.output == f"Report: {full_run / 'report.html'}\n"
    missing = CliRunner().invoke(app, ["report", str(full_run / "nothing")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: No answers.parquet in ") and len(missing.output.splitlines()) == 1


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_a_headless_browser(full_run):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[dev]')")
    path = write_report(full_run)
    answers = pd.read_parquet(full_run / "answers.parquet")
    problems, requests = [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(path.resolve().as_uri())
            page.wait_for_load_state("load")

            images = page.eval_on_selector_all("img", "all => all.map(i => [i.alt, i.naturalWidth, i.getBoundingClientRect().height])")
            assert len(images) == 4 and all(width > 0 and height > 0 for _, width, height in images), images
            tables = page.eval_on_selector_all("section table", "all => all.map(t => t.querySelectorAll('td').length)")
            assert len(tables) >= 10 and all(cells > 0 for cells in tables), tables

            visible = "rows => rows.filter(r => r.getClientRects().length > 0).map(r => r.dataset.correct)"
            assert len(page.eval_on_selector_all("#examples-table tbody tr", visible)) == len(answers)
            page.click('button[data-filter="incorrect"]')
            shown = page.eval_on_selector_all("#examples-table tbody tr", visible)
            assert shown == ["0"] * int((~answers["correct"]).sum())
            page.click('button[data-filter="top"]')
            scores = page.eval_on_selector_all(
                "#examples-table tbody tr", "rows => rows.filter(r => r.getClientRects().length > 0).map(r => r.cells[6].textContent)"
            )
            assert scores == sorted(scores, reverse=True) and len(scores) == int((~answers["correct"]).sum())
            page.click('button[data-filter="correct"]')
            assert set(page.eval_on_selector_all("#examples-table tbody tr", visible)) == {"1"}
        finally:
            browser.close()
    assert problems == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def flag_run(root: Path, best: dict, stopped: list[bool], errors: int = 8, correct: int = 16) -> Path:
    """A run whose answers stopped (or ran to the 48-token limit) as given, and whose best cell is `best`."""
    path = make_run(root, n=len(stopped), full=False)
    run = RunDir.from_path(path)
    answers = pd.read_parquet(run.answers).assign(stopped=stopped, answer_len=[7 if s else 48 for s in stopped])
    answers.to_parquet(run.answers, index=False)
    run.run_json.write_text(json.dumps(json.loads(run.run_json.read_text()) | {"settings": {"max_new_tokens": 48}}))
    run.probes("mlp").mkdir(parents=True)
    (run.probes("mlp") / "probes.json").write_text(json.dumps({"best": best, "errors": errors, "correct": correct}))
    return path


PERFECT = {"layer": 11, "token": "exact_answer_first", "auc_mean": 1.0, "auc_std": 0.0}


def test_answers_that_do_not_stop_raise_a_red_flag_naming_the_cause(tmp_path):
    from truthmap.analysis.report import red_flags

    path = flag_run(tmp_path, PERFECT, [False] * 27 + [True] * 3, errors=60, correct=40)
    flags = red_flags(RunDir.from_path(path))
    assert flags[0].startswith("27 of 30 answers (90%) ran to the 48-token limit without stopping: labels and exact")
    assert flags[1] == ("best cell (mlp, layer 11, exact_answer_first) AUC 1.000 ± 0.000 is too good to be true; "
                        "likely cause: answers not stopping (27 of 30 ran to the token limit).")
    page = write_report(path).read_text()
    assert page.count('<p class="warning">Warning: ') == 2 and "too good to be true" in page


def test_a_perfect_cell_on_few_errors_or_on_stopped_answers_names_its_cause(tmp_path):
    from truthmap.analysis.report import red_flags

    few = red_flags(RunDir.from_path(flag_run(tmp_path / "a", PERFECT, [True] * 30, errors=4, correct=60)))
    assert few == ["best cell (mlp, layer 11, exact_answer_first) AUC 1.000 ± 0.000 is too good to be true; likely "
                   "cause: too few rows of one class (4 errors, 60 correct among the probed rows)."]
    other = red_flags(RunDir.from_path(flag_run(tmp_path / "b", PERFECT, [True] * 30, errors=40, correct=60)))
    assert len(other) == 1 and other[0].endswith("likely cause: a text artefact: something in the probed tokens, not "
                                                 "the model's knowledge, gives the label away (e.g. correct and wrong "
                                                 "answers written or located differently).")


@pytest.mark.parametrize("best", [PERFECT | {"auc_mean": 0.985}, PERFECT | {"auc_std": 0.004}])
def test_good_numbers_with_stopped_answers_raise_no_flag(tmp_path, best):
    from truthmap.analysis.report import red_flags

    path = flag_run(tmp_path, best, [True] * 20 + [False] * 10, errors=40, correct=60)
    assert red_flags(RunDir.from_path(path)) == []
    assert '<p class="warning">' not in write_report(path).read_text()


def test_a_perfect_cell_on_errors_that_copy_the_prompt_names_the_copying(tmp_path):
    from truthmap.analysis.report import red_flags

    path = flag_run(tmp_path, PERFECT, [True] * 30, errors=40, correct=60)
    run = RunDir.from_path(path)
    answers = pd.read_parquet(run.answers)
    wrong = ~answers["correct"]
    answers["prompt"] = [f"Q: What is the capital of Lyonshire? ({i})\nA:" for i in range(len(answers))]
    answers.loc[wrong, "exact_answer"] = ["Lyonshire"] * (int(wrong.sum()) - 1) + ["Lyon"]
    answers.to_parquet(run.answers, index=False)
    errors = int((wrong & answers["exact_answer_valid"]).sum())
    assert red_flags(run)[0].endswith(
        f"likely cause: a text artefact: the exact answers of {errors} of the {errors} probed errors are text of the "
        "prompt (the question's own subject, or an example), so the exact-answer tokens give the label away.")


def test_report_gives_the_verdict_controls_and_selectivity(full_run):
    from truthmap.analysis.heatmap import plot_heatmap

    run = RunDir.from_path(full_run)
    probes = run.probes("mlp")
    summary = json.loads((probes / "probes.json").read_text())
    verdict = "geography: best cell layer 3, -1, AUC 0.795 [0.70, 0.88]; best text-only control Text @ answer, AUC 0.61"
    controls = {"text_answer": {"label": "Text @ answer", "auc_mean": 0.61, "auc_std": 0.02, "auc_low": 0.5,
                                "auc_high": 0.7, "aucs": [0.6, 0.62]},
                "text_question": {"label": "Text @ question", "auc_mean": float("nan"), "auc_std": float("nan"),
                                  "note": "A text-only control cannot be fitted: empty vocabulary"}}
    summary |= {"verdict": verdict, "controls": controls, "best_control": "text_answer",
                "embedding_best": {"layer": 0, "token": "exact_answer_first", "auc_mean": 0.66, "auc_std": 0.01}}
    (probes / "probes.json").write_text(json.dumps(summary))
    zeros = np.zeros((4, len(POSITIONS)))
    plot_heatmap(zeros, POSITIONS, "sel", probes / "selectivity.png", probes / "selectivity.svg", diverging=True)
    (run.tables / "detection_table.md").write_text("t\n\n| method |\n\nVerdict (95 % intervals over the test rows):\n\n"
                                                   "- geography: best probe Probe @ -1, AUC 0.8; the probe beats it.\n")
    page = write_report(full_run).read_text()
    assert page.count(verdict) == 2  # the summary and the heatmap section
    assert "Text @ question" in page and "empty vocabulary" in page and "Text @ answer" in page
    assert "<h3>Selectivity: AUC minus the best text-only control</h3>" in page
    assert "Input embedding row (the token-identity floor): best exact_answer_first, AUC 0.660." in page
    assert "<li>geography: best probe Probe @ -1, AUC 0.8; the probe beats it.</li>" in page
