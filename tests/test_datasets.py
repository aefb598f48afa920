"""Registry, prompts, loaders and sampling. Tests that read the real files skip when the data dir is absent."""

import json
import re
import sys
import types
from pathlib import Path

import pytest

from truthmap.datasets import (
    DEFAULT_DATASET,
    LOADERS,
    REGISTRY,
    CustomSource,
    Record,
    build_prompt,
    get_spec,
    list_datasets,
    load_records,
)
from truthmap.datasets import loaders
from truthmap.errors import ConfigError, DataError, TruthmapWarning

PAPER_DATASETS = ["triviaqa", "hotpotqa", "hotpotqa_with_context", "movies", "winobias", "winogrande", "mnli",
                  "imdb", "math", "natural_questions_with_context"]


@pytest.fixture
def data_dir(shared_data):
    return shared_data


@pytest.fixture(params=[0, 1, 2])
def seed(request):
    return request.param


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv("TRUTHMAP_DATA_DIR", raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def movies_csv(n: int) -> str:
    return "Question,Answer\n" + "".join(f"Who acted as R{i} in the movie 'M{i}'?,Actor {i}\n" for i in range(n))


# -------------------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_papers_datasets_plus_custom_and_geography():
    names = list_datasets()
    assert names[0] == DEFAULT_DATASET == "geography"
    assert sorted(names) == sorted([*PAPER_DATASETS, "custom", "geography"])
    assert set(names) == set(REGISTRY)
    assert all(REGISTRY[name].loader in LOADERS for name in names)


def test_entry_settings():
    for name in ["winobias", "winogrande", "mnli", "imdb"]:
        assert get_spec(name).exact_answer == "label"
    assert {n for n in REGISTRY if REGISTRY[n].grouped} == {"winobias"}
    assert get_spec("math").max_new_tokens == 200
    assert get_spec("geography").max_new_tokens == 48  # built in, asks for one sentence
    assert {REGISTRY[n].max_new_tokens for n in REGISTRY if n not in ("math", "geography")} == {100}


def test_unknown_dataset_message():
    expected = f"Unknown dataset 'trivia'. Did you mean: triviaqa? Available: {', '.join(list_datasets())}."
    assert expected.startswith("Unknown dataset 'trivia'. Did you mean: triviaqa? Available: geography, triviaqa, ")
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        get_spec("trivia")
    with pytest.raises(ConfigError, match=r"^Unknown dataset 'zzz'\. Available: geography, "):
        load_records("zzz", "test")


# --------------------------------------------------------------------------------------------------------- prompts


def test_prompts_instruct_and_base():
    record = Record(id="triviaqa-test-00000", question="Who wrote Hamlet?", answers=["Shakespeare"])
    spec = get_spec("triviaqa")
    assert build_prompt(spec, record, "instruct") == "Who wrote Hamlet?"
    assert build_prompt(spec, record, "base") == "Q: Who wrote Hamlet?\nA:"
    assert build_prompt(get_spec("math"), record, "instruct") == "Who wrote Hamlet? Answer shortly."


def test_prompt_with_context_and_braces():
    record = Record(id="x", question="What is {x}?", answers=["1"], context="Some {context}.")
    spec = get_spec("natural_questions_with_context")
    assert build_prompt(spec, record, "instruct") == "Some {context}.\nWhat is {x}?"
    assert build_prompt(spec, record, "base") == "Context:Some {context}.\nQ: What is {x}?\nA:"


def test_prompt_errors():
    record = Record(id="winobias-test-00001", question="q", answers=["a"])
    with pytest.raises(ConfigError, match=r"^Unknown prompt style 'chat'\. Available: instruct, base\.$"):
        build_prompt(get_spec("triviaqa"), record, "chat")
    with pytest.raises(DataError, match=r"Record winobias-test-00001 has no field 'sentence'"):
        build_prompt(get_spec("winobias"), record, "instruct")


# ----------------------------------------------------------------------------------------------- real files (paper)


@pytest.mark.integration
@pytest.mark.parametrize("name", PAPER_DATASETS)
def test_load_paper_dataset(name, data_dir):
    spec = get_spec(name)
    records = load_records(name, "test", data_dir=data_dir, n_samples=20)
    assert len(records) == 20
    ids = [r.id for r in records]
    assert len(set(ids)) == 20 and all(re.fullmatch(rf"{name}-test-\d{{5}}", i) for i in ids)
    assert ids == sorted(ids)  # file order
    for r in records:
        assert r.question.strip() and r.answers and all(a.strip() for a in r.answers)
        if spec.exact_answer == "label":
            assert r.wrong_answers
        if "with_context" in name:
            assert r.context.strip()
        for style in ("instruct", "base"):
            assert r.question in build_prompt(spec, r, style) or name in ("winobias", "winogrande")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["winobias", "math", "hotpotqa_with_context"])
def test_load_is_deterministic(name, data_dir, seed):
    first = load_records(name, "train", data_dir=data_dir, n_samples=20, seed=seed)
    again = load_records(name, "train", data_dir=data_dir, n_samples=20, seed=seed)
    assert [r.id for r in first] == [r.id for r in again]
    assert [r.question for r in first] == [r.question for r in again]
    other = load_records(name, "train", data_dir=data_dir, n_samples=20, seed=seed + 100)
    assert [r.id for r in other] != [r.id for r in first]


@pytest.mark.integration
def test_ids_name_source_rows(data_dir):
    records = load_records("movies", "train", data_dir=data_dir)
    assert len(records) == 10_000
    assert records[0].id == "movies-train-00000"
    assert records[0].question == "Who acted as Sophie in the movie 'The Love Punch'?"
    assert records[3].answers == ["Therese Giehse"]  # stripped of the file's leading space
    math = load_records("math", "test", data_dir=data_dir)
    assert math[0].id == "math-test-00000" and math[0].answers == ["21"] and math[0].extra["value"] == 21.0


@pytest.mark.integration
@pytest.mark.parametrize("n", [20, 7, 1])
def test_winobias_pairs_stay_whole(data_dir, seed, n):
    records = load_records("winobias", "test", data_dir=data_dir, n_samples=n, seed=seed)
    assert len(records) == max(4, n - n % 4)
    by_group = {}
    for r in records:
        by_group.setdefault(r.group, []).append(r)
    for group, quad in by_group.items():
        assert group.startswith("winobias-test-quad-")
        assert sorted(r.extra["stereotype"] for r in quad) == ["anti", "anti", "pro", "pro"]
        pro = sorted((r.answers, r.wrong_answers) for r in quad if r.extra["stereotype"] == "pro")
        anti = sorted((r.answers, r.wrong_answers) for r in quad if r.extra["stereotype"] == "anti")
        assert pro == anti  # the anti-stereotype versions of the same two items
        rows = sorted(int(r.id.rsplit("-", 1)[1]) for r in quad)
        assert rows[1] == rows[0] + 1 and rows[0] % 2 == 0  # rows 2k and 2k+1, plus their versions


@pytest.mark.integration
def test_winobias_all_rows_paired(data_dir):
    records = load_records("winobias", "train", data_dir=data_dir)
    assert len(records) == 1584
    counts = {}
    for r in records:
        counts[r.group] = counts.get(r.group, 0) + 1
    assert set(counts.values()) == {4}


@pytest.mark.integration
@pytest.mark.parametrize(("name", "total"), [("hotpotqa_with_context", 500), ("natural_questions_with_context", 2655)])
def test_one_file_datasets_split_disjoint(name, total, data_dir):
    train = load_records(name, "train", data_dir=data_dir)
    test = load_records(name, "test", data_dir=data_dir)
    rows = lambda records: {r.id.rsplit("-", 1)[1] for r in records}  # noqa: E731
    assert not rows(train) & rows(test)
    assert len(rows(train) | rows(test)) == total
    assert abs(len(train) - len(test)) <= 1


@pytest.mark.integration
def test_hotpotqa_context_is_sentences_per_line(data_dir):
    record = next(r for r in load_records("hotpotqa_with_context", "test", data_dir=data_dir)
                  if r.answers == ["Chief of Protocol"])
    assert "Shirley Temple Black (April 23, 1928" in record.context
    assert "\nAs an adult, she was named United States ambassador" in record.context


@pytest.mark.integration
def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("TRUTHMAP_DATA_DIR", str(data_dir))
    assert len(load_records("math", "test", n_samples=3)) == 3


# ------------------------------------------------------------------------------------------------------- sampling


def test_subsample_nested_and_capped(tmp_path, seed, monkeypatch):
    write(tmp_path / "movie_qa_test.csv", movies_csv(50))
    small = load_records("movies", "test", data_dir=tmp_path, n_samples=5, seed=seed)
    large = load_records("movies", "test", data_dir=tmp_path, n_samples=10, seed=seed)
    assert len(small) == 5 and len(large) == 10
    assert {r.id for r in small} <= {r.id for r in large}
    with pytest.warns(TruthmapWarning, match=r"--n-samples 500 is more than the 50 questions of dataset 'movies'"):
        assert len(load_records("movies", "test", data_dir=tmp_path, n_samples=500)) == 50
    monkeypatch.setattr(loaders, "MAX_PER_SPLIT", 8)
    capped = load_records("movies", "test", data_dir=tmp_path)
    assert len(capped) == 8
    # The cap is drawn with the fixed seed: the same rows whatever the run's seed.
    assert [r.id for r in load_records("movies", "test", data_dir=tmp_path, n_samples=8, seed=seed)] == \
        [r.id for r in capped]


def test_split_keeps_groups_whole(seed):
    records = [Record(id=str(i), question="q", answers=["a"], group=f"g{i // 3}") for i in range(30)]
    train = loaders.split_records(records, "train", 0.5)
    test = loaders.split_records(records, "test", 0.5)
    assert {r.group for r in train}.isdisjoint({r.group for r in test})
    assert len(train) + len(test) == 30
    drawn = loaders.subsample(records, 10, seed)
    assert len(drawn) == 9 and all(sum(r.group == d.group for r in drawn) == 3 for d in drawn)


# --------------------------------------------------------------------------------------------------------- custom


def test_custom_csv_aliases_and_split(tmp_path):
    rows = ['"Capital of France?",Paris', '"Largest planet?","[""Jupiter"", ""jupiter""]"',
            "\"Red planet?\",\"['Mars', 'the red planet']\"", '"Odd?","not [a list"']
    rows += [f'"Question {i}?",Answer {i}' for i in range(16)]
    path = write(tmp_path / "qa.csv", "question,answer\n" + "\n".join(rows) + "\n")
    train = load_records("custom", "train", custom=CustomSource(path))
    test = load_records("custom", "test", custom=CustomSource(path))
    assert (len(train), len(test)) == (16, 4)
    assert not {r.id for r in train} & {r.id for r in test}
    by_id = {r.id.rsplit("-", 1)[1]: r for r in train + test}
    assert by_id["00000"].answers == ["Paris"]
    assert by_id["00001"].answers == ["Jupiter", "jupiter"]
    assert by_id["00002"].answers == ["Mars", "the red planet"]
    assert by_id["00003"].answers == ["not [a list"]
    assert all(re.fullmatch(r"custom-(train|test)-\d{5}", r.id) for r in train + test)


def test_custom_answer_starting_with_a_bracket_must_be_a_list(tmp_path):
    # Taken as one literal gold answer, '["Paris", "paris"' would label "The capital is Paris." incorrect.
    path = write(tmp_path / "qa.csv", 'question,answer\nCapital of France?,"[""Paris"", ""paris"""\n')
    with pytest.raises(DataError, match=r"qa\.csv line 2: column 'answer' starts with '\[' but is not a valid JSON "
                                        r"list \(got '\[\"Paris\", \"paris\"'\)"):
        load_records("custom", "train", custom=CustomSource(path))


def test_custom_jsonl_named_columns(tmp_path):
    lines = [json.dumps({"q": f"Question {i}?", "golds": [f"A{i}", f"B{i}"] if i % 2 else f"A{i}"}) for i in range(10)]
    path = write(tmp_path / "qa.jsonl", "\n".join(lines) + "\n\n")
    source = CustomSource(str(path), question_column="q", answer_column="golds")
    records = load_records("custom", "train", custom=source) + load_records("custom", "test", custom=source)
    assert sorted(r.question for r in records) == sorted(f"Question {i}?" for i in range(10))
    assert next(r for r in records if r.question == "Question 1?").answers == ["A1", "B1"]
    assert next(r for r in records if r.question == "Question 2?").answers == ["A2"]


def test_custom_missing_column(tmp_path):
    path = write(tmp_path / "qa.csv", "prompt,answer\nWhat?,That\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} has no column 'question'; columns found: "
                                        r"prompt, answer\. Name the right column"):
        load_records("custom", "test", custom=CustomSource(path))
    jsonl = write(tmp_path / "qa.jsonl", '{"question": "What?", "gold": "That"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl line 1 has no column 'answer'; columns found: question, gold"):
        load_records("custom", "test", custom=CustomSource(jsonl))


def test_custom_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"Dataset 'custom' needs a CustomSource"):
        load_records("custom", "test")
    with pytest.raises(DataError, match=r"has extension '\.txt'; use \.csv, \.jsonl or \.parquet"):
        load_records("custom", "test", custom=CustomSource(write(tmp_path / "qa.txt", "x")))
    with pytest.raises(DataError, match=r"Custom file .*nope\.csv does not exist"):
        load_records("custom", "test", custom=CustomSource(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match=r"the dataset is 'movies'; use the dataset 'custom'"):
        load_records("movies", "test", data_dir=tmp_path, custom=CustomSource(tmp_path / "x.csv"))
    bad = write(tmp_path / "bad.csv", "question,answer\nWhat?,\n")
    with pytest.raises(DataError, match=r"bad\.csv line 2: column 'answer' has no answer"):
        load_records("custom", "train", custom=CustomSource(bad))
    one = write(tmp_path / "one.csv", "question,answer\nWhat?,That\n")
    with pytest.raises(DataError, match=r"Dataset 'custom' split 'test' is empty \(from .*one\.csv\)"):
        load_records("custom", "test", custom=CustomSource(one))


# --------------------------------------------------------------------------------------------------------- errors


def test_missing_data_dir():
    with pytest.raises(DataError, match=r"Dataset 'movies' reads files from a data directory, but none was given: "
                                        r"pass --data-dir or set TRUTHMAP_DATA_DIR"):
        load_records("movies", "test")
    with pytest.raises(DataError, match=r"Data directory /no/such/dir does not exist: pass --data-dir"):
        load_records("movies", "test", data_dir="/no/such/dir")


def test_missing_file_names_full_path(tmp_path):
    expected = tmp_path.resolve() / "triviaqa" / "topics.dpr.trivia.test.txt"
    with pytest.raises(DataError, match=rf"Dataset 'triviaqa' \(test\) needs the file {re.escape(str(expected))}, "
                                        r"which does not exist: pass --data-dir"):
        load_records("triviaqa", "test", data_dir=tmp_path)


def test_empty_files(tmp_path):
    write(tmp_path / "movie_qa_test.csv", "")
    with pytest.raises(DataError, match=r"movie_qa_test\.csv is empty: expected a header row with columns "
                                        r"Question, Answer"):
        load_records("movies", "test", data_dir=tmp_path)
    write(tmp_path / "movie_qa_test.csv", "Question,Answer\n")
    with pytest.raises(DataError, match=r"movie_qa_test\.csv has a header but no rows"):
        load_records("movies", "test", data_dir=tmp_path)
    write(tmp_path / "triviaqa" / "topics.dpr.trivia.test.txt", "")
    with pytest.raises(DataError, match=r"topics\.dpr\.trivia\.test\.txt is empty"):
        load_records("triviaqa", "test", data_dir=tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "movie_qa_test.csv"
    path.write_bytes("Question,Answer\nWho?,Andy García\n".encode() + "Who else?,Zoë\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} is not valid UTF-8: byte 46 \(line 3\) is "
                                        r"b'\\xeb'; re-save the file as UTF-8\.$"):
        load_records("movies", "test", data_dir=tmp_path)


def test_malformed_rows(tmp_path):
    write(tmp_path / "triviaqa" / "topics.dpr.trivia.test.txt", "Q1?\t['a']\nQ2?\tnot a list\n")
    with pytest.raises(DataError, match=r"line 2: column 'answers' should be a non-empty list literal, "
                                        r"got 'not a list'"):
        load_records("triviaqa", "test", data_dir=tmp_path)
    write(tmp_path / "mnli_validation.csv", "Question,Answer,Origin\nDoes it?,maybe,mnli\n")
    with pytest.raises(DataError, match=r"line 2: column 'Answer' is 'maybe'; expected one of entailment"):
        load_records("mnli", "test", data_dir=tmp_path)
    write(tmp_path / "hotpotqa" / "hotpot_dev_v1_simplified.json", '["just a string"]')
    with pytest.raises(DataError, match=r"hotpot_dev_v1_simplified\.json does not have the layout dataset 'hotpotqa' "
                                        r"expects \(AttributeError"):
        load_records("hotpotqa", "test", data_dir=tmp_path)
    write(tmp_path / "hotpotqa" / "hotpot_dev_v1_simplified.json", '[{"question": "Q?", "answer": " "}]')
    with pytest.raises(DataError, match=r"hotpot_dev_v1_simplified\.json item 0: column 'answer' is empty"):
        load_records("hotpotqa", "test", data_dir=tmp_path)


def test_bad_split_and_n_samples(tmp_path):
    with pytest.raises(ConfigError, match=r"^Unknown split 'dev'\. Available: train, test\.$"):
        load_records("movies", "dev", data_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"n_samples must be a positive integer or None; got 0"):
        load_records("movies", "test", data_dir=tmp_path, n_samples=0)


# ------------------------------------------------------------------------------------------------------ geography


def fake_geography():
    return [Record(id=f"geo-{i}", question=f"What is the capital of country {i}?", answers=[f"City {i}"])
            for i in range(10)]


def test_geography_split_without_data_dir(monkeypatch):
    module = types.ModuleType("truthmap.datasets.builtin")
    module.geography_records = fake_geography
    monkeypatch.setitem(sys.modules, "truthmap.datasets.builtin", module)
    train = load_records("geography", "train")
    test = load_records("geography", "test")
    assert (len(train), len(test)) == (5, 5)
    assert {r.question for r in train}.isdisjoint({r.question for r in test})
    assert all(re.fullmatch(r"geography-(train|test)-000\d\d", r.id) for r in train + test)
    assert all(r.extra["source_id"].startswith("geo-") for r in train + test)
    assert [r.id for r in load_records("geography", "train")] == [r.id for r in train]


def test_real_geography_builtin():
    train, test = load_records("geography", "train"), load_records("geography", "test")
    assert train and test and {r.question for r in train}.isdisjoint({r.question for r in test})
    assert all(r.answers for r in train + test)
