"""Resampling on a tiny model: seeded per row (the same answers at any batch size), resumable, and complete."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap import pipeline
from truthmap.runner import resample as resampling
from truthmap.cli import app
from truthmap.lm.decoding import generate_batch
from truthmap.errors import ConfigError, StoreError
from truthmap.lm.models import encode_prompt, stop_token_ids

K = 3
CELL = {"layer": 1, "token": "exact_answer_first"}


def resample(config, lm, **changes):
    options = dict(n_resamples=K, temperature=1.0, seed=0, lm=lm) | CELL | changes
    return pipeline.resample(config, **options)


# ------------------------------------------------------------------------------------------------ per-row sampling


def sampled(lm, prompts, batch_size, seeds, max_new_tokens=12):
    stops = stop_token_ids(lm.tokenizer, lm.model)
    out = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        out += generate_batch(lm.model, lm.tokenizer, prompts[part], max_new_tokens, stops, 1.0, row_seeds=seeds[part])
    return [g.token_ids for g in out]


def test_row_seeds_give_the_same_answers_at_any_batch_size(tiny):
    questions = ["What is the capital of France?", "Zürich?", "In which country is the city of Tromsø?", "What?"] * 3
    prompts = [encode_prompt(tiny.tokenizer, q, True) for q in questions]
    seeds = [resampling.sample_seed(0, f"q{i % 4}", i // 4) for i in range(len(prompts))]
    one = sampled(tiny, prompts, 1, seeds)
    assert sampled(tiny, prompts, 5, seeds) == one == sampled(tiny, prompts, 12, seeds)
    assert len({tuple(t) for t in one[::4]}) == 3  # the same question, other seeds: other answers
    other = [resampling.sample_seed(1, f"q{i % 4}", i // 4) for i in range(len(prompts))]
    assert sampled(tiny, prompts, 12, other) != one


def test_row_seeds_sample_the_models_distribution(tiny):
    import torch

    prompt = encode_prompt(tiny.tokenizer, "What is the capital of France?", True)
    first = [g.token_ids[0] for g in generate_batch(
        tiny.model, tiny.tokenizer, [prompt] * 600, 1, [10**9], 1.0, row_seeds=list(range(600)))]
    with torch.no_grad():
        probabilities = torch.softmax(tiny.model(torch.tensor([prompt])).logits[0, -1], -1)
    top = int(probabilities.argmax())
    p = float(probabilities[top])
    assert abs(first.count(top) / 600 - p) < 4 * (p * (1 - p) / 600) ** 0.5


def test_sampled_logprobs_are_the_models_own(tiny):
    import torch

    prompt = encode_prompt(tiny.tokenizer, "Zürich?", True)
    gen = generate_batch(tiny.model, tiny.tokenizer, [prompt], 6, [10**9], 0.7, row_seeds=[5])[0]
    logits = tiny.model(torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1 : -1]  # [answer, vocab]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
    assert gen.logprobs == pytest.approx(expected.tolist(), abs=1e-4)  # temperature 1, comparable with greedy


def test_row_seeds_need_a_temperature(tiny):
    prompt = encode_prompt(tiny.tokenizer, "What?", True)
    with pytest.raises(ConfigError, match="row_seeds needs temperature > 0"):
        generate_batch(tiny.model, tiny.tokenizer, [prompt], 4, [2], 0.0, row_seeds=[1])


# ------------------------------------------------------------------------------------------------------ the stage


def test_resampling_writes_every_file(greedy_run, tiny):
    summary = resample(greedy_run, tiny)
    out = pipeline.run_dir(greedy_run).resamples
    answers = pd.read_parquet(out / "answers.parquet")
    greedy = pd.read_parquet(pipeline.run_dir(greedy_run).answers)
    assert list(answers.columns) == resampling.RESAMPLE_COLUMNS
    assert len(answers) == K * len(greedy) and list(answers["sample"][:K]) == list(range(K))
    assert list(answers["id"][::K]) == list(greedy["id"])
    assert (answers["answer_len"] == answers["answer_ids"].map(len)).all()
    assert 0 < answers["correct"].sum() < len(answers) and answers["exact_answer_valid"].mean() > 0.5
    cell_acts, greedy_acts = np.load(out / "cell_acts.npy"), np.load(out / "greedy_cell_acts.npy")
    assert cell_acts.shape == (len(answers), 32) and cell_acts.dtype == np.float16
    assert greedy_acts.shape == (len(greedy), 32)
    for name in ["error_types.csv", "error_type_counts.json", "type_probes.csv", "selection.csv",
                 "selection_choices.csv", "selection.png", "resamples.json"]:
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "resamples.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["cell"] == {"site": "mlp"} | CELL and summary["questions"] == len(greedy)
    types = pd.read_csv(out / "error_types.csv")
    assert len(types) == len(greedy) and types["k"].eq(K).all()
    probes = pd.read_csv(out / "type_probes.csv")
    assert len(probes) == 11 and probes["skipped"].notna().any()  # 24 questions: most types have too few
    selection = pd.read_csv(out / "selection.csv")
    assert selection.loc[0, "group"] == "all" and selection.loc[0, "greedy"] == pytest.approx(greedy["correct"].mean())
    assert set(summary["selection"]) == {"greedy", "probe", "majority", "logprob", "oracle"}


def test_resampled_activations_match_the_greedy_store(greedy_run, tiny):
    """The resampled answers are read exactly as the greedy store was, so one probe serves both."""
    from truthmap.stages.activations import open_store
    from truthmap.runstate import Checkpoints

    run = pipeline.run_dir(greedy_run)
    greedy = pd.read_parquet(run.answers).assign(key=lambda t: t["id"])
    store, _ = open_store(run.activations("mlp"))
    again = resampling.cell_activations(tiny, greedy, "mlp", 1, "exact_answer_last", 5, Checkpoints(run.path / "c", {}))
    valid = greedy["exact_answer_valid"].to_numpy()
    expected = resampling.greedy_cell(store, {"layer": 1, "token": "exact_answer_last"})
    # The greedy store was recorded while decoding: a forward pass agrees up to float rounding, one float16 step.
    np.testing.assert_allclose(again[valid].astype(np.float32), expected[valid].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_resampling_is_deterministic_across_batch_sizes(greedy_run, tiny):
    import dataclasses
    import shutil

    resample(dataclasses.replace(greedy_run, batch_size=2), tiny)
    out = pipeline.run_dir(greedy_run).resamples
    small = pd.read_parquet(out / "answers.parquet")
    small_acts = np.load(out / "cell_acts.npy")
    shutil.rmtree(out)
    resample(dataclasses.replace(greedy_run, batch_size=7), tiny)
    large = pd.read_parquet(out / "answers.parquet")
    # Identical answers; the log-probabilities only up to the float noise of batched forward passes.
    pd.testing.assert_frame_equal(large.drop(columns="answer_logprobs"), small.drop(columns="answer_logprobs"))
    for a, b in zip(large["answer_logprobs"], small["answer_logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(np.load(out / "cell_acts.npy").astype(np.float32), small_acts.astype(np.float32), atol=2e-3)


def test_a_subset_of_questions_keeps_their_answers(greedy_run, tiny, tmp_path):
    import shutil

    resample(greedy_run, tiny)
    out = pipeline.run_dir(greedy_run).resamples
    whole = pd.read_parquet(out / "answers.parquet").set_index(["id", "sample"])
    shutil.rmtree(out)
    summary = resample(greedy_run, tiny, n_questions=7)
    part = pd.read_parquet(out / "answers.parquet").set_index(["id", "sample"])
    assert summary["questions"] == 7 and len(part) == 7 * K
    pd.testing.assert_frame_equal(part, whole.loc[part.index])


def test_killed_resampling_resumes_to_the_same_answers(greedy_run, tiny, monkeypatch):
    import shutil

    resample(greedy_run, tiny)
    out = pipeline.run_dir(greedy_run).resamples
    whole = pd.read_parquet(out / "answers.parquet")
    shutil.rmtree(out)
    real, calls = resampling.generate_batch, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(resampling, "generate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        resample(greedy_run, tiny)
    assert len(list((out / "work" / "generations").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(resampling, "generate_batch", real)
    resample(greedy_run, tiny)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "answers.parquet"), whole)


def test_a_finished_resampling_reruns_its_analysis_without_the_model(greedy_run, tiny, monkeypatch):
    import truthmap.lm.models

    first = resample(greedy_run, tiny)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(truthmap.lm.models, "load_model", no_model)
    assert resample(greedy_run, None) == first


def test_the_default_cell_is_the_train_runs_best(greedy_run, tiny):
    from truthmap.rundir import write_json

    probes = pipeline.run_dir(greedy_run).probes("mlp")
    write_json(probes / "probes.json", {"best": {"layer": 0, "token": "-1", "auc_mean": 0.9}})
    summary = pipeline.resample(greedy_run, n_resamples=2, lm=tiny)
    assert summary["cell"] == {"site": "mlp", "layer": 0, "token": "-1"}


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"temperature": 0.0}, ConfigError, r"Invalid --temperature 0.0: resampling needs a temperature > 0"),
        ({"n_resamples": 0}, ConfigError, r"Invalid --n-resamples 0"),
        ({"n_questions": 0}, ConfigError, r"^Invalid --n-questions 0: expected an integer >= 1 \(questions to resample\)\.$"),
        ({"token": "exact"}, ConfigError, r"^Unknown token 'exact'\. Available: last_q, first_answer, .*, -1\.$"),
        ({"layer": 2}, ConfigError, r"Invalid --layer 2: the model has 2 layers \(0 to 1\)"),
        ({"layer": None}, StoreError,
         r"No probes in .* Run `truthmap run` on the train split first, or pass --layer and --token"),
    ],
)
def test_bad_options_are_refused_with_what_to_do(greedy_run, tiny, changes, error, message):
    with pytest.raises(error, match=message):
        resample(greedy_run, tiny, **changes)


runner = CliRunner()


def test_cli_without_a_greedy_run_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["resample", "--runs-dir", str(tmp_path), "--layer", "1", "--token", "-1"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: No greedy answers in ") and "Run `truthmap run --dataset geography" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_refuses_temperature_zero(tmp_path):
    result = runner.invoke(app, ["resample", "--runs-dir", str(tmp_path), "--temperature", "0"])
    assert result.exit_code == 1 and result.output.startswith("Error: Invalid --temperature 0.0")


def test_cli_resamples_a_saved_model(greedy_run, tiny, tmp_path):
    import dataclasses

    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    config = dataclasses.replace(greedy_run, model=str(model_dir), runs_dir=str(tmp_path / "cli-runs"))
    pipeline.generate(config, tiny)
    pipeline.extract(config, tiny)
    args = ["resample", "--model", str(model_dir), "--dataset", "custom", "--runs-dir", config.runs_dir,
            "--n-resamples", "2", "--layer", "1", "--token", "exact_answer_first", "--batch-size", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = pipeline.run_dir(config).resamples
    assert "Cell: mlp layer 1, token exact_answer_first" in result.output and str(out / "selection.csv") in result.output
    assert len(pd.read_parquet(out / "answers.parquet")) == 2 * 24


def test_resample_help_has_an_example():
    result = runner.invoke(app, ["resample", "--help"])
    assert result.exit_code == 0 and "Example: truthmap resample" in result.output
