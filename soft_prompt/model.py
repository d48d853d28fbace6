"""The wrapper: a frozen causal LM with a soft prompt prepended to every input.

    input ids   x1 .. xT            --(frozen input embedding)-->  [B, T, D]
    soft prompt P1 .. PV            --(SoftPromptEmbedding)------>  [B, V, D]
    concatenated [P1..PV][x1..xT]   ----------------------------->  [B, V + T, D] --> frozen model

The attention mask gets V leading ones, the labels V leading -100 (no loss on virtual tokens),
and, for models that take position ids, real tokens continue at positions V, V + 1, ... whatever
padding the batch has. Generation (`generation.py`) and label scoring (`scoring.py`) build on this;
their methods here only hand over.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from . import generation, scoring
from .checkpoint import load_checkpoint, save_checkpoint
from .data import IGNORE_INDEX
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
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a truncated weights file
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
        self.takes_position_ids = "position_ids" in forward_arguments
        self.takes_logits_to_keep = "logits_to_keep" in forward_arguments
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name is a
        # deprecated alias): the name PEFT's generation hook looks for.
        self.cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"
        self._prompt_kv = None  # (what it was computed from, the soft prompt's cache); see generation.prompt_cache
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
        if self.takes_position_ids:
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
        if not self.plain_linear_head:
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

    # -- generation and label scoring (generation.py, scoring.py) ------------------------------

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
        `logits_processor`, ...). Either padding side is accepted. `prefix_cache=True` reuses the
        soft prompt's keys and values where that is exact (greedy or sampling without beams); both
        paths give the same tokens (see `generation.py`).
        """
        return generation.generate(self, input_ids, attention_mask, prefix_cache, **generation_kwargs)

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
    ) -> tuple[list[str], torch.Tensor]:
        """The best label for each text by label scoring, and the scores `[len(texts), len(labels)]`.

        Each text fills the template (a str fills its first field, a dict names the fields) with
        each label in the last field; a label's score is the total log-probability of the tokens
        from the last field on, given the soft prompt and the text before it. The answer is always
        one of `labels`. `template` defaults to the checkpoint's; `use_prompt=False` scores with the
        frozen model alone, for comparison.
        """
        return scoring.classify(self, texts, labels, template, tokenizer, batch_size, use_prompt)

    def completion_log_probs(
        self,
        sequences: Sequence[tuple[list[int], list[int]]],
        pad_id: int = 0,
        batch_size: int = 16,
        use_prompt: bool = True,
    ) -> torch.Tensor:
        """The total log-probability `[N]` (fp32) of each completion given its prompt, for
        (prompt ids, completion ids) pairs; see `scoring.completion_log_probs`."""
        return scoring.completion_log_probs(self, sequences, pad_id, batch_size, use_prompt)
