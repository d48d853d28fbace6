"""Labels, masks and positions: the conventions every batch follows.

A label of `IGNORE_INDEX` takes no loss; a mask holds 1 on real positions and 0 on padding; and
padding never advances the position, so a row's tokens sit where they would alone.
"""

from __future__ import annotations

import torch


IGNORE_INDEX = -100


def right_padded(
    rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists as a right-padded batch `[B, T]`, T the longest row, and its mask (1 on real ids)."""
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids `[B, L]` that count only real positions: padding does not advance them, so a
    row's tokens sit where they would alone, whatever padding (or shorter prompt) precedes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
