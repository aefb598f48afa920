"""batches.run_batches: the one resumable batch loop; stages.stage_done: the one resume check."""

import json

import pandas as pd
import pytest

from truthmap.batches import load_in_order, run_batches
from truthmap.errors import StoreError
from truthmap.runstate import Checkpoints

WORDS = ["a", "bbbb", "cc", "dddd", "e", "fff"]


def words_frame(batch):
    return pd.DataFrame({"id": batch, "length": [len(w) for w in batch]})


def test_batches_go_longest_first_with_ties_in_their_order(tmp_path):
    seen = []
    run_batches(WORDS, lambda b: seen.append(b) or words_frame(b), Checkpoints(tmp_path, {}), batch_size=2,
                description="words", length=len)
    assert seen == [["bbbb", "dddd"], ["fff", "cc"], ["a", "e"]]
    assert list(load_in_order(Checkpoints(tmp_path, {}), WORDS)["length"]) == [1, 4, 2, 4, 1, 3]


def test_a_killed_run_resumes_with_the_batches_it_had_not_checkpointed(tmp_path):
    seen = []

    def dies_on_second(batch):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(batch)
        return words_frame(batch)

    with pytest.raises(KeyboardInterrupt):
        run_batches(WORDS, dies_on_second, Checkpoints(tmp_path, {}), batch_size=2, description="w", length=len)
    again = []
    ran = run_batches(WORDS, lambda b: again.append(b) or words_frame(b), Checkpoints(tmp_path, {}), batch_size=2,
                      description="w", length=len)
    assert seen == [["bbbb", "dddd"]] and again == [["fff", "cc"], ["a", "e"]] and ran == 2
    assert set(load_in_order(Checkpoints(tmp_path, {}), WORDS).index) == set(WORDS)


def test_keys_done_and_a_custom_cut(tmp_path):
    items = list(range(5))
    seen = []
    run_batches(items, lambda b: seen.append(b), Checkpoints(tmp_path, {}), batch_size=99, description="n",
                key=lambda i: f"k{i}", done={"k1", "k3"}, cut=lambda todo: [[i] for i in todo])
    assert seen == [[0], [2], [4]]  # work returning None writes no checkpoint
    assert Checkpoints(tmp_path, {}).parts() == []


def test_checkpoints_of_other_settings_are_refused(tmp_path):
    Checkpoints(tmp_path, {"model": "a"})
    with pytest.raises(StoreError, match="with model='a', not 'b'"):
        run_batches(WORDS, words_frame, Checkpoints(tmp_path, {"model": "b"}), batch_size=2, description="w")


def test_stage_done_refuses_or_redoes_on_other_settings(tmp_path):
    from truthmap.config import RunConfig, run_dir
    from truthmap.runner.contract import Stage, stage_done

    config = RunConfig(runs_dir=str(tmp_path))
    made = run_dir(config).path / "made.json"

    def stage(on_mismatch):
        return Stage("s", (), ("made",), made=lambda c, r: json.loads(made.read_text()) if made.exists() else None,
                     wanted=lambda c, r: {"site": c.site}, run=None, on_mismatch=on_mismatch)

    assert not stage_done(stage("refuse"), config)  # nothing made yet
    made.parent.mkdir(parents=True)
    made.write_text(json.dumps({"site": "mlp"}))
    assert stage_done(stage("refuse"), config) and stage_done(stage("redo"), config)
    made.write_text(json.dumps({"site": "resid"}))
    assert not stage_done(stage("redo"), config)
    with pytest.raises(StoreError, match=r"was made with site='resid', not 'mlp'\. Use another --runs-dir"):
        stage_done(stage("refuse"), config)
