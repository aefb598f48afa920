"""Tiny models and tokenizers built in code: no download, milliseconds."""

from __future__ import annotations

import functools

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "In which country is the city of Tromsø? Tromsø is in Norway.",
    "Zürich, São Paulo, Kraków and Reykjavík are cities. Answer: the answer is Hartford, a city.",
    "Question: Long answer: Exact answer: NO ANSWER. 0123456789 user assistant system",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>" if chat else "<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHATML if chat else None
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.5,  # peaked logits: greedy choices never hinge on float noise
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_lm(chat: bool = True, seed: int = 0):
    from truthmap.models import LoadedModel

    tokenizer = tiny_tokenizer(chat)
    model = tiny_llama(len(tokenizer), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(model, tokenizer, "tiny", "memory", chat, "cpu", "float32")


def half_right_qa(lm, path, questions, max_new_tokens: int = 16):
    """A custom-dataset CSV on which about half of the model's greedy answers count as right.

    Odd rows take the start of the model's own greedy answer as gold (a substring match), even rows a gold
    no answer contains, so both classes are there for the probes."""
    import csv

    from truthmap.decoding import generate_batch
    from truthmap.models import encode_prompt

    prompts = [encode_prompt(lm.tokenizer, q, True) for q in questions]
    generations = [g for start in range(0, len(prompts), 30)
                   for g in generate_batch(lm.model, lm.tokenizer, prompts[start : start + 30], max_new_tokens, [2])]
    texts = [lm.tokenizer.decode(g.token_ids).strip() for g in generations]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        for i, (q, text) in enumerate(zip(questions, texts)):
            writer.writerow([q, text[:4] if i % 2 and text[:4].strip() else "zzzqqq"])
    return path


def save_tiny_model(lm, directory):
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory
