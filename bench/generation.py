"""Generation throughput of the default model: generated tokens per second at batch sizes 1, 8 and 32.

    python bench/generation.py [--model smollm2] [--questions 32] [--max-new-tokens 48]

Same questions at every batch size (the built-in dataset's first N train questions), greedy, fp32 on CPU.
Tokens counted are the generated ones up to the stop token; padding after an early stop is not counted.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,8,32")
    args = parser.parse_args()
    os.environ.setdefault("TRUTHMAP_PROGRESS", "0")

    import torch

    from truthmap import build_prompt, get_spec, load_model, load_records
    from truthmap.lm.decoding import batches, generate_batch  # the decoder itself is what this measures
    from truthmap.lm.models import encode_prompt, stop_token_ids

    lm = load_model(args.model, device="cpu", dtype="float32")
    spec = get_spec("geography")
    records = load_records("geography", "train", n_samples=args.questions, seed=0)
    prompts = [encode_prompt(lm.tokenizer, build_prompt(spec, r, "instruct"), lm.is_chat) for r in records]
    stops = stop_token_ids(lm.tokenizer, lm.model)
    print(f"model={args.model} threads={torch.get_num_threads()} questions={len(prompts)} max_new_tokens={args.max_new_tokens}")
    print(f"{'batch':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for size in [int(s) for s in args.batch_sizes.split(",")]:
        started, tokens = time.perf_counter(), 0
        for batch in batches(prompts, size):
            tokens += sum(len(g.token_ids) for g in generate_batch(lm.model, lm.tokenizer, batch, args.max_new_tokens, stops))
        seconds = time.perf_counter() - started
        print(f"{size:>5} {tokens:>7} {seconds:>8.1f} {tokens / seconds:>9.1f}")


if __name__ == "__main__":
    main()
