"""A base model's safetensors (a local folder or a hub id) read into another dtype a chunk at a time.

`from_pretrained(dtype=bf16)` on fp32 files maps each file into memory and converts from the
mapping: every page it reads stays in the process's memory until the load ends, so loading peaks
at the files plus the converted copy (benchmarks/README.md measures it). Here each tensor is read
with plain reads, 64 MiB at a time, straight into its converted tensor: the peak is the converted
weights plus one chunk. transformers still builds the model from these tensors (`state_dict=`),
so its key renaming, weight tying and checks apply.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK_BYTES = 64 << 20


def safetensors_files(name: str | Path) -> list[Path]:
    """The weight files of `name`, a folder or a hub id (downloaded to the hub cache, as
    from_pretrained would), found as from_pretrained finds them: `model.safetensors`, else the shards
    named by `model.safetensors.index.json`; [] when there are none (e.g. only .bin files)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def find(filename: str) -> Path | None:
        if Path(name).is_dir():
            path = Path(name) / filename
            return path if path.is_file() else None
        try:
            return Path(hf_hub_download(str(name), filename))
        except EntryNotFoundError:  # not in the repo, or (offline) not in the cache
            return None

    single = find("model.safetensors")
    if single is not None:
        return [single]
    index = find("model.safetensors.index.json")
    if index is None:
        return []
    shards = [find(shard) for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [] if None in shards else shards


def read_header(path: Path) -> tuple[dict, int]:
    """(the file's tensor entries: name -> dtype, shape, data_offsets; where the data starts)."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    header.pop("__metadata__", None)
    return header, 8 + header_size


def read_converted(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, floating-point ones converted to `dtype` (others kept).
    A short file or an unknown dtype raises a one-line ValueError."""
    header, data_start = read_header(path)
    chunk = bytearray(CHUNK_BYTES)
    tensors = {}
    with open(path, "rb", buffering=0) as file:
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not read here")
            stored = SAFETENSORS_DTYPES[entry["dtype"]]
            tensor = torch.empty(entry["shape"], dtype=dtype if stored.is_floating_point else stored)
            flat = tensor.view(-1)
            per_chunk = CHUNK_BYTES // stored.itemsize
            file.seek(data_start + entry["data_offsets"][0])
            for start in range(0, flat.numel(), per_chunk):
                count = min(per_chunk, flat.numel() - start)
                if file.readinto(memoryview(chunk)[: count * stored.itemsize]) != count * stored.itemsize:
                    raise ValueError(f"{path} is truncated (tensor {name})")
                flat[start : start + count] = torch.frombuffer(chunk, dtype=stored, count=count)
            tensors[name] = tensor
    return tensors


def load_converted(name: str, dtype: torch.dtype):
    """The causal LM `name` (a folder or a hub id) with its floating-point weights in `dtype`, read
    by `read_converted`; None where from_pretrained's own loading should be used instead: no
    safetensors files, nothing to convert (a mapped file of the right dtype costs no copy), a dtype
    not read here, a model class outside transformers' causal-LM table, quantized weights, or
    modules the class keeps in fp32."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    files = safetensors_files(name)
    stored = {SAFETENSORS_DTYPES.get(entry["dtype"]) for path in files for entry in read_header(path)[0].values()}
    if None in stored or not any(d.is_floating_point and d != dtype for d in stored):
        return None
    config = AutoConfig.from_pretrained(name)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "quantization_config", None):
        return None
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if model_class._keep_in_fp32_modules or getattr(model_class, "_keep_in_fp32_modules_strict", None):
        return None
    state_dict = {}
    for path in files:
        state_dict.update(read_converted(path, dtype))
    try:
        generation_config = GenerationConfig.from_pretrained(name)
    except OSError:  # none saved: from_pretrained derives one from the config, as it does then
        generation_config = None
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                        generation_config=generation_config)
    model.config.name_or_path = name  # from_pretrained(None) leaves it empty; checkpoints record it
    return model
