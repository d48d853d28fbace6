"""Label scoring: classify a text by the log-probability the model gives each label word.

Each text fills the template with each label in its last field; a label's score is the total
log-probability of the tokens from the last field on, given the soft prompt and the text before it.
`SoftPromptModel.classify` and `.completion_log_probs` call the functions below.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .data import split_template, template_fields

if TYPE_CHECKING:
    from .model import SoftPromptModel


@torch.no_grad()
def classify(
    model: SoftPromptModel,
    texts: Sequence[str | dict],
    labels: Sequence[str],
    template: str | None = None,
    tokenizer=None,
    batch_size: int = 16,
    use_prompt: bool = True,
    prompt_names: Sequence[str | None] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """The best label for each text, and the scores `[len(texts), len(labels)]`; see
    `SoftPromptModel.classify`."""
    template = template or model.metadata.get("template")
    tokenizer = tokenizer or model.tokenizer
    if not template:
        raise ValueError("no template: pass template=... (the checkpoint records none)")
    if tokenizer is None:
        raise ValueError("classify needs a tokenizer: pass tokenizer=... or load the model with one")
    sequences = label_sequences(texts, labels, template, tokenizer)
    if prompt_names is not None:
        if len(prompt_names) != len(texts):
            raise ValueError(f"prompt_names has {len(prompt_names)} names for {len(texts)} texts")
        prompt_names = [name for name in prompt_names for _ in labels]  # one per (text, label) pair
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = completion_log_probs(model, sequences, pad_id, batch_size, use_prompt, prompt_names)
    scores = scores.view(len(texts), len(labels))
    return [labels[index] for index in scores.argmax(dim=1).tolist()], scores


def label_sequences(
    texts: Sequence[str | dict], labels: Sequence[str], template: str, tokenizer
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, label ids) for each text and each label in turn: the text fills the template
    (a str its first field, a dict names the fields) and the label its last field."""
    if not labels or not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"labels must be non-empty strings, got {list(labels)!r}")
    fields = template_fields(template)
    sequences = []
    for text in texts:
        row = dict(text) if isinstance(text, dict) else {fields[0]: text}
        missing = [name for name in fields[:-1] if name not in row]
        if missing:
            raise ValueError(f"the template {template!r} needs the fields {fields[:-1]}; missing {missing}")
        for label in labels:
            # Tokenised as training does: the prompt with the tokenizer's defaults, the completion without specials.
            prompt, completion = split_template(template, {**row, fields[-1]: label})
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            sequences.append((prompt_ids, completion_ids))
    return sequences


@torch.no_grad()
def completion_log_probs(
    model: SoftPromptModel,
    sequences: Sequence[tuple[list[int], list[int]]],
    pad_id: int = 0,
    batch_size: int = 16,
    use_prompt: bool = True,
    prompt_names: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """The total log-probability `[N]` (fp32) of each completion given its prompt: `sequences`
    holds (prompt ids, completion ids) pairs. Each sequence is scored after the active soft
    prompt, after none (`use_prompt=False`), or after its own (`prompt_names`, a name or None
    each, mixed in the same batches). Batched, right-padded `[pad][P][x][pad]`; prompts too long
    for the context are cut from the left, with a warning."""
    base_model, device = model.base_model, model.device
    if prompt_names is None:
        prompt_names = [model.active_prompt if use_prompt else None] * len(sequences)
    if len(prompt_names) != len(sequences):
        raise ValueError(f"prompt_names has {len(prompt_names)} names for {len(sequences)} sequences")
    num_virtual = [model.prompt_length(name) for name in prompt_names]  # each sequence's V
    # Longest first, so each batch holds sequences of similar length (little padding computed);
    # the scores are put back in the caller's order at the end.
    order = sorted(range(len(sequences)), key=lambda i: -(num_virtual[i] + len(sequences[i][0]) + len(sequences[i][1])))
    totals = []
    for start in range(0, len(sequences), batch_size):
        indices = order[start : start + batch_size]
        chunk = []
        for index in indices:
            prompt_ids, completion_ids = sequences[index]
            if not prompt_ids or not completion_ids:
                raise ValueError("label scoring needs tokens before the label and a non-empty label")
            if model.context_length is not None:
                prompt_ids = truncate_left(prompt_ids, model.context_length - num_virtual[index] - len(completion_ids))
            chunk.append((prompt_ids, completion_ids))
        length = max(len(p) + len(c) for p, c in chunk)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (prompt_ids, completion_ids) in enumerate(chunk):
            ids = prompt_ids + completion_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        inputs = model.prepare_inputs(
            input_ids.to(device), attention_mask.to(device), prompt_names=[prompt_names[i] for i in indices]
        )
        chunk_virtual = inputs["inputs_embeds"].shape[1] - length  # the chunk's longest prompt
        rows, positions, targets = [], [], []
        for row, (prompt_ids, completion_ids) in enumerate(chunk):
            ids = prompt_ids + completion_ids
            # Token k is predicted by the output at position V + k - 1 (the prompts shift it by V).
            for k in range(len(prompt_ids), len(ids)):
                rows.append(row)
                positions.append(chunk_virtual + k - 1)
                targets.append(ids[k])
        rows = torch.tensor(rows, device=device)
        positions = torch.tensor(positions, device=device)
        if model.plain_linear_head:
            # The LM head only where a label token is predicted, not over [b, V + T, vocab].
            hidden = base_model.get_decoder()(**inputs, use_cache=False).last_hidden_state
            selected = base_model.get_output_embeddings()(hidden[rows, positions]).float()  # [tokens, vocab]
        else:
            selected = base_model(**inputs, use_cache=False).logits[rows, positions].float()
        token_log_probs = selected.log_softmax(dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])
        totals.append(torch.zeros(len(chunk), device=device).index_add_(0, rows, token_log_probs[:, 0]))
    sorted_totals = torch.cat(totals).cpu()
    return torch.empty_like(sorted_totals).index_copy_(0, torch.tensor(order, dtype=torch.long), sorted_totals)


def truncate_left(ids: list[int], max_length: int) -> list[int]:
    """The last `max_length` ids, with a warning when that drops some (the end is what is continued)."""
    if max_length < 1:
        raise ValueError(f"no room left in the model's context for the input (max_length={max_length})")
    if len(ids) <= max_length:
        return ids
    warnings.warn(
        f"input of {len(ids)} tokens is longer than the model's context allows ({max_length} with the "
        f"soft prompt and the rest): keeping its last {max_length} tokens"
    )
    return ids[len(ids) - max_length :]
