"""Residual reparameterization of a soft prompt (Razdaibiedina et al. 2023, "Residual Prompt
Tuning"): the prompt the model sees is

    P' = P + LayerNorm(MLP(P)),   MLP = Linear(D, H) -> ReLU -> Linear(H, D)

with one MLP shared by the V virtual tokens (the block order of the authors' `ResMLP`, shared,
with layer norm and without dropout). The layer norm's gain starts at zero, so P' starts equal to
the initialised P: with the default gain of 1 the residual has norm sqrt(D) per token, far above
the embeddings of small models, and swamps a text init (the authors' T5 has much larger
embeddings; docs/training.md has what it cost). Training updates P and the MLP; afterwards only
P' `[V, D]` is kept, so a checkpoint is an ordinary prompt that infer.py, analyze.py and PEFT load
unchanged.

The reparameterization is a torch parametrization of the prompt's `weight`: `prompt.weight` *is*
P' wherever it is read (the forward, label scoring, `save_checkpoint(prompt.weight, ...)`), while
the trainable tensors are `prompt.parameters()`: P (`parametrizations.weight.original`) and the
MLP's. A run that resumes needs P and the MLP too: `reparam_files` / `restore_reparam`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from torch.nn.utils import parametrize

from .embedding import SoftPromptEmbedding

REPARAM_FILE = "reparam.safetensors"  # beside last/'s prompt: P before the reparameterization, and the MLP


class ResidualReparam(nn.Module):
    """`forward(P) = P + LayerNorm(MLP(P))` for a prompt `[V, D]`, computed in fp32 (as the prompt's
    master copy is) even under autocast. `seed` seeds the MLP's init without touching the global RNG."""

    def __init__(self, embed_dim: int, hidden: int, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"the reparameterization's hidden size must be an integer >= 1, got {hidden!r}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
            self.norm = nn.LayerNorm(embed_dim)
        nn.init.zeros_(self.norm.weight)  # P' = P at the start; the gain grows from the first step

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        with torch.autocast(prompt.device.type, enabled=False):
            return prompt + self.norm(self.mlp(prompt))


def add_reparam(prompt: SoftPromptEmbedding, hidden: int, seed: int | None = None) -> ResidualReparam:
    """Reparameterize `prompt` in place: its `weight` becomes P + LayerNorm(MLP(P)), P its current
    weight; the MLP is on the prompt's device and trains when the prompt does."""
    if reparam_of(prompt) is not None:
        raise ValueError("the prompt is reparameterized already")
    weight = prompt.weight
    reparam = ResidualReparam(prompt.embed_dim, hidden, seed).to(weight.device)
    reparam.requires_grad_(weight.requires_grad)
    parametrize.register_parametrization(prompt, "weight", reparam)
    return reparam


def reparam_of(prompt: SoftPromptEmbedding) -> ResidualReparam | None:
    """The prompt's reparameterization, or None for a plain prompt."""
    if not parametrize.is_parametrized(prompt, "weight"):
        return None
    return prompt.parametrizations.weight[0]


def bake(prompt: SoftPromptEmbedding) -> None:
    """Drop the reparameterization, keeping its result: `weight` becomes a plain parameter holding P'."""
    parametrize.remove_parametrizations(prompt, "weight", leave_parametrized=True)


def reparam_tensors(prompt: SoftPromptEmbedding) -> dict[str, torch.Tensor]:
    """What resuming needs beside the optimizer: P (`prompt`) and the MLP's state (`reparam.*`)."""
    reparam = reparam_of(prompt)
    if reparam is None:
        raise ValueError("the prompt is not reparameterized")
    tensors = {"prompt": prompt.parametrizations.weight.original}
    tensors.update({f"reparam.{name}": value for name, value in reparam.state_dict().items()})
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


def reparam_files(prompt: SoftPromptEmbedding) -> dict[str, bytes]:
    """`reparam_tensors` as an extra file of `save_checkpoint` (no pickle)."""
    return {REPARAM_FILE: save(reparam_tensors(prompt))}


def restore_reparam(prompt: SoftPromptEmbedding, directory: str | Path) -> None:
    """Load what `reparam_files` wrote into a prompt reparameterized the same way (`add_reparam`
    with the same hidden size). A missing, damaged or mismatched file is a one-line ValueError."""
    path = Path(directory) / REPARAM_FILE
    try:
        saved = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is missing or corrupt ({error}): resume a run trained with the same --reparam") from None
    current = reparam_tensors(prompt)
    shapes = {name: list(value.shape) for name, value in current.items()}
    if {name: list(value.shape) for name, value in saved.items()} != shapes:
        raise ValueError(f"{path} does not hold this prompt's reparameterization (wanted {shapes}): pass the same --reparam-hidden")
    reparam = reparam_of(prompt)
    with torch.no_grad():
        prompt.parametrizations.weight.original.copy_(saved["prompt"])
        reparam.load_state_dict({name.removeprefix("reparam."): value for name, value in saved.items() if name != "prompt"})
