"""The wrapper: a frozen causal LM with a soft prompt prepended to every input.

    input ids   x1 .. xT            --(frozen input embedding)-->  [B, T, D]
    soft prompt P1 .. PV            --(SoftPromptEmbedding)------>  [B, V, D]
    concatenated [P1..PV][x1..xT]   ----------------------------->  [B, V + T, D] --> frozen model

The attention mask gets V leading ones, the labels V leading -100 (no loss on virtual tokens),
and, for models that take position ids, real tokens continue at positions V, V + 1, ... whatever
padding the batch has. Several named prompts can share the frozen model, and a batch can give each
row its own: `[pad][P_row][x]`. Generation (`generation.py`) and label scoring (`scoring.py`) build
on this; their methods here only hand over.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from . import generation, scoring
from .checkpoint import load_checkpoint, save_checkpoint
from .embedding import SoftPromptEmbedding
from .loss import frozen_head_cross_entropy
from .masks import IGNORE_INDEX, positions_from_mask
from .prompt_cache import PromptCache

DEFAULT_PROMPT = "default"  # the name of the prompt made by __init__ and loaded by from_pretrained


class SoftPromptModel(nn.Module):
    """A frozen `PreTrainedModel` for causal LM with a trainable soft prompt.

    Args:
        base_model: any Hugging Face causal LM with `get_input_embeddings()`; all its parameters
            are frozen (`requires_grad=False`).
        num_virtual_tokens, init, init_text, tokenizer, text_fill, vocab_size, seed, label_words:
            see `SoftPromptEmbedding`.
        metadata: extra facts saved with the checkpoint (template, label words, ...).
        name: the prompt's name.

    The prompt made here is named "default" unless `name` says otherwise; more can be added or
    loaded beside it (`add_prompt`, `load_prompt`), one is active (`set_prompt`), and
    `prompt_names` gives each row of a batch its own (see `prepare_inputs`).
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
        name: str = DEFAULT_PROMPT,
        label_words: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(base_model, "get_input_embeddings") or base_model.get_input_embeddings() is None:
            raise ValueError(f"{type(base_model).__name__} has no get_input_embeddings(): not a supported causal LM")
        base_model.requires_grad_(False)
        self.base_model = base_model
        self.tokenizer = tokenizer
        # Each named prompt's keys and values, for generation and label scoring (prompt_cache.py).
        self.prompt_cache = PromptCache(self.run_prompt_alone)
        # Named prompts, each with its own metadata; `prompt` is the active one (see `set_prompt`).
        self.prompts = nn.ModuleDict()
        self.prompt_metadata: dict[str, dict] = {}
        self.add_prompt(
            name, num_virtual_tokens, init, init_text=init_text, text_fill=text_fill,
            vocab_size=vocab_size, seed=seed, metadata=metadata, label_words=label_words,
        )
        self.set_prompt(name)
        forward_arguments = inspect.signature(base_model.forward).parameters
        self.takes_position_ids = "position_ids" in forward_arguments
        self.takes_logits_to_keep = "logits_to_keep" in forward_arguments
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name is a
        # deprecated alias): the name PEFT's generation hook looks for.
        self.cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"
        # The chunked loss applies the LM head itself: only for a plain linear head over the
        # decoder's last hidden state (no logit soft-capping or scaling, which it would skip).
        config = base_model.config
        self.plain_linear_head = (
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
        prompt_names: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs with the soft prompt prepended: `inputs_embeds` `[B, V + T, D]`,
        `attention_mask` `[B, V + T]` and, where the model takes them, `position_ids` `[B, V + T]`.

        `prompt_first=True` lays out `[P][x][pad]` (right padding, training); `False` moves each
        row's left padding before the prompt, `[pad][P][x]`, so that the prompt touches the text.
        `prompt_names` gives each row its own prompt (a name, or None for the frozen model alone):
        V is then the longest of them and a shorter one gets masked slots before it,
        `[pad][P_row][x]`, so that every row sees exactly what it would see alone.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_embeds = self.base_model.get_input_embeddings()(input_ids)  # [B, T, D]
        prompt_embeds, prompt_mask = self.prompt_block(prompt_names, input_ids.shape[0], text_embeds.dtype)
        inputs_embeds = torch.cat([prompt_embeds, text_embeds], dim=1)  # [B, V + T, D]
        attention_mask = torch.cat([prompt_mask.to(attention_mask), attention_mask], dim=1)  # [B, V + T]
        if not prompt_first:
            # Stable sort on "is a real position" moves each row's padding to the front, keeping
            # the order of the prompt and the text: [P][pad][x] -> [pad][P][x].
            order = torch.sort(attention_mask, dim=1, stable=True).indices  # [B, V + T]
            inputs_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand_as(inputs_embeds))
            attention_mask = attention_mask.gather(1, order)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self.takes_position_ids:
            # Padding does not advance the position: the prompt sits at 0..V-1, the text after it.
            inputs["position_ids"] = positions_from_mask(attention_mask)
        return inputs

    def prompt_block(
        self, prompt_names: Sequence[str | None] | None, batch_size: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's prompt in the model's `dtype`, right-aligned in `[B, V, D]`, and its mask
        `[B, V]`; V is the longest row prompt (the active prompt's when `prompt_names` is None)."""
        if prompt_names is None:
            # A view of the fp32 master copy, cast here, so its gradient stays fp32.
            prompt_embeds = self.prompt(batch_size).to(dtype)  # [B, V, D]
            return prompt_embeds, torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        prompt_mask = self.prompt_mask(prompt_names, batch_size)
        num_virtual = prompt_mask.shape[1]
        prompt_embeds = torch.zeros(batch_size, num_virtual, self.prompt.embed_dim, dtype=dtype, device=self.device)
        for name in dict.fromkeys(prompt_names):
            if name is not None:
                rows = [row for row, row_name in enumerate(prompt_names) if row_name == name]
                weight = self.prompts[name].weight  # [V_name, D]
                prompt_embeds[rows, num_virtual - weight.shape[0] :] = weight.to(dtype)
        return prompt_embeds, prompt_mask

    def prompt_mask(self, prompt_names: Sequence[str | None], batch_size: int) -> torch.Tensor:
        """`[B, V]`, V the longest row prompt: row r holds zeros, then one 1 per virtual token of its
        prompt (none for None). An unknown name, or a name count other than B, is a ValueError."""
        if len(prompt_names) != batch_size:
            raise ValueError(f"prompt_names has {len(prompt_names)} names for a batch of {batch_size} rows")
        for row, name in enumerate(prompt_names):
            if name is not None and name not in self.prompts:
                raise ValueError(f"row {row} names prompt {name!r}, but the loaded prompts are {self.prompt_names}")
        lengths = torch.tensor([self.prompt_length(name) for name in prompt_names])
        first_real = (lengths.max() - lengths).to(self.device)  # [B]
        return (torch.arange(int(lengths.max()), device=self.device) >= first_real[:, None]).long()

    def text_labels(
        self, labels: torch.Tensor, attention_mask: torch.Tensor | None, prompt_names: Sequence[str | None] | None
    ) -> torch.Tensor:
        """`labels` `[B, T]` as each row counts them alone: a row without a prompt has nothing
        before its first token to predict it (in a mixed batch a masked slot would)."""
        if prompt_names is None or all(name is not None for name in prompt_names):
            return labels
        first_real = (attention_mask.long().argmax(dim=1, keepdim=True) if attention_mask is not None
                      else labels.new_zeros(labels.shape[0], 1))  # [B, 1]
        no_prompt = torch.tensor([name is None for name in prompt_names], device=labels.device)[:, None]
        return torch.where(no_prompt, labels.scatter(1, first_real, IGNORE_INDEX), labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_names: Sequence[str | None] | None = None,
        **kwargs,
    ):
        """The frozen model's output on `[P][x]`; `labels` `[B, T]` get V leading -100s, so the
        loss is the model's own shifted cross-entropy over the real tokens. `prompt_names`: one
        prompt (or None) per row, see `prepare_inputs`."""
        inputs = self.prepare_inputs(input_ids, attention_mask, prompt_names=prompt_names)
        if labels is not None:
            num_virtual = inputs["inputs_embeds"].shape[1] - input_ids.shape[1]
            prompt_labels = labels.new_full((labels.shape[0], num_virtual), IGNORE_INDEX)
            labels = self.text_labels(labels, attention_mask, prompt_names)
            inputs["labels"] = torch.cat([prompt_labels, labels], dim=1)  # [B, V + T]
        return self.base_model(**inputs, **kwargs)

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_names: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """The mean next-token cross-entropy over the labelled tokens, as `forward(...).loss`, but
        without the `[B, V + T, vocab]` logits: the LM head runs only where a label is (not on
        virtual tokens or padding), a chunk at a time (see `loss.py`). `labels` `[B, T]`, -100 = none.
        """
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if not self.plain_linear_head:
            return self(input_ids, attention_mask, labels, prompt_names, use_cache=False).loss
        inputs = self.prepare_inputs(input_ids, attention_mask, prompt_names=prompt_names)
        hidden = self.base_model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [B, V + T, D]
        # Position j predicts token j + 1: the text tokens x1..xT are predicted from V-1..V+T-2.
        length = input_ids.shape[1]
        num_virtual = hidden.shape[1] - length
        labels = self.text_labels(labels, attention_mask, prompt_names)
        if num_virtual == 0:  # no row has a prompt: nothing predicts the first token
            predicting_text, labels = hidden[:, :-1], labels[:, 1:]  # [B, T - 1, D]
        else:
            predicting_text = hidden[:, num_virtual - 1 : num_virtual + length - 1]  # [B, T, D]
        has_label = labels != IGNORE_INDEX
        return frozen_head_cross_entropy(
            predicting_text[has_label], self.base_model.get_output_embeddings(), labels[has_label]
        )

    def run_prompt_alone(self, weight: torch.Tensor) -> DynamicCache:
        """The frozen model's cache after the prompt `weight` `[V, D]` alone, at positions 0..V-1,
        batch 1: what `prompt_cache` keeps for each named prompt."""
        inputs = {"inputs_embeds": weight[None].to(self.base_model.dtype)}  # [1, V, D]
        if self.takes_position_ids:
            inputs["position_ids"] = torch.arange(weight.shape[0], device=weight.device)[None]  # [1, V]
        return self.base_model(**inputs, use_cache=True)[self.cache_argument]

    # -- named prompts -------------------------------------------------------------------------

    @property
    def prompt(self) -> SoftPromptEmbedding:
        """The active prompt: used when no `prompt_names` are given, and the only one that trains."""
        return self.prompts[self.active_prompt]

    @property
    def metadata(self) -> dict:
        """The active prompt's metadata (template, label words, ...), saved with it."""
        return self.prompt_metadata[self.active_prompt]

    @property
    def prompt_names(self) -> list[str]:
        return list(self.prompts)

    def prompt_length(self, name: str | None) -> int:
        """The number of virtual tokens of prompt `name`; 0 for None (the frozen model alone)."""
        if name is None:
            return 0
        if name not in self.prompts:
            raise ValueError(f"no prompt named {name!r}: the loaded prompts are {self.prompt_names}")
        return self.prompts[name].num_virtual_tokens

    def add_prompt(
        self,
        name: str,
        num_virtual_tokens: int = 20,
        init: str = "random",
        *,
        init_text: str | None = None,
        text_fill: str = "pad",
        vocab_size: int | None = None,
        seed: int | None = None,
        metadata: dict | None = None,
        label_words: Sequence[str] | None = None,
    ) -> SoftPromptEmbedding:
        """A new prompt `name` beside the others, frozen until `set_prompt(name)`; the arguments
        are `SoftPromptEmbedding`'s (the model's tokenizer serves `init="text"`)."""
        if name in self.prompts:
            raise ValueError(f"a prompt named {name!r} is loaded already: delete_prompt({name!r}) first or choose another name")
        word_embeddings = self.base_model.get_input_embeddings()
        prompt = SoftPromptEmbedding(
            num_virtual_tokens,
            word_embeddings.embedding_dim,
            init,
            word_embeddings=word_embeddings,
            tokenizer=self.tokenizer,
            init_text=init_text,
            text_fill=text_fill,
            vocab_size=vocab_size,
            seed=seed,
            label_words=label_words,
        ).to(word_embeddings.weight.device)
        try:
            self.prompts[name] = prompt.requires_grad_(False)
        except (KeyError, TypeError) as error:  # "a.b", "", or a name ModuleDict uses itself ("keys", ...)
            raise ValueError(f"{name!r} cannot name a prompt ({error})") from None
        self.prompt_metadata[name] = {
            "init": init,
            "init_text": init_text if init in ("text", "labels") else None,
            "text_fill": text_fill,
            "seed": seed,
            **(metadata or {}),
        }
        self.prompt_cache.invalidate(name)
        return prompt

    def load_prompt(self, directory: str | os.PathLike, name: str) -> SoftPromptEmbedding:
        """Load a checkpoint of ours or PEFT's as prompt `name`, frozen until `set_prompt(name)`. Its
        embedding size must be the model's (a `CheckpointError` otherwise); its length may differ."""
        weight, metadata = load_checkpoint(directory, self.base_model)
        # seed=0: the placeholder rows are overwritten at once and must not consume the global RNG.
        prompt = self.add_prompt(name, weight.shape[0], seed=0, metadata=metadata)
        with torch.no_grad():
            prompt.weight.copy_(weight)
        return prompt

    def set_prompt(self, name: str) -> None:
        """Make `name` the active prompt: the default for every call, and the one that trains
        (its weight alone requires grad, so training it never changes another)."""
        if name not in self.prompts:
            raise ValueError(f"no prompt named {name!r}: the loaded prompts are {self.prompt_names}")
        for prompt_name, prompt in self.prompts.items():
            prompt.requires_grad_(prompt_name == name)
        self.active_prompt = name

    def delete_prompt(self, name: str) -> None:
        """Drop prompt `name` (not the active one) and its cached keys and values."""
        if name == self.active_prompt:
            raise ValueError(f"{name!r} is the active prompt: set_prompt() another one before deleting it")
        if name not in self.prompts:
            raise ValueError(f"no prompt named {name!r}: the loaded prompts are {self.prompt_names}")
        del self.prompts[name]
        del self.prompt_metadata[name]
        self.prompt_cache.invalidate(name)

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str) -> SoftPromptEmbedding:
        """PEFT's spelling of `load_prompt(directory, adapter_name)`."""
        return self.load_prompt(directory, adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """PEFT's spelling of `set_prompt(adapter_name)`."""
        self.set_prompt(adapter_name)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, name: str | None = None, **metadata) -> None:
        """Write prompt `name` (default: the active one) as a PEFT-compatible checkpoint directory
        (see `checkpoint.py`), with its metadata updated by `metadata`."""
        name = name or self.active_prompt
        if name not in self.prompts:
            raise ValueError(f"no prompt named {name!r}: the loaded prompts are {self.prompt_names}")
        save_checkpoint(directory, self.prompts[name].weight, self.base_model, {**self.prompt_metadata[name], **metadata})

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, directory: str | os.PathLike, tokenizer=None, name: str = DEFAULT_PROMPT
    ) -> "SoftPromptModel":
        """Load a prompt saved by `save_pretrained` or by PEFT onto `base_model`, as prompt `name`."""
        weight, metadata = load_checkpoint(directory, base_model)
        # seed=0: the placeholder rows are overwritten at once and must not consume the global RNG.
        model = cls(base_model, weight.shape[0], tokenizer=tokenizer, seed=0, metadata=metadata, name=name)
        with torch.no_grad():
            model.prompt.weight.copy_(weight)
        return model

    # -- generation and label scoring (generation.py, scoring.py) ------------------------------

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_cache: bool = True,
        prompt_names: Sequence[str | None] | None = None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """Generate after `[P][x]` with the KV cache on; returns the real input ids followed by the
        new tokens, `[B * copies, T + N]` (copies = `num_return_sequences`), as PEFT does.

        `generation_kwargs` are Hugging Face's (`max_new_tokens`, `do_sample`, `temperature`, `top_k`,
        `top_p`, `num_beams`, `repetition_penalty`, `eos_token_id`, `generation_config`,
        `logits_processor`, ...). Either padding side is accepted. `prefix_cache=True` reuses the
        soft prompt's keys and values where that is exact (greedy or sampling without beams); both
        paths give the same tokens (see `generation.py`). `prompt_names`: one prompt (or None) per
        row; each row gets the tokens it gets alone.
        """
        return generation.generate(self, input_ids, attention_mask, prefix_cache, prompt_names, **generation_kwargs)

    @property
    def context_length(self) -> int | None:
        """The most positions the frozen model takes, prompt included; None when unbounded (ALiBi)."""
        return getattr(self.base_model.config, "max_position_embeddings", None)

    def classify(
        self,
        texts: Sequence[str | dict],
        labels: Sequence[str],
        template: str | None = None,
        tokenizer=None,
        batch_size: int = 16,
        use_prompt: bool = True,
        prompt_names: Sequence[str | None] | None = None,
    ) -> tuple[list[str], torch.Tensor]:
        """The best label for each text by label scoring, and the scores `[len(texts), len(labels)]`.

        Each text fills the template (a str fills its first field, a dict names the fields) with
        each label in the last field; a label's score is the total log-probability of the tokens
        from the last field on, given the soft prompt and the text before it. The answer is always
        one of `labels`. `template` defaults to the checkpoint's; `use_prompt=False` scores with the
        frozen model alone, for comparison; `prompt_names` scores each text with its own prompt
        (or None), in shared batches.
        """
        return scoring.classify(self, texts, labels, template, tokenizer, batch_size, use_prompt, prompt_names)

    def completion_log_probs(
        self,
        sequences: Sequence[tuple[list[int], list[int]]],
        pad_id: int = 0,
        batch_size: int = 16,
        use_prompt: bool = True,
        prompt_names: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """The total log-probability `[N]` (fp32) of each completion given its prompt, for
        (prompt ids, completion ids) pairs; see `scoring.completion_log_probs`."""
        return scoring.completion_log_probs(self, sequences, pad_id, batch_size, use_prompt, prompt_names)
