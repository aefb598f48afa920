"""Tiny models and tokenizers built in code: no download, milliseconds."""

from __future__ import annotations

import functools
import types

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
    from truthmap.lm.models import LoadedModel

    tokenizer = tiny_tokenizer(chat)
    model = tiny_llama(len(tokenizer), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(model, tokenizer, "tiny", "memory", chat, "cpu", "float32")


def half_right_qa(lm, path, questions, max_new_tokens: int = 16):
    """A custom-dataset CSV on which about half of the model's greedy answers count as right.

    Odd rows take the start of the model's own greedy answer as gold (a substring match), even rows a gold
    no answer contains, so both classes are there for the probes."""
    import csv

    from truthmap.lm.decoding import generate_batch
    from truthmap.lm.models import encode_prompt

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


# --------------------------------------------------------------------------- a scripted base model

# Base-model answers that go on past the line break into invented turns, as Gemma-3-270M's do. Trained without
# the pre-tokenizer's word split, the tokenizer merges across line breaks, so some tokens straddle one (".\nQ").
BASE_CORPUS = [
    "Q: What is the capital of France?\nA: Paris.\nQ: What is the capital of Italy?\nA: Rome.\n\n",
    "Q: What is the capital of Peru?\nA: Lima.\nQ: What is the capital of Chile?\nA: Santiago.\n",
]


@functools.lru_cache(maxsize=None)
def tiny_base_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(BASE_CORPUS * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "left"
    return tokenizer


class ScriptedOutput(dict):
    """What a forward pass returns: out.logits and out["past_key_values"]."""

    __getattr__ = dict.__getitem__


class ScriptedCache:
    """Stands in for the KV cache: which script each row of the batch follows, and how far it has got."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts, self.step = scripts, 0

    def batch_select_indices(self, index):
        self.scripts = [self.scripts[i] for i in index.tolist()]


def scripted_model(scripts: dict[tuple, list[int]], vocab_size: int, eos_id: int):
    """A causal LM that writes, for each prompt (its token ids), the given tokens, then its end token; any other
    prompt gets the end token at once. It runs through decoding.generate_batch as a real model does."""
    import torch

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.generation_config = types.SimpleNamespace(eos_token_id=eos_id)

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None,
                    logits_to_keep=0):
            if past_key_values is None:  # the prompts: left padding removed, each row finds its script
                prompts = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
                past_key_values = ScriptedCache([scripts.get(p, []) for p in prompts])
            else:
                past_key_values.step += 1
            step = past_key_values.step
            logits = torch.zeros(len(input_ids), input_ids.shape[1], vocab_size)  # [batch, seq, vocab]
            for row, script in enumerate(past_key_values.scripts):
                logits[row, -1, script[step] if step < len(script) else eos_id] = 100.0  # certain even when sampled
            return ScriptedOutput(logits=logits, past_key_values=past_key_values)

    return Scripted().eval()


def scripted_base_lm(answers: dict[str, str]):
    """A LoadedModel of a base model (no chat template) that answers each prompt text with the given text."""
    from truthmap.lm.models import LoadedModel, encode_prompt

    tokenizer = tiny_base_tokenizer()
    scripts = {
        tuple(encode_prompt(tokenizer, prompt, False)): tokenizer(text, add_special_tokens=False)["input_ids"]
        for prompt, text in answers.items()
    }
    model = scripted_model(scripts, len(tokenizer), tokenizer.eos_token_id)
    return LoadedModel(model, tokenizer, "scripted", "memory", False, "cpu", "float32")
