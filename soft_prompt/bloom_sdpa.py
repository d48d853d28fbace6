"""Scaled-dot-product attention for BLOOM, whose transformers implementation only has an eager
path (it refuses `attn_implementation="sdpa"`): the ALiBi bias and the padding/causal mask become
SDPA's additive `attn_mask`, so PyTorch can pick a fused kernel instead of materialising the
`[B, H, T, T]` scores and probabilities in Python-level ops. Same result as eager to round-off.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F


def _sdpa_forward(
    self,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs,
):
    """BloomAttention.forward with F.scaled_dot_product_attention; returns no attention weights."""
    if output_attentions:
        raise ValueError("BLOOM's SDPA attention returns no attention weights: leave output_attentions off")
    batch_size, query_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # 3 x [B, H, T, hd]
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    key_length = key.shape[2]
    # Eager computes beta * alibi + q k^T / sqrt(hd) + mask; alibi is [B * H, 1, K] with beta = 1.
    bias = alibi.view(batch_size, self.num_heads, 1, key_length).to(query.dtype)
    if attention_mask is not None:
        bias = bias + attention_mask.to(query.dtype)  # [B, 1, Q, K] additive, broadcast over heads
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias,
        dropout_p=self.attention_dropout.p if self.training else 0.0, scale=self.inv_norm_factor,
    )  # [B, H, Q, hd]
    context = context.transpose(1, 2).reshape(batch_size, query_length, self.hidden_size)
    output = self.dense(context)
    output = F.dropout(output, p=self.hidden_dropout, training=self.training) + residual
    return output, None


def use_sdpa_attention(model: nn.Module) -> int:
    """Switch every BloomAttention in `model` to SDPA; returns how many were switched (0: not BLOOM)."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    switched = 0
    for module in model.modules():
        if isinstance(module, BloomAttention):
            if module.pretraining_tp > 1 and module.slow_but_exact:
                raise ValueError("BLOOM with slow_but_exact tensor-parallel slicing has no SDPA path")
            module.forward = types.MethodType(_sdpa_forward, module)
            switched += 1
    return switched
