"""The wrapper: a frozen causal LM with a soft prompt prepended to every input.

    input ids   x1 .. xT            --(frozen input embedding)-->  [B, T, D]
    soft prompt P1 .. PV            --(SoftPromptEmbedding)------>  [B, V, D]
    concatenated [P1..PV][x1..xT]   ----------------------------->  [B, V + T, D] --> frozen model

The attention mask gets V leading ones, the labels V leading -100 (no loss on virtual tokens),
and, for models that take position ids, real tokens continue at positions V, V + 1, ... whatever
padding the batch has.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .data import IGNORE_INDEX
from .embedding import SoftPromptEmbedding
from .loss import frozen_head_cross_entropy


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
        self._takes_position_ids = "position_ids" in inspect.signature(base_model.forward).parameters
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
