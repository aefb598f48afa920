"""A saved error detector: one probe at one (layer, token) cell, with everything needed to score new answers.

`Detector` follows scikit-learn's conventions on activations: X is [samples, layers, hidden], every layer's
activation at the detector's token; `fit` chooses the layer on validation splits when none is given (mean AUC
over the seeds), then fits one ErrorProbe on all rows. `save` writes one self-contained JSON file (weights,
standardization, cell, site, model, prompt, truthmap version, training summary). On text, `score(question,
answer)` builds the prompt the probe was trained on, locates the exact answer, reads the cell with one forward
pass and returns the probability that the answer is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from truthmap.config import DEFAULT_SEEDS
from truthmap.errors import ConfigError, DataError, ModelError
from truthmap.rundir import EXACT_POSITIONS, POSITIONS, write_json

FORMAT = "truthmap-detector"
FORMAT_VERSION = 1


class Detector:
    def __init__(self, token="exact_answer_last", layer=None, site="mlp", C=1.0, seeds=DEFAULT_SEEDS):
        self.token = token
        self.layer = layer
        self.site = site
        self.C = C
        self.seeds = seeds
        self.info: dict = {}  # model, prompt and training summary; filled by whoever fits or loads

    # ---------------------------------------------------------------------------------- estimator on activations

    def fit(self, X, y, groups=None):
        """X [n, layers, hidden] at the detector's token; y: True where the answer is wrong."""
        from truthmap.detection import choose_layers
        from truthmap.probes import ErrorProbe

        if self.token not in POSITIONS:
            raise ConfigError(f"Invalid --token {self.token!r}: expected one of {', '.join(POSITIONS)}.")
        X, y = np.asarray(X), np.asarray(y, dtype=bool)
        self.validation_auc_ = None
        if self.layer is None:
            _, _, val = choose_layers(lambda layer: X[:, layer], X.shape[1], y, groups, self.seeds, "the detector", self.C)
            self.validation_auc_ = val.mean(0)  # [layers]
            self.layer_ = int(self.validation_auc_.argmax())
        else:
            if not 0 <= self.layer < X.shape[1]:
                raise ConfigError(f"Invalid --layer {self.layer}: the model has layers 0..{X.shape[1] - 1}.")
            self.layer_ = int(self.layer)
        self.probe_ = ErrorProbe(C=self.C).fit(np.asarray(X[:, self.layer_], dtype=np.float64), y)
        self.n_layers_, self.hidden_ = X.shape[1], X.shape[2]
        return self

    def predict_proba(self, X):
        """[n, 2]: probability of a correct answer, then of an error."""
        return self.probe_.predict_proba(np.asarray(np.asarray(X)[:, self.layer_], dtype=np.float64))

    def predict(self, X):
        return self.predict_proba(X)[:, 1] > 0.5

    def score(self, question, answer=None, lm=None, gold=None, exact_answer=None):
        """On text: P(wrong) of one answer to one question. (score(X, y) gives the test AUC, as a probe's auc.)"""
        if answer is None or not isinstance(question, str):
            return self.probe_.auc(np.asarray(np.asarray(question)[:, self.layer_], dtype=np.float64), answer)
        result = self.score_many([question], [answer], lm, golds=[gold] if gold else None,
                                 exact_answers=[exact_answer] if exact_answer else None)
        return result[0]["error_probability"]

    # ------------------------------------------------------------------------------------------- save and load

    def to_dict(self) -> dict:
        from truthmap.rundir import package_versions

        probe = self.probe_
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "truthmap_version": package_versions().get("truthmap", "unknown"),
            "site": self.site,
            "layer": self.layer_,
            "token": self.token,
            "n_layers": self.n_layers_,
            "hidden": self.hidden_,
            **self.info,
            "validation_auc_by_layer": None if self.validation_auc_ is None else [round(float(a), 4) for a in self.validation_auc_],
            "probe": {
                "C": self.C,
                "coef": probe.coef_.tolist(),
                "intercept": probe.intercept_,
                "mean": probe.mean_.tolist(),
                "scale": probe.scale_.tolist(),
                "classes": [bool(c) for c in probe.classes_],
            },
        }

    def save(self, path) -> Path:
        write_json(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path) -> "Detector":
        from truthmap.probes import ErrorProbe

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Detector file {path} does not exist. Make one with `truthmap fit-detector`.")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path} is not a truthmap detector (not JSON: {err}).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{path} is not a truthmap detector (no \"format\": \"{FORMAT}\"); use a file from `truthmap fit-detector`.")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has detector format {data.get('format_version')}; this truthmap reads {FORMAT_VERSION}. Refit it.")
        check_fields(data, path)
        weights = data["probe"]
        detector = cls(token=data["token"], layer=data["layer"], site=data["site"], C=weights["C"])
        detector.layer_, detector.n_layers_, detector.hidden_ = data["layer"], data["n_layers"], data["hidden"]
        detector.validation_auc_ = data.get("validation_auc_by_layer")
        probe = ErrorProbe(C=weights["C"])
        probe.coef_, probe.mean_, probe.scale_ = (np.asarray(weights[k]) for k in ("coef", "mean", "scale"))
        probe.intercept_, probe.classes_ = float(weights["intercept"]), np.asarray(weights["classes"])
        probe.n_features_in_, probe.n_iter_ = len(probe.coef_), 0
        detector.probe_ = probe
        skip = {"probe", "validation_auc_by_layer", "site", "layer", "token", "n_layers", "hidden"}
        detector.info = {k: v for k, v in data.items() if k not in skip | {"format", "format_version", "truthmap_version"}}
        detector.truthmap_version = data.get("truthmap_version")
        return detector

    # ----------------------------------------------------------------------------------------------- on text

    def check_model(self, lm) -> None:
        from truthmap.models import model_slug
        from truthmap.sites import num_layers, site_width

        wanted = self.info.get("model")
        if wanted and model_slug(lm.name) != model_slug(wanted):
            raise ModelError(
                f"This detector was fitted on model '{wanted}', not '{lm.name}': its probe reads that model's "
                f"activations. Score with --model {wanted} (the default), or fit a detector for '{lm.name}'."
            )
        from truthmap.models import describe_identity, same_weights

        saved, now = self.info.get("model_identity"), getattr(lm, "identity", None)
        if not same_weights(saved, now):
            raise ModelError(
                f"This detector was fitted on {describe_identity(saved)}, not {describe_identity(now)}: another "
                "revision of the model has other activations. Score with the detector's revision, or refit it."
            )
        if (num_layers(lm.model), site_width(lm.model, self.site)) != (self.n_layers_, self.hidden_):
            raise ModelError(
                f"Model '{lm.name}' has {num_layers(lm.model)} layers of width {site_width(lm.model, self.site)} at "
                f"site {self.site}; the detector expects {self.n_layers_} x {self.hidden_}. Use the detector's model."
            )

    def score_many(self, questions, answers, lm=None, golds=None, exact_answers=None, batch_size: int = 16) -> list[dict]:
        """One dict per answer: error_probability (None when the exact answer was not found), exact_answer, source.

        The exact answer is, in this order: the given exact answer (it must occur in the answer), a given gold
        alias found in the answer, or the span the model extracts."""
        from truthmap.models import load_model

        check_texts(questions, answers)
        lm = lm or load_model(self.info.get("model", "smollm2"))
        self.check_model(lm)
        rows = encode_rows(lm, self.info, questions, answers)
        spans = {}
        if self.token in EXACT_POSITIONS:
            spans = given_spans(rows, exact_answers)
            golds_by_id = dict(zip(rows["id"], golds or []))
            spans |= locate_rows(lm, rows[~rows["id"].isin(spans)], golds_by_id, self.info, batch_size)
        return score_rows(self, lm, rows, spans, batch_size)


SITES = ("mlp", "mlp_in", "attn", "resid")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def check_fields(data: dict, path: Path) -> None:
    """A hand-edited or partial detector file fails here, naming the field, not deep inside scoring."""
    def bad(field: str, what: str):
        raise DataError(
            f"{path} is not a valid detector: field {field!r} {what}. Refit it with `truthmap fit-detector`."
        )

    for field, ok, expected in (
        ("site", lambda v: v in SITES, f"one of {', '.join(SITES)}"),
        ("token", lambda v: v in POSITIONS, "a token position such as exact_answer_last or -1"),
        ("n_layers", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("hidden", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("layer", lambda v: _is_int(v) and 0 <= v < data["n_layers"],
         f"a layer from 0 to {data['n_layers'] - 1} (n_layers - 1)" if _is_int(data.get("n_layers")) else ""),
        ("probe", lambda v: isinstance(v, dict), "an object with the probe's weights"),
    ):
        if field not in data:
            bad(field, "is missing")
        if not ok(data[field]):
            bad(field, f"is {data[field]!r}; expected {expected}")
    weights, hidden = data["probe"], data["hidden"]
    for field, ok, expected in (
        ("C", lambda v: _is_number(v) and v > 0, "a number > 0"),
        ("intercept", _is_number, "a number"),
        ("classes", lambda v: v == [False, True], "[false, true]"),
        *((key, lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers")
          for key in ("coef", "mean", "scale")),
    ):
        if field not in weights:
            bad(f"probe.{field}", "is missing")
        if not ok(weights[field]):
            shown = repr(weights[field])
            bad(f"probe.{field}", f"is {shown[:40] + '...' if len(shown) > 40 else shown}; expected {expected}")
    for field in ("coef", "mean", "scale"):
        if len(weights[field]) != hidden:
            bad(f"probe.{field}", f"has {len(weights[field])} values; expected {hidden}, the field 'hidden'")


def check_texts(questions, answers) -> None:
    for i, (question, answer) in enumerate(zip(questions, answers)):
        for what, text in (("question", question), ("answer", answer)):
            if not isinstance(text, str) or not text.strip():
                row = f" (row {i + 1})" if len(answers) > 1 else ""
                raise DataError(f"The {what}{row} is empty; give the text of the {what} to score.")


def encode_rows(lm, info: dict, questions, answers):
    """The answers table of new (question, answer) pairs: prompts as the detector's dataset builds them."""
    import dataclasses

    import pandas as pd

    from truthmap.datasets import build_prompt, get_spec
    from truthmap.datasets.spec import Record
    from truthmap.models import encode_prompt

    spec = get_spec(info.get("dataset", "geography"))
    chat = bool(info.get("chat_template", lm.is_chat)) and lm.is_chat
    lm = dataclasses.replace(lm, is_chat=chat)
    records = [Record(id=f"row-{i}", question=q, answers=[]) for i, q in enumerate(questions)]
    return pd.DataFrame(
        {
            "id": [r.id for r in records],
            "question": list(questions),
            "answer": list(answers),
            "prompt_ids": [encode_prompt(lm.tokenizer, build_prompt(spec, r, "instruct" if chat else "base"), chat) for r in records],
            "answer_ids": [lm.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers],
        }
    )


def given_spans(rows, exact_answers) -> dict:
    """Spans of exact answers given with the answers (case-insensitive, first occurrence)."""
    spans = {}
    for i, (row, exact) in enumerate(zip(rows.itertuples(), exact_answers or [])):
        if not isinstance(exact, str) or not exact.strip():
            continue
        start = row.answer.lower().find(exact.strip().lower())
        if start < 0:
            where = f" (row {i + 1})" if len(rows) > 1 else ""
            raise DataError(f"The exact answer{where} {exact!r} does not occur in the answer; give a span of the answer.")
        spans[row.id] = ("given", (start, start + len(exact.strip())))
    return spans


def locate_rows(lm, rows, golds: dict, info: dict, batch_size: int) -> dict:
    """Exact answers of new answers: a gold alias (golds: id -> aliases) when present, else extraction by the model."""
    import tempfile

    from truthmap.datasets import gold_span
    from truthmap.datasets.spec import Record
    from truthmap.locate import extract_spans
    from truthmap.rundir import Checkpoints

    spans = {}
    for row in rows.itertuples():
        gold = golds.get(row.id)
        aliases = [gold] if isinstance(gold, str) else list(gold or [])
        span = gold_span(Record(id=row.id, question=row.question, answers=aliases), row.answer) if aliases else None
        if span is not None:
            spans[row.id] = ("gold_match", span)
    pending = [(r.id, r.question, r.answer, r.answer_ids) for r in rows.itertuples() if r.id not in spans]
    with tempfile.TemporaryDirectory() as scratch:
        tries = int(info.get("extraction_tries") or 1)
        method = info.get("extractor", "free")  # detectors saved before the constrained extractor used free text
        spans |= extract_spans(lm, pending, batch_size, Checkpoints(Path(scratch), {}), method, tries, seed=0)
    return spans


def score_rows(detector: Detector, lm, rows, spans: dict, batch_size: int) -> list[dict]:
    from truthmap.activations import read_positions
    from truthmap.decoding import batches
    from truthmap.locate import exact_answer_columns, token_positions
    from truthmap.rundir import position_column

    if spans:
        rows = rows.assign(**exact_answer_columns(rows, lm.tokenizer, spans))
    else:
        positions = [token_positions(len(p), len(a), None) for p, a in zip(rows["prompt_ids"], rows["answer_ids"])]
        rows = rows.assign(**{position_column(k): [pos[k] for pos in positions] for k in POSITIONS},
                           exact_answer="", exact_answer_source="not_needed")
    column = position_column(detector.token)
    results = [None] * len(rows)
    for batch in batches([i for i in range(len(rows)) if rows[column].iat[i] >= 0], batch_size):
        sequences = [list(rows["prompt_ids"].iat[i]) + list(rows["answer_ids"].iat[i]) for i in batch]
        values = read_positions(lm, sequences, rows[column].to_numpy()[batch][:, None], detector.site)[:, :, 0]
        for i, p in zip(batch, detector.predict_proba(values)[:, 1]):
            results[i] = float(p)
    return [
        {
            "error_probability": results[i],
            "exact_answer": rows["exact_answer"].iat[i],
            "exact_answer_source": rows["exact_answer_source"].iat[i],
            "layer": detector.layer_,
            "token": detector.token,
        }
        for i in range(len(rows))
    ]


def load_scoring_model(detector: Detector, model: str | None, device: str | None, dtype: str | None):
    """The detector's model, or the one asked for once it is known to be the same (else a one-line error)."""
    from truthmap.models import load_model, model_slug

    wanted = detector.info.get("model", "smollm2")
    if model and model_slug(model) != model_slug(wanted):
        raise ModelError(
            f"This detector was fitted on model '{wanted}', not '{model}': its probe reads that model's activations. "
            f"Leave out --model, or fit a detector for '{model}' with `truthmap fit-detector --model {model}`."
        )
    lm = load_model(model or wanted, device, dtype)
    detector.check_model(lm)
    return lm


def read_pairs(path, question_column: str, answer_column: str):
    """Rows of a CSV or JSONL file that hold a question and an answer to score."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Input file {path} does not exist; give a CSV or JSONL file with --input.")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"Input file {path} must end in .csv or .jsonl.")
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_json(path, lines=True)
    except ValueError as err:
        raise DataError(f"Cannot read {path}: {err}") from None
    for column in (question_column, answer_column):
        if column not in frame.columns:
            raise DataError(f"{path} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
                            "name it with --question-column / --answer-column.")
    for i, row in enumerate(frame[[question_column, answer_column]].itertuples(index=False), start=1):
        if any(not isinstance(v, str) or not v.strip() for v in row):
            raise DataError(f"{path} row {i}: empty question or answer; fill it in or remove the row.")
    return frame


def score_file(detector: Detector, lm, frame, path, output, question_column: str, answer_column: str, batch_size: int) -> str:
    """Batch mode: every row of `frame` (from read_pairs) scored; written next to the input file (or to `output`)
    with the score columns added. Optional columns `exact_answer` and `gold` play the roles of --exact-answer/--gold."""
    from truthmap.rundir import write_atomic

    optional = {key: list(frame[key].where(frame[key].notna(), None)) if key in frame else None for key in ("exact_answer", "gold")}
    scores = detector.score_many(list(frame[question_column]), list(frame[answer_column]), lm, golds=optional["gold"],
                                 exact_answers=optional["exact_answer"], batch_size=batch_size)
    for key in ("error_probability", "exact_answer", "exact_answer_source"):
        frame[key] = [s[key] for s in scores]
    output = Path(output or Path(path).with_name(Path(path).stem + ".scored" + Path(path).suffix))
    if output.suffix.lower() == ".jsonl":
        write_atomic(output, lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False))
    else:
        write_atomic(output, lambda tmp: frame.to_csv(tmp, index=False))
    return f"Scored {len(frame)} answers: {output}"
