"""Cost beside accuracy (costs.py): seconds recorded per stage, a cost per method, the table and the plot."""

from pathlib import Path

import pandas as pd
import pytest
from test_detection import fake_run

from truthmap.analysis.costs import add_costs
from truthmap.rundir import record_seconds
from truthmap.analysis.detection import evaluate_dataset, write_detection_table
from truthmap.rundir import read_json, write_json


def test_costs_per_method_in_the_table_and_the_plot(tmp_path):
    train_run, _ = fake_run(tmp_path, "train", 160, 0)
    test_run, _ = fake_run(tmp_path, "test", 80, 1)
    record_seconds(test_run.costs, "baselines", 8.0, 80)  # 0.1 s per answer for both p(True) variants
    record_seconds(test_run.costs, "extract", 2.0, 80)
    assert read_json(test_run.costs)["extract"] == {"seconds_per_answer": 0.025, "answers": 80}
    results = add_costs(evaluate_dataset("toy", train_run, test_run, "mlp", (0, 5)), test_run)
    cost = {r["method"]: r["cost"] for r in results}
    assert cost["p(True)"] == {"forward_passes": 1, "generated_tokens": 0.0, "seconds": 0.05}
    assert cost["Logits-min-exact"] == cost["Text @ answer"] == {"forward_passes": 0, "generated_tokens": 0.0,
                                                                   "seconds": 0.0}
    assert cost["Probe @ exact_answer_last"] == {"forward_passes": 0, "generated_tokens": 0.0, "seconds": 0.025}

    written = write_detection_table(results, tmp_path / "tables", "toy table")
    table = pd.read_csv(tmp_path / "tables" / "cost_table.csv")
    probe = table.set_index("method").loc["Probe @ exact_answer_last"]
    assert probe["seconds"] == 0.025 and probe["auc_low"] <= probe["auc"] <= probe["auc_high"]
    md = Path(written["md"]).read_text()
    row = next(r for r in results if r["method"] == "Probe @ exact_answer_last")
    assert (f"| toy | Probe @ exact_answer_last | {row['auc_mean']:.3f} [{row['auc_low']:.3f}, {row['auc_high']:.3f}]"
            " | 0 | 0.0 | 0.0 | 0.0250 |") in md
    costs = md[md.index("AUC and cost per answer"):]  # the cost table, after the AUC and metrics tables
    assert "| toy | p(True) | " in costs and costs.count("\n| toy | ") == len(results)
    assert (tmp_path / "tables" / "auroc_vs_cost.png").stat().st_size > 1000


def test_a_probe_read_while_generating_costs_nothing_extra(tmp_path):
    run, _ = fake_run(tmp_path, "test", 40, 1)
    write_json(run.run_json, read_json(run.run_json) | {"activations_while_generating": "mlp"})
    rows = add_costs([{"method": "Probe @ -1"}, {"method": "p(True)-exact"}, {"method": "Other", "cost": {"x": 1}}],
                     run)
    assert rows[0]["cost"]["seconds"] == 0.0
    assert rows[1]["cost"]["seconds"] is None  # the baselines' seconds were not recorded
    assert rows[2]["cost"] == {"x": 1}


@pytest.mark.parametrize("stage", ["baselines", "extract"])
def test_record_seconds_keeps_the_other_stages(tmp_path, stage):
    path = tmp_path / "costs.json"
    record_seconds(path, "answers", 1.0, 4)
    record_seconds(path, stage, 3.0, 0)  # no answers: per answer over 1, no division by zero
    assert read_json(path) == {"answers": {"seconds_per_answer": 0.25, "answers": 4},
                               stage: {"seconds_per_answer": 3.0, "answers": 0}}
