"""The prompt describes itself: InSPEcT (Ramati, Gottesman and Geva 2024, "Eliciting Textual
Descriptions from Representations of Continuous Prompts") on our mechanism.

    source pass   the soft prompt alone [P1..PV] through the frozen model; keep the input of every
                  decoder layer at the V positions: states [L, V, D]
    target pass   "task: classes | task: classes | x x ... x" (V placeholders); at the input of
                  target layer t, the placeholders' states are replaced by the source states of
                  layer s; greedy decoding after it, up to the separator " |" or a newline, is the
                  description of the prompt read at (s, t)

The source pass puts the prompt at the input embeddings, with nothing before it, because that is
how the model sees it in use (`SoftPromptModel.prepare_inputs`); InSPEcT writes it over layer 0's
output instead. A layer index l names the input of decoder layer l (the frozen model's
`hidden_states[l]`, l = 0..L-1) on both sides, so (s, t) = (0, 0) puts the prompt vectors themselves
in place of the placeholders, and patching a text's own states at the same layer changes nothing.
(In a model with absolute position embeddings, GPT-2, layer inputs include them: the source
states carry the prompt's positions 0..V-1 into the placeholders' places.)

A sweep runs every (source, target) pair of a layer grid for the trained prompt and two controls,
the initial prompt (initial_prompt.safetensors) and random vectors of the prompt's per-token norms,
plus the target text with no patch: a description means something where it differs from what the
controls and the target text alone make the model say. Each description is scored by its class
rate (the share of the checkpoint's label words it names) and ROUGE-L against reference texts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .chance import random_vectors_like
from .model import SoftPromptModel
from .runtime import decoder_layers

DEFAULT_TARGET = (
    "Identify the sentiment of this review: positive or negative | Identify the type of this email: spam or not spam | "
)
PLACEHOLDER = " x"  # InSPEcT's placeholder token; its states are replaced from the target layer on
SEPARATORS = ("|", "\n")  # a description ends at the next demonstration or line
GRID_POINTS = 8  # the default grid's layers per axis: 8 x 8 pairs, 3 sources (see default_layers)


# -- patching -----------------------------------------------------------------------------------


@contextlib.contextmanager
def patched_layer_inputs(layers: nn.ModuleList, patches: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """While open, every forward call of decoder layer l (a key of `patches`, value (rows [R],
    states [R, P, D])) gets its input hidden states `[B, T, D]` with positions 0..P-1 of those
    rows replaced by `states`. Positions count within the call, not the whole sequence."""

    def hook_for(rows: torch.Tensor, states: torch.Tensor):
        def hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()  # [B, T, D]
            hidden[rows, : states.shape[1]] = states.to(hidden)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [layers[layer].register_forward_pre_hook(hook_for(*patch), with_kwargs=True) for layer, patch in patches.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def generate_patched(
    model: SoftPromptModel,
    input_ids: Sequence[int],
    patch_start: int,
    states: torch.Tensor,
    target_layers: Sequence[int],
    max_new_tokens: int = 60,
    stop_ids: set[int] = frozenset(),
) -> list[list[int]]:
    """Greedy continuations of the text `input_ids` (the frozen model, no soft prompt), one per
    row of `states` `[B, P, D]`: row b replaces positions patch_start..patch_start+P-1 at the input
    of decoder layer `target_layers[b]` by `states[b]`. The patch applies to the prefill only; the
    KV cache carries it into every decoded token. A row ends after a token of `stop_ids` (kept in
    its continuation) that follows one outside them, so a leading separator or newline does not
    end it empty; or after `max_new_tokens`.

    The text before `patch_start` is the same for every row and no patch reaches it (attention is
    causal): it runs once and its cache is shared by the B rows."""
    base_model, device = model.base_model, model.device
    batch_size, patch_length = states.shape[0], states.shape[1]
    ids = torch.tensor(list(input_ids), device=device)
    if not 0 <= patch_start <= len(ids) - patch_length:
        raise ValueError(f"a patch of {patch_length} positions from {patch_start} does not fit {len(ids)} tokens")
    layers = decoder_layers(base_model)
    cache, past = None, 0

    def step(step_ids: torch.Tensor) -> torch.Tensor:  # [B, n] -> next-token logits [B, vocab]
        nonlocal cache, past
        rows, length = step_ids.shape
        inputs = {"input_ids": step_ids, "attention_mask": torch.ones(rows, past + length, dtype=torch.long, device=device)}
        if model.takes_position_ids:
            inputs["position_ids"] = torch.arange(past, past + length, device=device).expand(rows, -1)
        if model.takes_logits_to_keep:
            inputs["logits_to_keep"] = 1
        output = base_model(**inputs, use_cache=True, **({model.cache_argument: cache} if cache is not None else {}))
        cache, past = output[model.cache_argument], past + length
        return output.logits[:, -1].float()

    if patch_start:
        step(ids[None, :patch_start])
        cache.batch_repeat_interleave(batch_size)
    patches = {}
    for layer in dict.fromkeys(target_layers):
        rows = torch.tensor([row for row, target in enumerate(target_layers) if target == layer], device=device)
        patches[layer] = (rows, states[rows.cpu()].to(device))
    with patched_layer_inputs(layers, patches):
        logits = step(ids[patch_start:].expand(batch_size, -1))  # [B, vocab]
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    continuations = [[] for _ in range(batch_size)]
    active = torch.arange(batch_size, device=device)  # the rows still decoding, in cache order
    begun = torch.zeros(batch_size, dtype=torch.bool, device=device)  # a token outside stop_ids came
    for length in range(1, max_new_tokens + 1):
        next_tokens = logits.argmax(dim=-1)  # [B_active]
        for row, token in zip(active.tolist(), next_tokens.tolist()):
            continuations[row].append(token)
        stops = torch.isin(next_tokens, stop)
        running = ~(stops & begun)
        if length == max_new_tokens or not running.any():
            break
        begun |= ~stops
        if not running.all():  # finished rows leave the batch and the cache
            cache.batch_select_indices(running.nonzero()[:, 0])
            active, next_tokens, begun = active[running], next_tokens[running], begun[running]
        logits = step(next_tokens[:, None])
    return continuations


@torch.no_grad()
def source_states(model: SoftPromptModel, prompts: torch.Tensor) -> torch.Tensor:
    """The input of every decoder layer at the prompt positions when each prompt of `prompts`
    `[S, V, D]` runs alone through the frozen model, as in use (positions 0..V-1, nothing before):
    `[S, L, V, D]` in the model's dtype."""
    base_model = model.base_model
    dtype = base_model.get_input_embeddings().weight.dtype
    inputs_embeds = prompts.to(device=model.device, dtype=dtype)
    hidden = base_model(inputs_embeds=inputs_embeds, output_hidden_states=True, use_cache=False).hidden_states
    num_layers = len(decoder_layers(base_model))
    return torch.stack(hidden[:num_layers], dim=1)  # hidden[l] is layer l's input for l < L


# -- the layer grid and the scores --------------------------------------------------------------


def default_layers(num_layers: int) -> list[int]:
    """About GRID_POINTS evenly spaced layers from 0: every layer of a shallow model, a stride of
    4 for SmolLM2's 30 (0, 4, ..., 28)."""
    stride = max(1, round(num_layers / GRID_POINTS))
    return list(range(0, num_layers, stride))


def layer_grid(num_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """The layers to sweep on both axes (sorted, distinct): `layers`, or `default_layers`. A layer
    outside 0..num_layers-1 is a one-line ValueError."""
    if layers is None:
        return default_layers(num_layers)
    outside = [layer for layer in layers if not 0 <= layer < num_layers]
    if outside or not layers:
        raise ValueError(f"--layers must name layers 0..{num_layers - 1} of the model's {num_layers}, got {list(layers)}")
    return sorted(set(layers))


def words(text: str) -> list[str]:
    """Lowercase word tokens (letters, digits, underscore), as ROUGE and the class rate count them."""
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure: with L the longest common subsequence of the two texts' words,
    2PR / (P + R) for P = L / |candidate| and R = L / |reference|; 0 when either is empty."""
    candidate_words, reference_words = words(candidate), words(reference)
    previous = [0] * (len(reference_words) + 1)  # LCS lengths of the candidate prefix so far, per reference prefix
    for candidate_word in candidate_words:
        current = [0]
        for j, reference_word in enumerate(reference_words):
            current.append(previous[j] + 1 if candidate_word == reference_word else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def class_rate(description: str, label_words: Sequence[str]) -> float | None:
    """The share of `label_words` whose words appear in `description`, in order and adjacent
    ("hate speech" in "it flags hate speech."); None without label words."""
    if not label_words:
        return None
    text = f" {' '.join(words(description))} "
    return sum(f" {' '.join(words(label))} " in text for label in label_words) / len(label_words)


def description_of(tokenizer, continuation: list[int]) -> str:
    """The decoded continuation from its first word up to the next separator, stripped."""
    text = tokenizer.decode(continuation, skip_special_tokens=True).lstrip("".join(SEPARATORS) + " ")
    for separator in SEPARATORS:
        text = text.split(separator)[0]
    return text.strip()


def stop_token_ids(tokenizer) -> set[int]:
    """The ids whose text holds a separator, and eos: decoding stops after any of them."""
    vocabulary = tokenizer.get_vocab().values()
    stop = {token_id for token_id in vocabulary if any(s in tokenizer.decode([token_id]) for s in SEPARATORS)}
    return stop | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


# -- the sweep ----------------------------------------------------------------------------------


def describe(
    model: SoftPromptModel,
    layers: Sequence[int] | None = None,
    target_text: str = DEFAULT_TARGET,
    references: Sequence[str] | None = None,
    initial_prompt: torch.Tensor | None = None,
    seed: int = 0,
    max_new_tokens: int = 60,
    batch_size: int = 64,
    top: int = 5,
) -> dict:
    """The descriptions of the active prompt at every (source, target) pair of the layer grid, and
    of the controls, as a JSON-ready dict:

        layers, num_layers, target_text, references, label_words
        unpatched                    what the target text alone makes the model say
        sources[name]                per source (trained, initial when `initial_prompt` `[V, D]` is
                                     given, random): [{source_layer, target_layer, description,
                                     class_rate, rouge_l}, ...] over the grid, source-major
        summary[name]                mean and max class rate and ROUGE-L over the pairs
        best[name]                   the `top` pairs by class rate, then ROUGE-L

    `references` default to the checkpoint's init text (none: ROUGE-L is None); the class rate
    counts the checkpoint's label words (none: None). The random control is seeded by `seed`."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("descriptions are decoded text: load the model with its tokenizer (tokenizer=...)")
    prompt = model.prompt.weight.detach().float().cpu()  # [V, D]
    num_virtual = prompt.shape[0]
    if references is None:
        references = [model.metadata["init_text"]] if model.metadata.get("init_text") else []
    label_words = model.metadata.get("label_words") or []
    grid = layer_grid(len(decoder_layers(model.base_model)), layers)
    pairs = [(source, target) for source in grid for target in grid]

    sources = {"trained": prompt}
    if initial_prompt is not None:
        if initial_prompt.shape != prompt.shape:
            raise ValueError(f"the initial prompt is {list(initial_prompt.shape)}, the prompt {list(prompt.shape)}")
        sources["initial"] = initial_prompt.float().cpu()
    sources["random"] = random_vectors_like(prompt, seed)
    states = source_states(model, torch.stack(list(sources.values())))  # [S, L, V, D]

    prefix = tokenizer(target_text.rstrip())["input_ids"]  # the placeholders bring their own space
    placeholder = tokenizer.encode(PLACEHOLDER, add_special_tokens=False)[-1]
    target_ids = prefix + [placeholder] * num_virtual
    stop = stop_token_ids(tokenizer)

    def scored(continuation: list[int]) -> dict:
        description = description_of(tokenizer, continuation)
        rouge = max((rouge_l(description, reference) for reference in references), default=None)
        return {"description": description, "class_rate": class_rate(description, label_words), "rouge_l": rouge}

    # Row 0 is the target text alone: its placeholders' own layer-0 input patched back changes
    # nothing. Then one row per (source, pair); rows run in batches sharing the target text's cache.
    with torch.no_grad():
        own = model.base_model(torch.tensor([target_ids], device=model.device), output_hidden_states=True).hidden_states[0]
    row_states = [own[0, len(prefix) :]] + [states[index, source] for index in range(len(sources)) for source, _ in pairs]
    row_targets = [0] + [target for _ in sources for _, target in pairs]
    continuations = []
    for start in tqdm(range(0, len(row_states), batch_size), desc="describing", unit="batch", leave=False):
        batch_states = torch.stack(row_states[start : start + batch_size])  # [B, V, D]
        targets = row_targets[start : start + batch_size]
        continuations += generate_patched(model, target_ids, len(prefix), batch_states, targets, max_new_tokens, stop)
    unpatched, continuations = continuations[0], continuations[1:]

    result = {
        "layers": grid,
        "num_layers": len(decoder_layers(model.base_model)),
        "target_text": target_text,
        "references": list(references),
        "label_words": list(label_words),
        "unpatched": scored(unpatched),
        "sources": {},
        "summary": {},
        "best": {},
    }
    for index, name in enumerate(sources):
        own = continuations[index * len(pairs) : (index + 1) * len(pairs)]
        entries = [{"source_layer": s, "target_layer": t, **scored(c)} for (s, t), c in zip(pairs, own)]
        result["sources"][name] = entries
        result["summary"][name] = summary_of(entries)
        result["best"][name] = sorted(entries, key=lambda e: (-(e["class_rate"] or 0), -(e["rouge_l"] or 0)))[:top]
    return result


def summary_of(entries: list[dict]) -> dict[str, float | None]:
    """Mean and max class rate and ROUGE-L over the pairs (None where a score is not defined)."""
    summary = {}
    for key in ("class_rate", "rouge_l"):
        values = [entry[key] for entry in entries if entry[key] is not None]
        summary[f"mean_{key}"] = sum(values) / len(values) if values else None
        summary[f"max_{key}"] = max(values) if values else None
    return summary


def format_descriptions(result: dict) -> str:
    """The best descriptions per source with their layers and scores, for the terminal."""

    def score(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"descriptions at {len(result['layers'])}x{len(result['layers'])} layer pairs (layers {result['layers']} "
        f"of {result['num_layers']}); target text {result['target_text']!r}",
        f"the target text alone: {result['unpatched']['description']!r}",
    ]
    for name, best in result["best"].items():
        summary = result["summary"][name]
        lines += ["", f"{name}: class rate mean {score(summary['mean_class_rate'])} max {score(summary['max_class_rate'])}, "
                      f"ROUGE-L mean {score(summary['mean_rouge_l'])} max {score(summary['max_rouge_l'])}"]
        for entry in best:
            lines.append(
                f"  {entry['source_layer']:>3} -> {entry['target_layer']:<3} class {score(entry['class_rate'])} "
                f"ROUGE-L {score(entry['rouge_l'])}  {entry['description']!r}"
            )
    return "\n".join(lines)
