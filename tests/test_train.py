"""The training loop, in process: determinism, Ctrl-C + resume equality, bad input, non-finite
losses, mixed precision, the schedule and the configuration."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from soft_prompt import SoftPromptModel
from soft_prompt.config import TASKS, TrainConfig, build_parser, config_fields, parse_args, resolve_config
from soft_prompt.tiny import demo_rows, save_tiny_model
from soft_prompt.training import lr_at

HATE = "Sentence : {text} Label : {label_text}"


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(40)))
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """GPT-2 has dropout, so exact resume needs the RNG states restored."""
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


def args(model: str, data: str, output_dir, *extra: str) -> list[str]:
    # 30 train rows in batches of 4, 2 per step: 4 steps an epoch, 8 in all.
    return [
        "--model", model, "--data", data, "--template", HATE, "--output-dir", str(output_dir),
        "--batch-size", "4", "--grad-accum", "2", "--epochs", "2", "--val-fraction", "0.25",
        "--seed", "1", "--save-every", "2", "--eval-every", "3", "--warmup-steps", "2", "--group-by-length", *extra,
    ]  # fmt: skip


def losses(output_dir) -> list[float]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line.get("loss", line.get("eval_loss")) for line in lines]


def prompt(directory) -> torch.Tensor:
    return load_file(Path(directory) / "adapter_model.safetensors")["prompt_embeddings"]


@pytest.fixture(scope="module")
def reference_run(gpt2_dir, jsonl, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference")
    assert train.main(args(gpt2_dir, jsonl, output_dir)) == 0
    return output_dir


def test_same_arguments_give_bit_identical_prompts(reference_run, gpt2_dir, jsonl, tmp_path):
    assert train.main(args(gpt2_dir, jsonl, tmp_path)) == 0
    assert torch.equal(prompt(tmp_path / "last"), prompt(reference_run / "last"))
    assert torch.equal(prompt(tmp_path / "best"), prompt(reference_run / "best"))
    assert losses(tmp_path) == losses(reference_run)
    # 8 steps, evaluations at steps 3, 6 and the last.
    assert len(losses(reference_run)) == 8 + 3


def test_ctrl_c_saves_last_and_resume_reaches_the_same_prompt(reference_run, gpt2_dir, jsonl, tmp_path, monkeypatch):
    original_loss, calls = SoftPromptModel.loss, []

    def interrupt_at_fifth_micro_batch(self, *a, **k):
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # inside step 3 (micro-batches 5 and 6): the step finishes first
                os.kill(os.getpid(), signal.SIGINT)
        return original_loss(self, *a, **k)

    monkeypatch.setattr(SoftPromptModel, "loss", interrupt_at_fifth_micro_batch)
    assert train.main(args(gpt2_dir, jsonl, tmp_path)) == 130
    monkeypatch.setattr(SoftPromptModel, "loss", original_loss)
    state = json.loads((tmp_path / "last" / "training_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 6)
    assert not (tmp_path / "loss_curve.png").exists()

    assert train.main(args(gpt2_dir, jsonl, tmp_path, "--resume", str(tmp_path))) == 0
    assert torch.equal(prompt(tmp_path / "last"), prompt(reference_run / "last"))
    assert torch.equal(prompt(tmp_path / "best"), prompt(reference_run / "best"))
    resumed, reference = (load_file(run / "last" / "training_state.safetensors") for run in (tmp_path, reference_run))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    assert losses(tmp_path) == losses(reference_run)


def nan_loss_on(monkeypatch, bad_calls: set[int] | None):
    original_loss, calls = SoftPromptModel.loss, []

    def loss(self, *a, **k):
        value = original_loss(self, *a, **k)
        if self.training:
            calls.append(1)
            if bad_calls is None or len(calls) in bad_calls:
                return value * float("nan")
        return value

    monkeypatch.setattr(SoftPromptModel, "loss", loss)


def test_micro_batches_and_accumulation_give_the_gradient_of_the_whole_batch(bloom_dir, jsonl, tmp_path, monkeypatch):
    """A step's loss is the mean over all its labelled tokens, however the step is cut: 8-row batches
    whole, cut into micro-batches by --max-batch-tokens, or as 2 accumulated batches of 4 (the same
    rows: without length grouping a batch of 8 is two consecutive batches of 4)."""
    original_loss, calls = SoftPromptModel.loss, []

    def counting_loss(self, *a, **k):
        calls.append(1)
        return original_loss(self, *a, **k)

    monkeypatch.setattr(SoftPromptModel, "loss", counting_loss)

    def run(name: str, *extra: str) -> tuple[torch.Tensor, list[float], int]:
        calls.clear()
        output_dir = tmp_path / name
        arguments = ["--model", bloom_dir, "--data", jsonl, "--template", HATE, "--output-dir", str(output_dir),
                     "--num-virtual-tokens", "4", "--epochs", "1", "--seed", "3", "--save-every", "0", *extra]
        assert train.main(arguments) == 0
        return prompt(output_dir / "last"), losses(output_dir), len(calls)

    whole, whole_losses, whole_calls = run("whole", "--batch-size", "8")
    for name, extra in [("split", ["--batch-size", "8", "--max-batch-tokens", "60"]),
                        ("accumulated", ["--batch-size", "4", "--grad-accum", "2"])]:
        weight, step_losses, num_calls = run(name, *extra)
        assert num_calls > whole_calls == 5  # 40 rows: 5 steps, each cut into more micro-batches
        assert len(step_losses) == len(whole_losses) == 5
        torch.testing.assert_close(step_losses, whole_losses, rtol=1e-5, atol=0)
        torch.testing.assert_close(weight, whole, rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_is_skipped_and_counted(bloom_dir, jsonl, tmp_path, monkeypatch):
    nan_loss_on(monkeypatch, {1, 2})  # the first step's two micro-batches
    config = resolve_config(parse_args(args(bloom_dir, jsonl, tmp_path, "--max-steps", "2")))
    summary = train.train(config)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(lines[0]["loss"]) and math.isfinite(lines[1]["loss"])
    assert torch.isfinite(prompt(tmp_path / "last")).all()


def test_non_finite_steps_in_a_row_stop_the_run(bloom_dir, jsonl, tmp_path, monkeypatch, capsys):
    nan_loss_on(monkeypatch, None)
    assert train.main(args(bloom_dir, jsonl, tmp_path, "--max-bad-steps", "2")) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("train.py: stopped: the loss or gradient was not finite for 2 steps in a row")


@pytest.mark.parametrize("precision, model_dtype", [("bf16", "bf16"), ("fp16", "fp32")])
def test_mixed_precision_keeps_an_fp32_prompt(precision, model_dtype, bloom_dir, jsonl, tmp_path):
    extra = ["--precision", precision, "--model-dtype", model_dtype, "--max-steps", "2", "--device", "cpu"]
    assert train.main(args(bloom_dir, jsonl, tmp_path, *extra)) == 0
    weight = prompt(tmp_path / "last")
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    assert all(math.isfinite(loss) for loss in losses(tmp_path))
    scaler = json.loads((tmp_path / "last" / "training_state.json").read_text())["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")


def test_demo_task_runs_offline(tmp_path):
    assert train.main(["--task", "demo", "--output-dir", str(tmp_path), "--max-steps", "2"]) == 0
    model = SoftPromptModel.from_pretrained(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "demo-model"), tmp_path / "last"
    )
    assert model.metadata["label_words"] == ["hate speech", "no hate speech"]
    assert model.metadata["template"] == HATE


@pytest.mark.parametrize("scheduler, hf_name", [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")])
def test_schedule_matches_transformers(scheduler, hf_name):
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    schedule = get_scheduler(hf_name, optimizer, num_warmup_steps=3, num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [lr_at(step, 0.03, scheduler, 3, 10) for step in range(10)] == expected


def test_every_field_has_its_flag_and_presets_yield_to_flags():
    flags = {action.dest for action in build_parser()._actions} - {"help"}
    assert flags == set(config_fields(TrainConfig()))
    config = resolve_config(parse_args(["--task", "hate", "--lr", "0.1", "--label-words", "no", "yes"]))
    assert (config.data.data, config.data.template, config.prompt.init) == (
        "SetFit/ethos_binary", HATE, "text"
    )
    assert (config.optim.lr, config.data.label_words, config.optim.batch_size) == (0.1, ["no", "yes"], 8)
    defaults = resolve_config(parse_args(["--data", "d.jsonl", "--template", HATE]))
    assert (defaults.model.model, defaults.optim.lr, defaults.prompt.num_virtual_tokens) == ("bigscience/bloomz-560m", 3e-2, 20)
    assert TASKS["hate"]["label_words"] == ["hate speech", "no hate speech"]
