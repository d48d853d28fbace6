"""Next-token loss without the `[B, T, vocab]` logits.

The frozen model's LM head is applied only to the hidden states that have a label, a chunk of rows
at a time, and the gradient for those hidden states is computed in the same pass: the head is
frozen, so `d loss / d hidden = (softmax - onehot) @ W` is all the backward needs. Neither the
logits nor the softmax are kept, so memory holds one `[chunk, vocab]` block (and an fp32 piece of
it) instead of `[B, V + T, vocab]` in fp32 (bloomz-560m: 250,880 columns), and no matmul is added
or repeated. The gradient's `softmax - onehot` is written back into the logits block, in place.
"""

from __future__ import annotations

import torch

# 2^26 logits per chunk, in the model's dtype (256 MiB in fp32, 128 MiB in bf16): large enough
# for efficient matmuls, small beside the model.
CHUNK_ELEMENTS = 1 << 26
# The softmax runs on pieces of a chunk this size (fp32, or fp64 for an fp64 model): on CPU a block
# under glibc's 32 MiB mmap limit is reused from the heap, where a fresh mmap'd block pays a page
# fault per 4 KiB each time.
SOFTMAX_PIECE_BYTES = 1 << 22


def softmax_piece_rows(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows of `[rows, vocab]` scores that fit SOFTMAX_PIECE_BYTES in the softmax's dtype, the
    logits' `dtype` promoted to fp32 at least (at least one row)."""
    return max(1, SOFTMAX_PIECE_BYTES // (vocab_size * torch.promote_types(dtype, torch.float32).itemsize))


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` `[N, vocab]` against `targets` `[N]`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, piece_rows):
        # Softmax in fp32 at least (fp64 stays fp64, so an fp64 model gives an exact reference).
        softmax_dtype = torch.promote_types(hidden.dtype, torch.float32)
        loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = torch.nn.functional.linear(hidden[rows], weight, bias)  # [n, vocab], the model's dtype
            chunk_targets = targets[rows, None]  # [n, 1]
            for piece_start in range(0, logits.shape[0], piece_rows):
                piece = logits[piece_start : piece_start + piece_rows]  # a view: the gradient goes back in it
                piece_targets = chunk_targets[piece_start : piece_start + piece_rows]
                scores = piece.to(softmax_dtype)
                probs = torch.softmax(scores, dim=-1)  # one fused pass, no exp block of our own
                # -log p(target) = max - logit(target) + log(sum exp(logit - max)), and the sum is
                # 1 / p(argmax): p(argmax) >= 1 / vocab never underflows, unlike p(target).
                loss += (scores.amax(dim=-1) - scores.gather(1, piece_targets).squeeze(1) - probs.amax(dim=-1).log()).sum()
                if needs_grad:
                    probs.scatter_add_(1, piece_targets, probs.new_full(piece_targets.shape, -1.0))  # softmax - onehot
                    piece.copy_(probs)
            if needs_grad:
                grad_hidden[rows] = logits @ weight  # [n, D]
        if needs_grad:
            ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None


def frozen_head_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    piece_rows: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` `[N, vocab]` against `targets` `[N]`.

    Equals `F.cross_entropy(head(hidden).float(), targets)`, and its gradient w.r.t. `hidden`,
    while holding at most `chunk_rows` rows of logits at a time, and `piece_rows` of them in fp32
    (fp64 for an fp64 model). `head` must be frozen.
    """
    if head.weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy needs a frozen LM head (requires_grad=False)")
    vocab_size = head.weight.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // vocab_size)
    if torch.is_autocast_enabled(hidden.device.type):
        # Match what autocast would do to the head's matmul: compute it in the autocast dtype.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
        hidden = hidden.to(dtype)
    else:
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.dtype)
    if piece_rows is None:
        piece_rows = softmax_piece_rows(vocab_size, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total = _FrozenHeadCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, piece_rows)
    return total / max(targets.numel(), 1)
