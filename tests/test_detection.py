"""Baselines, chosen-layer probes, the detection table, and the saved detector."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks
from typer.testing import CliRunner

from truthmap.stages.baselines import BASELINE_NAMES, exact_token_span, p_true_error_scores, token_scores
from truthmap.analysis.detection import chosen_layer_probe, evaluate_dataset, markdown_table, write_detection_table
from truthmap.analysis.detector import Detector
from truthmap.errors import ConfigError, DataError, ModelError, StoreError
from truthmap.rundir import POSITIONS, RunDir, write_json

# ----------------------------------------------------------------------------------------------------- baselines


def test_token_scores_equal_hand_computed_values():
    logprobs = [-0.1, -2.0, -0.5, -1.0]
    scores = token_scores(logprobs, exact_tokens=(1, 3))  # exact answer = tokens 1 and 2
    p = np.exp(logprobs)
    expected = {
        "logits_mean": 0.9,  # -(-0.1 - 2.0 - 0.5 - 1.0) / 4
        "logits_min": 2.0,
        "logits_max": 0.1,
        "probas_mean": -(p.sum() / 4),
        "probas_min": -math.exp(-2.0),
        "probas_max": -math.exp(-0.1),
        "logits_mean_exact": 1.25,  # -(-2.0 - 0.5) / 2
        "logits_min_exact": 2.0,
        "logits_max_exact": 0.5,
        "probas_mean_exact": -(math.exp(-2.0) + math.exp(-0.5)) / 2,
        "probas_min_exact": -math.exp(-2.0),
        "probas_max_exact": -math.exp(-0.5),
    }
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name


def test_token_scores_without_exact_answer_are_nan_for_exact_variants():
    scores = token_scores([-0.3, -0.7], exact_tokens=None)
    assert scores["logits_mean"] == pytest.approx(0.5)
    assert all(math.isnan(scores[k]) for k in scores if k.endswith("_exact"))


def test_baseline_names_follow_the_paper():
    assert BASELINE_NAMES["logits_min_exact"] == "Logits-min-exact"
    assert BASELINE_NAMES["probas_mean"] == "Probas-mean"
    assert BASELINE_NAMES["p_true_exact"] == "p(True)-exact"


def test_exact_token_span_from_stored_positions():
    row = pd.Series({"exact_answer_valid": True, "prompt_len": 10, "pos_exact_answer_first": 12, "pos_exact_answer_last": 13})
    assert exact_token_span(row) == (2, 4)  # answer tokens 2 and 3
    assert exact_token_span(row.copy().replace({True: False})) is None


def test_p_true_is_a_probability_independent_of_batch_size(tiny):
    questions = ["What is the capital of France?"] * 3 + ["Who wrote it?"]
    answers = ["Paris", "Lyon is the capital", "", "Paris Paris"]
    one = p_true_error_scores(tiny, questions, answers, 1, "p(True)")
    many = p_true_error_scores(tiny, questions, answers, 4, "p(True)")
    assert np.isnan(one[2]) and np.isnan(many[2])  # nothing proposed, nothing scored
    known = [0, 1, 3]
    assert ((one[known] > 0) & (one[known] < 1)).all()
    np.testing.assert_allclose(one[known], many[known], atol=1e-5)
    assert len(set(np.round(one[known], 6))) == 3  # the answer matters


# ------------------------------------------------------------------------------------- runs with known structure

LAYERS, HIDDEN = 4, 6
SIGNAL_LAYER, SIGNAL_POSITION = 2, "exact_answer_last"


CITIES = ["Paris", "Oslo", "Lima", "Rome", "Bern", "Kyiv"]


def fake_run(root, split, n, seed, direction=None, baseline_quality=1.0, dataset="toy", error_rate=0.5,
             text_signal=False):
    """A finished run: answers, activations where one cell separates errors along `direction`, baselines.

    The answers name a city drawn at random; with text_signal, every wrong answer names Lima or Kyiv and every right
    one another city, so that the exact answer alone gives the errors away."""
    rng = np.random.default_rng(seed)
    is_error = rng.random(n) < error_rate
    valid = np.ones(n, dtype=bool)
    valid[:3] = False  # rows without an exact answer are left out of every method
    run = RunDir(root, "tiny", dataset, split)
    run.path.mkdir(parents=True)
    words = np.random.default_rng(seed + 1000)  # its own stream: the activations stay those of older versions
    city = words.integers(0, len(CITIES), n)
    if text_signal:
        city = np.where(is_error, words.choice([2, 5], n), words.choice([0, 1, 3, 4], n))
    exact = [CITIES[c] for c in city]
    pd.DataFrame(
        {"id": [f"{dataset}-{split}-{i}" for i in range(n)], "group": [None] * n, "correct": ~is_error,
         "exact_answer_valid": valid, "exact_answer": exact, "answer": [f"It is {c}." for c in exact],
         "question": [f"Which city is number {i}?" for i in range(n)]}
    ).to_parquet(run.answers)
    write_json(run.run_json, {"settings": {}, "chat_template": True, "config": {"extraction_tries": 1}})
    direction = np.eye(HIDDEN)[0] if direction is None else direction
    acts = rng.normal(size=(LAYERS, len(POSITIONS), n, HIDDEN)).astype(np.float16)
    acts[SIGNAL_LAYER, POSITIONS.index(SIGNAL_POSITION)] += (3.0 * (is_error[:, None] - 0.5) * direction).astype(np.float16)
    store = run.activations("mlp")
    store.mkdir(parents=True)
    np.memmap(store / "acts.f16", dtype=np.float16, mode="w+", shape=acts.shape)[:] = acts
    write_json(store / "meta.json", {"shape": list(acts.shape), "written": n, "answers": {}, "site": "mlp"})
    noise = rng.normal(size=n)
    scores = {name: noise for name in BASELINE_NAMES}
    scores["logits_min_exact"] = baseline_quality * is_error + rng.normal(scale=0.3, size=n)
    pd.DataFrame({"id": [f"{dataset}-{split}-{i}" for i in range(n)], **scores}).to_parquet(run.baselines)
    return run, is_error


def test_chosen_layer_probe_finds_the_informative_layer_and_scores_test(tmp_path):
    from truthmap.analysis.detection import probe_data

    train_run, _ = fake_run(tmp_path, "train", 160, 0)
    test_run, _ = fake_run(tmp_path, "test", 80, 1)
    result = chosen_layer_probe(probe_data(train_run, "mlp"), probe_data(test_run, "mlp"), SIGNAL_POSITION, (0, 5, 26))
    assert result["layers"] == [SIGNAL_LAYER] * 3
    assert result["auc_mean"] > 0.95
    noise = chosen_layer_probe(probe_data(train_run, "mlp"), probe_data(test_run, "mlp"), "last_q", (0, 5, 26))
    assert 0.3 < noise["auc_mean"] < 0.7  # no signal at that token, whatever layer validation picks


def test_evaluate_dataset_and_table(tmp_path):
    train_run, _ = fake_run(tmp_path, "train", 160, 0)
    test_run, _ = fake_run(tmp_path, "test", 80, 1)
    results = evaluate_dataset("toy", train_run, test_run, "mlp", (0, 5))
    by_method = {r["method"]: r for r in results}
    assert by_method["Logits-min-exact"]["auc_mean"] > 0.9  # the informative baseline, on the 77 valid test rows
    assert 0.3 < by_method["Logits-mean"]["auc_mean"] < 0.7
    assert by_method["Probe @ exact_answer_last"]["layers"] == [SIGNAL_LAYER] * 2
    assert all(r["n_test"] == 77 for r in results)
    written = write_detection_table(results, tmp_path / "tables", "toy table")
    table = pd.read_csv(written["csv"], index_col=0)
    assert list(table.columns) == ["toy", "toy_std"]
    assert table.index[0] == "Logits-mean" and table.index[-1] == "Probe @ exact_answer_after_last"
    md = open(written["md"]).read()
    best = max(results, key=lambda r: r["auc_mean"])
    assert f"| {best['method']} | **{best['auc_mean']:.3f}" in md
    assert (tmp_path / "tables" / "detection_table.png").stat().st_size > 1000
    assert (tmp_path / "tables" / "risk_coverage.png").stat().st_size > 1000


def test_every_row_carries_the_field_metrics(tmp_path):
    """AUPRC, PRR, FPR@95 and AURC beside each AUC: in the results, the second table and the metrics CSV."""
    from truthmap.analysis.metrics import all_metrics

    train_run, _ = fake_run(tmp_path, "train", 160, 0)
    test_run, _ = fake_run(tmp_path, "test", 80, 1)
    results = evaluate_dataset("toy", train_run, test_run, "mlp", (0, 5))
    informative = {r["method"]: r for r in results}["Logits-min-exact"]
    scores = pd.read_parquet(test_run.baselines).set_index("id")["logits_min_exact"]
    table = pd.read_parquet(test_run.answers).set_index("id")
    valid = table.index[table["exact_answer_valid"]]
    expected = all_metrics(~table.loc[valid, "correct"].to_numpy(), scores.loc[valid].to_numpy())
    for name in ("auprc", "prr", "fpr_at_95_recall", "aurc"):
        assert informative[name] == pytest.approx(expected[name])
    assert informative["risk_coverage"]["coverage"][-1] == 1.0
    written = write_detection_table(results, tmp_path / "tables", "toy table")
    frame = pd.read_csv(written["metrics_csv"])
    assert list(frame.columns) == ["dataset", "method", "AUROC", "AUPRC", "PRR", "FPR@95", "AURC"]
    row = frame[frame["method"] == "Logits-min-exact"].iloc[0]
    assert row["PRR"] == pytest.approx(expected["prr"], abs=1e-4)
    assert f"| toy | Logits-min-exact | {expected['auroc']:.3f} | {expected['auprc']:.3f} | {expected['prr']:.3f}" \
        in open(written["md"]).read()


@pytest.mark.parametrize("text_signal", [False, True])
def test_text_controls_are_rows_of_the_table_with_a_verdict(tmp_path, text_signal):
    train_run, _ = fake_run(tmp_path, "train", 160, 0, text_signal=text_signal)
    test_run, _ = fake_run(tmp_path, "test", 80, 1, text_signal=text_signal)
    results = evaluate_dataset("toy", train_run, test_run, "mlp", (0, 5))
    by_method = {r["method"]: r for r in results}
    exact = by_method["Text @ exact answer"]
    assert exact["auc_low"] <= exact["auc_mean"] <= exact["auc_high"] and len(exact["aucs"]) == 2
    probe = by_method["Probe @ exact_answer_last"]
    assert probe["auc_low"] <= probe["auc_mean"] <= probe["auc_high"]
    if text_signal:
        assert exact["auc_mean"] > 0.95
    else:
        assert all(abs(by_method[m]["auc_mean"] - 0.5) < 0.15 for m in ("Text @ exact answer", "Text @ answer"))
    written = write_detection_table(results, tmp_path / "tables", "toy table")
    table = pd.read_csv(written["csv"], index_col=0)
    baselines = list(table.index).index("p(True)-exact")
    controls = ["Text @ exact answer", "Text @ answer", "Text @ question"]
    assert list(table.index)[baselines + 1 : baselines + 4] == controls
    md = open(written["md"]).read()
    assert "- toy: best probe Probe @ exact_answer_last, AUC" in md
    assert ("the probe does not beat it" if text_signal else "the probe beats it") in md


def test_markdown_table_marks_the_best_per_column():
    mean = pd.DataFrame({"a": [0.6, 0.9], "b": [0.8, float("nan")]}, index=["m1", "m2"])
    std = pd.DataFrame({"a": [float("nan"), 0.01], "b": [float("nan"), float("nan")]}, index=["m1", "m2"])
    md = markdown_table(mean, std)
    assert "| m1 | 0.600 | **0.800** |" in md
    assert "| m2 | **0.900 ± 0.010** | n/a |" in md


# ----------------------------------------------------------------------------------------------------- detector


def synthetic_cells(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    X = rng.normal(size=(n, LAYERS, HIDDEN))
    X[:, SIGNAL_LAYER, 1] += 2.5 * (y - 0.5)
    return X, y


def test_detector_chooses_layer_and_round_trips(tmp_path):
    X, y = synthetic_cells()
    info = {"model": "tiny", "dataset": "geography"}
    detector = Detector(token="exact_answer_last", seeds=(0, 5), info=info).fit(X, y)
    assert detector.layer_ == SIGNAL_LAYER and detector.validation_auc_.argmax() == SIGNAL_LAYER
    path = detector.save(tmp_path / "d.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "d.npz"]
    loaded = Detector.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), detector.predict_proba(X))
    assert loaded.layer_ == SIGNAL_LAYER and loaded.token == "exact_answer_last" and loaded.info["model"] == "tiny"
    saved = json.loads(path.read_text())
    assert saved["format"] == "truthmap-detector" and saved["format_version"] == 2 and "truthmap_version" in saved
    assert saved["probe"] == {"C": 1.0, "classes": [False, True]} and "coef" not in json.dumps(saved)
    with np.load(tmp_path / "d.npz") as weights:
        assert sorted(weights.files) == ["coef", "intercept", "mean", "scale"] and weights["coef"].shape == (HIDDEN,)
    X_test, y_test = synthetic_cells(seed=1)
    assert loaded.auc(X_test, y_test) > 0.9  # the signal is strong: held-out AUC near 1
    assert loaded.score(X_test, y_test) == np.mean(loaded.predict(X_test) == y_test)  # accuracy, as ClassifierMixin


def test_detector_predicts_its_classes_on_every_layer_or_its_layer_alone():
    X, y = synthetic_cells()
    detector = Detector(seeds=(0,)).fit(X, y)
    predicted = detector.predict(X)
    assert predicted.dtype == bool and 0.8 < np.mean(predicted == y) <= 1
    np.testing.assert_array_equal(predicted, detector.predict_proba(X)[:, 1] > 0.5)
    np.testing.assert_array_equal(detector.predict_proba(X[:, SIGNAL_LAYER]), detector.predict_proba(X))
    words = np.where(y, "wrong", "right")  # any two labels: classes_ sorted, the second the error class
    named = Detector(seeds=(0,)).fit(X, words)
    assert list(named.classes_) == ["right", "wrong"] and named.layer_ == SIGNAL_LAYER
    np.testing.assert_array_equal(named.predict(X), np.where(predicted, "wrong", "right"))
    with pytest.raises(ValueError, match="X has 3 layers, but Detector was fitted on 4"):
        detector.predict(X[:, :3])
    with pytest.raises(ValueError, match="X has 5 features per layer, but Detector is expecting 6"):
        detector.predict(X[:, :, :5])


@parametrize_with_checks([Detector(token="-1")])
def test_detector_is_a_scikit_learn_classifier(estimator, check):
    check(estimator)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"token": "exact_answer_lst"}, r"^Unknown token 'exact_answer_lst'\. Did you mean: exact_answer_last, "
                                        r"exact_answer_first, exact_answer_after_last\? Available: last_q, "
                                        r"first_answer, .*, -2, -1\.$"),
        ({"site": "mlp_out"}, r"^Unknown site 'mlp_out'\. Did you mean: mlp_in, mlp\? Available: mlp, mlp_in, attn, "
                              r"resid\.$"),
        ({"layer": 4}, r"^The 'layer' parameter of Detector must be an int from 0 to 3 \(X has 4 layers\) or None\. "
                       r"Got 4 instead\.$"),
    ],
)
def test_detector_checks_its_parameters_at_fit(params, message):
    X, y = synthetic_cells(n=40)
    detector = Detector(**params)
    with pytest.raises(ConfigError, match=message):
        detector.fit(X, y)
    assert detector.get_params()[next(iter(params))] == params[next(iter(params))]  # stored unchanged


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"^Detector file .*d\.json does not exist\. Make one with `truthmap fit-detector`\.$"),
        ("not json", r"is not a truthmap detector \(not JSON: "),
        ('{"format": "other"}', r'is not a truthmap detector \(no "format": "truthmap-detector"\)'),
        ('{"format": "truthmap-detector", "format_version": 1, "probe": {"coef": [1.0]}}',
         r"d\.json is a detector of format 1 \(its weights inside the JSON\); this truthmap reads format 2 \(a \.json "
         r"and a \.npz\)\. Refit it with `truthmap fit-detector`\.$"),
    ],
)
def test_detector_load_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StoreError, match=message) as err:
        Detector.load(path)
    assert "\n" not in str(err.value)


def test_detector_json_and_npz_must_belong_together(tmp_path):
    X, y = synthetic_cells(n=60)
    first = Detector(layer=1).fit(X, y).save(tmp_path / "first.json")
    Detector(layer=2).fit(X, y).save(tmp_path / "second.json")
    (tmp_path / "first.npz").unlink()
    with pytest.raises(StoreError, match=r"first\.npz is missing: a detector is first\.json and first\.npz side by"):
        Detector.load(first)
    (tmp_path / "first.npz").write_bytes((tmp_path / "second.npz").read_bytes())
    with pytest.raises(StoreError, match=r"first\.npz is not the weights file of .*first\.json \(its sha256 differs"):
        Detector.load(first)
    with pytest.raises(ConfigError, match=r"^A detector is saved as a \.json file .*; got .*first\.npz\. Name"):
        Detector(layer=1).fit(X, y).save(tmp_path / "first.npz")


def fitted_tiny_detector(tiny, token):
    from truthmap.stages.activations import read_positions

    texts = [tiny.tokenizer(f"Paris is {'the ' * k}capital", add_special_tokens=False)["input_ids"] for k in range(20)]
    X = read_positions(tiny, texts, [[len(t) - 1] for t in texts], "mlp")[:, :, 0]  # [20, layers, hidden]
    y = np.arange(20) % 2 == 0
    info = {"model": "tiny", "dataset": "geography", "chat_template": True, "extraction_tries": 1}
    return Detector(token=token, layer=1, info=info).fit(X, y)


def test_detector_scores_text_with_the_tiny_model(tiny):
    from truthmap.stages.activations import read_positions
    from truthmap.analysis.detector import encode_rows

    detector = fitted_tiny_detector(tiny, "-1")
    [scored] = detector.score_texts(["What is the capital of France?"], ["Paris is the capital."], tiny)
    p = scored["error_probability"]
    assert 0 < p < 1
    rows = encode_rows(tiny, detector.info, ["What is the capital of France?"], ["Paris is the capital."])
    sequence = list(rows["prompt_ids"][0]) + list(rows["answer_ids"][0])
    expected = detector.predict_proba(read_positions(tiny, [sequence], [[len(sequence) - 1]], "mlp")[:, :, 0])[0, 1]
    assert p == pytest.approx(expected)  # the last answer token, read by one forward pass
    batch = detector.score_texts(["Q one?", "What is the capital of France?"], ["A one.", "Paris is the capital."],
                                 tiny)
    assert batch[1]["error_probability"] == pytest.approx(p, abs=1e-6)


def test_detector_at_exact_answer_uses_gold_when_given(tiny):
    detector = fitted_tiny_detector(tiny, "exact_answer_last")
    result = detector.score_texts(["Capital of France?"], ["It is Paris, of course."], tiny, golds=[["Paris"]])[0]
    assert result["exact_answer"] == "Paris" and result["exact_answer_source"] == "gold_match"
    assert 0 < result["error_probability"] < 1


def test_detector_refuses_another_model_and_empty_answers(tiny):
    detector = fitted_tiny_detector(tiny, "-1")
    detector.info["model"] = "smollm2"
    with pytest.raises(ModelError, match="fitted on model 'smollm2', not 'tiny'"):
        detector.score_texts(["Capital of France?"], ["Paris"], lm=tiny)
    with pytest.raises(DataError, match="The answer is empty"):
        detector.score_texts(["Capital of France?"], ["  "], lm=tiny)


def test_score_cli_errors_are_one_line(tmp_path):
    from truthmap.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["score", "--detector", str(tmp_path / "none.json"), "--question", "Q?", "--answer", "A"])
    assert missing.exit_code == 1 and "Error: Detector file" in missing.output and "Traceback" not in missing.output
    X, y = synthetic_cells()
    detector = Detector(seeds=(0,), info={"model": "smollm2", "dataset": "geography"}).fit(X, y)
    path = detector.save(tmp_path / "d.json")
    empty = runner.invoke(app, ["score", "--detector", str(path), "--question", "Q?", "--answer", " "])
    assert empty.exit_code == 1 and "Error: The answer is empty" in empty.output
    other = runner.invoke(app, ["score", "--detector", str(path), "--question", "Q?", "--answer", "A", "--model", "gpt2"])
    assert other.exit_code == 1 and "fitted on model 'smollm2', not 'gpt2'" in other.output
    bad = tmp_path / "in.csv"
    pd.DataFrame({"question": ["Q?", "Q2?"], "answer": ["A", None]}).to_csv(bad, index=False)
    rows = runner.invoke(app, ["score", "--detector", str(path), "--input", str(bad)])
    assert rows.exit_code == 1 and "in.csv line 3: empty question or answer" in rows.output


def test_given_exact_answer_skips_extraction_and_must_occur(tiny):
    detector = fitted_tiny_detector(tiny, "exact_answer_last")
    result = detector.score_texts(["Capital of France?"], ["It is Paris, of course."], tiny, exact_answers=["paris"])[0]
    assert result["exact_answer"] == "Paris" and result["exact_answer_source"] == "given"
    with pytest.raises(DataError, match="'Lyon' does not occur in the answer"):
        detector.score_texts(["Capital of France?"], ["It is Paris."], tiny, exact_answers=["Lyon"])
