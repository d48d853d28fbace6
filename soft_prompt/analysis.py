"""What a soft prompt learned: ..."""

from __future__ import annotations

import torch


def prompt_drift(weight: torch.Tensor, initial_weight: torch.Tensor) -> dict[str, float]:
    """How far the prompt `[V, D]` moved from its initial value: the Frobenius distance and the
    mean over virtual tokens of the cosine between each token and its initial vector."""
    weight, initial_weight = weight.detach().float(), initial_weight.detach().float().to(weight.device)
    return {
        "prompt_distance": (weight - initial_weight).norm().item(),
        "prompt_cosine": torch.cosine_similarity(weight, initial_weight, dim=-1).mean().item(),
    }
