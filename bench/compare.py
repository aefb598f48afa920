"""truthmap against a per-sample pipeline in the style of the paper's scripts: time, memory and AUCs.

    python bench/compare.py [--n 250,1000] [--big 10000] [--dataset winobias] [--data-dir DIR] [--model smollm2]

For each size in --n, on the same model, questions and (layer, token) cells, in this one process:
- truthmap: `pipeline.generate` (batched greedy answers, labels, exact answers, and the 15 probed positions of
  every layer recorded while the answers are decoded, float16 memmap), `pipeline.extract` (finds them done) and
  `pipeline.probe` (every cell fitted at once by batched L-BFGS);
- truthmap's two-pass store, as before activations were recorded while generating: `pipeline.extract` on a copy
  of the answers (batched forward passes with hooks that keep the 15 positions), then `pipeline.probe`; the
  largest AUC difference from the one-pass store shows what decoding with a KV cache changes (float rounding);
- per-sample, as the reference scripts (Orgad et al. 2025) do it: one `generate` call per question with
  `output_scores=True`, every step's scores over the whole vocabulary kept in RAM; one forward pass per answer
  (`output_hidden_states=True`) with hooks that keep every layer's output over the whole sequence, float32, all
  in a list in RAM; one scikit-learn probe per (layer, token) cell and seed.
Only the mechanics differ: the per-sample probes read the positions of truthmap's answers table (so no second
exact-answer extraction), and use truthmap's splits (`grouped_split`, same seeds) and its model, a
StandardScaler + LogisticRegression(C=1) (the reference fits an unscaled LogisticRegression with 100 iterations,
which does not converge on raw activations).

Per size it prints the wall time of each stage, peak RSS and working memory (peak RSS during the pipeline minus
the RSS when it started, the model already loaded; also for anonymous memory only, without the file pages of the
memmapped store and model weights, which the kernel can drop at will), the largest AUC difference over the
cells, the largest AUC difference between truthmap's one-pass and two-pass stores, and the time of truthmap's
second-pass extraction against a plain batched forward pass over the same sequences (same batches, no hooks,
nothing kept). Then truthmap alone at --big samples (--big-dataset), and the targets of the
issue, met or not. Memory is sampled every 10 ms by a thread reading /proc/self/status; freed memory is handed
back to the OS (malloc_trim) between pipelines, so one pipeline's leftovers do not hide the next one's growth.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MB = 2**20
STAGES = ("generate", "extract", "probe")


# ------------------------------------------------------------------------------------------------- memory


class MemorySampler(threading.Thread):
    """Peak RSS (all, and anonymous only) since the last reset, read every `interval` seconds."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = self.peak_anon = 0

    @staticmethod
    def now() -> tuple[int, int]:
        """(RSS, anonymous RSS) in bytes."""
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields.get("RssAnon", fields["VmRSS"])

    def reset(self) -> None:
        self.peak, self.peak_anon = self.now()

    def run(self) -> None:
        while True:
            rss, anon = self.now()
            self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)
            time.sleep(self.interval)


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap; give it back so RSS shows the next growth
    except (OSError, AttributeError):
        pass


@dataclass
class Measured:
    """One pipeline's run: seconds and peak memory per stage, RSS when it started."""

    name: str
    start: tuple[int, int] = (0, 0)
    seconds: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)
    peak_anon: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def working(self) -> int:
        return max(self.peak.values()) - self.start[0]

    @property
    def working_anon(self) -> int:
        return max(self.peak_anon.values()) - self.start[1]


@contextmanager
def stage(sampler: MemorySampler, measured: Measured, name: str):
    sampler.reset()
    started = time.perf_counter()
    yield
    measured.seconds[name] = time.perf_counter() - started
    time.sleep(2 * sampler.interval)  # one more sample of the stage's end
    measured.peak[name], measured.peak_anon[name] = sampler.peak, sampler.peak_anon
    # A line per stage as it ends: a run of hours killed midway still leaves what it measured in the log.
    print(f"  {measured.name} {name}: {measured.seconds[name]:.1f} s, working "
          f"{(sampler.peak - measured.start[0]) / MB:.0f} MB ({(sampler.peak_anon - measured.start[1]) / MB:.0f} MB "
          f"anonymous)", flush=True)


def warm_up(lm, configs) -> None:
    """Import what the pipelines import, load their questions and run the model once (its weights are mapped
    from disk and only become resident when first used): costs paid once, not by whichever pipeline runs first."""
    import matplotlib.figure  # noqa: F401  (the heatmap)
    import pyarrow.parquet  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch

    from truthmap import pipeline  # noqa: F401
    from truthmap.analysis import heatmap, probes  # noqa: F401
    from truthmap.stages import activations  # noqa: F401

    for config in configs:
        pipeline.load_config_records(config)
    with torch.inference_mode():
        lm.model(torch.tensor([[lm.tokenizer.eos_token_id] * 8], device=lm.model.device))


def begin(sampler: MemorySampler, name: str) -> Measured:
    release_freed_memory()
    return Measured(name, start=sampler.now())


# ------------------------------------------------------------------------------------------------- truthmap


def run_truthmap(config, lm, sampler):
    """truthmap's three stages; returns the measurements, the answers table and the mean AUC per cell (or None)."""
    import pandas as pd

    from truthmap import pipeline
    measured = begin(sampler, "truthmap")
    run = pipeline.run_dir(config)
    if run.answers.exists() or (run.generation_parts.exists() and any(run.generation_parts.iterdir())):
        measured.notes.append(f"resumed from the finished work in {run.path}: times and memory are the rest's only")
    with stage(sampler, measured, "generate"):
        run = pipeline.generate(config, lm)
    with stage(sampler, measured, "extract"):
        pipeline.extract(config, lm)  # done: generate recorded the activations
    return measured, pd.read_parquet(run.answers), probed_auc(config, sampler, measured)


def run_two_pass(config, lm, sampler):
    """The same answers' activations read by a second forward pass (`pipeline.extract` on a copy of the run
    without its store), then probed: measurements and the mean AUC per cell (or None)."""
    import dataclasses
    import shutil

    from truthmap import pipeline
    run = pipeline.run_dir(config)
    copy = dataclasses.replace(config, runs_dir=str(Path(config.runs_dir) / "two-pass"))
    target = pipeline.run_dir(copy)
    target.path.mkdir(parents=True, exist_ok=True)
    for name in ("answers.parquet", "run.json"):
        shutil.copy(run.path / name, target.path / name)
    measured = begin(sampler, "two-pass")
    with stage(sampler, measured, "extract"):
        pipeline.extract(copy, lm)
    return measured, probed_auc(copy, sampler, measured)


def probed_auc(config, sampler, measured):
    """pipeline.probe, timed as the probe stage; the mean AUC per cell [layers, positions], or None."""
    import pandas as pd

    from truthmap import pipeline
    from truthmap.errors import ProbeError
    from truthmap.rundir import POSITIONS

    with stage(sampler, measured, "probe"):
        try:
            pipeline.probe(config)
        except ProbeError as error:
            measured.notes.append(f"probe skipped: {error}")
            return None
    cells = pd.read_csv(pipeline.run_dir(config).probes(config.site) / "heatmap.csv")
    cells = cells[cells["layer"].astype(str) != "embed"].assign(layer=lambda t: t["layer"].astype(int))
    return cells.pivot(index="layer", columns="token", values="auc_mean")[list(POSITIONS)].to_numpy()


def plain_forward_seconds(lm, table, batch_size: int) -> float:
    """A batched forward pass over the same sequences and batches as `extract`, without hooks, keeping nothing."""
    import torch

    from truthmap.lm.decoding import left_pad
    from truthmap.stages.activations import extraction_batches

    sequences = [list(p) + list(a) for p, a in zip(table["prompt_ids"], table["answer_ids"])]
    started = time.perf_counter()
    for batch in extraction_batches([len(s) for s in sequences], batch_size):
        input_ids, attention_mask = left_pad([sequences[i] for i in batch], lm.tokenizer.pad_token_id)
        with torch.inference_mode():
            lm.model.base_model(input_ids=input_ids.to(lm.model.device), attention_mask=attention_mask.to(lm.model.device))
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------- per sample


def per_sample_generate(lm, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list]:
    """One `generate` per prompt, keeping every step's scores ([steps, vocab] float32) as the reference does."""
    import torch

    from truthmap.lm.models import stop_token_ids

    stop_ids = stop_token_ids(lm.tokenizer, lm.model)
    answers, scores = [], []
    for prompt in prompts:
        with torch.no_grad():
            out = lm.model.generate(
                torch.tensor([prompt], device=lm.model.device), max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_k=None, top_p=None, output_scores=True, return_dict_in_generate=True,
                eos_token_id=stop_ids, pad_token_id=lm.tokenizer.pad_token_id,
            )
        scores.append(torch.stack(out.scores, dim=1)[0].float().cpu())  # [steps, vocab]
        new = out.sequences[0, len(prompt) :].tolist()
        stop = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
        answers.append(new[:stop])
    return answers, scores


def per_sample_extract(lm, sequences: list[list[int]], site: str) -> list:
    """One forward pass per sequence; every layer's output at `site` over the whole sequence, float32:
    a list of [layers, seq, hidden] arrays, all kept."""
    import numpy as np
    import torch

    from truthmap.lm.sites import site_hooks

    outputs = {}

    def keep(layer):
        def hook(_module, args, output=None):
            value = output if output is not None else args[0]  # forward_pre hooks see the input
            value = value[0] if isinstance(value, tuple) else value
            outputs[layer] = value[0].detach().float().cpu().numpy()  # [seq, hidden]
        return hook

    handles = []
    for layer, (module, kind) in enumerate(site_hooks(lm.model, site)):
        register = module.register_forward_hook if kind == "forward" else module.register_forward_pre_hook
        handles.append(register(keep(layer)))
    kept = []
    try:
        for sequence in sequences:
            with torch.no_grad():
                lm.model(torch.tensor([sequence], device=lm.model.device), output_hidden_states=True)
            kept.append(np.stack([outputs[layer] for layer in range(len(handles))]))  # [layers, seq, hidden]
    finally:
        for handle in handles:
            handle.remove()
    return kept


def per_sample_probe(kept: list, table, seeds):
    """One StandardScaler + LogisticRegression per (layer, token) cell and seed, on truthmap's rows and splits.
    Returns the test AUC, [seeds, layers, positions]."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from truthmap.analysis.probes import grouped_split
    from truthmap.rundir import POSITIONS, position_column

    rows = np.flatnonzero(table["exact_answer_valid"].to_numpy())
    is_error = ~table["correct"].to_numpy()[rows]
    groups = [table["group"].iloc[i] for i in rows]
    splits = [grouped_split(len(rows), groups, 0.2, seed, stratify=is_error) for seed in seeds]  # as probe_grid
    positions = np.stack([table[position_column(p)].to_numpy()[rows] for p in POSITIONS], axis=1)  # [rows, 15]
    n_layers = kept[0].shape[0]
    aucs = np.empty((len(seeds), n_layers, len(POSITIONS)))
    for layer in range(n_layers):
        for j in range(len(POSITIONS)):
            X = np.stack([kept[r][layer, positions[i, j]] for i, r in enumerate(rows)])  # [rows, hidden]
            for s, (train, test) in enumerate(splits):
                probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
                probe.fit(X[train], is_error[train])
                aucs[s, layer, j] = roc_auc_score(is_error[test], probe.decision_function(X[test]))
    return aucs


def run_per_sample(config, lm, table, sampler, max_new_tokens: int, probe: bool):
    """The per-sample pipeline on truthmap's prompts and answers; returns measurements, mean AUC, answers that match."""
    measured = begin(sampler, "per-sample")
    with stage(sampler, measured, "generate"):
        answers, scores = per_sample_generate(lm, list(map(list, table["prompt_ids"])), max_new_tokens)
        del scores  # the reference saves them when its generation script ends
    same = [a == list(b) for a, b in zip(answers, table["answer_ids"])]
    ties = [tie_margin(lm, table, i, answers[i]) for i, equal in enumerate(same) if not equal]
    with stage(sampler, measured, "extract"):
        kept = per_sample_extract(lm, [list(p) + list(a) for p, a in zip(table["prompt_ids"], table["answer_ids"])], config.site)
    auc = None
    with stage(sampler, measured, "probe"):
        if probe:
            auc = per_sample_probe(kept, table, config.seeds).mean(0)
        del kept
    return measured, auc, sum(same), ties


# Greedy decoding is a float computation: where two tokens' logits are this close, batched and single-sequence
# kernels round differently and may pick either (the gap where an answer flipped in a bench run: 3e-6).
TIE = 1e-3


def tie_margin(lm, table, row: int, theirs: list[int]) -> float:
    """|logit difference| of the two pipelines' tokens where their answers for `row` first differ, by a full
    forward over the shared part (a stop token stands for the answer that ended there)."""
    import torch

    from truthmap.lm.models import stop_token_ids

    ours, prompt = list(table["answer_ids"][row]), list(table["prompt_ids"][row])
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    stop = stop_token_ids(lm.tokenizer, lm.model)[0]
    pick = [seq[first] if first < len(seq) else stop for seq in (ours, theirs)]
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + ours[:first]], device=lm.model.device)).logits[0, -1].float()
    return abs(float(logits[pick[0]] - logits[pick[1]]))


# ------------------------------------------------------------------------------------------------- report


def per_stage(m: Measured) -> str:
    parts = ", ".join(f"{s} {(m.peak[s] - m.start[0]) / MB:.0f} ({(m.peak_anon[s] - m.start[1]) / MB:.0f})" for s in m.peak)
    return f"{m.name} working MB per stage (anonymous): {parts}"


def row(m: Measured) -> str:
    stages = " | ".join(f"{m.seconds.get(s, float('nan')):.1f}" for s in STAGES)
    return (f"| {m.name} | {stages} | {m.total:.1f} | {max(m.peak.values()) / MB:.0f} | {m.working / MB:.0f} | "
            f"{m.working_anon / MB:.0f} |")


HEADER = ("| pipeline | generate s | extract s | probe s | total s | peak RSS MB | working MB | working anon MB |\n"
          "|---|---|---|---|---|---|---|---|")


def pick_dataset(name: str, data_dir: str | None) -> tuple[str, str]:
    """The dataset to use, and a note when it falls back to the built-in one for want of a data directory."""
    if name == "geography" or data_dir:  # geography is built in; the others are read from the data directory
        return name, ""
    return "geography", f"(no --data-dir or TRUTHMAP_DATA_DIR for {name}: built-in geography instead)"


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # each size's table shows as soon as it is measured, even in a log
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="250,1000", help="sizes compared with the per-sample pipeline")
    parser.add_argument("--big", type=int, default=10000, help="size run by truthmap alone (0: none)")
    parser.add_argument("--dataset", default="winobias")
    parser.add_argument("--big-dataset", default="winogrande",
                        help="a dataset with --big questions (winobias has 1,584; winogrande's train split 10,000)")
    parser.add_argument("--data-dir", default=os.environ.get("TRUTHMAP_DATA_DIR"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--site", default="mlp")
    parser.add_argument("--batch-size", type=int, default=64, help="truthmap's batch for generation and extraction")
    parser.add_argument("--extraction-tries", type=int, default=1, help="for datasets whose exact answers need the LLM")
    parser.add_argument("--seeds", default="0,5,26,42,63")
    parser.add_argument("--runs-dir", default=None, help="default: a temporary directory, removed at the end")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")
    sys.stdout.reconfigure(line_buffering=True)  # runs take hours: show each table when it is done, also in a pipe

    import numpy as np

    from truthmap.config import RunConfig
    from truthmap.datasets import get_spec
    from truthmap.lm.models import load_model

    sampler = MemorySampler()
    sampler.start()
    lm = load_model(args.model)
    model_rss = sampler.now()[0]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    dataset, note = pick_dataset(args.dataset, args.data_dir)
    big_dataset, big_note = pick_dataset(args.big_dataset, args.data_dir)
    sizes = [int(x) for x in args.n.split(",") if x.strip()]
    print(f"model {args.model} ({lm.device}, {lm.dtype}), RSS with the model loaded {model_rss / MB:.0f} MB; "
          f"site {args.site}; {len(seeds)} seeds; batch {args.batch_size}; torch threads "
          f"{__import__('torch').get_num_threads()}")
    targets = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs_dir or tmp)

        def config_for(name: str, n: int) -> RunConfig:
            return RunConfig(model=args.model, dataset=name, n_samples=n, data_dir=args.data_dir,
                             runs_dir=str(root / f"{name}-{n}"), batch_size=args.batch_size, site=args.site,
                             extraction_tries=args.extraction_tries, seeds=seeds)

        warm_up(lm, [config_for(dataset, n) for n in sizes] + ([config_for(big_dataset, args.big)] if args.big else []))
        print(f"RSS after imports and loading the questions (each pipeline's baseline): {sampler.now()[0] / MB:.0f} MB")
        for n in sizes:
            config = config_for(dataset, n)
            ours, table, our_auc = run_truthmap(config, lm, sampler)
            two_pass, two_pass_auc = run_two_pass(config, lm, sampler)
            max_new_tokens = get_spec(dataset).max_new_tokens
            theirs, their_auc, same, ties = run_per_sample(config, lm, table, sampler, max_new_tokens, our_auc is not None)
            plain = plain_forward_seconds(lm, table, args.batch_size)
            print(f"\n## {dataset}, {len(table)} questions {note}\n\n{HEADER}\n{row(ours)}\n{row(theirs)}\n"
                  f"{row(two_pass)}\n")
            print(f"{per_stage(ours)}\n{per_stage(theirs)}\n{per_stage(two_pass)}")
            speedup, memory = theirs.total / ours.total, theirs.working / max(ours.working, 1)
            print(f"\nper-sample / truthmap: {speedup:.1f}x the time, {memory:.1f}x the working memory "
                  f"({theirs.working_anon / max(ours.working_anon, 1):.1f}x anonymous)")
            print(f"answers identical to truthmap's: {same}/{len(table)}"
                  + "".join(f"; one differs first at a tie (|logit difference| {t:.1e})" if t < TIE else
                            f"; one differs first where the logits differ by {t:.1e}" for t in ties))
            ratio = two_pass.seconds["extract"] / plain
            print(f"truthmap second-pass extract / plain batched forward: {ratio:.2f} "
                  f"({two_pass.seconds['extract']:.1f} s / {plain:.1f} s)")
            for message in ours.notes + two_pass.notes:
                print(message)
            one_vs_two = None
            if our_auc is not None and two_pass_auc is not None:
                one_vs_two = float(np.abs(our_auc - two_pass_auc).max())
                print(f"one-pass vs two-pass store: max |AUC difference| over {our_auc.size} cells {one_vs_two:.4f}")
            delta = None
            if our_auc is not None:
                delta = float(np.abs(our_auc - their_auc).max())
                print(f"max |AUC difference| over {our_auc.size} cells (mean over seeds): {delta:.4f}; "
                      f"best cell AUC {our_auc.max():.3f} (truthmap), {their_auc.max():.3f} (per-sample)")
            targets += [
                (f"end to end >= 10x faster at n={len(table)}", speedup >= 10, f"{speedup:.1f}x"),
                (f"answers identical at n={len(table)}, ties within {TIE:g} logits aside", all(t < TIE for t in ties),
                 f"{same}/{len(table)} identical, {sum(t < TIE for t in ties)} tie(s)"),
                (f"probe stage <= 30 s at n={len(table)}", ours.seconds["probe"] <= 30, f"{ours.seconds['probe']:.1f} s"),
                (f"probe stage faster than per-sample probes at n={len(table)}",
                 ours.seconds["probe"] < theirs.seconds["probe"], f"{ours.seconds['probe']:.1f} s vs {theirs.seconds['probe']:.1f} s"),
                (f"working memory >= 10x smaller at n={len(table)}", memory >= 10, f"{memory:.1f}x"),
                (f"AUCs within 0.01 at n={len(table)}", delta is not None and delta <= 0.01, "n/a" if delta is None else f"{delta:.4f}"),
                (f"second-pass extract <= 1.3x a plain batched forward at n={len(table)}", ratio <= 1.3, f"{ratio:.2f}x"),
                (f"one-pass store: AUCs within 0.01 of the two-pass store at n={len(table)}", one_vs_two is not None and one_vs_two <= 0.01,
                 "n/a" if one_vs_two is None else f"{one_vs_two:.4f}"),
            ]
        if args.big:
            config = config_for(big_dataset, args.big)
            ours, table, _ = run_truthmap(config, lm, sampler)
            print(f"\n## truthmap alone: {big_dataset}, {len(table)} questions {big_note}\n\n{HEADER}\n{row(ours)}\n")
            print(per_stage(ours))
            for message in ours.notes:
                print(message)
            targets.append((f"working memory < 2 GB at n={len(table)}", ours.working < 2 * 2**30, f"{ours.working / MB:.0f} MB"))
    if targets:
        print("\n## targets (2 CPU cores, the default model)\n")
        for name, met, value in targets:
            print(f"- [{'x' if met else ' '}] {name}: {value}")


if __name__ == "__main__":
    main()
