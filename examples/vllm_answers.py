"""Generate a dataset's answers with vLLM (greedy, the model's chat template) and write the file that
`truthmap import` reads. Needs a GPU and `pip install vllm`; it was not run in truthmap's tests, which check the
file it writes from vLLM-shaped outputs (tests/test_import.py).

    python examples/vllm_answers.py --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset triviaqa \
        --split test --n-samples 1000 --data-dir ../shared/data --out answers.jsonl
    truthmap import answers.jsonl --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset triviaqa --split test

Import with the same --model (hub id or directory) that vLLM loaded: the activations must come from those weights.
The questions, prompts and gold aliases are truthmap's own (load_records, build_prompt), so the imported run
answers the questions `truthmap generate` would have asked. Token ids are written too: re-encoding the text does
not always give the tokens the model wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_answers(path, records, prompts, outputs) -> Path:
    """One JSON object per answer: id, question, prompt, gold, answer, the exact tokens, and whether it stopped."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for record, prompt, output in zip(records, prompts, outputs):
            completion = output.outputs[0]
            row = {
                "id": record.id,
                "question": record.question,
                "prompt": prompt,
                "gold": list(record.answers),
                "answer": completion.text,
                "prompt_token_ids": list(output.prompt_token_ids),
                "answer_token_ids": list(completion.token_ids),  # truthmap drops a trailing end token
                "stopped": completion.finish_reason == "stop",  # "length": ran to max_tokens
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    from vllm import LLM, SamplingParams  # imported here: the writer above needs no vLLM

    from truthmap.datasets import build_prompt, get_spec, load_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A hub id or local directory (not a GGUF file).")
    parser.add_argument("--dataset", default="triviaqa")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="The subsample's seed, as truthmap's --seed.")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="answers.jsonl")
    args = parser.parse_args()

    spec = get_spec(args.dataset)
    records = load_records(args.dataset, args.split, args.data_dir, args.n_samples, args.seed)
    prompts = [build_prompt(spec, record, "instruct") for record in records]  # the user message, as generate's
    llm = LLM(model=args.model)
    # Greedy, as truthmap generate; the chat template is the model's own, applied by vLLM as by truthmap.
    sampling = SamplingParams(temperature=0.0, max_tokens=spec.max_new_tokens)
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], sampling)
    print(f"Wrote {write_answers(args.out, records, prompts, outputs)} ({len(outputs)} answers)")


if __name__ == "__main__":
    main()
