"""A saved error detector: one probe at one (layer, token) cell, with everything needed to score new answers.

`Detector` is a scikit-learn classifier on activations. X is [samples, layers, hidden], every layer's activation
at the detector's token, or [samples, hidden] for one layer. `fit` chooses the layer on validation splits when
none is given (mean AUC over the seeds), then fits one ErrorProbe on all rows. The labels are the answers'
is_error (True where the answer is wrong), or any two classes: classes_ is sorted, and classes_[1] is the error
class. `predict` returns classes_ values, `predict_proba` is (n, 2) in classes_ order, `score` is the accuracy
(ClassifierMixin's) and `auc` the ROC AUC, as for ErrorProbe.

On text, `score_texts(questions, answers)` builds the prompts the probe was trained on, locates the exact
answers, reads the cell with one forward pass and returns each answer's probability of being wrong.

`save` writes two files: detector_<site>.json (settings, model, prompt, training summary: readable and
diffable) and detector_<site>.npz beside it (the probe's arrays, read without pickle). The JSON records the
sha256 of the .npz, so a pair that does not belong together is refused on load.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from truthmap.config import DEFAULT_SEEDS
from truthmap.errors import ConfigError, DataError, ModelError, StoreError, check_name
from truthmap.lm.sites import SITES
from truthmap.rundir import (
    EXACT_POSITIONS,
    POSITIONS,
    check_token,
    detector_weights,
    file_sha256,
    write_atomic,
    write_json,
)

FORMAT = "truthmap-detector"
FORMAT_VERSION = 2  # 1: the weights were lists inside the JSON (refused on load: refit); 2: a .json and a .npz
DIRECTORY_VERSION = 3  # a directory: config.json, model.safetensors, README.md (save_pretrained)
ARRAYS = ("coef", "mean", "scale", "intercept")  # the .npz: coef, mean, scale [hidden]; intercept a scalar


class Detector(ClassifierMixin, BaseEstimator):
    """Parameters: token (the probed token, a name of rundir.POSITIONS), layer (None: chosen on validation
    splits), site, C (the probe's inverse penalty), seeds (of the validation splits), info (where the
    activations come from: model, revision, dataset, prompt and extraction settings, training summary; used by
    score_texts and saved with the detector; not read by fit).

    Fitted: layer_, probe_ (the ErrorProbe of that layer), classes_, n_layers_, n_features_in_ (the hidden size
    of one layer), validation_auc_ ([layers] mean validation AUC; None when the layer was given or X has one).
    ClassifierMixin comes first: scikit-learn's check_mixin_order requires mixins left of BaseEstimator.
    """

    def __init__(self, token="exact_answer_last", layer=None, site="mlp", C=1.0, seeds=DEFAULT_SEEDS, info=None):
        self.token = token
        self.layer = layer
        self.site = site
        self.C = C
        self.seeds = seeds
        self.info = info

    # ---------------------------------------------------------------------------------- estimator on activations

    def fit(self, X, y, groups=None):
        """X [n, layers, hidden] (or [n, hidden], one layer) at the detector's token; y: True where wrong."""
        from sklearn.utils.multiclass import check_classification_targets

        from truthmap.analysis.detection import choose_layers
        from truthmap.analysis.probes import ErrorProbe, ProbeInputError

        check_token(self.token)
        check_name("site", self.site, SITES)
        X, y = self._check_X(X, y, reset=True)
        X = X if X.ndim == 3 else X[:, None, :]  # [n, layers, hidden]
        self.n_layers_ = X.shape[1]
        self.validation_auc_ = None
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) \
                    or not 0 <= self.layer < self.n_layers_:
                raise ConfigError(f"The 'layer' parameter of Detector must be an int from 0 to {self.n_layers_ - 1} "
                                  f"(X has {self.n_layers_} layers) or None. Got {self.layer!r} instead.")
            self.layer_ = int(self.layer)
        elif self.n_layers_ == 1:
            self.layer_ = 0
        else:
            check_classification_targets(y)
            classes = np.unique(y)
            if classes.size != 2:
                raise ProbeInputError(f"Detector needs labels of 2 classes (the error class second); y has "
                                      f"{classes.size}: {classes.tolist()[:5]}.")
            _, _, val = choose_layers(lambda layer: X[:, layer], self.n_layers_, y == classes[1], groups, self.seeds,
                                      "the detector", self.C)
            self.validation_auc_ = val.mean(0)  # [layers]
            self.layer_ = int(self.validation_auc_.argmax())
        self.probe_ = ErrorProbe(C=self.C).fit(X[:, self.layer_], y)
        self.classes_ = self.probe_.classes_
        return self

    def decision_function(self, X):
        """Log-odds of classes_[1] (the error class), shape (n,)."""
        X = self._cell(X)  # first: it checks that the detector is fitted
        return self.probe_.decision_function(X)

    def predict_proba(self, X):
        """(n, 2) in classes_ order: with is_error labels, P(correct) then P(wrong); calibrated once calibrate ran."""
        X = self._cell(X)
        if getattr(self, "calibrator_", None) is None:
            return self.probe_.predict_proba(X)
        wrong = self.calibrator_.predict(self.probe_.decision_function(X))
        return np.column_stack([1 - wrong, wrong])

    def predict(self, X):
        """classes_[1] where P(error) > 0.5, else classes_[0]."""
        wrong = self.predict_proba(X)[:, 1] > 0.5  # first: it checks that the detector is fitted
        return self.classes_[wrong.astype(int)]

    # ------------------------------------------------------------------------------- calibration and decisions

    def calibrate(self, X, y):
        """Calibrate P(wrong) and set the thresholds (calibration.py) on rows the probe was not fitted on.

        Fitted: calibrator_, calibration_ (method, counts, ECE and Brier before and after), thresholds_ (name ->
        target and threshold on the log-odds, or why it was refused), calibration_scores_ and calibration_errors_
        (the rows' log-odds and labels: a threshold at any other target is set from them)."""
        from truthmap.analysis.calibration import fit_calibrator, quality, threshold_table

        z = self.decision_function(X)
        errors = np.asarray(y) == self.classes_[1]
        self.calibrator_ = None
        self.calibration_scores_, self.calibration_errors_ = z, errors
        self.calibration_ = {"method": None, "rows": int(z.size), "errors": int(errors.sum()),
                             "correct": int((~errors).sum()), "before": quality(errors, self.predict_proba(X)[:, 1])}
        self.thresholds_ = threshold_table(z, errors)  # too few rows of a class: refused there, with the counts
        if errors.all() or not errors.any():  # nothing to calibrate on: the probe's own probability stays
            self.calibration_["refused"] = (f"The calibration rows hold {int(errors.sum())} errors and "
                                            f"{int((~errors).sum())} right answers; calibrating needs both.")
            return self
        self.calibrator_ = fit_calibrator(z, errors)
        self.calibration_ |= {"method": self.calibrator_.kind, "after": quality(errors, self.calibrator_.predict(z))}
        return self

    def threshold(self, max_fpr=None, min_recall=None) -> float:
        """The log-odds threshold (flag where decision_function >= it) at a target false-positive rate or recall."""
        from truthmap.analysis.calibration import threshold_at_fpr, threshold_at_recall

        if (max_fpr is None) == (min_recall is None):
            raise ConfigError("Give one target: --max-fpr (such as 0.05) or --min-recall (such as 0.9).")
        if getattr(self, "calibration_scores_", None) is None:
            raise ConfigError("This detector has no calibration rows, so no threshold; refit it with "
                              "`truthmap fit-detector` to flag answers.")
        if max_fpr is not None:
            return threshold_at_fpr(self.calibration_scores_, self.calibration_errors_, max_fpr)
        return threshold_at_recall(self.calibration_scores_, self.calibration_errors_, min_recall)

    def evaluate(self, X, y, n_boot: int = 500) -> dict:
        """On held-out rows: every metric (metrics.py) with its 95 % bootstrap interval, calibration quality, and
        the false-positive rate and recall each stored threshold really gives, with 95 % Wilson intervals."""
        from truthmap.analysis.calibration import quality, realized
        from truthmap.analysis.metrics import FUNCTIONS, bootstrap_interval

        z = self.decision_function(X)
        errors = np.asarray(y) == self.classes_[1]
        out = {"rows": int(z.size), "errors": int(errors.sum()), "correct": int((~errors).sum())}
        for name, metric in FUNCTIONS.items():
            low, high = bootstrap_interval(metric, errors, z, n_boot=n_boot)
            out[name] = {"value": round(metric(errors, z), 4), "low": round(low, 4), "high": round(high, 4)}
        out["calibration"] = quality(errors, self.predict_proba(X)[:, 1])
        out["thresholds"] = {name: realized(z, errors, row["threshold"])
                             for name, row in getattr(self, "thresholds_", {}).items() if row["threshold"] is not None}
        return out

    def auc(self, X, y) -> float:
        """ROC AUC with classes_[1] as positives (score keeps sklearn's accuracy)."""
        X = self._cell(X)
        return self.probe_.auc(X, y)

    def _check_X(self, X, y="no_validation", reset=False):
        """X [n, layers, hidden] (floats kept) or [n, hidden] (float64), checked as scikit-learn checks it, and y.

        n_features_in_ is the hidden size of one layer, the features the probe reads."""
        from sklearn.utils.validation import check_array, check_X_y, validate_data

        if _ndim(X) != 3:
            return validate_data(self, X, y, reset=reset, dtype=np.float64)
        floats = (np.float64, np.float32, np.float16)  # every layer in float64 would be 4x a float16 store's rows
        if isinstance(y, str):
            X = check_array(X, allow_nd=True, dtype=floats)
        else:
            X, y = check_X_y(X, y, allow_nd=True, dtype=floats)
        if reset:
            self.n_features_in_ = X.shape[2]
            self.__dict__.pop("feature_names_in_", None)  # from an earlier fit on a DataFrame
        elif X.shape[2] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[2]} features per layer, but Detector is expecting "
                             f"{self.n_features_in_} features as input.")
        return X if isinstance(y, str) else (X, y)

    def _cell(self, X):
        """The detector's layer of X: [n, hidden]. X is every layer [n, layers, hidden], or that layer alone."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        X = self._check_X(X)
        if X.ndim == 2:
            return X
        if X.shape[1] != self.n_layers_:
            raise ValueError(f"X has {X.shape[1]} layers, but Detector was fitted on {self.n_layers_}; give every "
                             f"layer, or the detector's layer ({self.layer_}) alone as [n, hidden].")
        return X[:, self.layer_]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        tags.input_tags.three_d_array = True
        return tags

    # ------------------------------------------------------------------------------------------- save and load

    def to_dict(self) -> dict:
        """The JSON half of a saved detector: everything but the probe's arrays."""
        from truthmap.rundir import package_versions

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "truthmap_version": package_versions().get("truthmap", "unknown"),
            "site": self.site,
            "layer": self.layer_,
            "token": self.token,
            "n_layers": self.n_layers_,
            "hidden": self.n_features_in_,
            **(self.info or {}),
            "validation_auc_by_layer": None if self.validation_auc_ is None else [round(float(a), 4) for a in self.validation_auc_],
            "probe": {"C": self.C, "classes": self.classes_.tolist()},
        }

    def save(self, path) -> Path:
        """path (.json) and the .npz of the same name beside it. The .npz is written first and the JSON names its
        hash, so a save killed between the two leaves a pair that load refuses, not a mixed detector."""
        path = Path(path)
        weights = weights_path(path)
        probe = self.probe_
        arrays = {"coef": probe.coef_, "mean": probe.mean_, "scale": probe.scale_,
                  "intercept": np.float64(probe.intercept_)}

        def write_npz(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a path
                np.savez(f, **arrays)

        write_atomic(weights, write_npz)
        write_json(path, self.to_dict() | {"weights_sha256": file_sha256(weights)})
        return path

    def to_config(self) -> dict:
        """config.json of a saved detector (format 3): to_dict's fields, the calibration and the thresholds."""
        calibrated = getattr(self, "calibrator_", None) is not None
        return self.to_dict() | {
            "format_version": DIRECTORY_VERSION,
            "calibration": getattr(self, "calibration_", None),
            "thresholds": getattr(self, "thresholds_", {}),
            "calibrator": self.calibrator_.kind if calibrated else None,
        }

    def save_pretrained(self, directory) -> Path:
        """A directory as a Hugging Face model: config.json, model.safetensors, README.md (the model card). The
        weights are written first and config.json names their hash, as in save."""
        from safetensors.numpy import save_file

        from truthmap.analysis.card import model_card
        from truthmap.rundir import DetectorFiles

        files = DetectorFiles(directory)
        if files.path.suffix.lower() == ".json":
            raise ConfigError(f"A detector is saved as a directory (config.json, model.safetensors, README.md); got "
                              f"{files.path}. Name a directory, such as {files.path.with_name(files.path.stem)}.")
        write_atomic(files.weights, lambda tmp: save_file(self._arrays(), str(tmp), metadata={"format": FORMAT}))
        config = self.to_config() | {"weights_sha256": file_sha256(files.weights)}
        write_json(files.config, config)
        write_atomic(files.card, lambda tmp: tmp.write_text(model_card(config)))
        return files.path

    def _arrays(self) -> dict:
        probe = self.probe_
        arrays = {"coef": probe.coef_, "mean": probe.mean_, "scale": probe.scale_,
                  "intercept": np.array([probe.intercept_])}
        if getattr(self, "calibrator_", None) is not None:
            arrays |= self.calibrator_.to_arrays()
        if getattr(self, "calibration_scores_", None) is not None:
            arrays |= {"calibration_scores": self.calibration_scores_,
                       "calibration_is_error": self.calibration_errors_.astype(np.uint8)}
        return {k: np.ascontiguousarray(v, dtype=np.uint8 if v.dtype == np.uint8 else np.float64)
                for k, v in arrays.items()}

    @classmethod
    def from_pretrained(cls, directory) -> "Detector":
        """A detector saved by save_pretrained, or a format-2 detector .json (its .npz beside it)."""
        from truthmap.rundir import DetectorFiles

        path = Path(directory)
        if path.is_file() and path.suffix.lower() == ".json":
            return cls.load(path)
        files = DetectorFiles(path)
        if not files.config.is_file():
            raise StoreError(f"{path} is not a detector directory (no config.json in it). Make one with "
                             "`truthmap fit-detector`.")
        data = read_detector_json(files.config, DIRECTORY_VERSION)
        check_fields(data, files.config)
        arrays = read_safetensors(files, data)
        detector = cls._from_parts(data, arrays | {"intercept": arrays["intercept"][0]})
        if "calibration_scores" in arrays:
            from truthmap.analysis.calibration import CALIBRATORS

            calibrator = data.get("calibrator")
            detector.calibrator_ = CALIBRATORS[calibrator].from_arrays(arrays) if calibrator else None
            detector.calibration_scores_ = arrays["calibration_scores"]
            detector.calibration_errors_ = arrays["calibration_is_error"].astype(bool)
            detector.calibration_, detector.thresholds_ = data["calibration"], data["thresholds"]
        return detector

    @classmethod
    def load(cls, path) -> "Detector":
        """A format-2 detector (.json and .npz); a directory is read by from_pretrained."""
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path)
        data = read_detector_json(path)
        check_fields(data, path)
        return cls._from_parts(data, read_weights(path, data))

    @classmethod
    def _from_parts(cls, data: dict, arrays: dict) -> "Detector":
        from truthmap.analysis.probes import ErrorProbe

        fitted = ("format", "format_version", "truthmap_version", "weights_sha256", "probe", "validation_auc_by_layer",
                  "site", "layer", "token", "n_layers", "hidden", "calibration", "thresholds", "calibrator")
        info = {k: v for k, v in data.items() if k not in fitted}
        detector = cls(token=data["token"], layer=data["layer"], site=data["site"], C=data["probe"]["C"], info=info)
        probe = ErrorProbe(C=data["probe"]["C"])
        probe.coef_, probe.mean_, probe.scale_ = arrays["coef"], arrays["mean"], arrays["scale"]
        probe.intercept_, probe.classes_ = float(arrays["intercept"]), np.asarray(data["probe"]["classes"])
        probe.n_features_in_, probe.n_iter_ = data["hidden"], 0
        validation = data.get("validation_auc_by_layer")
        detector.probe_, detector.classes_ = probe, probe.classes_
        detector.layer_, detector.n_layers_, detector.n_features_in_ = data["layer"], data["n_layers"], data["hidden"]
        detector.validation_auc_ = None if validation is None else np.asarray(validation, dtype=np.float64)
        return detector

    # ----------------------------------------------------------------------------------------------- on text

    def check_model(self, lm) -> None:
        from truthmap.lm.models import model_slug
        from truthmap.lm.sites import num_layers, site_width

        wanted = (self.info or {}).get("model")
        if wanted and model_slug(lm.name) != model_slug(wanted):
            raise ModelError(
                f"This detector was fitted on model '{wanted}', not '{lm.name}': its probe reads that model's "
                f"activations. Score with --model {wanted} (the default), or fit a detector for '{lm.name}'."
            )
        from truthmap.lm.models import describe_identity, same_weights

        saved, now = (self.info or {}).get("model_identity"), getattr(lm, "identity", None)
        if not same_weights(saved, now):
            raise ModelError(
                f"This detector was fitted on {describe_identity(saved)}, not {describe_identity(now)}: another "
                "revision of the model has other activations. Score with the detector's revision, or refit it."
            )
        if (num_layers(lm.model), site_width(lm.model, self.site)) != (self.n_layers_, self.n_features_in_):
            raise ModelError(
                f"Model '{lm.name}' has {num_layers(lm.model)} layers of width {site_width(lm.model, self.site)} at "
                f"site {self.site}; the detector expects {self.n_layers_} x {self.n_features_in_}. Use the detector's "
                "model."
            )

    def score_texts(self, questions, answers, lm=None, golds=None, exact_answers=None,
                    batch_size: int = 16) -> list[dict]:
        """One dict per (question, answer): error_probability (P(wrong); None when the exact answer was not
        found), exact_answer, exact_answer_source, layer, token.

        The exact answer is, in this order: the given exact answer (it must occur in the answer), a given gold
        alias found in the answer, or the span the model extracts."""
        from truthmap.lm.models import load_model

        check_texts(questions, answers)
        info = self.info or {}
        lm = lm or load_model(info.get("model", "smollm2"))
        self.check_model(lm)
        rows = encode_rows(lm, info, questions, answers)
        spans = {}
        if self.token in EXACT_POSITIONS:
            spans = given_spans(rows, exact_answers)
            golds_by_id = dict(zip(rows["id"], golds or []))
            spans |= locate_rows(lm, rows[~rows["id"].isin(spans)], golds_by_id, info, batch_size)
        return score_rows(self, lm, rows, spans, batch_size)


def _ndim(X) -> int:
    """Dimensions of array-like X; 2 when unknown, so that validate_data explains what is wrong with it."""
    if hasattr(X, "ndim"):
        return X.ndim
    try:
        return np.asarray(X).ndim
    except (TypeError, ValueError):
        return 2


def weights_path(path) -> Path:
    """The .npz beside a detector's JSON file; the JSON must end in .json, so that the two cannot collide."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise ConfigError(f"A detector is saved as a .json file (with a .npz beside it); got {path}. Name it "
                          f"{path.with_suffix('.json').name}.")
    return detector_weights(path)


def read_detector_json(path: Path, version: int = FORMAT_VERSION) -> dict:
    if not path.is_file():
        raise StoreError(f"Detector file {path} does not exist. Make one with `truthmap fit-detector`.")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path} is not a truthmap detector (not JSON: {err}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not a truthmap detector (no \"format\": \"{FORMAT}\"); use a file from "
                         "`truthmap fit-detector`.")
    if data.get("format_version") == 1:
        raise StoreError(f"{path} is a detector of format 1 (its weights inside the JSON); this truthmap reads "
                         f"format {FORMAT_VERSION} (a .json and a .npz). Refit it with `truthmap fit-detector`.")
    if data.get("format_version") == DIRECTORY_VERSION and version != DIRECTORY_VERSION:
        raise StoreError(f"{path} is the config.json of a detector directory; give the directory "
                         f"{path.parent} instead.")
    if data.get("format_version") != version:
        raise StoreError(f"{path} has detector format {data.get('format_version')}; this truthmap reads "
                         f"{version}. Refit it with `truthmap fit-detector`.")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _invalid(path: Path, field: str, what: str, thing: str = "field") -> StoreError:
    return StoreError(
        f"{path} is not a valid detector: {thing} {field!r} {what}. Refit it with `truthmap fit-detector`."
    )


def check_fields(data: dict, path: Path) -> None:
    """A hand-edited or partial detector file fails here, naming the field, not deep inside scoring."""
    def bad(field: str, what: str):
        raise _invalid(path, field, what)

    for field, ok, expected in (
        ("site", lambda v: v in SITES, f"one of {', '.join(SITES)}"),
        ("token", lambda v: v in POSITIONS, "a token position such as exact_answer_last or -1"),
        ("n_layers", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("hidden", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("layer", lambda v: _is_int(v) and 0 <= v < data["n_layers"],
         f"a layer from 0 to {data['n_layers'] - 1} (n_layers - 1)" if _is_int(data.get("n_layers")) else ""),
        ("weights_sha256", lambda v: isinstance(v, str), "the sha256 of the .npz beside it"),
        ("probe", lambda v: isinstance(v, dict), "an object with the probe's C and classes"),
    ):
        if field not in data:
            bad(field, "is missing")
        if not ok(data[field]):
            bad(field, f"is {data[field]!r}; expected {expected}")
    for field, ok, expected in (
        ("C", lambda v: _is_number(v) and v > 0, "a number > 0"),
        ("classes", lambda v: isinstance(v, list) and len(v) == 2 and v[0] != v[1]
         and all(isinstance(c, (bool, int, str)) for c in v), "two class labels, such as [false, true]"),
    ):
        if field not in data["probe"]:
            bad(f"probe.{field}", "is missing")
        if not ok(data["probe"][field]):
            bad(f"probe.{field}", f"is {data['probe'][field]!r}; expected {expected}")


def read_weights(path: Path, data: dict) -> dict:
    """The probe's arrays from the .npz beside the JSON, checked against the JSON's hash and hidden size."""
    weights = weights_path(path)
    if not weights.is_file():
        raise StoreError(f"{weights} is missing: a detector is {path.name} and {weights.name} side by side. Copy both, "
                         "or refit with `truthmap fit-detector`.")
    if file_sha256(weights) != data["weights_sha256"]:
        raise StoreError(f"{weights} is not the weights file of {path} (its sha256 differs from the JSON's "
                         "weights_sha256). Copy the two files together, or refit with `truthmap fit-detector`.")
    try:
        with np.load(weights, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key], dtype=np.float64) for key in ARRAYS if key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise StoreError(f"{weights} is damaged ({err}); refit with `truthmap fit-detector`.") from None
    for key in ARRAYS:
        shape = () if key == "intercept" else (data["hidden"],)
        if key not in arrays:
            raise _invalid(weights, key, "is missing", "array")
        if arrays[key].shape != shape:
            raise _invalid(weights, key, f"has shape {arrays[key].shape}; expected {shape}, from the field 'hidden' of "
                           f"{path.name}", "array")
        if not np.isfinite(arrays[key]).all():
            raise _invalid(weights, key, "holds NaN or inf", "array")
        if key == "scale" and (arrays[key] <= 0).any():  # else scores are NaN, with only a RuntimeWarning
            raise _invalid(weights, key, "holds 0 or a negative value (it divides the activations)", "array")
    return arrays


def read_safetensors(files, data: dict) -> dict:
    """The arrays of model.safetensors, checked against config.json's hash and hidden size."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not files.weights.is_file():
        raise StoreError(f"{files.weights} is missing: a detector directory holds config.json and model.safetensors. "
                         "Copy the whole directory, or refit with `truthmap fit-detector`.")
    if file_sha256(files.weights) != data["weights_sha256"]:
        raise StoreError(f"{files.weights} is not the weights file of {files.config} (its sha256 differs from "
                         "weights_sha256). Copy the directory whole, or refit with `truthmap fit-detector`.")
    try:
        arrays = load_file(str(files.weights))
    except (OSError, SafetensorError) as err:
        raise StoreError(f"{files.weights} is damaged ({err}); refit with `truthmap fit-detector`.") from None
    for key in ARRAYS:
        shape = (1,) if key == "intercept" else (data["hidden"],)
        if key not in arrays or arrays[key].shape != shape or not np.isfinite(arrays[key]).all():
            raise _invalid(files.weights, key, f"is missing, or not {shape} finite numbers", "array")
    return arrays


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
    from truthmap.lm.models import encode_prompt

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
    from truthmap.runstate import Checkpoints
    from truthmap.stages.label import Extraction

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
        spans |= Extraction(lambda: lm, lambda: Checkpoints(Path(scratch), {}), batch_size, method, tries)(pending)
    return spans


def score_rows(detector: Detector, lm, rows, spans: dict, batch_size: int) -> list[dict]:
    from truthmap.lm.decoding import batches
    from truthmap.rundir import position_column
    from truthmap.stages.activations import read_positions
    from truthmap.stages.locate import exact_answer_columns, token_positions

    if spans:
        rows = rows.assign(**exact_answer_columns(rows, lm.tokenizer, spans))
    else:
        positions = [token_positions(len(p), len(a), None) for p, a in zip(rows["prompt_ids"], rows["answer_ids"])]
        rows = rows.assign(**{position_column(k): [pos[k] for pos in positions] for k in POSITIONS},
                           exact_answer="", exact_answer_source="not_needed")
    column = position_column(detector.token)
    results, logits = [None] * len(rows), [None] * len(rows)
    for batch in batches([i for i in range(len(rows)) if rows[column].iat[i] >= 0], batch_size):
        sequences = [list(rows["prompt_ids"].iat[i]) + list(rows["answer_ids"].iat[i]) for i in batch]
        values = read_positions(lm, sequences, rows[column].to_numpy()[batch][:, None], detector.site)[:, :, 0]
        check_finite(values, [rows["id"].iat[i] for i in batch], detector)
        for i, p, z in zip(batch, detector.predict_proba(values)[:, 1], detector.decision_function(values)):
            results[i], logits[i] = float(p), float(z)
    return [
        {
            "error_probability": results[i],
            "error_logit": logits[i],  # the probe's log-odds, before calibration: what a threshold compares
            "exact_answer": rows["exact_answer"].iat[i],
            "exact_answer_source": rows["exact_answer_source"].iat[i],
            "layer": detector.layer_,
            "token": detector.token,
        }
        for i in range(len(rows))
    ]


def check_finite(values, ids, detector) -> None:
    """NaN or inf activations (a float16 overflow) would give a meaningless probability: refused, naming a row.
    values: [rows, layers, hidden] or [rows, hidden]; detector: anything with the site and token read."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"The activations of {ids[int(np.argmax(bad))]} at site {detector.site}, token "
                        f"{detector.token} hold NaN or inf ({int(bad.sum())} of {len(values)} rows); run the model in "
                        "float32 (--dtype float32).")


def load_scoring_model(detector: Detector, model: str | None, device: str | None, dtype: str | None):
    """The detector's model, or the one asked for once it is known to be the same (else a one-line error)."""
    from truthmap.lm.models import load_model, model_slug

    wanted = (detector.info or {}).get("model", "smollm2")
    if model and model_slug(model) != model_slug(wanted):
        raise ModelError(
            f"This detector was fitted on model '{wanted}', not '{model}': its probe reads that model's activations. "
            f"Leave out --model, or fit a detector for '{model}' with `truthmap fit-detector --model {model}`."
        )
    lm = load_model(model or wanted, device, dtype)
    detector.check_model(lm)
    return lm


def read_pairs(path, question_column: str, answer_column: str):
    """Rows of a CSV, JSONL or Parquet file (tables.read_table) that hold a question and an answer to score."""
    import pandas as pd

    from truthmap.tables import read_table

    rows = read_table(Path(path), (question_column, answer_column), what="Input file")
    for line, row in rows:
        if any(not isinstance(row.get(c), str) or not row[c].strip() for c in (question_column, answer_column)):
            where = f"line {line}" if isinstance(line, int) else line
            raise DataError(f"{path} {where}: empty question or answer; fill it in or remove the row.")
    # An empty CSV cell is no value, as pandas reads it: no gold, no exact answer given.
    return pd.DataFrame([{k: None if v == "" else v for k, v in row.items()} for _, row in rows])


def score_file(detector: Detector, lm, frame, path, output, question_column: str, answer_column: str, batch_size: int,
               threshold: float | None = None) -> str:
    """Batch mode: every row of `frame` (from read_pairs) scored; written next to the input file (or to `output`)
    with the score columns added. Optional columns `exact_answer` and `gold` play the roles of --exact-answer/--gold."""
    optional = {key: list(frame[key].where(frame[key].notna(), None)) if key in frame else None for key in ("exact_answer", "gold")}
    scores = detector.score_texts(list(frame[question_column]), list(frame[answer_column]), lm, golds=optional["gold"],
                                  exact_answers=optional["exact_answer"], batch_size=batch_size)
    for key in ("error_probability", "exact_answer", "exact_answer_source"):
        frame[key] = [s[key] for s in scores]
    if threshold is not None:  # the flag at the target picked (Detector.threshold)
        frame["flag"] = [s["error_logit"] is not None and s["error_logit"] >= threshold for s in scores]
    output = Path(output or Path(path).with_name(Path(path).stem + ".scored" + Path(path).suffix))
    if output.suffix.lower() == ".jsonl":
        write_atomic(output, lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False))
    else:
        write_atomic(output, lambda tmp: frame.to_csv(tmp, index=False))
    return f"Scored {len(frame)} answers: {output}"
