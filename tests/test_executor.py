"""`--executor ray`: shards over Ray workers merge into exactly what a local run writes."""

import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from truthmap.cli import app
from truthmap.config import RunConfig
from truthmap.errors import ConfigError
from truthmap.executor import deal, import_ray, plan_workers, runner, shard_batches


def test_deal_gives_whole_batches_round_robin():
    assert deal(list(range(10)), 3, 2) == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
    assert deal([7, 8], 4, 3) == [[7, 8], [], []]
    assert shard_batches([[0, 1], [2], [3, 4], [5]], 3) == [[[0, 1], [5]], [[2]], [[3, 4]]]


def test_the_local_runner_runs_the_stage_function_on_one_shard_of_every_batch():
    loaded = []
    with runner(RunConfig(), lambda: loaded.append("state") or "state", n_batches=2) as workers:
        assert workers.one(lambda state: state.upper()) == "STATE"
        got = workers.map(lambda state, batches, shard: (state, batches, shard), [[0, 1], [2]], "Working")
    assert got == [("state", [[0, 1], [2]], None)] and loaded == ["state"]  # loaded once


def test_plan_workers_follows_the_cluster():
    config = RunConfig(executor="ray")
    assert plan_workers(config, {"CPU": 8.0}, n_batches=100) == (8, 0)
    assert plan_workers(config, {"CPU": 8.0, "GPU": 2.0}, n_batches=100) == (2, 1)
    assert plan_workers(RunConfig(device="cpu"), {"CPU": 8.0, "GPU": 2.0}, n_batches=100) == (8, 0)
    assert plan_workers(config, {"CPU": 8.0}, n_batches=3) == (3, 0)  # no worker without a batch
    with pytest.raises(ConfigError, match=r"^--workers 4 needs 4 CPUs, and the Ray cluster has 2\.$"):
        plan_workers(RunConfig(workers=4), {"CPU": 2.0}, n_batches=100)


def test_executor_is_validated_and_ray_missing_says_how_to_install(monkeypatch):
    with pytest.raises(ConfigError, match=r"^Unknown executor 'dask'\. Available: local, ray\.$"):
        RunConfig(executor="dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    with pytest.raises(ConfigError, match=r'needs Ray, which is not installed\. Install it with: pip install "truthmap\[ray\]"$'):
        import_ray()


@pytest.fixture
def small_study(tmp_path):
    """A saved tiny model and 20 questions (16 in the train split), about half of whose greedy answers count as right."""
    from tiny import half_right_qa, save_tiny_model, tiny_lm

    lm = tiny_lm(seed=3)
    model_dir = save_tiny_model(lm, tmp_path / "tiny-model")
    questions = [f"What is the capital of {word}? {i}" for i, word in enumerate(["France", "Norway", "Peru", "Chile"] * 5)]
    path = half_right_qa(lm, tmp_path / "qa.csv", questions, max_new_tokens=12)
    return model_dir, path


def test_ray_run_writes_what_the_local_run_writes(small_study, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'truthmap[ray]')")
    import torch

    model_dir, data = small_study
    common = ["--model", str(model_dir), "--dataset", "custom", "--batch-size", "4"]
    # Two extraction tries: the second one samples, and must draw the same tokens on a worker as here.
    generate = ["generate", *common, "--custom-path", str(data), "--extraction-tries", "2", "--max-new-tokens", "12"]
    runs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    ray_options = ["--executor", "ray", "--workers", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: the float rounding of a forward pass may depend on the threads
    try:
        for name, extra in (("local", []), ("ray", ray_options)):
            # generate records the mlp store while generating; extract adds resid by a second pass.
            for command in (generate, ["extract", *common, "--site", "resid"]):
                result = CliRunner().invoke(app, [*command, "--runs-dir", str(runs[name]), *extra])
                assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()

    local, distributed = (runs[name] / "tiny-model" / "custom" / "train" for name in ("local", "ray"))
    answers = pd.read_parquet(local / "answers.parquet")
    assert len(answers) == 16 and 0 < answers["correct"].sum() < 16  # the train split: 80 % of the questions
    pd.testing.assert_frame_equal(pd.read_parquet(distributed / "answers.parquet"), answers)
    from truthmap.stages.activations import open_store

    for site, one_pass in (("mlp", True), ("resid", False)):
        for name in ("meta.json", "acts.f16", "embed.f16"):
            assert (distributed / "activations" / site / name).read_bytes() == (local / "activations" / site / name).read_bytes()
        acts, meta = open_store(distributed / "activations" / site)
        np.testing.assert_array_equal(acts, open_store(local / "activations" / site)[0])
        assert meta["written"] == 16 and acts.shape[:3] == (16, 2, 15) and meta["one_pass"] is one_pass
    shards = distributed / "work" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["0-of-2", "1-of-2"]
    for shard in ("0-of-2", "1-of-2"):
        assert len(list((shards / shard / "generations").glob("part-*.parquet"))) > 0
        assert sorted(p.name for p in (shards / shard / "activations").iterdir()) == ["mlp", "resid"]
