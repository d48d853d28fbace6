"""The training loop on the shared-prefix path (the prompt run once per micro-batch): a run equals
a --no-shared-prefix run to round-off, train_config.json says which path ran and why, a model or
mode that cannot take it runs the plain path, and a run at the defaults resumes bit-exactly."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from soft_prompt import training_setup
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.tiny import save_tiny_model



@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(root / arch, arch, initializer_range=0.3) for arch in ("bloom", "gpt2", "llama")}


def args(model: str, data: str, output_dir, *extra: str) -> list[str]:
    # 30 train rows in batches of 4 (rows of different lengths: right padding), 2 per step.
    return [
        "--model", model, "--data", data, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir), "--batch-size", "4",
        "--grad-accum", "2", "--val-fraction", "0.25", "--seed", "1", "--eval-every", "5", "--save-every", "2", *extra,
    ]  # fmt: skip


def run_files(run: Path) -> tuple[torch.Tensor, list[dict], dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return load_file(run / "last" / "adapter_model.safetensors")["prompt_embeddings"], lines, json.loads(
        (run / "train_config.json").read_text()
    )


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_twenty_steps_equal_the_plain_path_to_round_off(arch, models, demo_rows_file, tmp_path):
    extra = ("--max-steps", "20", "--precision", "fp32", "--lr", "0.1")
    assert train.main(args(models[arch], demo_rows_file, tmp_path / "shared", *extra)) == 0
    assert train.main(args(models[arch], demo_rows_file, tmp_path / "plain", *extra, "--no-shared-prefix")) == 0
    shared, shared_lines, shared_config = run_files(tmp_path / "shared")
    plain, plain_lines, plain_config = run_files(tmp_path / "plain")
    assert shared_config["automatic"]["loss_path"] == "shared prefix"
    assert plain_config["automatic"]["loss_path"] == "plain (--no-shared-prefix)"
    assert not torch.equal(shared, plain)  # different arithmetic ...
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)  # ... the same prompt after 20 steps
    for ours, theirs in zip(shared_lines, plain_lines, strict=True):
        key = "loss" if "loss" in ours else "eval_loss"
        assert ours["step"] == theirs["step"]
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)


def test_bf16_runs_stay_within_bf16_round_off_of_the_plain_path(models, demo_rows_file, tmp_path):
    extra = ("--max-steps", "6", "--precision", "bf16")
    assert train.main(args(models["llama"], demo_rows_file, tmp_path / "shared", *extra)) == 0
    assert train.main(args(models["llama"], demo_rows_file, tmp_path / "plain", *extra, "--no-shared-prefix")) == 0
    (_, shared, _), (_, plain, _) = run_files(tmp_path / "shared"), run_files(tmp_path / "plain")
    for ours, theirs in zip(shared, plain, strict=True):
        key = "loss" if "loss" in ours else "eval_loss"
        assert ours[key] == pytest.approx(theirs[key], rel=2e-2)


@pytest.mark.parametrize(
    "arch, extra, reason",
    [
        ("gpt2", (), "dropout"),  # one prompt pass would give every row the same dropout mask
        ("llama", ("--gradient-checkpointing",), "checkpointing"),  # transformers drops a cache under it
    ],
)
def test_a_model_or_mode_that_cannot_take_it_runs_the_plain_path_and_says_why(arch, extra, reason, models, demo_rows_file, tmp_path):
    assert train.main(args(models[arch], demo_rows_file, tmp_path, "--max-steps", "1", *extra)) == 0
    loss_path = json.loads((tmp_path / "train_config.json").read_text())["automatic"]["loss_path"]
    assert loss_path.startswith("plain (") and reason in loss_path


def test_the_defaults_resume_bit_exactly(models, demo_rows_file, tmp_path, monkeypatch):
    """The defaults here: --precision auto, the shared-prefix path (Llama has no dropout)."""
    reference = tmp_path / "reference"
    assert train.main(args(models["llama"], demo_rows_file, reference, "--epochs", "2")) == 0
    original, calls = training_setup.shared_prefix_loss, []

    def interrupt_at_fifth_micro_batch(model, *a, **k):
        if model.training:
            calls.append(1)
            if len(calls) == 5:  # inside step 3: the step finishes first
                os.kill(os.getpid(), signal.SIGINT)
        return original(model, *a, **k)

    monkeypatch.setattr(training_setup, "shared_prefix_loss", interrupt_at_fifth_micro_batch)
    run = tmp_path / "run"
    assert train.main(args(models["llama"], demo_rows_file, run, "--epochs", "2")) == 130
    monkeypatch.setattr(training_setup, "shared_prefix_loss", original)
    assert json.loads((run / "last" / "training_state.json").read_text())["step"] == 3
    assert train.main(args(models["llama"], demo_rows_file, run, "--epochs", "2", "--resume", str(run))) == 0
    resumed, resumed_lines, config = run_files(run)
    expected, expected_lines, _ = run_files(reference)
    assert config["automatic"]["loss_path"] == "shared prefix" and "precision" in config["automatic"]
    assert torch.equal(resumed, expected)
    assert [line.get("loss", line.get("eval_loss")) for line in resumed_lines] == [
        line.get("loss", line.get("eval_loss")) for line in expected_lines
    ]
