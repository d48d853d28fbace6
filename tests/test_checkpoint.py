"""Checkpoint directories: round trips, PEFT compatibility both ways, atomic writes, clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from soft_prompt import CheckpointError, SoftPromptModel
from soft_prompt.checkpoint import CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME, tensor_sha256
from soft_prompt.files import WriteError
from tests.conftest import load

V = 4
TEXT = "the cat is lovely"


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer([TEXT], return_tensors="pt")).logits


def trained_wrapper(bloom):
    model, tokenizer = bloom
    wrapper = SoftPromptModel(model, num_virtual_tokens=V, init="text", init_text="the cat", tokenizer=tokenizer, seed=3)
    with torch.no_grad():
        wrapper.prompt.weight.add_(torch.randn(wrapper.prompt.weight.shape, generator=torch.Generator().manual_seed(0)))
    return wrapper


def test_round_trip_is_bit_exact_with_metadata(bloom, bloom_dir, tmp_path):
    wrapper = trained_wrapper(bloom)
    wrapper.save_pretrained(tmp_path / "ckpt", template="Sentence : {text} Label : {label_text}", label_words=["a", "b"])
    assert sorted(os.listdir(tmp_path / "ckpt")) == [CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME]
    stored = load_file(tmp_path / "ckpt" / WEIGHTS_NAME)
    assert list(stored) == ["prompt_embeddings"] and stored["prompt_embeddings"].dtype == torch.float32

    loaded = SoftPromptModel.from_pretrained(load(bloom_dir)[0], tmp_path / "ckpt")
    assert torch.equal(loaded.prompt.weight, wrapper.prompt.weight)
    assert loaded.metadata["label_words"] == ["a", "b"]
    assert loaded.metadata["init"] == "text" and loaded.metadata["init_text"] == "the cat"
    assert loaded.metadata["embed_dim"] == 32 and loaded.metadata["sha256"] == tensor_sha256(wrapper.prompt.weight)

    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_layers"], config["num_attention_heads"]) == (V, 32, 2, 4)
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "the cat"
    assert config["base_model_name_or_path"] == bloom_dir


def test_peft_loads_ours_and_gives_the_same_logits(bloom, bloom_dir, tmp_path):
    from peft import PeftModel

    wrapper = trained_wrapper(bloom)
    wrapper.save_pretrained(tmp_path / "ours")
    model, tokenizer = load(bloom_dir)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "ours")
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, wrapper.prompt.weight)
    torch.testing.assert_close(logits(peft_model, bloom[1]), logits(wrapper, bloom[1]), rtol=0, atol=1e-5)


def test_we_load_peft_and_give_the_same_logits(bloom_dir, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, tokenizer = load(bloom_dir)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=V))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    peft_model.save_pretrained(tmp_path / "peft")
    ours = SoftPromptModel.from_pretrained(load(bloom_dir)[0], tmp_path / "peft")
    assert torch.equal(ours.prompt.weight, peft_model.prompt_encoder["default"].embedding.weight)
    assert ours.metadata["source"] == "peft" and ours.metadata["init"] == "random"
    torch.testing.assert_close(logits(ours, tokenizer), logits(peft_model, tokenizer), rtol=0, atol=1e-5)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(bloom, bloom_dir, tmp_path, monkeypatch):
    wrapper = trained_wrapper(bloom)
    wrapper.save_pretrained(tmp_path / "ckpt")
    before = {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")}
    with torch.no_grad():
        wrapper.prompt.weight.mul_(2)
    calls = []

    def crash_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash_on_second_file)
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path / 'ckpt'}: No space left on device \\(ENOSPC\\)$"):
        wrapper.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")} == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no staging folder left behind
    SoftPromptModel.from_pretrained(load(bloom_dir)[0], tmp_path / "ckpt")  # still loads


def test_a_failed_swap_puts_the_previous_checkpoint_back(bloom, bloom_dir, tmp_path, monkeypatch):
    wrapper = trained_wrapper(bloom)
    wrapper.save_pretrained(tmp_path / "ckpt")
    before = {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")}
    replace, calls = os.replace, []

    def fail_second_rename(source, target):
        calls.append(target)
        if len(calls) == 2:  # the staged folder into place, after the old one was moved aside
            raise OSError(5, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(WriteError, match="Input/output error \\(EIO\\)$"):
        wrapper.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")} == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_saving_over_an_existing_checkpoint_replaces_it(bloom, bloom_dir, tmp_path):
    wrapper = trained_wrapper(bloom)
    wrapper.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        wrapper.prompt.weight.mul_(2)
    wrapper.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(SoftPromptModel.from_pretrained(load(bloom_dir)[0], tmp_path / "ckpt").prompt.weight, wrapper.prompt.weight)
    assert os.listdir(tmp_path) == ["ckpt"]


def break_weights_file(directory):
    path = directory / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-10])


def swap_in_other_weights(directory):
    other = load_file(directory / WEIGHTS_NAME)
    other["prompt_embeddings"] = other["prompt_embeddings"] + 1
    from safetensors.torch import save_file

    save_file(other, directory / WEIGHTS_NAME)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / WEIGHTS_NAME).unlink(), "has no adapter_model.safetensors"),
        (break_weights_file, "truncated or corrupt"),
        (swap_in_other_weights, "does not match the sha256"),
        (lambda d: (d / METADATA_NAME).write_text("{not json"), "not readable JSON"),
    ],
)
def test_damaged_checkpoints_get_one_clear_error(bloom, bloom_dir, tmp_path, damage, message):
    trained_wrapper(bloom).save_pretrained(tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        SoftPromptModel.from_pretrained(load(bloom_dir)[0], tmp_path / "ckpt")


def test_missing_directory_and_wrong_embedding_size(bloom, tmp_path):
    from soft_prompt.tiny import build_tiny_model

    with pytest.raises(CheckpointError, match="does not exist"):
        SoftPromptModel.from_pretrained(bloom[0], tmp_path / "nowhere")
    trained_wrapper(bloom).save_pretrained(tmp_path / "ckpt")
    wider = build_tiny_model("gpt2", 400, hidden_size=48)
    with pytest.raises(CheckpointError, match="embedding size 32 but the model has 48"):
        SoftPromptModel.from_pretrained(wider, tmp_path / "ckpt")


def test_an_output_path_that_is_a_file_is_refused(bloom, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        trained_wrapper(bloom).save_pretrained(tmp_path / "file")
