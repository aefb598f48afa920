"""`truthmap answer` against `truthmap generate` on the same questions: seconds per answer, and the answers compared.

    python bench/answer.py --runs-dir runs/results [--dataset geography] [--n 1000] [--tokens=-1,exact_answer_last]

Fits a detector per token on the train run of --dataset in --runs-dir (made by `truthmap run` or `make results`;
fit-detector is skipped when its directory exists), then, with one model loaded once, times on the same N test
questions: `generate` (answers, labels, exact answers and the activations recorded while decoding, into a
scratch run directory) and `answer` with each detector (the detector's cell read from the same decoding; at an
exact-answer token the extractor runs on each batch). Prints seconds per answer, the ratio to generate, whether
the answers are identical, and the selective accuracy at the 5 % false-positive threshold. Nothing else should run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path


def fitted(config, token: str, directory: Path) -> Path:
    import truthmap

    if not (directory / "config.json").exists():
        truthmap.fit_detector(config, token=token, layer=None, out=str(directory))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs/results")
    parser.add_argument("--dataset", default="geography")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--tokens", default="-1,exact_answer_last")
    parser.add_argument("--data-dir", default=os.environ.get("TRUTHMAP_DATA_DIR"))
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import pandas as pd

    import truthmap

    train = truthmap.RunConfig(model=args.model, dataset=args.dataset, split="train", runs_dir=args.runs_dir,
                               data_dir=args.data_dir)
    detectors = {t: fitted(train, t, Path(args.runs_dir) / "bench-answer" / f"{args.dataset}-{t}")
                 for t in args.tokens.split(",")}
    lm = truthmap.load_model(args.model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as scratch:
        test = dataclasses.replace(train, split="test", n_samples=args.n, runs_dir=scratch)
        spec, records = truthmap.load_config_records(test)
        started = time.perf_counter()
        generated = pd.read_parquet(truthmap.generate(test, lm).answers)
        base = (time.perf_counter() - started) / len(records)
    print(f"model={args.model} dataset={args.dataset} test questions={len(records)}")
    print(f"{'command':<32} {'s/answer':>9} {'ratio':>6} {'same answers':>13} {'kept':>6} {'acc kept':>9} {'acc all':>8}")
    print(f"{'generate':<32} {base:>9.3f} {1:>6.2f}")
    for token, directory in detectors.items():
        started = time.perf_counter()
        answered = truthmap.answer(detector=directory, records=records, spec=spec, lm=lm, max_fpr=0.05)
        seconds = (time.perf_counter() - started) / len(records)
        same = (answered.rows.set_index("id")["answer"] == generated.set_index("id")["answer"]).sum()
        kept = answered.selective or {}
        print(f"{'answer (' + token + ')':<32} {seconds:>9.3f} {seconds / base:>6.2f} {f'{same}/{len(records)}':>13} "
              f"{kept.get('share_kept', float('nan')):>6.2f} {kept.get('accuracy_kept', float('nan')):>9.3f} "
              f"{kept.get('accuracy_all', float('nan')):>8.3f}")


if __name__ == "__main__":
    main()
