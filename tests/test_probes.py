import os
import re

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from truthmap.errors import ProbeError
from truthmap.analysis.evaluation import auc, grouped_split, split_masks
from truthmap.analysis.probes import ErrorProbe, ProbeGrid, probe_grid

N, LAYERS, POSITIONS, HIDDEN = 2000, 4, 5, 16
SIGNAL = (2, 3)  # the one cell whose activations decide the label


@pytest.fixture(params=[int(s) for s in os.environ.get("TRUTHMAP_TEST_SEEDS", "0").split(",")])
def seed(request):
    """Data seed; sweep with TRUTHMAP_TEST_SEEDS=0,1,2,3."""
    return request.param


def make_store(tmp_path, seed, n=N):
    """A cell-major float16 memmap [layers, positions, n, hidden] as activations writes it, and its labels.

    Errors depend linearly on cell SIGNAL (with a little label noise); every other cell is pure noise."""
    rng = np.random.default_rng(seed)
    store = np.lib.format.open_memmap(
        tmp_path / "acts.npy", mode="w+", dtype=np.float16, shape=(LAYERS, POSITIONS, n, HIDDEN)
    )
    store[:] = rng.standard_normal(store.shape) * 3 + 1
    direction = rng.standard_normal(HIDDEN)
    score = (store[SIGNAL].astype(np.float64) - 1) @ direction / np.linalg.norm(direction) / 3  # ~N(0, 1)
    is_error = score + 0.2 * rng.standard_normal(n) > 0.5  # ~30% errors
    store.flush()
    return np.load(tmp_path / "acts.npy", mmap_mode="r"), is_error


def sample_major(store):
    return store.transpose(2, 0, 1, 3)  # a view [n, layers, positions, hidden]: acts[:, l, p, :] is one cell


class CellsOnly:
    """Activations that allow acts[:, layer, pos, :] and nothing else (no whole-array reads)."""

    def __init__(self, acts):
        self._acts = acts
        self.shape = acts.shape
        self.reads = []

    def __getitem__(self, key):
        assert isinstance(key, tuple) and len(key) == 4, key
        assert key[0] == slice(None) and key[3] == slice(None), key
        assert isinstance(key[1], int) and isinstance(key[2], int), key
        self.reads.append(key[1:3])
        return self._acts[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("probe_grid materialised the whole activation array")


# ------------------------------------------------------------------------------------------------- probe_grid


def test_grid_finds_the_signal_cell(tmp_path, seed):
    store, is_error = make_store(tmp_path, seed)
    acts = CellsOnly(sample_major(store))
    grid = probe_grid(acts, is_error, progress=False)

    assert isinstance(grid, ProbeGrid)
    assert grid.mean.shape == grid.std.shape == (LAYERS, POSITIONS)
    assert grid.aucs.shape == (5, LAYERS, POSITIONS)
    assert grid.seeds == (0, 5, 26, 42, 63)
    assert np.unravel_index(grid.mean.argmax(), grid.mean.shape) == SIGNAL
    assert grid.mean[SIGNAL] > 0.95
    noise = np.delete(grid.mean.ravel(), np.ravel_multi_index(SIGNAL, grid.mean.shape))
    assert noise.min() > 0.4 and noise.max() < 0.6, noise
    np.testing.assert_allclose(grid.mean, grid.aucs.mean(0))
    np.testing.assert_allclose(grid.std, grid.aucs.std(0))
    assert (grid.n_train, grid.n_test) == (1600, 400)
    assert grid.n_errors == is_error.sum() and grid.n_correct == N - is_error.sum()
    # each cell read once, cell by cell
    assert sorted(acts.reads) == [(layer, pos) for layer in range(LAYERS) for pos in range(POSITIONS)]


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_vectorised_fit_matches_sklearn(tmp_path, seed, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    store, is_error = make_store(tmp_path, seed)
    acts = sample_major(store)
    seeds = (0, 42)
    grid = probe_grid(acts, is_error, seeds=seeds, C=C, progress=False)
    for s, split_seed in enumerate(seeds):
        train, test = grouped_split(N, None, 0.2, split_seed, stratify=is_error)  # the split probe_grid uses
        for layer in range(LAYERS):
            for pos in range(POSITIONS):
                X = np.asarray(acts[:, layer, pos, :], dtype=np.float32)
                scaler = StandardScaler().fit(X[train])
                model = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(X[train]), is_error[train])
                expected = roc_auc_score(is_error[test], model.decision_function(scaler.transform(X[test])))
                assert abs(grid.aucs[s, layer, pos] - expected) < 0.01, (split_seed, layer, pos)


def test_vectorised_fit_matches_sklearn_when_separable(seed):
    """More features than train rows: the penalty alone bounds the weights."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n, hidden = 150, 200
    acts = rng.standard_normal((n, 1, 3, hidden)).astype(np.float32) * rng.uniform(0.1, 10, hidden)
    is_error = acts[:, 0, 1, :5].sum(1) / acts[:, 0, 1, :5].std(0).sum() + 0.3 * rng.standard_normal(n) > 0.3
    grid = probe_grid(acts, is_error, seeds=(7,), progress=False)
    train, test = grouped_split(n, None, 0.2, 7, stratify=is_error)
    for pos in range(3):
        scaler = StandardScaler().fit(acts[train, 0, pos])
        model = LogisticRegression(max_iter=10000).fit(scaler.transform(acts[train, 0, pos]), is_error[train])
        expected = roc_auc_score(is_error[test], model.decision_function(scaler.transform(acts[test, 0, pos])))
        assert abs(grid.aucs[0, 0, pos] - expected) < 0.01, pos


def test_grid_batches_do_not_change_results(tmp_path, monkeypatch):
    store, is_error = make_store(tmp_path, 0)
    acts = sample_major(store)
    whole = probe_grid(acts, is_error, seeds=(0,), progress=False)
    monkeypatch.setattr("truthmap.analysis.scheduler.CELL_BUDGET_BYTES", 1)  # one cell per batch
    single = probe_grid(acts, is_error, seeds=(0,), progress=False)
    np.testing.assert_allclose(single.aucs, whole.aucs, atol=1e-3)


def grid_on(device, tmp_path, monkeypatch):
    """The grid fitted on `device` (None: the default), and the device type each fit ran on."""
    from truthmap.analysis import scheduler
    seen = []
    fit = scheduler.fit_logistic
    monkeypatch.setattr(scheduler, "fit_logistic", lambda X, *a, **k: seen.append(X.device.type) or fit(X, *a, **k))
    tmp_path.mkdir(parents=True, exist_ok=True)
    store, is_error = make_store(tmp_path, 0, n=200)
    return probe_grid(sample_major(store), is_error, seeds=(0,), progress=False, device=device), set(seen)


def test_grid_runs_on_the_device_it_is_given(tmp_path, monkeypatch):
    assert grid_on("cpu", tmp_path, monkeypatch)[1] == {"cpu"}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_grid_on_the_gpu_matches_the_cpu(tmp_path, monkeypatch):
    on_cpu, _ = grid_on("cpu", tmp_path / "cpu", monkeypatch)
    on_gpu, seen = grid_on(None, tmp_path / "gpu", monkeypatch)  # default: cuda when present
    assert seen == {"cuda"}
    np.testing.assert_allclose(on_gpu.aucs, on_cpu.aucs, atol=1e-6)


def test_grid_restores_torch_threads(tmp_path):
    import torch

    store, is_error = make_store(tmp_path, 0, n=100)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the 1 the grid is given: a restore that does nothing fails
    try:
        probe_grid(sample_major(store), is_error, seeds=(0,), progress=False, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_grid_shows_progress(tmp_path, monkeypatch, capsys):
    store, is_error = make_store(tmp_path, 0, n=100)
    monkeypatch.setenv("TRUTHMAP_PROGRESS", "1")
    probe_grid(sample_major(store), is_error, seeds=(0,), progress=True, name="nq")
    assert "Probing nq: 100%" in capsys.readouterr().err
    probe_grid(sample_major(store), is_error, seeds=(0,), progress=False, name="nq")
    assert capsys.readouterr().err == ""


def test_too_few_errors_is_refused_before_reading_activations(tmp_path):
    store, _ = make_store(tmp_path, 0, n=1000)
    is_error = np.zeros(1000, dtype=bool)
    is_error[:3] = True
    acts = CellsOnly(sample_major(store))
    msg = (
        "Too few errors to probe: 3 incorrect and 997 correct answers with a valid exact answer "
        "(need at least 5 of each). Use more samples (--n-samples; --n-questions in table and generalize)."
    )
    with pytest.raises(ProbeError, match=f"^{re.escape(msg)}$"):
        probe_grid(acts, is_error, progress=False)
    assert acts.reads == []

    msg = msg.replace("probe:", "probe triviaqa:")
    with pytest.raises(ProbeError, match=f"^{re.escape(msg)}$"):
        probe_grid(acts, is_error, progress=False, name="triviaqa")


def test_too_few_correct_answers(tmp_path):
    store, _ = make_store(tmp_path, 0, n=100)
    is_error = np.ones(100, dtype=bool)
    is_error[:4] = False
    msg = (
        "Too few correct answers to probe: 96 incorrect and 4 correct answers with a valid exact answer "
        "(need at least 5 of each). Use more samples (--n-samples; --n-questions in table and generalize)."
    )
    with pytest.raises(ProbeError, match=f"^{re.escape(msg)}$"):
        probe_grid(sample_major(store), is_error, progress=False)


@pytest.mark.parametrize("n_errors", [0, 100])
def test_one_class_is_refused(tmp_path, n_errors):
    store, _ = make_store(tmp_path, 0, n=100)
    is_error = np.arange(100) < n_errors
    few = "errors" if n_errors == 0 else "correct answers"
    with pytest.raises(ProbeError, match=f"^Too few {few} to probe: {n_errors} incorrect and {100 - n_errors} correct"):
        probe_grid(sample_major(store), is_error, progress=False)


def test_split_with_one_class_in_a_part_is_refused(tmp_path):
    store, _ = make_store(tmp_path, 0, n=100)
    is_error = np.arange(100) < 6
    groups = ["all-errors" if e else None for e in is_error]  # the six errors are one group: one side only
    train, test = grouped_split(100, groups, 0.2, 0, stratify=is_error)
    part, idx = ("train", train) if not is_error[train].any() else ("test", test)
    msg = (
        f"The {part} part of the split for seed 0 of nq has one class only: 0 incorrect and {idx.size} correct "
        "answers. Use more samples (--n-samples; --n-questions in table and generalize)."
    )
    acts = CellsOnly(sample_major(store))
    with pytest.raises(ProbeError, match=f"^{re.escape(msg)}$"):
        probe_grid(acts, is_error, groups=groups, seeds=(0,), progress=False, name="nq")
    assert acts.reads == []


def test_bad_inputs(tmp_path):
    store, is_error = make_store(tmp_path, 0, n=100)
    acts = sample_major(store)
    with pytest.raises(ProbeError, match=r"^The 'C' parameter of probe_grid must be a float > 0. Got -1 instead.$"):
        probe_grid(acts, is_error, C=-1, progress=False)
    with pytest.raises(ProbeError, match=r"acts must be 4-D \[samples, layers, positions, hidden\]; got shape"):
        probe_grid(acts[:, 0], is_error, progress=False)
    with pytest.raises(ProbeError, match=r"is_error has shape \(99,\) but acts has 100 samples"):
        probe_grid(acts, is_error[:99], progress=False)
    broken = np.array(acts)
    broken[7, 1, 2, 3] = np.inf
    with pytest.raises(ProbeError, match=r"at layer 1, position 2 hold 1 NaN or inf values"):
        probe_grid(broken, is_error, progress=False)


# ------------------------------------------------------------------------------------------------ grouped_split


def test_grouped_split_keeps_groups_together(seed):
    rng = np.random.default_rng(seed)
    n = 500
    groups = [f"pair-{i // 2}" if i < 300 else None for i in rng.permutation(n)]  # 150 pairs, 200 singletons
    for split_seed in (0, 5, 26, 42, 63):
        train, test = grouped_split(n, groups, 0.2, split_seed)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
        train_groups = {groups[i] for i in train} - {None}
        test_groups = {groups[i] for i in test} - {None}
        assert not train_groups & test_groups
        assert abs(test.size - 100) <= 1


def test_grouped_split_treats_nan_as_no_group():
    groups = [np.nan] * 50 + ["a", "a"]  # how pandas reads null groups
    train, test = grouped_split(52, groups, 0.2, 0)
    assert test.size == 10 or test.size == 11  # singletons fill the test part; one NaN group would not
    assert {50, 51} <= set(train) or {50, 51} <= set(test)


def test_grouped_split_is_seeded_and_stratified(seed):
    labels = np.random.default_rng(seed).random(1000) < 0.1
    a_train, a_test = grouped_split(1000, None, 0.2, 26, stratify=labels)
    b_train, b_test = grouped_split(1000, None, 0.2, 26, stratify=labels)
    c_train, c_test = grouped_split(1000, None, 0.2, 27, stratify=labels)
    assert np.array_equal(a_test, b_test) and np.array_equal(a_train, b_train)
    assert not np.array_equal(a_test, c_test)
    assert a_test.size == 200
    assert labels[a_test].sum() == round(0.2 * labels.sum())
    assert np.all(np.diff(a_train) > 0) and np.all(np.diff(a_test) > 0)


def test_grouped_split_errors():
    with pytest.raises(ProbeError, match="groups has 3 entries but there are 4 rows"):
        grouped_split(4, ["a", "b", None])
    with pytest.raises(ProbeError, match=r"groups\[1\] = \['x'\] is not hashable"):
        grouped_split(3, [None, ["x"], None])
    with pytest.raises(ProbeError, match="test_size must be a float between 0 and 1"):
        grouped_split(10, test_size=1.5)
    with pytest.raises(ProbeError, match="leaves the train part empty"):
        grouped_split(4, ["g"] * 4)


# --------------------------------------------------------------------------------------------------- ErrorProbe


@parametrize_with_checks([ErrorProbe()])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_error_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 8)) * rng.uniform(0.1, 20, 8) + rng.uniform(-50, 50, 8)
    y = np.where(X[:, 0] / 10 + rng.standard_normal(300) > 0, "wrong", "right")
    probe = ErrorProbe(C=0.5, tol=1e-8).fit(X, y)
    scaler = StandardScaler().fit(X)
    reference = LogisticRegression(C=0.5, tol=1e-8, max_iter=10000).fit(scaler.transform(X), y)
    np.testing.assert_allclose(probe.mean_, scaler.mean_)
    np.testing.assert_allclose(probe.scale_, scaler.scale_)
    np.testing.assert_allclose(probe.coef_, reference.coef_[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(probe.predict_proba(X), reference.predict_proba(scaler.transform(X)), atol=1e-4)
    assert list(probe.classes_) == ["right", "wrong"]
    assert probe.predict_proba(X).shape == (300, 2)
    assert probe.score(X, y) == np.mean(probe.predict(X) == y)  # accuracy, as ClassifierMixin
    assert probe.auc(X, y) == pytest.approx(auc(y == "wrong", probe.decision_function(X)))
    assert probe.auc(X, y) > 0.8


def test_error_probe_validates_C():
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ProbeError, match=r"^The 'C' parameter of ErrorProbe must be a float > 0. Got -1 instead.$"):
        ErrorProbe(C=-1).fit(X, y)
    with pytest.raises(ValueError, match="The 'C' parameter of ErrorProbe"):  # also sklearn's exception type
        ErrorProbe(C="big").fit(X, y)


def test_error_probe_refuses_one_class():
    with pytest.raises(ProbeError, match=r"needs samples of 2 classes, but y has only one class: True\.$"):
        ErrorProbe().fit(np.ones((5, 2)), np.ones(5, dtype=bool))


def test_auc_refuses_one_class():
    with pytest.raises(ProbeError, match=r"An AUC needs labels of 2 classes, got 1"):
        auc([True, True], [0.1, 0.2])
    assert auc([False, True, True], [0.3, 0.2, 0.9]) == 0.5


# ------------------------------------------------------------------------------------- the fit's speed-ups, checked


@pytest.mark.parametrize("n, hidden", [(120, 60), (600, 40)])  # fewer rows than features (Woodbury), and more
def test_fit_matches_converged_sklearn_with_correlated_features(n, hidden):
    """Features with a spectrum like real activations' (a few large directions, a long tail): the fit's AUCs, on
    float32 activations and in both preconditioner forms, are those of converged sklearn fits."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from truthmap.analysis.evaluation import auc_rows, split_masks
    from truthmap.analysis.solver import fit_logistic

    rng = np.random.default_rng(3)
    spectrum = 50 / (1 + np.arange(hidden) / 3) ** 2
    rotation, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    X = (rng.standard_normal((2, n, hidden)) * np.sqrt(spectrum)) @ rotation + rng.uniform(-5, 5, hidden)
    y = X[0, :, :3].sum(1) / X[0, :, :3].sum(1).std() + rng.standard_normal(n) > 0.5
    train = split_masks(n, None, (0, 5), y)
    fit = fit_logistic(torch.tensor(X, dtype=torch.float32), y.astype(float), train, 1.0)
    assert fit["converged"].all()
    for s, mask in enumerate(train):
        got = auc_rows(fit["logits"][:, s, ~mask].numpy(), y[~mask])
        for cell in range(2):
            scaler = StandardScaler().fit(X[cell, mask])
            model = LogisticRegression(tol=1e-10, max_iter=100000).fit(scaler.transform(X[cell, mask]), y[mask])
            expected = auc_rows(model.decision_function(scaler.transform(X[cell, ~mask]))[None], y[~mask])[0]
            assert abs(got[cell] - expected) < 0.003, (s, cell, got[cell], expected)
            np.testing.assert_allclose(fit["coef"][cell, s].numpy(), model.coef_[0], atol=0.02 * np.abs(model.coef_).max())


def test_float32_activations_fit_as_float64():
    """Only the passes over X are float32: the fit lands where the float64 one does."""
    import torch

    from truthmap.analysis.evaluation import split_masks
    from truthmap.analysis.solver import fit_logistic

    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 300, 50)).astype(np.float16).astype(np.float32)  # a float16 store's values
    y = X[:, :, 0].sum(0) + rng.standard_normal(300) > 0
    train = split_masks(300, None, (0, 1, 2), y)
    low = fit_logistic(torch.tensor(X), y.astype(float), train, 1.0)
    high = fit_logistic(torch.tensor(X, dtype=torch.float64), y.astype(float), train, 1.0)
    assert low["logits"].dtype == torch.float64
    np.testing.assert_allclose(low["logits"].numpy(), high["logits"].numpy(), atol=1e-3)


def test_detection_fits_as_the_heatmap(tmp_path):
    """fit_layers (detection table, generalization) is the grid's fit: the same logits for the same rows."""
    import torch

    from truthmap.analysis.detection import fit_layers
    from truthmap.analysis.evaluation import split_masks
    from truthmap.analysis.solver import fit_logistic

    store, is_error = make_store(tmp_path, 0, n=400)
    acts = sample_major(store)
    masks = split_masks(400, None, (0, 42), is_error)
    fit = fit_layers(lambda layer: acts[:, layer, 3, :], LAYERS, is_error, masks)
    X = torch.tensor(np.stack([acts[:, layer, 3, :] for layer in range(LAYERS)]), dtype=torch.float32)
    grid = fit_logistic(X, is_error.astype(float), masks, 1.0)
    np.testing.assert_allclose(fit["logits"], grid["logits"].numpy(), atol=1e-8)
    assert fit["coef"].shape == (LAYERS, 2, HIDDEN)


def test_fit_cells_batches_by_the_memory_budget(monkeypatch):
    from truthmap.analysis import scheduler
    cells = [(layer, pos) for layer in range(3) for pos in range(4)]
    rng = np.random.default_rng(0)
    data = {cell: rng.standard_normal((200, 8)).astype(np.float16) for cell in cells}
    y = rng.random(200) < 0.4
    train = split_masks(200, None, (0,), y)
    monkeypatch.setattr(scheduler, "CELL_BUDGET_BYTES", 5 * 4 * 200 * 8)  # 5 float32 cells (more than 5 fits' state)
    batches = [batch for batch, _ in scheduler.fit_cells(data.__getitem__, cells, y, train, device="cpu", threads=1)]
    assert batches == [cells[:4], cells[4:8], cells[8:]]  # 3 batches of at most 5 cells, as equal as can be
    # two fits at once share the budget, and come back in the order of the cells
    batches = [batch for batch, _ in scheduler.fit_cells(data.__getitem__, cells, y, train, device="cpu", threads=2)]
    assert batches == [cells[i : i + 2] for i in range(0, 12, 2)]
    # fewer cells than a batch holds: still one batch per CPU
    three = scheduler.fit_cells(data.__getitem__, cells[:3], y, train, device="cpu", threads=2)
    batches = [batch for batch, _ in three]
    assert batches == [cells[:2], cells[2:3]]
    # 10 rows: a cell's activations are 320 bytes, its fits' state 8 x STATE_VECTORS x 1 split x 9: that decides
    few = {cell: values[:10] for cell, values in data.items()}
    monkeypatch.setattr(scheduler, "CELL_BUDGET_BYTES", 4 * 8 * scheduler.STATE_VECTORS * 9)
    y = np.arange(10) % 2 == 0
    train = split_masks(10, None, (0,), y)
    batches = [batch for batch, _ in scheduler.fit_cells(few.__getitem__, cells, y, train, device="cpu", threads=1)]
    assert batches == [cells[:4], cells[4:8], cells[8:]]


def test_fit_cells_names_the_cell_with_nan():
    from truthmap.analysis.scheduler import fit_cells

    X = np.ones((20, 4), dtype=np.float16)
    X[3, 1] = np.nan
    y = np.arange(20) % 2 == 0
    with pytest.raises(ProbeError, match=r"^cell 7 hold 1 NaN or inf values; extract the activations again\.$"):
        list(fit_cells(lambda cell: X, [7], y, y[None], where=lambda cell: f"cell {cell}"))


def test_busy_cpus_lower_the_threads(monkeypatch):
    """Another process spinning on the CPUs shows in busy_elsewhere; threads_to_use leaves its CPUs to it."""
    import subprocess
    import sys
    import time

    from truthmap.analysis import cpuload
    before = cpuload.cpu_sample()
    if before is None:
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        start = cpuload.cpu_sample()
        time.sleep(1.0)
        end = cpuload.cpu_sample()
    finally:
        spinner.wait()
    assert cpuload.busy_elsewhere(start, end) > 0.5  # the spinner's CPU (and whatever else runs here)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert cpuload.threads_to_use(2, 0.0) == 2
    assert cpuload.threads_to_use(2, 0.2) == 2  # a light load keeps both
    assert cpuload.threads_to_use(2, 0.9) == 1  # one CPU taken: one thread
    assert cpuload.threads_to_use(2, 3.0) == 1  # never fewer than one
    assert cpuload.threads_to_use(1, 0.0) == 1  # never more than asked
    assert cpuload.busy_elsewhere(None, end) == 0.0


def test_grid_fits_fewer_batches_at_once_beside_a_busy_process(tmp_path, monkeypatch):
    """On 2 free CPUs two batches are fitted at once, each on one thread; with one CPU taken by another process,
    one at a time. The results do not depend on it beyond float rounding, and the main thread keeps its setting."""
    import threading
    import time

    import torch

    from truthmap.analysis import cpuload

    from truthmap.analysis import scheduler
    running, most, threads_seen, lock = [0], [0], set(), threading.Lock()
    fit = scheduler.fit_logistic

    def watched(*a, **k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads_seen.add(torch.get_num_threads())
        time.sleep(0.05)  # long enough for a second batch to start beside it
        try:
            return fit(*a, **k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(scheduler, "fit_logistic", watched)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpuload, "busy_elsewhere", lambda before, after: 0.0)  # whatever else runs beside the test
    store, is_error = make_store(tmp_path, 0, n=100)
    monkeypatch.setattr(scheduler, "CELL_BUDGET_BYTES", 2 * 2 * 4 * 100 * HIDDEN)  # 2 cells a batch with 2 workers
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        free = probe_grid(sample_major(store), is_error, seeds=(0, 1), progress=False, device="cpu", n_boot=0)
        assert (most[0], threads_seen) == (2, {1})
        assert torch.get_num_threads() == 2
        most[0] = 0
        monkeypatch.setattr(cpuload, "busy_elsewhere", lambda before, after: 1.0)  # one CPU taken by others
        busy = probe_grid(sample_major(store), is_error, seeds=(0, 1), progress=False, device="cpu", n_boot=0)
        assert (most[0], threads_seen) == (1, {1})
        np.testing.assert_allclose(busy.aucs, free.aucs, atol=1e-6)
        threads_seen.clear()
        probe_grid(sample_major(store), is_error, seeds=(0,), progress=False, device="cpu", threads=1, n_boot=0)
        assert threads_seen == {1}  # threads given: one fit at a time on that one
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_worker_that_finishes_starts_the_batch_loaded_ahead_while_an_older_batch_still_runs(tmp_path, monkeypatch):
    """Two workers, the first batch slow: the second worker goes on to the third batch without waiting for the
    first, never more than two fits run at once, and the batches are still yielded in the order of the cells."""
    import threading
    import time

    import torch

    from truthmap.analysis import cpuload

    from truthmap.analysis import scheduler
    events, lock = [], threading.Lock()
    fit = scheduler.fit_logistic

    def watched(X, *a, **k):
        with lock:
            call = sum(kind == "start" for kind, _ in events)
            events.append(("start", call))
        time.sleep(0.6 if call == 0 else 0.02)
        try:
            return fit(X, *a, **k)
        finally:
            with lock:
                events.append(("end", call))

    monkeypatch.setattr(scheduler, "fit_logistic", watched)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpuload, "busy_elsewhere", lambda before, after: 0.0)
    store, is_error = make_store(tmp_path, 0, n=60)
    monkeypatch.setattr(scheduler, "CELL_BUDGET_BYTES", 2 * 2 * 4 * 60 * HIDDEN)  # 2 cells a batch with 2 workers
    X = sample_major(store)
    cells = [(layer, pos) for layer in range(X.shape[1]) for pos in range(X.shape[2])]
    train = split_masks(len(is_error), None, (0,), is_error)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yielded = [batch for batch, _ in scheduler.fit_cells(lambda c: X[:, c[0], c[1], :], cells, is_error, train)]
    finally:
        torch.set_num_threads(before)
    assert [cell for batch in yielded for cell in batch] == cells and len(yielded) >= 4
    assert events.index(("start", 2)) < events.index(("end", 0))
    running = np.cumsum([1 if kind == "start" else -1 for kind, _ in events])
    assert running.max() == 2


def test_preconditioner_inverse_falls_back_to_float64_when_float32_loses_the_identity():
    import torch

    from truthmap.analysis.solver import _inverse_of_identity_plus

    v = torch.tensor([[1.0], [2.0], [-1.0], [0.5]])
    gram, c = v @ v.T, 1e12  # in float32, I + c * gram rounds to the singular c * gram
    assert torch.linalg.cholesky_ex(torch.eye(4) + c * gram).info > 0
    inverse = _inverse_of_identity_plus(c, gram)
    exact = torch.eye(4, dtype=torch.float64) - c * (v @ v.T).double() / (1 + c * float(v.square().sum()))
    assert inverse.dtype == torch.float32
    torch.testing.assert_close(inverse.double(), exact, atol=1e-4, rtol=0)  # condition number 6e12: 1e-16 x that
    small = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # the usual case: float32 throughout
    torch.testing.assert_close(_inverse_of_identity_plus(0.5, small) @ (torch.eye(2) + 0.5 * small), torch.eye(2))


def test_finished_cells_leave_the_batch_for_the_last_ones_in_place():
    import torch

    from truthmap.analysis.solver import _refill, _refill_moves

    batch = torch.arange(6.0)[:, None].repeat(1, 3)  # cell i holds i
    memory = batch.data_ptr()
    keep = torch.tensor([False, True, False, True, False, True])  # cells 0, 2 and 4 finished
    left = _refill(batch, _refill_moves(keep))
    assert left[:, 0].tolist() == [3.0, 1.0, 5.0]  # the kept cells beyond the first 3 (3, 5) fill its holes (0, 2)
    assert left.data_ptr() == memory  # no new tensor
    assert _refill(torch.arange(3), _refill_moves(torch.tensor([True, True, True]))).tolist() == [0, 1, 2]
