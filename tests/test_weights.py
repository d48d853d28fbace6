"""Base weights read into another dtype a chunk at a time equal what from_pretrained builds."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from soft_prompt import weights
from soft_prompt.runtime import load_base_model
from soft_prompt.tiny import build_tiny_model

from .conftest import load


def assert_same_model(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (reference.get_output_embeddings().weight is reference.get_input_embeddings().weight)
    assert model.config.to_dict() == reference.config.to_dict()
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert not model.training


@pytest.mark.parametrize("model_dtype", ["bf16", "fp16"])
def test_converted_load_equals_from_pretrained(model_dir, model_dtype, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 1000)  # tensors span many chunks, some end mid-chunk
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[model_dtype]
    assert weights.load_converted(model_dir, dtype) is not None  # the chunked path, not the fallback
    model, _ = load_base_model(model_dir, model_dtype)
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval())


def test_nothing_to_convert_is_left_to_from_pretrained(model_dir):
    assert weights.load_converted(model_dir, torch.float32) is None  # the mapped file costs no copy
    model, _ = load_base_model(model_dir, "fp32")
    assert_same_model(model, load(model_dir)[0])


def test_read_converted_equals_the_file_cast_tensor_by_tensor(bloom_dir, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 4 * 7)  # 7 fp32 values a chunk: no row boundary
    path = weights.safetensors_files(bloom_dir)[0]
    expected = load_file(path)
    converted = weights.read_converted(path, torch.bfloat16)
    assert list(converted) == list(expected)
    for name, tensor in expected.items():
        assert converted[name].shape == tensor.shape
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name


def test_sharded_folders_are_read_shard_by_shard(tmp_path, bloom_dir):
    model = AutoModelForCausalLM.from_pretrained(bloom_dir)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shutil.copy(f"{bloom_dir}/tokenizer.json", tmp_path)
    shutil.copy(f"{bloom_dir}/tokenizer_config.json", tmp_path)
    files = weights.safetensors_files(tmp_path)
    assert len(files) > 1 and all(path.name.startswith("model-") for path in files)
    loaded, _ = load_base_model(str(tmp_path), "bf16")
    assert_same_model(loaded, AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval())


def test_non_float_tensors_keep_their_dtype(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"ids": torch.arange(5), "mask": torch.tensor([True, False]), "scale": torch.tensor(0.5)}, path)
    converted = weights.read_converted(path, torch.float16)
    assert converted["ids"].dtype == torch.int64 and converted["ids"].tolist() == [0, 1, 2, 3, 4]
    assert converted["mask"].tolist() == [True, False]
    assert converted["scale"].dtype == torch.float16 and converted["scale"].shape == () and converted["scale"] == 0.5


def test_a_truncated_file_is_one_line(tmp_path, bloom_dir):
    shutil.copytree(bloom_dir, tmp_path / "model")
    path = tmp_path / "model" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated \(tensor "):
        weights.read_converted(path, torch.bfloat16)
    with pytest.raises(ValueError, match="^cannot load a causal LM from folder .*truncated"):
        load_base_model(str(tmp_path / "model"), "bf16")


def test_classes_that_keep_modules_in_fp32_are_left_to_from_pretrained(tmp_path, monkeypatch):
    model = build_tiny_model("llama", 64)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(type(model), "_keep_in_fp32_modules", ["lm_head"])
    assert weights.load_converted(str(tmp_path), torch.float16) is None


def test_a_hub_id_is_read_from_the_hub_cache_the_same_way(tmp_path, bloom_dir, monkeypatch):
    import huggingface_hub.constants

    # The hub cache's layout: refs/main names the snapshot folder that holds the repo's files.
    repo = tmp_path / "hub" / "models--someone--tiny-bloom"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(bloom_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # offline (conftest)
    assert weights.safetensors_files("someone/tiny-bloom") == [repo / "snapshots" / commit / "model.safetensors"]
    assert weights.safetensors_files("someone/not-cached") == []  # left to from_pretrained's own error
    assert weights.load_converted("someone/tiny-bloom", torch.bfloat16) is not None
    model, _ = load_base_model("someone/tiny-bloom", "bf16")
    reference = AutoModelForCausalLM.from_pretrained("someone/tiny-bloom", dtype=torch.bfloat16).eval()
    assert_same_model(model, reference)
    assert model.config.name_or_path == "someone/tiny-bloom"
