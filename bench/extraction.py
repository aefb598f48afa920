"""Activation extraction and probe fitting with the default model: a table of speed, memory and disk.

    python bench/extraction.py [--samples 64] [--probe-samples 1000]

Extraction: samples per second at batch sizes 1 and 16 over the same answers (the built-in dataset's questions,
each followed by a generated-length answer), peak RSS growth, bytes on disk per sample. Probes: seconds to fit
all 30 x 15 cells x 5 seeds on a store of --probe-samples rows (random activations, random labels: the fit cost
does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def answers_table(lm, n: int):
    import pandas as pd

    from truthmap import build_prompt, get_spec, load_records
    from truthmap.lm.models import encode_prompt
    from truthmap.rundir import POSITIONS, position_column
    from truthmap.stages.locate import token_positions

    spec = get_spec("geography")
    rows = []
    for record in load_records("geography", "train", n_samples=n, seed=0):
        prompt = encode_prompt(lm.tokenizer, build_prompt(spec, record, "instruct"), True)
        answer = lm.tokenizer(f"I believe the answer is {record.answers[0]}, as far as I know.", add_special_tokens=False)
        found = token_positions(len(prompt), len(answer["input_ids"]), (4, 5))
        rows.append({"prompt_ids": prompt, "answer_ids": answer["input_ids"]} | {position_column(p): found[p] for p in POSITIONS})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--probe-samples", type=int, default=1000)
    parser.add_argument("--site", default="mlp")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import numpy as np

    from truthmap import load_model, probe_grid
    from truthmap.stages.activations import extract_activations  # the extraction pass itself is what this measures

    lm = load_model("smollm2", device="cpu", dtype="float32")
    table = answers_table(lm, args.samples)
    base_rss = peak_rss_mb()
    print(f"model=smollm2 site={args.site} samples={len(table)} mean tokens/sample={table.prompt_ids.map(len).mean() + table.answer_ids.map(len).mean():.0f}")
    print(f"{'stage':<28} {'value':>10}  unit")
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in (1, 16):
            started = time.perf_counter()
            store = extract_activations(lm, table, Path(tmp) / f"b{batch_size}", args.site, batch_size, {})
            rate = len(table) / (time.perf_counter() - started)
            print(f"{f'extract, batch {batch_size}':<28} {rate:>10.2f}  samples/s")
        disk = (store / "acts.f16").stat().st_size / len(table)
        print(f"{'extract, peak RSS growth':<28} {peak_rss_mb() - base_rss:>10.0f}  MB")
        print(f"{'store on disk':<28} {disk:>10.0f}  bytes/sample")

        n, layers, positions, hidden = args.probe_samples, 30, 15, 576
        path = Path(tmp) / "probe.f16"
        acts = np.memmap(path, dtype=np.float16, mode="w+", shape=(layers, positions, n, hidden))
        acts[:] = np.random.default_rng(0).standard_normal(acts.shape, dtype=np.float32)
        acts.flush()
        labels = np.random.default_rng(1).random(n) < 0.4
        started = time.perf_counter()
        probe_grid(acts.transpose(2, 0, 1, 3), labels, progress=False)
        print(f"{f'fit {layers}x{positions} cells x 5 seeds':<28} {time.perf_counter() - started:>10.1f}  s (n={n})")
        print(f"{'peak RSS (whole process)':<28} {peak_rss_mb():>10.0f}  MB")


if __name__ == "__main__":
    main()
