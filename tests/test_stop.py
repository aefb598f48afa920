"""Where answers end: at the end token, and with a plain (base) prompt at the first line break, as in the paper.

A scripted base model keeps talking after its answer, into invented "Q:"/"A:" turns, as Gemma-3-270M does; its
tokenizer merges across line breaks, so some tokens straddle one (".\\nQ: What is the capital of ").
"""

import json

import pandas as pd
import pytest

from truthmap import pipeline
from truthmap.config import RunConfig
from truthmap.errors import StoreError
from truthmap.datasets import get_spec
from truthmap.stages.generate import answer_stop, generate_answers, stop_at_text
from truthmap.runstate import Checkpoints

from tiny import scripted_base_lm, tiny_base_tokenizer

CAPITALS = {"France": "Paris", "Italy": "Rome", "Peru": "Lima", "Chile": "Santiago"}
TALKS_ON = {  # country -> what the model writes after "Q: What is the capital of {country}?\nA:"
    "France": " Paris.\nQ: What is the capital of Italy?\nA: Rome.\n\n",  # right first line; "." straddles the break
    "Italy": " Milan\nQ: What is the capital of Italy?\nA: Rome\n",  # wrong first line; the gold comes later
    "Peru": "\n Lima is the capital.\nQ: What is the capital of Chile?\nA:",  # opens with a line break
    "Chile": " Santiago," * 40,  # never breaks: runs to the token limit
}


def base_prompt(country: str) -> str:
    return f"Q: What is the capital of {country}?\nA:"


@pytest.fixture
def base_lm():
    return scripted_base_lm({base_prompt(country): text for country, text in TALKS_ON.items()})


def answers(lm, tmp_path, stop_text, max_new_tokens=64, batch_size=4):
    countries = list(TALKS_ON)
    frame = generate_answers(
        lm, countries, [base_prompt(c) for c in countries], max_new_tokens, batch_size,
        Checkpoints(tmp_path / "parts", {"stop_text": stop_text}), stop_text,
    )
    return frame.set_index("id")


def test_stop_check_keeps_the_tokens_wholly_before_the_line_break():
    tokenizer = tiny_base_tokenizer()
    check = stop_at_text(tokenizer, "\n")
    ids = tokenizer(" Paris.\nQ: What is the capital of Italy?", add_special_tokens=False)["input_ids"]
    straddling = next(i for i, t in enumerate(ids) if "\n" in tokenizer.decode([t]))
    assert tokenizer.decode([ids[straddling]]) != "\n"  # the test's point: the break is inside a longer token
    assert check(ids[:straddling]) is None
    assert check(ids[: straddling + 1]) == straddling
    assert tokenizer.decode(ids[:straddling]) == " Paris"  # the "." shares the token of the line break
    leading = tokenizer("\n\n Lima", add_special_tokens=False)["input_ids"]
    assert check(leading) is None  # a line break before any text does not end the answer
    assert stop_at_text(tokenizer, None) is None and stop_at_text(tokenizer, "") is None


def test_base_answers_end_at_the_first_line_break(base_lm, tmp_path):
    table = answers(base_lm, tmp_path, "\n")
    tokenizer = base_lm.tokenizer
    assert table.loc["France", "answer"] == " Paris"
    assert table.loc["Italy", "answer"] == " Milan"
    assert table.loc["Peru", "answer"] == "\n Lima is the capital"
    assert table.loc["Chile", "answer"].startswith(" Santiago")
    assert list(table["stopped"]) == [True, True, True, False]
    for row in table.itertuples():
        assert "Q:" not in row.answer and "\n" not in row.answer.lstrip()
        assert tokenizer.decode(list(row.answer_ids)) == row.answer  # the tokens kept are those of the text kept
        assert len(row.answer_logprobs) == len(row.answer_ids)
    full = answers(base_lm, tmp_path / "full", None)  # the same model, without the stop text
    for country in TALKS_ON:
        kept = list(table.loc[country, "answer_ids"])
        assert list(full.loc[country, "answer_ids"])[: len(kept)] == kept  # a prefix of what the model wrote
        assert list(full.loc[country, "answer_logprobs"])[: len(kept)] == pytest.approx(
            list(table.loc[country, "answer_logprobs"])
        )


def test_rows_that_reach_the_line_break_leave_the_batch(base_lm, tmp_path):
    rows_seen = []
    real = base_lm.model.forward
    base_lm.model.forward = lambda input_ids, **kwargs: rows_seen.append(len(input_ids)) or real(input_ids, **kwargs)
    table = answers(base_lm, tmp_path, "\n", max_new_tokens=30)
    assert rows_seen[0] == 4 and rows_seen[-1] == 1  # only the answer that never breaks runs to the limit
    assert len(rows_seen) == 30 and len(table.loc["Chile", "answer_ids"]) == 30


def test_answers_stop_only_at_the_end_token_with_a_chat_template(base_lm, tmp_path):
    spec = get_spec("triviaqa")
    assert answer_stop(spec, chat=True) is None
    assert answer_stop(spec, chat=False) == "\n"
    table = answers(base_lm, tmp_path, answer_stop(spec, chat=True))
    assert table.loc["France", "answer"] == TALKS_ON["France"]  # on to the end token, line breaks included
    assert table.loc["France", "stopped"]


def capitals_csv(path):
    rows = [f"What is the capital of {country}?,{city}" for country, city in CAPITALS.items()] * 5
    path.write_text("question,answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_labels_and_exact_answers_are_read_from_the_first_line(base_lm, tmp_path):
    # locate="gold": the scripted model answers its scripts only, so it cannot extract; the gold alias can. It has no
    # layers either: no activations are recorded while it generates.
    config = RunConfig(dataset="custom", custom_path=str(capitals_csv(tmp_path / "qa.csv")), runs_dir=str(tmp_path),
                       batch_size=4, max_new_tokens=40, extraction_tries=1, locate="gold")
    table = pd.read_parquet(pipeline.generate(config, lm=base_lm, activations=False).answers)
    country = table["question"].str.extract(r"capital of (\w+)\?")[0]
    assert set(country) == set(CAPITALS)
    expected = {"France": True, "Italy": False, "Peru": True, "Chile": True}  # Italy: "Milan", then "Rome" unasked
    assert list(table["correct"]) == [expected[c] for c in country]
    assert not table["answer"].str.contains("Q:").any()
    right = table[table["correct"]]
    assert (right["exact_answer"] == country[table["correct"]].map(CAPITALS)).all()
    assert (right["exact_end"] <= right["answer"].str.len()).all()
    run_json = json.loads(pipeline.run_dir(config).run_json.read_text())
    assert run_json["settings"]["stop_text"] == "\n" and run_json["chat_template"] is False


def test_a_base_run_made_before_the_stop_rule_is_refused(base_lm, tmp_path):
    config = RunConfig(dataset="custom", custom_path=str(capitals_csv(tmp_path / "qa.csv")), runs_dir=str(tmp_path),
                       batch_size=4, max_new_tokens=40, extraction_tries=1)
    run = pipeline.generate(config, lm=base_lm, activations=False)
    assert pipeline.generate(config, lm=base_lm, activations=False).path == run.path  # resumes: nothing to do
    made = json.loads(run.run_json.read_text())
    del made["settings"]["stop_text"]  # as written before answers stopped at the line break
    run.run_json.write_text(json.dumps(made))
    with pytest.raises(StoreError, match=r"was made with stop_text=None, not '\\n'\. Use another --runs-dir"):
        pipeline.generate(config, lm=base_lm, activations=False)


def test_resampled_answers_end_at_the_line_break_too(base_lm, tmp_path):
    from truthmap.lm.models import encode_prompt, stop_token_ids
    from truthmap.runner.resample import sample_answers

    countries = list(TALKS_ON)
    greedy = pd.DataFrame({"id": countries,
                           "prompt_ids": [encode_prompt(base_lm.tokenizer, base_prompt(c), False) for c in countries]})
    stops = stop_token_ids(base_lm.tokenizer, base_lm.model)
    sampled = sample_answers(base_lm, greedy, 2, 1.0, 0, 64, 4, Checkpoints(tmp_path, {}), stops, "\n")
    first_lines = [" Paris", " Milan", "\n Lima is the capital"]
    assert list(sampled["answer"])[:6] == [line for line in first_lines for _ in range(2)]
    assert list(sampled["stopped"]) == [True] * 6 + [False] * 2


def test_batches_of_a_killed_base_run_from_before_the_stop_rule_are_refused(base_lm, tmp_path):
    config = RunConfig(dataset="custom", custom_path=str(capitals_csv(tmp_path / "qa.csv")), runs_dir=str(tmp_path),
                       batch_size=4, max_new_tokens=40, extraction_tries=1)
    parts = pipeline.run_dir(config).generation_parts
    parts.mkdir(parents=True)
    (parts / "settings.json").write_text(json.dumps({"model": "smollm2", "dataset": "custom"}))  # no stop_text
    with pytest.raises(StoreError, match=r"generations was made with stop_text=None, not '\\n'"):
        pipeline.generate(config, lm=base_lm, activations=False)
