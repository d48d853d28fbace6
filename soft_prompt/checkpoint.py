"""Checkpoint I/O: one directory, loadable by PEFT and by us.

    adapter_model.safetensors   {"prompt_embeddings": [V, D] fp32}   (PEFT's key and shape)
    adapter_config.json         PEFT's PROMPT_TUNING config, written without importing peft
    soft_prompt.json            our metadata: init, template, label words, sha256 of the prompt ...
    initial_prompt.safetensors  the prompt before training (optional; PEFT ignores it), for analysis

A directory is written whole into a temporary sibling and swapped in by renames, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .files import json_bytes, make_folder, new_sibling, write_atomic, writing

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT checkpoints (pickle; loaded weights_only)
CONFIG_NAME = "adapter_config.json"
METADATA_NAME = "soft_prompt.json"
INITIAL_PROMPT_NAME = "initial_prompt.safetensors"
PROMPT_KEY = "prompt_embeddings"
PEFT_INIT_NAMES = {"random": "RANDOM", "uniform": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}
OUR_INIT_NAMES = {"RANDOM": "random", "TEXT": "text", "SAMPLE_VOCAB": "vocab"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's fp32 bytes: detects a prompt file that does not match its metadata."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def write_directory_atomic(directory: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Replace `directory` by one holding exactly `files`, never leaving a half-written mix: a
    failure (a `WriteError`, e.g. no space left) leaves the previous directory whole."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a directory: choose another output path")
    make_folder(directory.parent)
    with writing(directory):
        staging = new_sibling(directory, folder=True)
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        try:
            for name, data in files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)  # "member/file": a checkpoint inside
                with open(staging / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            if directory.exists():
                os.replace(directory, old)  # between these two renames the old copy is still whole
            os.replace(staging, directory)
        except BaseException:
            if old.exists() and not directory.exists():
                os.replace(old, directory)  # the second rename failed: put the previous one back
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)


def peft_adapter_config(base_model: torch.nn.Module, num_virtual_tokens: int, metadata: dict) -> dict:
    """PEFT's PromptTuningConfig fields for a CAUSAL_LM prompt, as PEFT writes them."""
    config = base_model.config
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": base_model.get_input_embeddings().embedding_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "prompt_tuning_init": PEFT_INIT_NAMES.get(metadata.get("init"), "RANDOM"),
        "prompt_tuning_init_text": metadata.get("init_text"),
        "tokenizer_name_or_path": metadata.get("tokenizer_name_or_path") or base_model_name(base_model),
        "tokenizer_kwargs": None,
        "base_model_name_or_path": base_model_name(base_model),
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": None,
    }


def base_model_name(base_model: torch.nn.Module) -> str | None:
    return getattr(base_model.config, "_name_or_path", None) or None


def save_checkpoint(
    directory: str | os.PathLike,
    weight: torch.Tensor,
    base_model: torch.nn.Module,
    metadata: dict,
    extra_files: dict[str, bytes] | None = None,
    initial_weight: torch.Tensor | None = None,
) -> None:
    """Write the prompt `weight` `[V, D]` and its configs (plus `extra_files`, and the prompt before
    training, `initial_weight`, when given) atomically."""
    from . import __version__

    weight = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    ours = {
        **metadata,
        "base_model_name_or_path": base_model_name(base_model),
        "embed_dim": weight.shape[1],
        "num_virtual_tokens": weight.shape[0],
        "dtype": "float32",
        "sha256": tensor_sha256(weight),
        "soft_prompt_version": __version__,
    }
    files = {
        WEIGHTS_NAME: save({PROMPT_KEY: weight}, metadata={"format": "pt"}),
        CONFIG_NAME: json_bytes(peft_adapter_config(base_model, weight.shape[0], metadata)),
        METADATA_NAME: json_bytes(ours),
        **(extra_files or {}),
    }
    if initial_weight is not None:
        initial_weight = initial_weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        files[INITIAL_PROMPT_NAME] = save({PROMPT_KEY: initial_weight}, metadata={"format": "pt"})
    write_directory_atomic(directory, files)


def update_metadata(directory: str | os.PathLike, fields: dict) -> None:
    """Add `fields` to a checkpoint's soft_prompt.json, rewritten atomically; the prompt is untouched."""
    path = Path(directory) / METADATA_NAME
    write_atomic(path, json_bytes({**read_json(path), **fields}))


def load_initial_prompt(directory: str | os.PathLike) -> torch.Tensor | None:
    """The prompt before training `[V, D]` fp32 saved beside a checkpoint, or None where the
    checkpoint has none (PEFT's, or older ones)."""
    path = Path(directory) / INITIAL_PROMPT_NAME
    if not path.is_file():
        return None
    try:
        return load_file(path)[PROMPT_KEY].to(torch.float32)
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({error})") from None


def read_json(path: Path) -> dict:
    """A checkpoint's JSON object; anything else (unreadable, not UTF-8, not JSON, not an object)
    is a one-line CheckpointError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path} is not readable JSON ({error}): the checkpoint is corrupt") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object: the checkpoint is corrupt")
    return value


def load_checkpoint(directory: str | os.PathLike, base_model: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    """The prompt `[V, D]` fp32 and its metadata from one of our directories or PEFT's.

    Raises `CheckpointError` naming the problem: a missing directory or file, a truncated or
    corrupt file, an embedding size other than the base model's, or a sha256 mismatch.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if (directory / WEIGHTS_NAME).is_file():
        try:
            tensors = load_file(directory / WEIGHTS_NAME)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{directory / WEIGHTS_NAME} is truncated or corrupt ({error})") from None
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        try:
            tensors = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{directory / LEGACY_WEIGHTS_NAME} is truncated or corrupt ({error})") from None
    else:
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}: not a soft-prompt or PEFT checkpoint")
    if not isinstance(tensors, dict) or not isinstance(tensors.get(PROMPT_KEY), torch.Tensor):
        found = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise CheckpointError(f"{directory} has no {PROMPT_KEY!r} tensor (found {found})")
    weight = tensors[PROMPT_KEY].to(torch.float32)

    adapter_config = read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else {}
    if adapter_config and adapter_config.get("peft_type", "PROMPT_TUNING") != "PROMPT_TUNING":
        raise CheckpointError(f"{directory} holds a {adapter_config['peft_type']} adapter, not a prompt-tuning one")
    if (directory / METADATA_NAME).is_file():
        metadata = read_json(directory / METADATA_NAME)
        expected = metadata.get("sha256")
        if expected and tensor_sha256(weight) != expected:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} does not match the sha256 in {METADATA_NAME}: the files are "
                "from different saves or corrupt"
            )
    else:  # a PEFT checkpoint: take what its config tells
        metadata = {
            "init": OUR_INIT_NAMES.get(adapter_config.get("prompt_tuning_init"), "random"),
            "init_text": adapter_config.get("prompt_tuning_init_text"),
            "base_model_name_or_path": adapter_config.get("base_model_name_or_path"),
            "source": "peft",
        }
    if weight.ndim != 2 or weight.shape[0] == 0:
        raise CheckpointError(f"{PROMPT_KEY} must be [num_virtual_tokens, embed_dim], got {list(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise CheckpointError(f"{directory / WEIGHTS_NAME} holds NaN or infinite values: the prompt is unusable")
    embed_dim = base_model.get_input_embeddings().embedding_dim
    if weight.shape[1] != embed_dim:
        raise CheckpointError(
            f"checkpoint {directory} has embedding size {weight.shape[1]} but the model has {embed_dim}: "
            f"it was trained for another base model ({metadata.get('base_model_name_or_path')})"
        )
    return weight, metadata
