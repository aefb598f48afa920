"""A detector as a directory (save_pretrained / from_pretrained): config.json, model.safetensors, README.md."""

import json

import numpy as np
import pytest
from test_detection import HIDDEN, synthetic_cells

from truthmap.analysis.detector import Detector
from truthmap.errors import StoreError


def calibrated_detector(n_fit=None):
    X, y = synthetic_cells()
    X_cal, y_cal = synthetic_cells(seed=2)
    detector = Detector(token="-1", seeds=(0,), info={"model": "tiny", "dataset": "geography"}).fit(X, y)
    return detector.calibrate(X_cal, y_cal), X, y


def test_save_pretrained_then_from_pretrained_gives_bit_identical_scores(tmp_path):
    detector, X, y = calibrated_detector()
    X_test, y_test = synthetic_cells(seed=1)
    detector.info["test"] = detector.evaluate(X_test[:, detector.layer_], y_test, n_boot=50)
    folder = detector.save_pretrained(tmp_path / "det")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = Detector.from_pretrained(folder)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), detector.predict_proba(X_test))
    np.testing.assert_array_equal(loaded.decision_function(X_test), detector.decision_function(X_test))
    assert loaded.threshold(max_fpr=0.05) == detector.threshold(max_fpr=0.05)
    assert loaded.threshold(min_recall=0.85) == detector.threshold(min_recall=0.85)  # any target, from stored rows
    assert Detector.load(folder).layer_ == detector.layer_  # load reads a directory too
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 3 and config["calibrator"] == "platt"
    assert config["thresholds"]["fpr_0.05"]["threshold"] == detector.thresholds_["fpr_0.05"]["threshold"]
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / "model.safetensors"))
    assert arrays["coef"].shape == (HIDDEN,) and arrays["platt"].shape == (2,)
    assert arrays["calibration_scores"].shape == (len(detector.calibration_scores_),)


def test_the_card_holds_the_configs_numbers(tmp_path):
    detector, X, y = calibrated_detector()
    X_test, y_test = synthetic_cells(seed=1)
    detector.info["test"] = detector.evaluate(X_test[:, detector.layer_], y_test, n_boot=50)
    detector.info["test"]["best_control"] = {"method": "Text @ answer", "auc": 0.6123}
    folder = detector.save_pretrained(tmp_path / "det")
    card = (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    test = config["test"]
    assert f"| AUROC | {test['auroc']['value']:.3f} [{test['auroc']['low']:.3f}, {test['auroc']['high']:.3f}] |" in card
    assert f"| PRR | {test['prr']['value']:.3f} [" in card
    assert "(Text @ answer," in card and "AUROC 0.612" in card
    fpr = config["thresholds"]["fpr_0.05"]
    realized = test["thresholds"]["fpr_0.05"]["fpr"]
    assert f"| fpr 0.05 | {fpr['threshold']:.4f} | {realized['value']:.3f} [" in card
    calibration = config["calibration"]
    assert f"ECE {calibration['before']['ece']:.3f} -> {calibration['after']['ece']:.3f}" in card
    assert "Error detector for tiny: geography, mlp layer" in card


def test_format_2_files_still_load_and_a_tampered_directory_is_refused(tmp_path):
    detector, X, _ = calibrated_detector()
    old = Detector(token="-1", seeds=(0,)).fit(*synthetic_cells())
    path = old.save(tmp_path / "old.json")
    np.testing.assert_array_equal(Detector.from_pretrained(path).predict_proba(X), old.predict_proba(X))
    with pytest.raises(Exception, match="no calibration rows, so no threshold; refit it"):
        Detector.from_pretrained(path).threshold(max_fpr=0.05)
    folder = detector.save_pretrained(tmp_path / "det")
    with pytest.raises(StoreError, match=r"config\.json of a detector directory; give the directory"):
        Detector.load(folder / "config.json")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StoreError, match=r"model\.safetensors is not the weights file of .*config\.json"):
        Detector.from_pretrained(folder)
    with pytest.raises(StoreError, match=r"is not a detector directory \(no config\.json in it\)"):
        Detector.from_pretrained(tmp_path)
