"""The wrapper: a frozen causal LM with a soft prompt prepended to every input.

    input ids   x1 .. xT            --(frozen input embedding)-->  [B, T, D]
    soft prompt P1 .. PV            --(SoftPromptEmbedding)------>  [B, V, D]
    concatenated [P1..PV][x1..xT]   ----------------------------->  [B, V + T, D] --> frozen model

The attention mask gets V leading ones, the labels V leading -100 (no loss on virtual tokens),
and, for models that take position ids, real tokens continue at positions V, V + 1, ... whatever
padding the batch has.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .checkpoint import load_checkpoint, save_checkpoint
from .data import IGNORE_INDEX, split_template, template_fields
from .embedding import SoftPromptEmbedding
from .loss import frozen_head_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base_model(name: str, model_dtype: str = "fp32", device: torch.device | str = "cpu"):
    """(the causal LM `name`, a hub id or a folder, in `model_dtype` on `device` in eval mode, its
    tokenizer with a pad token). Raises a one-line ValueError when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(name).is_file():
        raise ValueError(f"--model {name} is a file: pass a model folder or a hub name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[model_dtype])
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        if Path(name).is_dir():
            raise ValueError(f"cannot load a causal LM from folder {name} ({reason})") from None
        raise ValueError(
            f"could not load model {name!r} from the hub ({reason}): pass a local model folder with --model"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out and never labelled
    return model.to(device).eval(), tokenizer


class SoftPromptModel(nn.Module):
    """A frozen `PreTrainedModel` for causal LM with a trainable soft prompt.

    Args:
        base_model: any Hugging Face causal LM with `get_input_embeddings()`; all its parameters
            are frozen (`requires_grad=False`).
        num_virtual_tokens, init, init_text, tokenizer, text_fill, vocab_size, seed: see
            `SoftPromptEmbedding`.
        metadata: extra facts saved with the checkpoint (template, label words, ...).
    """

    def __init__(
        self,
        base_model: nn.Module,
        num_virtual_tokens: int = 20,
        init: str = "random",
        init_text: str | None = None,
        tokenizer=None,
        text_fill: str = "pad",
        vocab_size: int | None = None,
        seed: int | None = None,
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(base_model, "get_input_embeddings") or base_model.get_input_embeddings() is None:
            raise ValueError(f"{type(base_model).__name__} has no get_input_embeddings(): not a supported causal LM")
        base_model.requires_grad_(False)
        self.base_model = base_model
        self.tokenizer = tokenizer
        word_embeddings = base_model.get_input_embeddings()
        self.prompt = SoftPromptEmbedding(
            num_virtual_tokens,
            word_embeddings.embedding_dim,
            init,
            word_embeddings=word_embeddings,
            tokenizer=tokenizer,
            init_text=init_text,
            text_fill=text_fill,
            vocab_size=vocab_size,
            seed=seed,
        ).to(word_embeddings.weight.device)
        self.metadata = {
            "init": init,
            "init_text": init_text if init == "text" else None,
            "text_fill": text_fill,
            "seed": seed,
            **(metadata or {}),
        }
        forward_arguments = inspect.signature(base_model.forward).parameters
        self._takes_position_ids = "position_ids" in forward_arguments
        self._takes_logits_to_keep = "logits_to_keep" in forward_arguments
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name is a
        # deprecated alias): the name PEFT's generation hook looks for.
        self._cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"
        self._prompt_kv = None  # (what it was computed from, the soft prompt's cache); see _prompt_cache
        # The chunked loss applies the LM head itself: only for a plain linear head over the
        # decoder's last hidden state (no logit soft-capping or scaling, which it would skip).
        config = base_model.config
        self._plain_linear_head = (
            isinstance(base_model.get_output_embeddings(), nn.Linear)
            and callable(getattr(base_model, "get_decoder", None))
            and not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
        )

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    @property
    def device(self) -> torch.device:
        return self.prompt.weight.device

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_first: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Model inputs with the soft prompt prepended: `inputs_embeds` `[B, V + T, D]`,
        `attention_mask` `[B, V + T]` and, where the model takes them, `position_ids` `[B, V + T]`.

        `prompt_first=True` lays out `[P][x][pad]` (right padding, training); `False` moves each
        row's left padding before the prompt, `[pad][P][x]`, so that the prompt touches the text.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size, num_virtual = input_ids.shape[0], self.num_virtual_tokens
        text_embeds = self.base_model.get_input_embeddings()(input_ids)  # [B, T, D]
        # The fp32 master copy is cast to the compute dtype here, so its gradient stays fp32.
        prompt_embeds = self.prompt(batch_size).to(text_embeds.dtype)  # [B, V, D]
        inputs_embeds = torch.cat([prompt_embeds, text_embeds], dim=1)  # [B, V + T, D]
        prompt_mask = attention_mask.new_ones(batch_size, num_virtual)
        attention_mask = torch.cat([prompt_mask, attention_mask], dim=1)  # [B, V + T]
        if not prompt_first:
            # Stable sort on "is a real position" moves each row's padding to the front, keeping
            # the order of the prompt and the text: [P][pad][x] -> [pad][P][x].
            order = torch.sort(attention_mask, dim=1, stable=True).indices  # [B, V + T]
            inputs_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand_as(inputs_embeds))
            attention_mask = attention_mask.gather(1, order)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self._takes_position_ids:
            # Padding does not advance the position: the prompt sits at 0..V-1, the text after it.
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """The frozen model's output on `[P][x]`; `labels` `[B, T]` get V leading -100s, so the
        loss is the model's own shifted cross-entropy over the real tokens."""
        inputs = self.prepare_inputs(input_ids, attention_mask)
        if labels is not None:
            prompt_labels = labels.new_full((labels.shape[0], self.num_virtual_tokens), IGNORE_INDEX)
            inputs["labels"] = torch.cat([prompt_labels, labels], dim=1)  # [B, V + T]
        return self.base_model(**inputs, **kwargs)

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean next-token cross-entropy over the labelled tokens, as `forward(...).loss`, but
        without the `[B, V + T, vocab]` logits: the LM head runs only where a label is (not on
        virtual tokens or padding), a chunk at a time (see `loss.py`). `labels` `[B, T]`, -100 = none.
        """
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if not self._plain_linear_head:
            return self(input_ids, attention_mask, labels, use_cache=False).loss
        inputs = self.prepare_inputs(input_ids, attention_mask)
        hidden = self.base_model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [B, V + T, D]
        # Position j predicts token j + 1: the text tokens x1..xT are predicted from V-1..V+T-2.
        num_virtual, length = self.num_virtual_tokens, input_ids.shape[1]
        predicting_text = hidden[:, num_virtual - 1 : num_virtual + length - 1]  # [B, T, D]
        has_label = labels != IGNORE_INDEX
        return frozen_head_cross_entropy(
            predicting_text[has_label], self.base_model.get_output_embeddings(), labels[has_label]
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, **metadata) -> None:
        """Write the prompt as a PEFT-compatible checkpoint directory (see `checkpoint.py`)."""
        save_checkpoint(directory, self.prompt.weight, self.base_model, {**self.metadata, **metadata})

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, directory: str | os.PathLike, tokenizer=None
    ) -> "SoftPromptModel":
        """Load a prompt saved by `save_pretrained` or by PEFT onto `base_model`."""
        weight, metadata = load_checkpoint(directory, base_model)
        # seed=0: the placeholder rows are overwritten at once and must not consume the global RNG.
        model = cls(base_model, num_virtual_tokens=weight.shape[0], tokenizer=tokenizer, seed=0, metadata=metadata)
        with torch.no_grad():
            model.prompt.weight.copy_(weight)
        return model

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_cache: bool = True,
        **generation_kwargs,
    ) -> torch.Tensor:
        """Generate after `[P][x]` with the KV cache on; returns the real input ids followed by the
        new tokens, `[B * copies, T + N]` (copies = `num_return_sequences`), as PEFT does.

        `generation_kwargs` are Hugging Face's (`max_new_tokens`, `do_sample`, `temperature`, `top_k`,
        `top_p`, `num_beams`, `repetition_penalty`, `eos_token_id`, `generation_config`,
        `logits_processor`, ...). Either padding side is accepted. Two paths, same tokens:

        - prefix cache (`prefix_cache=True`, greedy or sampling without beams, on architectures where
          it is exact, see `_prefix_cache_supported`): the soft prompt's keys and values are computed
          once and reused by every batch; a short decode loop here drives the cache.
        - otherwise the frozen model's own `generate()` gets the prefill as `inputs_embeds`
          `[pad][P][x]`; it derives position ids from the mask, so the text follows the prompt.

        In both, the repetition penalty counts the real input ids and the generated ones, never the
        virtual tokens or the padding (Hugging Face's own would see only the generated ids here).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = left_align(input_ids, attention_mask)
        if not attention_mask.any(dim=1).all():
            raise ValueError("empty input: every sequence needs at least one token")
        config = copy.deepcopy(generation_kwargs.pop("generation_config", None) or self.base_model.generation_config)
        processors = LogitsProcessorList(generation_kwargs.pop("logits_processor", None) or [])
        model_kwargs = config.update(**generation_kwargs)  # what is not a generation option goes to the model
        if config.repetition_penalty not in (None, 1.0):
            processors.insert(0, RealTokenRepetitionPenalty(config.repetition_penalty, input_ids, attention_mask))
            config.repetition_penalty = 1.0

        if prefix_cache and not model_kwargs and self._prefix_cache_supported() and decode_loop_handles(config):
            new_tokens = self._generate_from_prompt_cache(input_ids, attention_mask, config, processors)
            output = None
        else:
            inputs = self.prepare_inputs(input_ids, attention_mask, prompt_first=False)
            inputs.pop("position_ids", None)  # generate() derives them from the mask at every step
            output = self.base_model.generate(
                **inputs, generation_config=config, logits_processor=processors, **model_kwargs
            )
            # With inputs_embeds and no input_ids, generate() returns only the new tokens.
            new_tokens = output if isinstance(output, torch.Tensor) else output.sequences
        copies = new_tokens.shape[0] // input_ids.shape[0]  # beams are already reduced to return sequences
        sequences = torch.cat([input_ids.repeat_interleave(copies, dim=0), new_tokens], dim=1)  # [B * copies, T + N]
        if output is None or isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences  # return_dict_in_generate=True: keep scores etc.
        return output

    def _prefix_cache_supported(self) -> bool:
        """Whether the cached prompt followed by the batch's padding, `[P][pad][x]`, is exactly
        `[pad][P][x]`: true when positions come from position ids (GPT-2's absolute, Llama's rotary)
        or from the mask (BLOOM's ALiBi), not from cache slots as sliding windows count them."""
        config = self.base_model.config
        full_attention = getattr(config, "sliding_window", None) is None and set(
            getattr(config, "layer_types", None) or ["full_attention"]
        ) == {"full_attention"}
        positions_not_from_slots = self._takes_position_ids or config.model_type == "bloom"
        return full_attention and positions_not_from_slots and not config.is_encoder_decoder

    def _prompt_cache(self):
        """The frozen model's cache after the soft prompt alone, at positions 0..V-1, batch 1.

        The prompt's keys and values do not depend on the text after it (causal attention), so they
        are computed once and recomputed only when the prompt changes: an in-place update (its
        version counter), a new tensor or device (its data pointer) or another compute dtype.
        """
        weight = self.prompt.weight
        key = (weight._version, weight.data_ptr(), self.base_model.dtype)
        if self._prompt_kv is None or self._prompt_kv[0] != key:
            inputs = {"inputs_embeds": weight[None].to(self.base_model.dtype)}  # [1, V, D]
            if self._takes_position_ids:
                inputs["position_ids"] = torch.arange(self.num_virtual_tokens, device=weight.device)[None]  # [1, V]
            self._prompt_kv = (key, self.base_model(**inputs, use_cache=True)[self._cache_argument])
        return self._prompt_kv[1]

    def _generate_from_prompt_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config,
        processors: LogitsProcessorList,
    ) -> torch.Tensor:
        """Greedy or sampled decoding, as generate() does it, starting from the cached prompt.

        The layout is `[P][pad][x]`: the mask hides the padding and the position ids (or BLOOM's
        mask-derived ALiBi positions) put the text at V, V + 1, ..., as in `[pad][P][x]`.
        Returns the new tokens `[B, N]`; rows that ended get `pad_token_id` after their eos.
        """
        batch_size, num_virtual = input_ids.shape[0], self.num_virtual_tokens
        cache = copy.deepcopy(self._prompt_cache())
        cache.batch_repeat_interleave(batch_size)  # [1, heads, V, d] -> [B, heads, V, d] in every layer
        attention_mask = torch.cat([attention_mask.new_ones(batch_size, num_virtual), attention_mask], dim=1)  # [B, V + T]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, num_virtual:]  # [B, T]
        if config.do_sample:
            processors = LogitsProcessorList([*processors, *sampling_warpers(config)])
        eos = torch.tensor(as_list(config.eos_token_id), dtype=torch.long, device=input_ids.device)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0].item() if len(eos) else 0)

        step_inputs = {"inputs_embeds": self.base_model.get_input_embeddings()(input_ids)}  # [B, T, D]
        new_tokens = input_ids.new_empty(batch_size, 0)
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=input_ids.device)
        for _ in range(config.max_new_tokens):
            if self._takes_position_ids:
                step_inputs["position_ids"] = position_ids
            if self._takes_logits_to_keep:
                step_inputs["logits_to_keep"] = 1
            logits = self.base_model(
                **step_inputs, attention_mask=attention_mask, use_cache=True, **{self._cache_argument: cache}
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

    # -- classification ------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The most positions the frozen model takes, prompt included; None when unbounded (ALiBi)."""
        return getattr(self.base_model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def classify(
        self,
        texts: Sequence[str | dict],
        labels: Sequence[str],
        template: str | None = None,
        tokenizer=None,
        batch_size: int = 16,
        use_prompt: bool = True,
    ) -> tuple[list[str], torch.Tensor]:
        """The best label for each text by label scoring, and the scores `[len(texts), len(labels)]`.

        Each text fills the template (a str fills its first field, a dict names the fields) with
        each label in the last field; a label's score is the total log-probability of the tokens
        from the last field on, given the soft prompt and the text before it. The answer is always
        one of `labels`. `template` defaults to the checkpoint's; `use_prompt=False` scores with the
        frozen model alone, for comparison.
        """
        template = template or self.metadata.get("template")
        tokenizer = tokenizer or self.tokenizer
        if not template:
            raise ValueError("no template: pass template=... (the checkpoint records none)")
        if tokenizer is None:
            raise ValueError("classify needs a tokenizer: pass tokenizer=... or load the model with one")
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
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores = self.completion_log_probs(sequences, pad_id, batch_size, use_prompt)
        scores = scores.view(len(texts), len(labels))
        return [labels[index] for index in scores.argmax(dim=1).tolist()], scores

    @torch.no_grad()
    def completion_log_probs(
        self,
        sequences: Sequence[tuple[list[int], list[int]]],
        pad_id: int = 0,
        batch_size: int = 16,
        use_prompt: bool = True,
    ) -> torch.Tensor:
        """The total log-probability `[N]` (fp32) of each completion given its prompt: `sequences`
        holds (prompt ids, completion ids) pairs. Batched, right-padded `[P][x][pad]`; prompts too long
        for the context are cut from the left, with a warning."""
        num_virtual = self.num_virtual_tokens if use_prompt else 0
        # Longest first, so each batch holds sequences of similar length (little padding computed);
        # the scores are put back in the caller's order at the end.
        order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
        totals = []
        for start in range(0, len(sequences), batch_size):
            chunk = []
            for prompt_ids, completion_ids in (sequences[i] for i in order[start : start + batch_size]):
                if not prompt_ids or not completion_ids:
                    raise ValueError("label scoring needs tokens before the label and a non-empty label")
                if self.context_length is not None:
                    prompt_ids = truncate_left(prompt_ids, self.context_length - num_virtual - len(completion_ids))
                chunk.append((prompt_ids, completion_ids))
            length = max(len(p) + len(c) for p, c in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            rows, positions, targets = [], [], []
            for row, (prompt_ids, completion_ids) in enumerate(chunk):
                ids = prompt_ids + completion_ids
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                # Token k is predicted by the output at position V + k - 1 (the prompt shifts it by V).
                for k in range(len(prompt_ids), len(ids)):
                    rows.append(row)
                    positions.append(num_virtual + k - 1)
                    targets.append(ids[k])
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            inputs = self.prepare_inputs(input_ids, attention_mask) if use_prompt else {
                "input_ids": input_ids, "attention_mask": attention_mask}
            rows = torch.tensor(rows, device=self.device)
            positions = torch.tensor(positions, device=self.device)
            if self._plain_linear_head:
                # The LM head only where a label token is predicted, not over [b, V + T, vocab].
                hidden = self.base_model.get_decoder()(**inputs, use_cache=False).last_hidden_state
                selected = self.base_model.get_output_embeddings()(hidden[rows, positions]).float()  # [tokens, vocab]
            else:
                selected = self.base_model(**inputs, use_cache=False).logits[rows, positions].float()
            token_log_probs = selected.log_softmax(dim=-1).gather(1, torch.tensor(targets, device=self.device)[:, None])
            totals.append(torch.zeros(len(chunk), device=self.device).index_add_(0, rows, token_log_probs[:, 0]))
        sorted_totals = torch.cat(totals).cpu()
        return torch.empty_like(sorted_totals).index_copy_(0, torch.tensor(order, dtype=torch.long), sorted_totals)


# -- helpers for generation ------------------------------------------------------------------------

# The generation options the prefix-cache decode loop implements (or that change no token);
# any other option set sends generation through the frozen model's own generate().
DECODE_LOOP_OPTIONS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "num_beams", "num_return_sequences", "use_cache",
    "output_attentions", "output_hidden_states", "_from_model_config", "transformers_version",
})


def decode_loop_handles(config) -> bool:
    """Whether `_generate_from_prompt_cache` implements every option `config` sets."""
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
