"""The results pages (docs/results/) are written by `make results` from the runs it makes, each with its stamp."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from truthmap.errors import ConfigError
from truthmap.results import GENERATED, read_results_file, run_command, write_results

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python -m truthmap.results study.toml --only tiny-geography"


def missing_stamp(page: str) -> list[str]:
    """What a results page lacks of its generator's stamp: the marker line, the commit and the command."""
    wanted = {"generator line": re.escape(GENERATED), "commit": r"^\| commit \| `[0-9a-f]{7,}[^`]*` \|$",
              "command": r"^\| command \| `python -m truthmap\.results [^`]+` \|$"}
    return [name for name, pattern in wanted.items() if not re.search(pattern, page, re.MULTILINE)]


def test_every_committed_results_page_has_its_generators_stamp():
    pages = sorted((REPO / "docs" / "results").glob("*.md"))
    assert pages, "docs/results/ holds no page: run `make results` (its index is written even before any study)"
    assert {page.name: missing_stamp(page.read_text(encoding="utf-8")) for page in pages} == {
        page.name: [] for page in pages}


def test_a_page_typed_by_hand_is_caught():
    assert missing_stamp("# Results\n\n| method | AUC |\n|---|---|\n| probe | 0.950 |\n") == [
        "generator line", "commit", "command"]
    stamped = f"{GENERATED}\n| commit | `0123abcd4567` |\n| command | `{COMMAND}` |\n"
    assert missing_stamp(stamped) == []
    assert missing_stamp(stamped.replace("| commit | `0123abcd4567` |", "| commit | `` |")) == ["commit"]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """Two studies in a results file; only the first runs: a tiny model on 40 of the built-in dataset's questions
    (as a custom file whose gold makes about half the answers right, so both classes are there to probe)."""
    from tiny import half_right_qa, save_tiny_model, tiny_lm

    from truthmap.datasets import load_records

    tmp = tmp_path_factory.mktemp("results")
    lm = tiny_lm(seed=3)
    model = save_tiny_model(lm, tmp / "tiny-model")
    questions = [record.question for record in load_records("geography", "train", n_samples=40)]
    data = half_right_qa(lm, tmp / "geography.csv", questions)
    (tmp / "study.toml").write_text(f"""
runs_dir = "{tmp / 'runs'}"
seeds = [0, 1]
batch_size = 8
max_new_tokens = 16

[[study]]
name = "tiny-geography"
title = "A tiny model on built-in questions"
model = "{model}"
dataset = "custom"
custom_path = "{data}"

[[study]]
name = "not-run"
title = "A study left for later"
dataset = "winobias"
""")
    written = write_results(tmp / "study.toml", tmp / "pages", only=["tiny-geography"], command=COMMAND)
    return tmp, written


def test_a_small_study_writes_its_page_with_the_stamp_and_tables(small_study):
    tmp, written = small_study
    pages = tmp / "pages"
    assert written == [pages / "tiny-geography.md", pages / "index.md"]
    page = (pages / "tiny-geography.md").read_text()
    assert missing_stamp(page) == [] and f"| command | `{COMMAND}` |" in page
    assert re.search(r"^\| wall time \| `\d+ s \(\d+\.\d min\)` \|$", page, re.MULTILINE)
    assert re.search(r"^\| machine \| `.+, \d+ CPUs, .+` \|$", page, re.MULTILINE)
    # The numbers on the page are the run's: its answers and its probes' best cell.
    run = tmp / "runs" / "tiny-model" / "custom" / "train"
    answers = pd.read_parquet(run / "answers.parquet")
    assert f"| samples | {len(answers)} |" in page and f"| correct | {int(answers['correct'].sum())} |" in page
    best = json.loads((run / "probes" / "mlp" / "probes.json").read_text())["best"]
    assert (f"| best cell | {best['layer']} | `{best['token']}` | {best['auc_mean']:.3f} "
            f"[{best['auc_low']:.3f}, {best['auc_high']:.3f}] |") in page
    assert "| `exact_answer_last` |" in page and "| Text @ answer (text only) |" in page
    assert "![heatmap of custom-mlp](tiny-geography/custom-mlp-heatmap.png)" in page
    assert (pages / "tiny-geography" / "custom-mlp-heatmap.png").read_bytes() == (
        run / "probes" / "mlp" / "heatmap.png").read_bytes()
    assert "truthmap run --model " in page and "--max-new-tokens 16" in page


def test_the_index_links_the_pages_and_names_the_studies_not_run(small_study):
    tmp, _ = small_study
    index = (tmp / "pages" / "index.md").read_text()
    assert missing_stamp(index) == []
    assert "| [A tiny model on built-in questions](tiny-geography.md) | custom-mlp |" in index
    assert "| A study left for later | not run yet: `make results ONLY=not-run` |" in index


def test_the_documentation_results_file_holds_run_config_keys():
    studies = read_results_file(REPO / "docs" / "results.toml")
    assert [s.name for s in studies] == ["smollm2-geography", "smollm2-triviaqa", "smollm2-winobias",
                                         "gemma3-geography"]
    assert run_command(studies[0].configs()[0]) == (
        "truthmap run --dataset geography --n-samples 300 --runs-dir runs/results")
    assert [c.n_samples for c in studies[3].configs(n_samples=20)] == [20]


def test_a_bad_results_file_is_named_in_one_line(tmp_path):
    bad = tmp_path / "results.toml"
    bad.write_text('[[study]]\nname = "a"\ntitle = "A"\nn-samples = 3\n')
    with pytest.raises(ConfigError, match=r"^Unknown key 'n-samples' in .*results.toml, study 'a'\. Did you mean: "
                                          r"n_samples\?"):
        read_results_file(bad)
    bad.write_text('[[study]]\nname = "a"\ntitle = "A"\n[[study]]\nname = "a"\ntitle = "B"\n')
    with pytest.raises(ConfigError, match=r"names two studies alike: a\.$"):
        read_results_file(bad)
    bad.write_text('model = "smollm2"\n')
    with pytest.raises(ConfigError, match=r"lists no study: add \[\[study\]\] tables"):
        read_results_file(bad)
    with pytest.raises(ConfigError, match=r"^No study 'nope' in .*\. Available: a\.$"):
        bad.write_text('[[study]]\nname = "a"\ntitle = "A"\n')
        write_results(bad, tmp_path / "pages", only=["nope"])


def test_a_study_that_fails_is_named_and_the_index_is_still_written(small_study, tmp_path):
    from truthmap.errors import TruthmapError

    tmp, _ = small_study
    (tmp_path / "empty").mkdir()
    study = tmp_path / "study.toml"
    study.write_text(f'[[study]]\nname = "broken"\ntitle = "No data"\nmodel = "{tmp / "tiny-model"}"\n'
                     f'dataset = "winobias"\ndata_dir = "{tmp_path / "empty"}"\nruns_dir = "{tmp_path / "runs"}"\n')
    with pytest.raises(TruthmapError, match=r"^Study 'broken' failed: .+ The other pages and the index were written\.$"):
        write_results(study, tmp_path / "pages", command=COMMAND)
    assert "| No data | not run yet: `make results ONLY=broken` |" in (tmp_path / "pages" / "index.md").read_text()
    assert not (tmp_path / "pages" / "broken.md").exists()
