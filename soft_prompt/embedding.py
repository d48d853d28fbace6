"""The soft prompt: `num_virtual_tokens` trainable vectors and the ways to initialise them.

The vectors are always stored in fp32 (the master copy the optimizer updates); the wrapper casts
them to the frozen model's compute dtype only when it concatenates them with the text embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

INIT_STRATEGIES = ("random", "uniform", "text", "vocab", "labels")
TEXT_FILLS = ("pad", "repeat")
# Lester et al. sample initial prompt tokens from the 5000 most common ids; sentencepiece
# vocabularies are ordered by frequency, so "most common" is "the first 5000".
LESTER_VOCAB_SIZE = 5000


def text_init_ids(
    tokenizer, init_text: str, num_virtual_tokens: int, text_fill: str = "pad"
) -> list[int]:
    """The `num_virtual_tokens` token ids whose embeddings initialise a text-initialised prompt.

    The text is tokenised without special tokens; a longer text keeps its first ids, a shorter one
    is filled with the pad id (`text_fill="pad"`) or cycled (`text_fill="repeat"`, as PEFT does).
    """
    if text_fill not in TEXT_FILLS:
        raise ValueError(f"text_fill must be one of {TEXT_FILLS}, got {text_fill!r}")
    if tokenizer is None:
        raise ValueError("init='text' needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
    if not init_text or not init_text.strip():
        raise ValueError("init='text' needs a non-empty init_text")
    ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {init_text!r} tokenises to no tokens; pass a longer text")
    if len(ids) >= num_virtual_tokens:
        return ids[:num_virtual_tokens]
    if text_fill == "repeat":
        return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token to fill a short init text: set tokenizer.pad_token "
            "(e.g. to the eos token) or pass text_fill='repeat'"
        )
    return ids + [tokenizer.pad_token_id] * (num_virtual_tokens - len(ids))


def vocab_ids(word_embeddings: nn.Embedding, count: int, vocab_size: int | None, generator) -> list[int]:
    """`count` ids drawn uniformly from the first `vocab_size` (default 5000) of the vocabulary."""
    high = min(vocab_size or LESTER_VOCAB_SIZE, word_embeddings.num_embeddings)
    return torch.randint(0, high, (count,), generator=generator).tolist()


def embedding_rows(word_embeddings: nn.Embedding, ids: list[int]) -> torch.Tensor:
    """A copy of the embedding matrix's rows for `ids`, `[len(ids), D]`."""
    with torch.no_grad():
        return word_embeddings.weight[torch.tensor(ids, device=word_embeddings.weight.device)].detach().clone()


def label_embeddings(word_embeddings: nn.Embedding, tokenizer, label_words: Sequence[str] | None, num_virtual_tokens: int) -> torch.Tensor:
    """`[L, D]`: each label word's mean token embedding (Lester et al. average a multi-token label)."""
    if tokenizer is None:
        raise ValueError("init='labels' needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)")
    if not label_words:
        raise ValueError("init='labels' needs the label words (--label-words)")
    if len(label_words) > num_virtual_tokens:
        raise ValueError(
            f"init='labels' puts each of the {len(label_words)} label words on its own virtual token: "
            f"pass --num-virtual-tokens {len(label_words)} or more"
        )
    rows = []
    for word in label_words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label word {word!r} tokenises to no tokens")
        rows.append(embedding_rows(word_embeddings, ids).mean(dim=0))
    return torch.stack(rows)


class SoftPromptEmbedding(nn.Module):
    """`num_virtual_tokens` trainable vectors of the frozen model's embedding size, in fp32.

    Args:
        num_virtual_tokens: V, the number of virtual tokens.
        embed_dim: D, the frozen model's input-embedding size.
        init: "random" (normal(0, 1), PEFT's RANDOM), "uniform" (U[-0.5, 0.5], Lester et al.),
            "text" (rows of the embedding matrix for a text's tokens), "vocab" (rows for ids
            drawn uniformly from the first `vocab_size` ids) or "labels" (Lester et al.'s class-label
            init: virtual token i is the mean embedding of label word i's tokens; the rest are the
            init text's rows when `init_text` is given, "vocab" rows otherwise).
        word_embeddings: the frozen model's input embedding, needed by "text", "vocab" and "labels".
        tokenizer, init_text, text_fill: for "text" (and "labels"); see `text_init_ids`.
        label_words: for "labels": the label words, tokenised as written, without special tokens.
        vocab_size: for "vocab": draw from ids [0, vocab_size); default 5000 (Lester et al.),
            pass the full vocabulary size for PEFT's SAMPLE_VOCAB.
        seed: seeds the random draws ("random", "uniform", "vocab"); None uses torch's global RNG.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        embed_dim: int,
        init: str = "random",
        *,
        word_embeddings: nn.Embedding | None = None,
        tokenizer=None,
        init_text: str | None = None,
        text_fill: str = "pad",
        vocab_size: int | None = None,
        seed: int | None = None,
        label_words: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}")
        if init not in INIT_STRATEGIES:
            raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INIT_STRATEGIES)}")
        if init in ("text", "vocab", "labels") and word_embeddings is None:
            raise ValueError(f"init={init!r} needs the frozen model's word_embeddings")
        self.num_virtual_tokens = num_virtual_tokens
        self.embed_dim = embed_dim
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        shape = (num_virtual_tokens, embed_dim)

        if init == "random":
            weight = torch.randn(shape, generator=generator)
        elif init == "uniform":
            weight = torch.rand(shape, generator=generator) - 0.5
        elif init == "labels":
            labels = label_embeddings(word_embeddings, tokenizer, label_words, num_virtual_tokens)  # [L, D]
            rest = num_virtual_tokens - len(labels)
            if rest == 0:
                weight = labels
            elif init_text is not None:
                weight = torch.cat([labels, embedding_rows(word_embeddings, text_init_ids(tokenizer, init_text, rest, text_fill))])
            else:
                weight = torch.cat([labels, embedding_rows(word_embeddings, vocab_ids(word_embeddings, rest, vocab_size, generator))])
        elif init == "text":
            weight = embedding_rows(word_embeddings, text_init_ids(tokenizer, init_text, num_virtual_tokens, text_fill))
        else:
            weight = embedding_rows(word_embeddings, vocab_ids(word_embeddings, num_virtual_tokens, vocab_size, generator))
        self.weight = nn.Parameter(weight.to(device="cpu", dtype=torch.float32).contiguous())

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt for a batch: `[B, V, D]`, a view of the fp32 weight (no copy)."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, embed_dim={self.embed_dim}"
