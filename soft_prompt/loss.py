"""Next-token loss without the `[B, T, vocab]` logits.

The frozen model's LM head is applied only to the hidden states that have a label, a chunk of rows
at a time, and the gradient for those hidden states is computed in the same pass: the head is
frozen, so `d loss / d hidden = (softmax - onehot) @ W` is all the backward needs. Neither the
logits nor the softmax are kept, so memory holds one `[chunk, vocab]` block instead of
`[B, V + T, vocab]` in fp32 (bloomz-560m: 250,880 columns), and no matmul is added or repeated.
"""

from __future__ import annotations

import torch

# About 256 MiB of fp32 logits per chunk: large enough for efficient matmuls, small beside the model.
CHUNK_ELEMENTS = 1 << 26


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` `[N, vocab]` against `targets` `[N]`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        # Softmax in fp32 at least (fp64 stays fp64, so an fp64 model gives an exact reference).
        softmax_dtype = torch.promote_types(hidden.dtype, torch.float32)
        loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = torch.nn.functional.linear(hidden[rows], weight, bias).to(softmax_dtype)  # [n, vocab]
            # log-sum-exp by hand, in place: one exp over the block, which the gradient reuses, and
            # no second [n, vocab] block (torch.logsumexp allocates one for its exp).
            row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            target_logits = logits.gather(1, targets[rows, None]).squeeze(1)
            exps = logits.sub_(row_max).exp_()  # exp(logit - max), in place of the logits
            sums = exps.sum(dim=-1, keepdim=True)
            loss += (sums.log() + row_max - target_logits[:, None]).sum()
            if needs_grad:
                probs = exps.div_(sums)  # softmax
                probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1
                grad_hidden[rows] = probs.to(weight.dtype) @ weight  # [n, D]
        if needs_grad:
            ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


def frozen_head_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` `[N, vocab]` against `targets` `[N]`.

    Equals `F.cross_entropy(head(hidden).float(), targets)`, and its gradient w.r.t. `hidden`,
    while holding at most `chunk_rows` rows of logits at a time. `head` must be frozen.
    """
    if head.weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy needs a frozen LM head (requires_grad=False)")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    if torch.is_autocast_enabled(hidden.device.type):
        # Match what autocast would do to the head's matmul: compute it in the autocast dtype.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
        hidden = hidden.to(dtype)
    else:
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total = _FrozenHeadCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)
    return total / max(targets.numel(), 1)
