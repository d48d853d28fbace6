"""Generation after a soft prompt, with the KV cache on.

Two paths give the same tokens:

- prefix cache (greedy or sampling without beams, on architectures where it is exact): each soft
  prompt's keys and values are computed once and reused by every batch; a short decode loop here
  drives the cache, laid out `[P][pad][x]`. A batch mixing prompts gathers each row's prompt
  cache, shorter ones after masked slots: `[pad][P_row][pad][x]`.
- otherwise the frozen model's own `generate()` gets the prefill as `inputs_embeds` `[pad][P][x]`;
  it derives position ids from the mask, so the text follows the prompt.

In both, the repetition penalty counts the real input ids and the generated ones, never the
virtual tokens or the padding (Hugging Face's own would see only the generated ids here).
`SoftPromptModel.generate` calls `generate` below.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .masks import positions_from_mask

if TYPE_CHECKING:
    from .model import SoftPromptModel

# The generation options the prefix-cache decode loop implements (or that change no token);
# any other option set sends generation through the frozen model's own generate().
DECODE_LOOP_OPTIONS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "num_beams", "num_return_sequences", "use_cache",
    "output_attentions", "output_hidden_states", "_from_model_config", "transformers_version",
})


@torch.no_grad()
def generate(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix_cache: bool = True,
    prompt_names: Sequence[str | None] | None = None,
    **generation_kwargs,
):
    """Generate after `[P][x]`; returns the real input ids followed by the new tokens,
    `[B * copies, T + N]` (copies = `num_return_sequences`), as PEFT does. See
    `SoftPromptModel.generate` for the arguments."""
    if prompt_names is not None:
        model.prompt_mask(prompt_names, input_ids.shape[0])  # a bad name fails here, before any work
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = left_align(input_ids, attention_mask)
    if not attention_mask.any(dim=1).all():
        raise ValueError("empty input: every sequence needs at least one token")
    base_model = model.base_model
    config = copy.deepcopy(generation_kwargs.pop("generation_config", None) or base_model.generation_config)
    processors = LogitsProcessorList(generation_kwargs.pop("logits_processor", None) or [])
    model_kwargs = config.update(**generation_kwargs)  # what is not a generation option goes to the model
    if config.repetition_penalty not in (None, 1.0):
        processors.insert(0, RealTokenRepetitionPenalty(config.repetition_penalty, input_ids, attention_mask))
        config.repetition_penalty = 1.0

    if prefix_cache and not model_kwargs and prefix_cache_supported(model) and decode_loop_handles(config):
        new_tokens = generate_from_prompt_cache(model, input_ids, attention_mask, config, processors, prompt_names)
        output = None
    else:
        inputs = model.prepare_inputs(input_ids, attention_mask, prompt_first=False, prompt_names=prompt_names)
        inputs.pop("position_ids", None)  # generate() derives them from the mask at every step
        output = base_model.generate(**inputs, generation_config=config, logits_processor=processors, **model_kwargs)
        # With inputs_embeds and no input_ids, generate() returns only the new tokens.
        new_tokens = output if isinstance(output, torch.Tensor) else output.sequences
    copies = new_tokens.shape[0] // input_ids.shape[0]  # beams are already reduced to return sequences
    sequences = torch.cat([input_ids.repeat_interleave(copies, dim=0), new_tokens], dim=1)  # [B * copies, T + N]
    if output is None or isinstance(output, torch.Tensor):
        return sequences
    output.sequences = sequences  # return_dict_in_generate=True: keep scores etc.
    return output


def prefix_cache_supported(model: SoftPromptModel) -> bool:
    """Whether the cached prompt followed by the batch's padding, `[P][pad][x]`, is exactly
    `[pad][P][x]` (see `prefix_cache_problem`)."""
    return prefix_cache_problem(model) is None


def prefix_cache_problem(model: SoftPromptModel) -> str | None:
    """Why a prompt's cached keys and values cannot be reused before text at positions V, V + 1, ...
    whatever padding comes between; None when they can: positions come from position ids (GPT-2's
    absolute, Llama's rotary) or from the mask (BLOOM's ALiBi), not from cache slots as sliding
    windows count them."""
    config = model.base_model.config
    if config.is_encoder_decoder:
        return f"{config.model_type} is an encoder-decoder model"
    if getattr(config, "sliding_window", None) is not None or set(
        getattr(config, "layer_types", None) or ["full_attention"]
    ) != {"full_attention"}:
        return f"{config.model_type} has sliding-window or other non-full attention layers"
    if not (model.takes_position_ids or config.model_type == "bloom"):
        return f"{config.model_type} takes no position ids, so its positions would count the cache's slots"
    return None


def batch_prompt_cache(model: SoftPromptModel, prompt_names: Sequence[str | None]) -> tuple[DynamicCache, torch.Tensor]:
    """A fresh cache whose row r holds the keys and values of prompt `prompt_names[r]` (None:
    none), gathered from each prompt's cache: `[B, heads, V, d]` in every layer, V the longest
    prompt, a shorter one right-aligned after zero slots; and the mask `[B, V]` hiding those slots."""
    batch_size = len(prompt_names)
    prompt_mask = model.prompt_mask(prompt_names, batch_size)  # [B, V]
    num_virtual = prompt_mask.shape[1]
    caches = {
        name: model.prompt_cache.get(name, model.prompts[name], model.base_model.dtype)
        for name in dict.fromkeys(prompt_names)
        if name is not None
    }
    if not caches:  # no row has a prompt
        return DynamicCache(), prompt_mask
    layers = []
    for index, like in enumerate(next(iter(caches.values())).layers):
        keys = like.keys.new_zeros(batch_size, like.keys.shape[1], num_virtual, like.keys.shape[3])
        values = like.values.new_zeros(batch_size, like.values.shape[1], num_virtual, like.values.shape[3])
        for name, cache in caches.items():
            rows = [row for row, row_name in enumerate(prompt_names) if row_name == name]
            layer = cache.layers[index]  # [1, heads, V_name, d]
            keys[rows, :, num_virtual - layer.keys.shape[2] :] = layer.keys
            values[rows, :, num_virtual - layer.values.shape[2] :] = layer.values
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers), prompt_mask


def generate_from_prompt_cache(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config,
    processors: LogitsProcessorList,
    prompt_names: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """Greedy or sampled decoding, as generate() does it, starting from the cached prompts.

    The layout is `[P][pad][x]`: the mask hides the padding and the position ids (or BLOOM's
    mask-derived ALiBi positions) put the text at V, V + 1, ..., as in `[pad][P][x]`; a row with a
    shorter prompt (or none) has masked slots before it, so its text follows its own prompt.
    Returns the new tokens `[B, N]`; rows that ended get `pad_token_id` after their eos.
    """
    base_model = model.base_model
    batch_size = input_ids.shape[0]
    cache, prompt_mask = batch_prompt_cache(model, prompt_names or [model.active_prompt] * batch_size)
    num_virtual = prompt_mask.shape[1]
    attention_mask = torch.cat([prompt_mask.to(attention_mask), attention_mask], dim=1)  # [B, V + T]
    position_ids = positions_from_mask(attention_mask)[:, num_virtual:]  # [B, T]
    if config.do_sample:
        processors = LogitsProcessorList([*processors, *sampling_warpers(config)])
    eos = torch.tensor(as_list(config.eos_token_id), dtype=torch.long, device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0].item() if len(eos) else 0)

    step_inputs = {"inputs_embeds": base_model.get_input_embeddings()(input_ids)}  # [B, T, D]
    new_tokens = input_ids.new_empty(batch_size, 0)
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=input_ids.device)
    for _ in range(config.max_new_tokens):
        if model.takes_position_ids:
            step_inputs["position_ids"] = position_ids
        if model.takes_logits_to_keep:
            step_inputs["logits_to_keep"] = 1
        logits = base_model(
            **step_inputs, attention_mask=attention_mask, use_cache=True, **{model.cache_argument: cache}
        ).logits
        scores = processors(new_tokens, logits[:, -1].float())  # [B, vocab]
        if config.do_sample:
            next_tokens = torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, pad)
        new_tokens = torch.cat([new_tokens, next_tokens[:, None]], dim=1)  # [B, n]
        unfinished &= ~torch.isin(next_tokens, eos)
        if not unfinished.any():
            break
        # The cache grew in place; only the new token goes in next.
        step_inputs = {"input_ids": next_tokens[:, None]}
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return new_tokens


def decode_loop_handles(config) -> bool:
    """Whether `generate_from_prompt_cache` implements every option `config` sets."""
    one_sequence = config.num_beams in (None, 1) and config.num_return_sequences in (None, 1)
    return one_sequence and config.max_new_tokens is not None and set(config.to_diff_dict()) <= DECODE_LOOP_OPTIONS


def sampling_warpers(config) -> list[LogitsProcessor]:
    """Temperature, top-k and top-p, in generate()'s order and on its conditions."""
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


class RealTokenRepetitionPenalty(LogitsProcessor):
    """Hugging Face's repetition penalty over `[real input ids, generated ids]`.

    generate() sees only the generated ids when the prefill goes in as embeddings; this adds the
    real input ids back (never the virtual tokens), as PEFT's generation and plain generate() on the
    ids count them. Padding is replaced by the row's last input token (real under left padding and
    counted anyway), so it penalises nothing extra.
    """

    def __init__(self, penalty: float, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])  # [B, T], left-padded
        self.penalty = RepetitionPenaltyLogitsProcessor(float(penalty))

    def __call__(self, generated_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Beams and return sequences are the input rows repeated in place: row i comes from row i // copies.
        copies = generated_ids.shape[0] // self.input_ids.shape[0]
        input_ids = self.input_ids.repeat_interleave(copies, dim=0).to(generated_ids.device)
        return self.penalty(torch.cat([input_ids, generated_ids], dim=1), scores)  # ids [B * copies, T + n]


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the front (a stable sort on the mask keeps the tokens' order)."""
    order = torch.sort(attention_mask, dim=1, stable=True).indices  # [B, T]
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)
