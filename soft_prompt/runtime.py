"""The runtime around the mechanism: loading the frozen model (and a checkpoint's prompts onto it),
picking the device, and the kernel options (attention, gradient checkpointing, compile, oneDNN's
cache) that change speed and memory, never results beyond round-off."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from .bloom_sdpa import use_sdpa_attention
from .checkpoint import METADATA_NAME, CheckpointError, read_json
from .config import AUTO, ModelConfig
from .model import DEFAULT_PROMPT, SoftPromptModel
from .weights import load_converted

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base_model(name: str, model_dtype: str = "fp32", device: torch.device | str = "cpu"):
    """(the causal LM `name`, a hub id or a folder, in `model_dtype` on `device` in eval mode, its
    tokenizer with a pad token). Raises a one-line ValueError when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(name).is_file():
        raise ValueError(f"--model {name} is a file: pass a model folder or a hub name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = load_converted(name, DTYPES[model_dtype])  # None: nothing to convert, or not read by us
        if model is None:
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


def limit_kernel_cache() -> None:
    """Cap oneDNN's cache of compiled CPU kernels at 32 (its default keeps 1024). Each new batch
    shape compiles a set of bf16/fp16 matmul kernels, and with rows of every length the cache grew
    a run's memory step after step (benchmarks/README.md measures it); the layers of one shape reuse
    far fewer than 32. It takes effect only if the process has run no 16-bit CPU matmul yet, and a
    value set in the environment is kept."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively: a CUDA device with bf16, or a CPU with
    AVX512-BF16 or AMX (its flags in /proc/cpuinfo; a CPU elsewhere counts as not). Elsewhere bf16
    is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def pick_device(name: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu; otherwise a device torch knows (`cuda:1` too) and this
    machine has. A one-line ValueError otherwise."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device: pass cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but torch sees no CUDA device: pass --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}, but torch sees no MPS device: pass --device cpu")
    return device


def apply_speed_options(base_model, model_cfg: ModelConfig) -> str:
    """--attention, --gradient-checkpointing and --compile on the frozen model; returns the
    attention kernel it runs (what --attention auto chose)."""
    attention = set_attention(base_model, model_cfg.attention, model_cfg.device, model_cfg.precision)
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: the frozen weights need no grad, only the prompt's path does.
        checkpoint_kwargs = {"use_reentrant": False}
        if hasattr(base_model, "activation_checkpointing_enable"):  # its name from transformers 5.23 on
            base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:  # the old name, which 5.23 on warns about
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    if model_cfg.compile:
        # Each layer compiled, not the decoder whole (PyTorch's "regional compilation"): the layers
        # share their code, so one compile serves all of them. Both loss() and forward() run
        # through them.
        try:
            modules = list(decoder_layers(base_model))
        except ValueError:  # no list of layers to find: the decoder whole
            modules = [base_model.get_decoder()]
        for module in modules:
            module.compile(dynamic=True)
    return attention


def decoder_layers(base_model: torch.nn.Module) -> torch.nn.ModuleList:
    """The frozen model's decoder layers, found generically: the outermost ModuleList with
    `num_hidden_layers` modules (`model.layers` in Llama, `transformer.h` in GPT-2 and BLOOM)."""
    num_layers = base_model.config.num_hidden_layers
    for module in base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(base_model).__name__} has no list of {num_layers} decoder layers")


def set_attention(base_model, attention: str, device_type: str, precision: str) -> str:
    """Run the frozen model's attention with `attention` (eager or sdpa) and return it. auto is
    eager on CPU under bf16/fp16 autocast, where SDPA's CPU backward is the slower kernel
    (benchmarks/README.md measures it), and otherwise the kernel the model loaded with
    (transformers' choice: SDPA where the model has it, eager for BLOOM)."""
    loaded = base_model.config._attn_implementation
    if attention == AUTO:
        attention = "eager" if device_type == "cpu" and precision != "fp32" else loaded
    if attention == "sdpa" and use_sdpa_attention(base_model):  # BLOOM: its transformers code has no SDPA
        return attention
    if attention != loaded:
        try:
            base_model.set_attn_implementation(attention)
        except (ValueError, ImportError) as error:
            reason = str(error).strip().splitlines()[0]
            raise ValueError(f"--attention {attention}: {type(base_model).__name__} cannot run it ({reason}); "
                             "pass --attention auto") from None
    return attention


def load_prompted_model(
    model_name: str,
    checkpoints: str | dict[str, str],
    precision: str | None = None,
    device: str | None = None,
    strict: bool = False,
) -> SoftPromptModel:
    """The frozen model `model_name` (hub id or folder) with its tokenizer and the checkpoints'
    prompts: one directory (named "default") or {name: directory}. The active prompt is "default"
    when there is one, else the first. `precision` defaults to the one the active prompt's
    checkpoint was trained with.

    A checkpoint recorded for another base model is a warning, or an error with `strict`; one with
    another embedding size, or missing or corrupt, raises `CheckpointError`. `device` is
    `pick_device`'s (default auto: cuda, then mps, then cpu).
    """
    if isinstance(checkpoints, str):
        checkpoints = {DEFAULT_PROMPT: checkpoints}
    device = pick_device(device or "auto")
    (first_name, first_directory), *others = checkpoints.items()
    precision = precision or trained_precision(checkpoints.get(DEFAULT_PROMPT, first_directory))
    base, tokenizer = load_base_model(model_name, precision, device)
    model = SoftPromptModel.from_pretrained(base, first_directory, tokenizer=tokenizer, name=first_name)
    for name, directory in others:
        model.load_prompt(directory, name)
    for name, directory in checkpoints.items():  # an --ensemble run's best/ holds its other prompts in subfolders
        for member in model.prompt_metadata[name].get("ensemble", []):
            model.load_prompt(Path(directory) / member, ensemble_member(name, member))
    for name, checkpoint in checkpoints.items():
        recorded = model.prompt_metadata[name].get("base_model_name_or_path")
        if recorded and not same_model_name(recorded, model_name):
            message = f"checkpoint {checkpoint} was trained on {recorded!r}, not {model_name!r}"
            if strict:
                raise CheckpointError(message + " (--strict)")
            warnings.warn(message + ": its outputs may be meaningless (--strict makes this an error)")
    model.set_prompt(DEFAULT_PROMPT if DEFAULT_PROMPT in checkpoints else first_name)
    return model


def ensemble_member(name: str, member: str) -> str:
    """The prompt name of an ensemble's member (its subfolder) loaded with checkpoint `name`."""
    return f"{name}/{member}"


def ensemble_prompts(model: SoftPromptModel, name: str | None) -> list[str | None]:
    """The prompts that answer for checkpoint `name`: itself and its ensemble's other members."""
    if name is None:
        return [None]
    return [name] + [ensemble_member(name, member) for member in model.prompt_metadata[name].get("ensemble", [])]


def trained_precision(checkpoint: str) -> str:
    """The --precision the checkpoint was trained with (its soft_prompt.json), or fp32 when it
    records none (older checkpoints, PEFT's)."""
    metadata = Path(checkpoint) / METADATA_NAME
    recorded = read_json(metadata).get("precision") if metadata.is_file() else None
    return recorded if recorded in DTYPES else "fp32"


def same_model_name(a: str, b: str) -> bool:
    """Hub id or local folder of the same name ("org/name" and "/models/name" agree)."""
    return a == b or Path(a).name.lower() == Path(b).name.lower()


def checkpoint_names(values: Sequence[str]) -> dict[str, str]:
    """--checkpoint values as {name: directory}, in order: `NAME=DIR`, or a bare `DIR` named "default"
    (also a directory whose own name holds "=")."""
    checkpoints = {}
    for value in values:
        name, separator, directory = value.partition("=")
        if not separator or not re.fullmatch(r"[\w-]+", name) or Path(value).is_dir():
            name, directory = DEFAULT_PROMPT, value
        if name in checkpoints:
            raise ValueError(
                f"--checkpoint: two checkpoints are named {name!r} ({checkpoints[name]} and {directory}); "
                "name each one: --checkpoint NAME=DIR"
            )
        checkpoints[name] = directory
    return checkpoints
