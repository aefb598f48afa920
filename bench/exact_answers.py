"""Locating exact answers with the default model: seconds per extraction, share located, agreement with gold.

    python bench/exact_answers.py [--questions 96] [--batch-size 16] [--dataset geography] [--data-dir DIR]

Generates greedy answers to the dataset's first N train questions once, labels them, then locates the exact
answer of every answer (right and wrong alike, as `--locate blind` does) with three extractors, in one process:
- constrained, with the few-shot prefix's KV cache computed once (the default);
- constrained, encoding every prompt whole (what the cache saves);
- free-form, one greedy try (the extractor before the constrained one; `--extractor free`).
For each: seconds per answer, the share of wrong answers (NO ANSWER aside) with a valid exact answer, and on right
answers the agreement with the gold alias (same first and last token; overlapping).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def answers(lm, dataset: str, split: str, n: int, data_dir: str | None, batch_size: int):
    """The greedy answers of a run made by the public API (pipeline.generate, without activations), labelled."""
    import pandas as pd

    import truthmap
    from truthmap import pipeline
    with tempfile.TemporaryDirectory() as tmp:
        config = truthmap.RunConfig(dataset=dataset, split=split, n_samples=n, data_dir=data_dir, runs_dir=tmp,
                                    batch_size=batch_size, prompt_style="instruct")
        _, records = truthmap.load_config_records(config)
        frame = pd.read_parquet(pipeline.generate(config, lm, activations=False).answers)
    frame["prompt_ids"] = [list(p) for p in frame["prompt_ids"]]
    return records, frame


def measure(lm, records, frame, batch_size: int, method: str, cached: bool) -> dict:
    from truthmap.lm.decoding import Prefix
    from truthmap.runstate import Checkpoints
    from truthmap.stages import locate
    from truthmap.stages.locate import exact_answer_columns, extract_spans, gold_agreement, gold_spans

    rows = [(r.id, r.question, a, list(ids)) for r, a, ids in zip(records, frame["answer"], frame["answer_ids"])]
    real_prefix = locate.extraction_prefix
    if not cached:
        locate.extraction_prefix = lambda lm: Prefix([-1], None)  # matches no prompt: every prompt encoded whole
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            spans = extract_spans(lm, rows, batch_size, Checkpoints(tmp, {}), method, tries=1, seed=0)
            seconds = time.perf_counter() - started
    finally:
        locate.extraction_prefix = real_prefix
    golds = gold_spans(records, list(frame["answer"]), list(frame["correct"]))
    table = frame.assign(**exact_answer_columns(frame, lm.tokenizer, spans, golds))
    wrong = ~table["correct"] & (table["exact_answer_source"] != "no_answer")
    return {"seconds": seconds, "per_answer": seconds / len(rows), "wrong_located": table["exact_answer_valid"][wrong].mean(),
            "wrong": int(wrong.sum()), "no_answer": int((table["exact_answer_source"] == "no_answer").sum()),
            **gold_agreement(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dataset", default="geography")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    from truthmap.lm.models import load_model

    lm = load_model("smollm2", device="cpu", dtype="float32")
    records, frame = answers(lm, args.dataset, args.split, args.questions, args.data_dir, args.batch_size)
    print(f"model=smollm2 dataset={args.dataset} answers={len(frame)} correct={int(frame['correct'].sum())} "
          f"batch={args.batch_size}")
    print(f"{'extractor':<30} {'s/answer':>9} {'wrong located':>14} {'NO ANSWER':>10} {'gold: same':>11} {'overlap':>8}")
    for name, method, cached in [("constrained, cached prefix", "constrained", True),
                                 ("constrained, whole prompts", "constrained", False),
                                 ("free, 1 try, cached prefix", "free", True)]:
        m = measure(lm, records, frame, args.batch_size, method, cached)
        print(f"{name:<30} {m['per_answer']:>9.3f} {m['wrong_located']:>13.0%} {m['no_answer']:>10} "
              f"{m['same_share']:>11.0%} {m['overlapping_share']:>8.0%}")


if __name__ == "__main__":
    main()
