"""Round trip of `truthmap import`, with timings: generate a run, write its answers as an engine would (JSONL),
import them into a new run, and compare the two runs stage by stage.

    python bench/import_roundtrip.py [--model smollm2] [--dataset geography] [--n-samples 50] [--runs-dir /tmp/rt]

Prints: labels and exact-answer positions equal or not, the largest difference of an answer token's
log-probability, the largest difference of a heatmap cell's AUC, how many answers re-encode from their text to the
generated tokens (without answer_token_ids), and the seconds of each stage of both runs (one model load, not
counted). Both `generate` and `import` write the activation store in their own pass (decoding, or the
teacher-forced pass that scores the answer tokens), so their "answers" stage includes the activations and the
"activations" stage (`extract`) finds the store done. Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="geography")
    parser.add_argument("--split", default="train")
    parser.add_argument("--n-samples", type=int, default=50)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs-dir", default="runs-roundtrip")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import numpy as np
    import pandas as pd

    import truthmap
    from truthmap import pipeline
    from truthmap.rundir import POSITIONS, position_column  # the answers table's schema

    root = Path(args.runs_dir)
    config = truthmap.RunConfig(model=args.model, dataset=args.dataset, split=args.split, n_samples=args.n_samples,
                                data_dir=args.data_dir, batch_size=args.batch_size, runs_dir=str(root / "generated"))
    lm = truthmap.load_model(args.model, config.device, config.dtype)
    seconds = {"generated": {}, "imported": {}}

    def timed(kind, stage, call):
        started = time.perf_counter()
        result = call()
        seconds[kind][stage] = round(time.perf_counter() - started, 1)
        return result

    generated = timed("generated", "answers", lambda: pipeline.generate(config, lm))
    timed("generated", "activations", lambda: pipeline.extract(config, lm))
    timed("generated", "probes", lambda: pipeline.probe(config))
    timed("generated", "report", lambda: truthmap.write_report(generated.path))

    table = pd.read_parquet(generated.answers)
    path = root / "answers.jsonl"
    pd.DataFrame({
        "id": table["id"], "question": table["question"], "prompt": table["prompt"], "gold": table["gold"].map(list),
        "answer": table["answer"], "answer_token_ids": table["answer_ids"].map(lambda ids: [int(t) for t in ids]),
    }).to_json(path, orient="records", lines=True, force_ascii=False)
    imported_config = dataclasses.replace(config, runs_dir=str(root / "imported"))
    summary = timed("imported", "answers",
                    lambda: pipeline.import_answers(imported_config, truthmap.ImportSource(str(path)), lm))
    imported = truthmap.run_dir(imported_config)
    timed("imported", "activations", lambda: pipeline.extract(imported_config, lm))
    timed("imported", "probes", lambda: pipeline.probe(imported_config))
    timed("imported", "report", lambda: truthmap.write_report(imported.path))

    after = pd.read_parquet(imported.answers)
    positions = [position_column(p) for p in POSITIONS]
    logprob_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max(initial=0))
                       for a, b in zip(table["answer_logprobs"], after["answer_logprobs"]))
    heatmaps = [pd.read_csv(run.probes(config.site) / "heatmap.csv") for run in (generated, imported)]
    re_encoded = sum(list(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) == list(ids)
                     for a, ids in zip(table["answer"], table["answer_ids"]))
    result = {
        "answers": len(table),
        "imported": summary["imported"],
        "labels_equal": bool((table["correct"].to_numpy() == after["correct"].to_numpy()).all()),
        "exact_positions_equal": bool((table[positions].to_numpy() == after[positions].to_numpy()).all()),
        "max_logprob_diff": logprob_diff,
        "max_auc_diff": float((heatmaps[0]["auc_mean"] - heatmaps[1]["auc_mean"]).abs().max()),
        "answers_whose_text_re_encodes_to_the_generated_tokens": f"{re_encoded} of {len(table)}",
        "seconds": seconds,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
