"""The run directory is the contract: every file a study writes is one rundir declares, with its columns and
dtypes, and no other module builds a path from a string."""

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from truthmap import pipeline, rundir
from truthmap.config import RunConfig
from truthmap.errors import StoreError
from truthmap.analysis.generalize import generalization
from truthmap.analysis.report import write_report
from truthmap.rundir import (ANSWER_COLUMNS, ARTIFACTS, DETECTOR_SCORE_COLUMNS, MODEL_ARTIFACTS, RESAMPLE_COLUMNS,
                             RUN_JSON, RUN_JSON_OPTIONAL, matches)

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "truthmap"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A whole study on a tiny model saved to disk: run (answers, activations, probes, report), resample, a detector
    fitted and applied, the detection table over the train and test splits, and the generalization matrices."""
    from tiny import half_right_qa, save_tiny_model, tiny_lm

    tmp = tmp_path_factory.mktemp("study")
    lm = tiny_lm(seed=3)
    model = save_tiny_model(lm, tmp / "tiny-model")
    questions = [f"What is the capital of {word}? {i}" for i, word in enumerate(["France", "Norway", "Peru"] * 30)]
    data = half_right_qa(lm, tmp / "qa.csv", questions)
    config = RunConfig(model=str(model), dataset="custom", custom_path=str(data), runs_dir=str(tmp / "runs"),
                       batch_size=8, seeds=(0, 1), extraction_tries=1)
    pipeline.run_all(config)
    pipeline.resample(config, n_resamples=2, layer=1, token="exact_answer_first")
    pipeline.table(config, ["custom"], n_resamples=2)  # makes the test split's run, its baselines and samples
    pipeline.fit_detector(config, "exact_answer_last", None)  # scores the train run and the test run
    run = pipeline.run_dir(config)
    # generalize needs two datasets: the same runs under a second name stand in for one (the files are the same).
    splits = (run, rundir.RunDir.from_path(run.path.parent / "test"))
    generalization({"custom": splits, "again": splits}, "mlp", "exact_answer_last", (0, 1), run.generalization)
    write_report(run.path)  # again, with every section's files there
    return run


def declared(relative: Path) -> bool:
    """A file under runs/<model-slug>/: one of the model's (tables/, generalization/), or one of a run's
    (<dataset>/<split>/...)."""
    return matches(relative, MODEL_ARTIFACTS) or len(relative.parts) > 2 and matches(Path(*relative.parts[2:]),
                                                                                    ARTIFACTS)


def test_every_file_of_a_study_is_declared_by_rundir(study):
    found = [p.relative_to(study.model_dir) for p in sorted(study.model_dir.rglob("*")) if p.is_file()]
    assert [str(p) for p in found if not declared(p)] == []
    # The walk saw each kind of artifact (so the check above is not passing on a half-made study).
    kinds = {p.parts[0] if p.parts[0] in ("tables", "generalization") else p.parts[2] for p in found}
    assert {"answers.parquet", "run.json", "resolved_config.json", "report.html", "activations", "probes",
            "resamples", "work", "baselines.parquet", "detector_mlp",
            "detector_scores.parquet", "tables", "generalization"} <= kinds


def test_undeclared_files_are_caught():
    assert matches("probes/mlp/heatmap.csv", ARTIFACTS)
    assert not matches("probes/mlp/heatmap.tsv", ARTIFACTS)
    assert not matches("probes/heatmap.csv", ARTIFACTS)  # a file one level too high
    assert not matches("probes/mlp/extra/heatmap.csv", ARTIFACTS)


ARROW_TYPES = {"string": "str", "large_string": "str", "bool": "bool", "int64": "int64", "double": "float64"}


def column_types(path: Path) -> dict:
    """Column -> logical type (rundir's), read from the parquet schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def logical(kind) -> str:
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return {"str": "list[str]", "int64": "list[int]", "float64": "list[float]"}[logical(kind.value_type)]
        return "null" if pa.types.is_null(kind) else ARROW_TYPES[str(kind)]

    schema = pq.read_schema(path)
    return dict(zip(schema.names, map(logical, schema.types)))


def check_columns(path: Path, declared: dict) -> None:
    found = column_types(path)
    assert list(found) == list(declared), path
    for column, kind in found.items():
        wanted = declared[column][0]
        assert kind == wanted or (kind in ("null", "str") and wanted == "str | None"), (path, column, kind, wanted)


def test_tables_have_the_declared_columns_and_types(study):
    check_columns(study.answers, ANSWER_COLUMNS)
    check_columns(study.resample_files.answers, RESAMPLE_COLUMNS)
    check_columns(study.detector_scores, DETECTOR_SCORE_COLUMNS)
    test_run = rundir.RunDir.from_path(study.path.parent / "test")
    baselines = column_types(test_run.baselines)
    assert baselines.pop("id") == rundir.BASELINE_ID_COLUMN["id"][0]
    assert baselines and set(baselines.values()) == {rundir.BASELINE_SCORE_DTYPE}


def test_a_column_of_another_type_is_caught(tmp_path):
    path = tmp_path / "scores.parquet"
    pd.DataFrame({"id": ["a"], "error_probability": [1], "in_train": [True]}).to_parquet(path)
    with pytest.raises(AssertionError, match="error_probability"):
        check_columns(path, DETECTOR_SCORE_COLUMNS)


def test_run_json_has_the_declared_keys(study):
    made = json.loads(study.run_json.read_text())
    assert set(made) <= set(RUN_JSON)
    assert set(RUN_JSON) - set(made) <= set(RUN_JSON_OPTIONAL)
    store = json.loads(study.store("mlp").meta.read_text())
    assert store["dtype"] == rundir.STORE_DTYPE and store["layout"] == rundir.STORE_LAYOUT


# ------------------------------------------------------------------------------- no paths built outside rundir

FILE_NAME = re.compile(r"^[\w.*{}-]+\.(json|parquet|csv|png|svg|npy|npz|f16|html|md|lock)$")
PATH_CALLS = {"Path", "PurePath", "joinpath", "with_name", "with_suffix"}
# What cannot live in rundir: (module, literal) -> why.
ALLOWED = {
    **{("lm/models.py", name): "the model cache (~/.cache/truthmap) and Hugging Face model folders, not a run"
       for name in ("gguf", "models", "config.json", "sha256.json", ".cache", "truthmap")},
    **{("datasets/registry.py", name): "a dataset's source file under the data directory, in its declarative entry"
       for name in ("movie_qa_train.csv", "movie_qa_test.csv", "winobias_dev.csv", "winobias_test.csv",
                    "winogrande_train.csv", "winogrande_test.csv", "mnli_train.csv", "mnli_validation.csv",
                    "AnswerableMath.csv", "AnswerableMath_test.csv")},
    ("analysis/detector.py", ".json"): "the name suggested in an error for a user's --out path, which may be anywhere",
}
ALLOWED_FSTRINGS = {  # (module, source of the f-string) -> why
    ("lm/models.py", "f'{target.name}.partial-{os.getpid()}'"): "a download in progress in the model cache",
    ("lm/models.py", "f'{model_slug(source.gguf_file)}-{key}'"): "a converted gguf model in the model cache",
}


def _is_text(node) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _docstrings(tree) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def path_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of each path built from a string: `x / "name"`, `Path("...")`, `os.path.join(.., "name")`,
    `.with_suffix(".npz")` (f-strings included), and any string that is a file name ("probes.json")."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [n for n in (node.left, node.right) if _is_text(n)]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in PATH_CALLS or ast.unparse(node.func) == "os.path.join":
                parts = [n for n in node.args if _is_text(n)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            parts = [node] if FILE_NAME.match(node.value) else []
        found += [(n.lineno, n.value if isinstance(n, ast.Constant) else ast.unparse(n)) for n in parts]
    return sorted(set(found))


def test_the_check_finds_each_kind_of_path_literal():
    source = '''
import os
from pathlib import Path
a = run.path / "probes.json"
b = Path("runs") / name
c = os.path.join(root, "x")
d = root / f"cell-{site}"
e = path.with_suffix(".npz")
f = {"file": "heatmap.csv"}
'''
    assert [line for line, _ in path_literals(source)] == [4, 5, 6, 7, 8, 9]
    assert path_literals('"""A docstring naming probes.json."""\nx = f"No {name}.parquet in {run.path}"\n') == []


def test_no_module_but_rundir_builds_a_path_from_a_string():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module == "rundir.py":
            continue
        found += [f"{module}:{line}: {text}" for line, text in path_literals(path.read_text(encoding="utf-8"))
                  if (module, text) not in ALLOWED and (module, text) not in ALLOWED_FSTRINGS]
    assert found == []


def test_run_json_refuses_a_key_rundir_does_not_declare(tmp_path):
    run = rundir.RunDir(tmp_path, "m", "d", "train")
    with pytest.raises(StoreError, match="run.json key 'extra' is not declared in rundir.RUN_JSON"):
        rundir.write_run_json(run, {"settings": {}, "extra": 1})
    assert not run.run_json.exists()
