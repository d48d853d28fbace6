"""Chance levels for the readings of a prompt against the vocabulary, and the script rule they share.

A reading of a prompt `[V, D]` (nearest-token cosines, script shares, pairwise cosines, the
attention the text gives it) means something only where it leaves what a prompt with nothing
learned gives. Two such prompts, each drawn from a seed:

    random vectors   V Gaussian directions, each scaled to the norm of the prompt's token at its place
    random tokens    the embeddings of V vocabulary tokens drawn uniformly (a random hard prompt)

Both have the prompt's shape, so `analysis.py` measures them exactly as it measures the prompt.
`script_of` (a token's Unicode script) and `text_script_shares` (the scripts of a text's letters)
give the same script names to tokens and to generated text.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

import torch

NO_LETTERS = "none"  # a neighbour with no letter: punctuation, digits, spaces
PARTIAL_BYTES = "partial bytes"  # a byte-level token that is part of a multi-byte character
SCRIPT_NAMES = {"CJK": "Han", "HANGUL": "Hangul"}


def script_of(text: str) -> str:
    """The Unicode script of a decoded token's first letter, from its character name (LATIN SMALL
    LETTER A -> Latin, CJK UNIFIED IDEOGRAPH-4E2D -> Han, CYRILLIC ... -> Cyrillic)."""
    for character in text:
        if character.isalpha():
            first_word = unicodedata.name(character, "UNKNOWN").split()[0]
            return SCRIPT_NAMES.get(first_word, first_word.title())
    return PARTIAL_BYTES if "\ufffd" in text else NO_LETTERS


def text_script_shares(text: str) -> dict[str, float]:
    """The share of each script among the letters of `text` (script_of's rule per letter), largest
    first; empty for a text without letters."""
    counts = Counter(script_of(character) for character in text if character.isalpha())
    total = sum(counts.values())
    return {script: count / total for script, count in counts.most_common()}


def random_vectors_like(prompt: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`[V, D]` fp32: for each virtual token of `prompt` `[V, D]`, a direction drawn uniformly
    (a normalised Gaussian) scaled to that token's norm. Same seed, same vectors."""
    generator = torch.Generator().manual_seed(seed)
    prompt = prompt.detach().float().cpu()
    directions = torch.nn.functional.normalize(torch.randn(prompt.shape, generator=generator), dim=-1)
    return directions * prompt.norm(dim=-1, keepdim=True)


def random_token_ids(
    num_tokens: int, vocab_size: int, seed: int = 0, exclude_ids: Iterable[int] = ()
) -> list[int]:
    """`num_tokens` ids drawn uniformly with replacement below `vocab_size`, never one of
    `exclude_ids` (the special tokens, say). Same seed, same ids."""
    excluded = torch.tensor(sorted(set(exclude_ids)), dtype=torch.long)
    allowed = torch.arange(vocab_size)[~torch.isin(torch.arange(vocab_size), excluded)]  # [N']
    if len(allowed) == 0:
        raise ValueError("no vocabulary token is left to draw once the excluded ids are removed")
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (num_tokens,), generator=generator)].tolist()


def chance_prompts(
    prompt: torch.Tensor,
    embeddings: torch.Tensor,
    seed: int = 0,
    vocab_size: int | None = None,
    exclude_ids: Iterable[int] = (),
) -> dict[str, dict]:
    """The two chance prompts for `prompt` `[V, D]` against `embeddings` `[N, D]`:
    {"random_vectors": {"weight": [V, D]}, "random_tokens": {"weight": [V, D], "ids": [V]}}, fp32 on
    the CPU. `vocab_size` limits the drawn ids to the tokenizer's (an embedding matrix can be padded
    past it); `exclude_ids` keeps special tokens out of the hard prompt."""
    ids = random_token_ids(prompt.shape[0], vocab_size or embeddings.shape[0], seed, exclude_ids)
    return {
        "random_vectors": {"weight": random_vectors_like(prompt, seed)},
        "random_tokens": {"weight": embeddings.detach().float().cpu()[ids], "ids": ids},
    }
