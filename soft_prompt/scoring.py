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
from tqdm import tqdm

from .masks import positions_from_mask, right_padded
from .templates import split_template, template_fields
from .generation import batch_prompt_cache, prefix_cache_supported

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
    # The method, not the function below: a stand-in such as serving.VllmModel scores elsewhere.
    scores = model.completion_log_probs(sequences, pad_id, batch_size, use_prompt, prompt_names)
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
    each, mixed in the same batches). Prompts too long for the context are cut from the left,
    with a warning.

    Sequences that share their prompt ids and soft prompt (one text's labels) share one pass over
    that prefix where the prefix cache is exact (see `shared_prefix_log_probs`); elsewhere each
    sequence runs whole (`whole_sequence_log_probs`). Either way about `batch_size` sequences go
    in a batch, longest first over all of them, and the scores come back in the caller's order.
    """
    if prompt_names is None:
        prompt_names = [model.active_prompt if use_prompt else None] * len(sequences)
    if len(prompt_names) != len(sequences):
        raise ValueError(f"prompt_names has {len(prompt_names)} names for {len(sequences)} sequences")
    fitted = []
    for (prompt_ids, completion_ids), name in zip(sequences, prompt_names):
        if not prompt_ids or not completion_ids:
            raise ValueError("label scoring needs tokens before the label and a non-empty label")
        if model.context_length is not None:
            prompt_ids = truncate_left(prompt_ids, model.context_length - model.prompt_length(name) - len(completion_ids))
        fitted.append((list(prompt_ids), list(completion_ids)))
    if prefix_cache_supported(model):
        return shared_prefix_log_probs(model, fitted, prompt_names, pad_id, batch_size)
    return whole_sequence_log_probs(model, fitted, prompt_names, pad_id, batch_size)


@torch.no_grad()
def shared_prefix_log_probs(
    model: SoftPromptModel,
    sequences: Sequence[tuple[list[int], list[int]]],
    prompt_names: Sequence[str | None],
    pad_id: int,
    batch_size: int,
) -> torch.Tensor:
    """`completion_log_probs` with one pass per prefix: the soft prompt's keys and values from its
    cache (`generation.batch_prompt_cache`), the text once after them, `[P][x][pad]`, whose last
    position predicts every completion's first token; then each completion's other tokens after a
    copy of its text's keys and values, `[P][x][pad][c][pad]`, the positions counting only real
    tokens (as the generation prefix cache does, exact where it is)."""
    device = model.device
    prefixes: dict[tuple, list[int]] = {}  # (soft prompt, prompt ids) -> the sequences after it
    for index, ((prompt_ids, _), name) in enumerate(zip(sequences, prompt_names)):
        prefixes.setdefault((name, tuple(prompt_ids)), []).append(index)
    order = sorted(prefixes, key=lambda key: -(model.prompt_length(key[0]) + len(key[1])))
    batches = list(prefix_batches(order, prefixes, batch_size))
    totals = torch.zeros(len(sequences), device=device)
    for batch in tqdm(batches, desc="scoring labels", disable=None if len(batches) > 1 else True, leave=False):
        names, texts = [name for name, _ in batch], [list(ids) for _, ids in batch]
        cache, prompt_mask = batch_prompt_cache(model, names)  # [G, heads, V, d], [G, V]
        text_ids, text_mask = right_padded(texts, pad_id, device)  # [G, T]
        mask = torch.cat([prompt_mask, text_mask], dim=1)  # [G, V + T]
        inputs = {"input_ids": text_ids, "attention_mask": mask, **continued_positions(model, mask, text_ids.shape[1])}
        members = [(group, index) for group, key in enumerate(batch) for index in prefixes[key]]
        groups, indices = [group for group, _ in members], [index for _, index in members]
        # Each completion's first token is predicted by its text's last real position.
        first_logits = selected_logits(model, inputs, groups, [len(texts[group]) - 1 for group in groups], cache)
        firsts = torch.tensor([sequences[index][1][0] for index in indices], device=device)
        totals[indices] += first_logits.log_softmax(dim=-1).gather(1, firsts[:, None])[:, 0]
        longer = [(group, index) for group, index in members if len(sequences[index][1]) > 1]
        if not longer:
            continue
        # The other tokens: completion ids but the last after their text's keys and values, [E, C - 1].
        cache.batch_select_indices(torch.tensor([group for group, _ in longer], device=device))  # [E, heads, V + T, d]
        completions = [sequences[index][1] for _, index in longer]
        label_ids, label_mask = right_padded([ids[:-1] for ids in completions], pad_id, device)
        mask = torch.cat([mask[[group for group, _ in longer]], label_mask], dim=1)  # [E, V + T + C - 1]
        inputs = {"input_ids": label_ids, "attention_mask": mask, **continued_positions(model, mask, label_ids.shape[1])}
        rows = [row for row, ids in enumerate(completions) for _ in ids[1:]]
        positions = [position for ids in completions for position in range(len(ids) - 1)]
        targets = torch.tensor([token for ids in completions for token in ids[1:]], device=device)
        token_log_probs = selected_logits(model, inputs, rows, positions, cache).log_softmax(dim=-1).gather(1, targets[:, None])
        rows_index = torch.tensor([index for _, index in longer], device=device)[torch.tensor(rows, device=device)]
        totals.index_add_(0, rows_index, token_log_probs[:, 0])
    return totals.cpu()


def prefix_batches(order: list, prefixes: dict[tuple, list[int]], batch_size: int):
    """Prefixes in `order`, grouped so that a batch holds about `batch_size` sequences (at least one prefix)."""
    batch, count = [], 0
    for key in order:
        if batch and count + len(prefixes[key]) > batch_size:
            yield batch
            batch, count = [], 0
        batch.append(key)
        count += len(prefixes[key])
    if batch:
        yield batch


def continued_positions(model: SoftPromptModel, attention_mask: torch.Tensor, new_length: int) -> dict:
    """The position ids `[B, new]` of the last `new_length` columns, counting only real positions
    before them (BLOOM takes its positions from the mask instead: nothing to pass)."""
    if not model.takes_position_ids:
        return {}
    return {"position_ids": positions_from_mask(attention_mask)[:, -new_length:]}


def selected_logits(model: SoftPromptModel, inputs: dict, rows: list[int], positions: list[int], cache=None) -> torch.Tensor:
    """The fp32 logits `[n, vocab]` at (rows, positions) of the frozen model's output on `inputs`
    (after `cache`, which grows): the LM head runs there only, not over `[B, T, vocab]`."""
    base_model = model.base_model
    rows, positions = torch.tensor(rows, device=model.device), torch.tensor(positions, device=model.device)
    cache_inputs = {} if cache is None else {model.cache_argument: cache}
    if model.plain_linear_head:
        hidden = base_model.get_decoder()(**inputs, use_cache=cache is not None, **cache_inputs).last_hidden_state
        return base_model.get_output_embeddings()(hidden[rows, positions]).float()
    return base_model(**inputs, use_cache=cache is not None, **cache_inputs).logits[rows, positions].float()


@torch.no_grad()
def whole_sequence_log_probs(
    model: SoftPromptModel,
    sequences: Sequence[tuple[list[int], list[int]]],
    prompt_names: Sequence[str | None],
    pad_id: int,
    batch_size: int,
) -> torch.Tensor:
    """`completion_log_probs` with every sequence run whole, right-padded `[pad][P][x][c][pad]`."""
    device = model.device
    # Longest first, so each batch holds sequences of similar length (little padding computed);
    # the scores are put back in the caller's order at the end.
    order = sorted(range(len(sequences)),
                   key=lambda i: -(model.prompt_length(prompt_names[i]) + len(sequences[i][0]) + len(sequences[i][1])))
    totals = torch.zeros(len(sequences), device=device)
    for start in range(0, len(sequences), batch_size):
        indices = order[start : start + batch_size]
        input_ids, attention_mask = right_padded([sequences[i][0] + sequences[i][1] for i in indices], pad_id, device)
        inputs = model.prepare_inputs(input_ids, attention_mask, prompt_names=[prompt_names[i] for i in indices])
        num_virtual = inputs["inputs_embeds"].shape[1] - input_ids.shape[1]  # the batch's longest prompt
        rows, positions, targets = [], [], []
        for row, index in enumerate(indices):
            prompt_ids, completion_ids = sequences[index]
            ids = prompt_ids + completion_ids
            # Token k is predicted by the output at position V + k - 1 (the prompts shift it by V).
            for k in range(len(prompt_ids), len(ids)):
                rows.append(row)
                positions.append(num_virtual + k - 1)
                targets.append(ids[k])
        token_log_probs = selected_logits(model, inputs, rows, positions).log_softmax(dim=-1)
        token_log_probs = token_log_probs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        totals.index_add_(0, torch.tensor(indices, device=device)[torch.tensor(rows, device=device)], token_log_probs)
    return totals.cpu()


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
