"""The training loss with the soft prompt computed once per batch instead of once per row.

Training lays a batch out as `[P][x][pad]`: the V prompt positions come first and are the same in
every row, and under causal attention their states depend on those positions alone. So instead of
running `[B, V + T]` positions, this runs V + B * T, in one of two ways:

    one pass     [P][x_1]...[x_B]  [1, V + B*T]  the rows laid end to end after one prompt; every
                                                  position-wise op runs once over them all, and
                                                  attention sees the rows (`prefix_attention.py`)
    two passes   [P]               [1, V]         with gradients; its keys and values become a cache
                 [P-cache][x]      [B, T]         the cache expanded over the B rows (a view), the
                                                  text at positions V, V + 1, ..., the mask [B, V + T]

The one pass needs a model whose attention goes through transformers' attention interface (GPT-2,
Llama and most others); BLOOM's does not, and takes two. Either way autograd sums the B rows'
gradients into the one prompt, and the loss and the prompt's gradient equal `SoftPromptModel.loss`
to round-off. The first text token is predicted by the prompt's last position, whose state every
row shares, and the text stops at the column before the last labelled one: later positions predict
nothing that is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache

from .generation import prefix_cache_problem
from .loss import frozen_head_cross_entropy
from .masks import IGNORE_INDEX, positions_from_mask
from .prefix_attention import PrefixLayout, prefix_attention_kernel, routed_to_prefix_attention

if TYPE_CHECKING:
    from .model import SoftPromptModel


def shared_prefix_supported(model: SoftPromptModel) -> tuple[bool, str]:
    """(whether `shared_prefix_loss` equals `model.loss` on this model in its current mode, why
    not). Ask in the mode it will run in: training mode adds the dropout and checkpointing checks."""
    base_model = model.base_model
    if not model.plain_linear_head:
        return False, "the LM head is not a plain linear layer over the decoder's output, which the chunked loss needs"
    problem = prefix_cache_problem(model)
    if problem is not None:
        return False, problem
    if base_model.training:
        if any(getattr(module, "gradient_checkpointing", False) is True for module in base_model.modules()):
            # transformers drops a passed cache under checkpointing in training mode (its layers,
            # and GPT-2's model forward), so the text rows would not see the prompt (two passes);
            # the backward's recomputation would run outside the prefix attention (one pass).
            return False, "gradient checkpointing drops the prompt's cache in transformers' layers"
        if has_active_dropout(base_model):
            # One prompt pass means one dropout mask for every row's prompt: not the same loss.
            return False, "dropout is active in training mode, and the rows would share the prompt's dropout"
    return True, "the prompt runs once per batch"


def has_active_dropout(module: nn.Module) -> bool:
    """Whether `module` in training mode drops anything: an `nn.Dropout` with p > 0, or a float
    `*dropout*` attribute > 0 (the rate that Llama's attention and BLOOM's blocks apply functionally)."""
    for child in module.modules():
        if isinstance(child, nn.Dropout) and child.p > 0:
            return True
        if any("dropout" in name and isinstance(value, float) and value > 0 for name, value in vars(child).items()):
            return True
    return False


def prompt_pass(model: SoftPromptModel, dtype: torch.dtype) -> tuple[torch.Tensor, DynamicCache]:
    """The decoder on the active prompt alone, with gradients: batch 1, positions 0..V-1, the prompt
    in `dtype`. Returns its last hidden states `[1, V, D]` and a fresh cache holding every layer's
    keys and values (nothing outlives the call)."""
    num_virtual = model.num_virtual_tokens
    embeds = model.prompt(1).to(dtype)  # [1, V, D], a view of the fp32 weight
    inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(1, num_virtual, dtype=torch.long, device=embeds.device)}
    if model.takes_position_ids:
        inputs["position_ids"] = torch.arange(num_virtual, device=embeds.device)[None]  # [1, V]
    cache = DynamicCache()
    output = model.base_model.get_decoder()(**inputs, use_cache=True, **{model.cache_argument: cache})
    return output.last_hidden_state, cache


def text_columns(labels: torch.Tensor) -> int:
    """How many of a right-padded batch's text columns the decoder runs: up to the one before the
    last labelled column (position j predicts token j + 1; the prompt's last predicts token 0), and
    at least one."""
    labelled_columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return max(int(labelled_columns[-1]) if len(labelled_columns) else 0, 1)


def shared_prefix_loss(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`model.loss(input_ids, attention_mask, labels)` for the active prompt and right-padded rows,
    with the prompt's V positions computed once for the batch (see the module's docstring). Check
    `shared_prefix_supported(model)` first. Works with or without gradients (evaluation)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    columns = text_columns(labels)
    input_ids, attention_mask, labels = input_ids[:, :columns], attention_mask[:, :columns], labels[:, : columns + 1]
    text_embeds = model.base_model.get_input_embeddings()(input_ids)  # [B, T, D]
    mask = torch.cat([attention_mask.new_ones(len(input_ids), model.num_virtual_tokens), attention_mask], dim=1)  # [B, V + T]
    kernel = prefix_attention_kernel(model.base_model)
    if kernel is not None:
        predicting = one_pass(model, text_embeds, mask, kernel)
    else:
        predicting = two_passes(model, text_embeds, mask)
    # predicting[:, j] predicts token j: [B, T + 1, D] against labels [B, <= T + 1]
    predicting = predicting[:, : labels.shape[1]]
    has_label = labels != IGNORE_INDEX
    return frozen_head_cross_entropy(predicting[has_label], model.base_model.get_output_embeddings(), labels[has_label])


def one_pass(model: SoftPromptModel, text_embeds: torch.Tensor, mask: torch.Tensor, kernel: str) -> torch.Tensor:
    """The prompt and the rows as one flat sequence `[1, V + B*T]` (`mask` `[B, V + T]`: the rows'
    masks after the prompt's ones); returns the states that predict each row's tokens,
    `[B, T + 1, D]`: the prompt's last, then the row's own."""
    batch_size, length, width = text_embeds.shape
    num_virtual = model.num_virtual_tokens
    embeds = torch.cat([model.prompt(1).to(text_embeds.dtype), text_embeds.reshape(1, batch_size * length, width)], dim=1)
    row_positions = positions_from_mask(mask)[:, num_virtual:]  # [B, T]: V, V + 1, ...
    positions = torch.cat([torch.arange(num_virtual, device=mask.device), row_positions.flatten()])[None]  # [1, V + B*T]
    layout = PrefixLayout.build(num_virtual, mask[:, num_virtual:], kernel)
    with routed_to_prefix_attention(model.base_model):
        hidden = model.base_model.get_decoder()(
            inputs_embeds=embeds, position_ids=positions, use_cache=False, prefix_layout=layout
        ).last_hidden_state  # [1, V + B*T, D]
    prompt_last = hidden[:, num_virtual - 1 : num_virtual].expand(batch_size, -1, -1)  # [B, 1, D]
    return torch.cat([prompt_last, hidden[0, num_virtual:].view(batch_size, length, width)], dim=1)


def two_passes(model: SoftPromptModel, text_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The prompt alone, then the rows against its cache (`mask` `[B, V + T]`: the rows' masks
    after the prompt's ones); returns the states that predict each row's tokens, `[B, T + 1, D]`:
    the prompt's last, then the row's own."""
    batch_size = text_embeds.shape[0]
    num_virtual = model.num_virtual_tokens
    prompt_hidden, prompt_cache = prompt_pass(model, text_embeds.dtype)  # [1, V, D]
    # Every row's cache is a view of the one prompt's keys and values, [B, heads, V, d]; the text
    # pass concatenates its own after them (a new tensor, so the views are never written).
    shared = [
        (layer.keys.expand(batch_size, -1, -1, -1), layer.values.expand(batch_size, -1, -1, -1))
        for layer in prompt_cache.layers
    ]
    text_inputs = {"inputs_embeds": text_embeds, "attention_mask": mask}
    if model.takes_position_ids:
        text_inputs["position_ids"] = positions_from_mask(mask)[:, num_virtual:]  # [B, T]: V, V + 1, ...
    # BLOOM takes its ALiBi positions from the [B, V + T] mask instead.
    text_hidden = model.base_model.get_decoder()(
        **text_inputs, use_cache=True, **{model.cache_argument: DynamicCache(ddp_cache_data=shared)}
    ).last_hidden_state  # [B, T, D]
    return torch.cat([prompt_hidden[:, -1:].expand(batch_size, -1, -1), text_hidden], dim=1)


@dataclass(frozen=True)
class BatchCost:
    """What the frozen model computes for one batch: positions, and matmul FLOPs."""

    positions: int
    flops: int


def batch_cost(
    base_model: nn.Module,
    num_virtual: int,
    batch_size: int,
    length: int,
    labelled: int,
    shared: bool,
    backward: bool = True,
) -> BatchCost:
    """The positions and matmul FLOPs of one batch `[P][x][pad]`, `batch_size` rows padded to
    `length`, `labelled` tokens with a label, on the plain path (`[B, V + T]` positions) or the
    shared-prefix one (V, then `[B, T]`), counting what runs:

    - the decoder's weight matrices on every position computed, padding included: 2 FLOPs per
      weight forward and, with `backward`, 2 more for the input's gradient (the frozen weights
      get no gradient);
    - attention's q k^T and p v over the whole [queries, keys] block each pass computes (masked
      entries too): 4 FLOPs per (query, key, channel) forward, 8 backward;
    - the LM head only where a label is, forward and its input's gradient.
    """
    config = base_model.config
    decoder = base_model.get_decoder()
    weights = sum(
        parameter.numel()
        for module in decoder.modules() if not isinstance(module, nn.Embedding)  # lookups, not matmuls
        for parameter in module.parameters(recurse=False) if parameter.ndim == 2
    )
    heads = config.num_attention_heads
    channels = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)  # query width
    # (rows, queries, keys) of each pass
    passes = [(1, num_virtual, num_virtual), (batch_size, length, num_virtual + length)] if shared else [
        (batch_size, num_virtual + length, num_virtual + length)
    ]
    positions = sum(rows * queries for rows, queries, _ in passes)
    score_pairs = sum(rows * queries * keys for rows, queries, keys in passes)
    linear = 2 * weights * positions
    attention = 4 * channels * config.num_hidden_layers * score_pairs
    head = 2 * labelled * base_model.get_output_embeddings().weight.numel()
    flops = linear + attention + head
    if backward:
        flops += linear + 2 * attention + head
    return BatchCost(positions, flops)
