"""Tiny offline stand-ins: a tokenizer trained on the spot, tiny models built from configs, and a
small labelled data set. Used by `train.py --task demo` and the tests; nothing is downloaded."""

from __future__ import annotations

import os
import random

from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

ARCHITECTURES = ("bloom", "gpt2", "llama")
SUBJECTS = ["the cat", "my neighbour", "this movie", "the weather", "our team", "the new law", "that song"]
KIND = ["is lovely", "was great fun", "made me smile", "is fine", "helps everyone", "sounds nice"]
HATEFUL = ["people like them are vermin", "they should all be thrown out", "those people are animals"]


def demo_rows(num_rows: int = 64, seed: int = 0) -> list[dict]:
    """Rows shaped like ETHOS (`text`, `label`, `label_text`), generated from word lists."""
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        hateful = index % 2 == 1
        text = rng.choice(HATEFUL) if hateful else f"{rng.choice(SUBJECTS)} {rng.choice(KIND)}"
        rows.append({"text": text, "label": int(hateful), "label_text": "hate speech" if hateful else "no hate speech"})
    return rows


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the demo corpus, with pad and eos tokens."""
    corpus = [row["text"] for row in demo_rows(256)] + [
        "Sentence : Label : Act as a . Prompt: Indicates whether the sentence contains hate speech or not",
        "You are a helpful assistant. Write an answer for the fitness trainer and the travel guide.",
    ]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")


def build_tiny_model(
    architecture: str, vocab_size: int, seed: int = 0, hidden_size: int = 32, initializer_range: float = 0.02
) -> PreTrainedModel:
    """A 2-layer model of `architecture` with random weights (seeded, std `initializer_range`)."""
    import torch

    common = dict(
        vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=initializer_range
    )
    if architecture == "bloom":
        config, cls = BloomConfig(hidden_size=hidden_size, n_layer=2, n_head=4, **common), BloomForCausalLM
    elif architecture == "gpt2":
        config, cls = GPT2Config(n_embd=hidden_size, n_layer=2, n_head=4, n_positions=256, **common), GPT2LMHeadModel
    elif architecture == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )
        cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    return cls(config).eval()


def save_tiny_model(
    directory: str | os.PathLike,
    architecture: str = "bloom",
    seed: int = 0,
    initializer_range: float = 0.02,
    hidden_size: int = 32,
) -> str:
    """Write a tiny model and its tokenizer as a Hugging Face folder; returns the folder. Its 4
    heads are `hidden_size // 4` wide (vLLM's CPU attention needs 32: `hidden_size=128`)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(architecture, len(tokenizer), seed=seed, hidden_size=hidden_size, initializer_range=initializer_range)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
