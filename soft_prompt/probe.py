"""What the model says with the current prompt: greedy continuations of fixed probe texts and the
Unicode scripts of their letters, so a run can log when its generations change language (the
tutorial's bloomz prompt that ended up answering in Chinese)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .chance import text_script_shares

if TYPE_CHECKING:
    from .model import SoftPromptModel

PROBE_REPETITION_PENALTY = 1.5  # the tutorial's setting


@torch.no_grad()
def probe(
    model: SoftPromptModel,
    texts: Sequence[str],
    max_new_tokens: int = 30,
    repetition_penalty: float = PROBE_REPETITION_PENALTY,
) -> list[dict]:
    """For each text, the greedy continuation after `[P][text]` with the active prompt and its
    letters' script shares: [{"text", "continuation", "scripts"}, ...]. Leaves the model's
    train/eval mode as it found it."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("probing decodes text: load the model with its tokenizer (tokenizer=...)")
    if not texts:
        return []
    was_training = model.training
    model.eval()
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True)
        output = model.generate(
            batch["input_ids"].to(model.device),
            batch["attention_mask"].to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
        )  # [B, T + N]
    finally:
        model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1] :]  # [B, N]
    continuations = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        {"text": text, "continuation": continuation, "scripts": text_script_shares(continuation)}
        for text, continuation in zip(texts, continuations)
    ]
