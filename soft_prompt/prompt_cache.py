"""The prompt cache: the frozen model's keys and values after each soft prompt alone.

A prompt's keys and values do not depend on the text after it (causal attention), so generation
and label scoring compute them once per prompt and reuse them for every batch. An entry is
recomputed only when its prompt changed: an in-place update (a parameter's version counter), a
new tensor or device (its data pointer), or another compute dtype. The model owns one
(`SoftPromptModel.prompt_cache`); nothing outside this class touches its entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache


class PromptCache:
    """Named prompts' caches, each `[1, heads, V, d]` per layer, computed by `compute(weight)`."""

    def __init__(self, compute: Callable[[torch.Tensor], DynamicCache]) -> None:
        self._compute = compute
        self._entries: dict[str, tuple[tuple, DynamicCache]] = {}  # name -> (what it was computed from, cache)

    def get(self, name: str, prompt: nn.Module, dtype: torch.dtype) -> DynamicCache:
        """The cache of prompt `name` (its module, whose `weight` is `[V, D]`), run in `dtype`;
        computed if missing or stale. The prompt's parameters are what is watched: a
        reparameterized prompt (`reparam.py`) computes its weight afresh at each read, from
        parameters that the optimizer updates in place."""
        key = (tuple((param._version, param.data_ptr()) for param in prompt.parameters()), dtype)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            entry = self._entries[name] = (key, self._compute(prompt.weight))
        return entry[1]

    def invalidate(self, name: str) -> None:
        """Forget prompt `name`'s cache (it was replaced or deleted)."""
        self._entries.pop(name, None)

    def clear(self) -> None:
        self._entries.clear()

    def size(self) -> int:
        """The bytes the cached keys and values hold."""
        return sum(
            tensor.numel() * tensor.element_size()
            for _, cache in self._entries.values()
            for layer in cache.layers
            for tensor in (layer.keys, layer.values)
        )
