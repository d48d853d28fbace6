"""Attention over one flat sequence `[P][row 1][row 2]...[row B]`: the prompt's V positions once,
then B text rows of T positions each, all on the sequence axis of a `[1, V + B * T]` batch.

Every position-wise op of a decoder layer (norms, projections, MLP) then runs once over all the
positions, and only attention needs the rows: the prompt attends causally to itself, and each row
to the prompt and causally to its own real tokens, as `[B, V + T]` rows of the plain path would.
The decoder is routed here by registering this function with transformers' attention interface
(models with `_supports_attention_backend`) and naming it in the config for the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface

NAME = "soft_prompt_prefix"
KERNELS = ("eager", "sdpa")  # the model's own settings this file reproduces


@dataclass(frozen=True)
class PrefixLayout:
    """Where the rows lie in the flat sequence, and what each position may see."""

    num_virtual: int
    rows: int
    length: int
    prompt_mask: torch.Tensor  # [1, 1, V, V] bool, causal
    text_mask: torch.Tensor  # [B, 1, T, V + T] bool, True where a row's query may attend
    kernel: str  # "eager" or "sdpa": the model's attention setting

    @classmethod
    def build(cls, num_virtual: int, attention_mask: torch.Tensor, kernel: str) -> PrefixLayout:
        """The layout of `attention_mask`'s `[B, T]` right-padded rows after a V-token prompt."""
        rows, length = attention_mask.shape
        device = attention_mask.device
        prompt_mask = torch.ones(num_virtual, num_virtual, dtype=torch.bool, device=device).tril()[None, None]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [T, T]
        own = causal[None] & attention_mask.bool()[:, None, :]  # [B, T, T]: padding hidden as a key
        # A padding query still sees the prompt, so its (unused) softmax never divides by zero.
        text_mask = torch.cat([own.new_ones(rows, length, num_virtual), own], dim=2)[:, None]  # [B, 1, T, V + T]
        return cls(num_virtual, rows, length, prompt_mask, text_mask, kernel)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float, kernel: str):
    """Softmax attention `[B, Hq, Tq, d]` over `[B, Hkv, Tk, d]` keys (Hq a multiple of Hkv, as in
    grouped-query attention) where `mask` `[B or 1, 1, Tq, Tk]` is True; as transformers' eager and
    SDPA kernels compute it (eager: scores in the input dtype, softmax in fp32)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    rows, query_heads, length, width = query.shape
    key_heads = key.shape[1]
    groups = query_heads // key_heads
    # Each key/value head serves `groups` consecutive query heads: stack their queries on one head's
    # rows, [B, Hkv, groups * Tq, d], instead of copying the keys and values `groups` times.
    grouped = query.reshape(rows, key_heads, groups * length, width)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling  # [B, Hkv, groups * Tq, Tk]
    hidden = ~mask.repeat(1, 1, groups, 1)  # [B or 1, 1, groups * Tq, Tk]
    scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).view(rows, query_heads, length, width)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    prefix_layout: PrefixLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: `query` `[1, Hq, V + B*T, d]`, `key` and `value`
    `[1, Hkv, V + B*T, d]` over the flat sequence that `prefix_layout` describes. Returns the output
    `[1, V + B*T, Hq, d]` and no weights."""
    if prefix_layout is None:
        raise ValueError("prefix attention runs only inside shared_prefix_loss, which passes the rows' layout")
    if dropout:
        raise ValueError("prefix attention has no dropout: shared_prefix_supported refuses active dropout")
    layout = prefix_layout
    num_virtual, rows, length = layout.num_virtual, layout.rows, layout.length
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5

    # [1, H, V, d] and [B, H, T, d], views; one split per tensor, so the backward joins the two
    # gradients once instead of zero-filling the whole tensor for each part.
    (prompt_query, text_query), (prompt_key, text_key), (prompt_value, text_value) = (
        (prompt, text[0].unflatten(1, (rows, length)).transpose(0, 1))
        for prompt, text in (x.split([num_virtual, rows * length], dim=2) for x in (query, key, value))
    )
    prompt_out = attend(prompt_query, prompt_key, prompt_value, layout.prompt_mask, scaling, layout.kernel)
    # Each row's keys: the one prompt's (expanded, a view) then its own, [B, Hkv, V + T, d].
    row_keys = torch.cat([prompt_key.expand(rows, -1, -1, -1), text_key], dim=2)
    row_values = torch.cat([prompt_value.expand(rows, -1, -1, -1), text_value], dim=2)
    text_out = attend(text_query, row_keys, row_values, layout.text_mask, scaling, layout.kernel)  # [B, Hq, T, d]
    # back to the flat sequence: [1, V, Hq, d] and [1, B*T, Hq, d] -> [1, V + B*T, Hq, d]
    return torch.cat([prompt_out.transpose(1, 2), text_out.transpose(1, 2).flatten(0, 1)[None]], dim=1), None


AttentionInterface.register(NAME, prefix_attention)


def prefix_attention_kernel(base_model: nn.Module) -> str | None:
    """The kernel `prefix_attention` would reproduce for `base_model` ("eager" or "sdpa"), or None
    where it cannot stand in for the model's attention: the model does not call transformers'
    attention interface (BLOOM), or it is set to another kernel (flash attention)."""
    kernel = base_model.config._attn_implementation
    return kernel if getattr(base_model, "_supports_attention_backend", False) and kernel in KERNELS else None


@contextlib.contextmanager
def routed_to_prefix_attention(base_model: nn.Module) -> Iterator[None]:
    """Within the block, the decoder's attention layers call `prefix_attention` (every layer reads
    the attention setting from the shared config at each call); the setting is restored after,
    also on an error. transformers builds no mask for a registered function like this one."""
    config = base_model.config
    kernel = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = kernel
