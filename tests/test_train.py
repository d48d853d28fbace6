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
from soft_prompt.config import HATE_TEMPLATE, TASKS, TrainConfig, build_parser, config_fields, parse_args, resolve_automatic, resolve_config
from soft_prompt.tiny import save_tiny_model
from soft_prompt.training import lr_at



@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """GPT-2 has dropout, so exact resume needs the RNG states restored."""
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


def args(model: str, data: str, output_dir, *extra: str) -> list[str]:
    # 30 train rows in batches of 4, 2 per step: 4 steps an epoch, 8 in all.
    return [
        "--model", model, "--data", data, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir),
        "--batch-size", "4", "--grad-accum", "2", "--epochs", "2", "--val-fraction", "0.25",
        "--seed", "1", "--save-every", "2", "--eval-every", "3", "--warmup-steps", "2", *extra,
    ]  # fmt: skip


def losses(output_dir) -> list[float]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line.get("loss", line.get("eval_loss")) for line in lines]


def prompt(directory) -> torch.Tensor:
    return load_file(Path(directory) / "adapter_model.safetensors")["prompt_embeddings"]


@pytest.fixture(scope="module")
def reference_runs(gpt2_dir, demo_rows_file, tmp_path_factory):
    """The uninterrupted run for some extra flags (made once per module for each)."""
    runs: dict[tuple[str, ...], Path] = {}

    def reference(*extra: str) -> Path:
        if extra not in runs:
            runs[extra] = tmp_path_factory.mktemp("reference")
            assert train.main(args(gpt2_dir, demo_rows_file, runs[extra], *extra)) == 0
        return runs[extra]

    return reference


@pytest.fixture(scope="module")
def reference_run(reference_runs) -> Path:
    return reference_runs()


def test_same_arguments_give_bit_identical_prompts(reference_run, gpt2_dir, demo_rows_file, tmp_path):
    assert train.main(args(gpt2_dir, demo_rows_file, tmp_path)) == 0
    assert torch.equal(prompt(tmp_path / "last"), prompt(reference_run / "last"))
    assert torch.equal(prompt(tmp_path / "best"), prompt(reference_run / "best"))
    assert losses(tmp_path) == losses(reference_run)
    # 8 steps, evaluations at steps 3, 6 and the last.
    assert len(losses(reference_run)) == 8 + 3


# Each default, and the settings it replaced, resumes bit-exactly: the defaults (length-grouped
# batches; on CPU --max-batch-tokens auto = 512, which these short rows stay under, and fp32 weights),
# the plain shuffle, batches cut into micro-batches, and bf16 compute with bf16 weights (auto).
@pytest.mark.parametrize("extra", [(), ("--no-group-by-length",), ("--max-batch-tokens", "100"), ("--precision", "bf16")])
def test_ctrl_c_saves_last_and_resume_reaches_the_same_prompt(extra, reference_runs, gpt2_dir, demo_rows_file, tmp_path, monkeypatch):
    reference_run = reference_runs(*extra)
    original_loss, calls = SoftPromptModel.loss, []

    def interrupt_at_fifth_micro_batch(self, *a, **k):
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # inside step 3 (micro-batches 5 and 6): the step finishes first
                os.kill(os.getpid(), signal.SIGINT)
        return original_loss(self, *a, **k)

    monkeypatch.setattr(SoftPromptModel, "loss", interrupt_at_fifth_micro_batch)
    assert train.main(args(gpt2_dir, demo_rows_file, tmp_path, *extra)) == 130
    monkeypatch.setattr(SoftPromptModel, "loss", original_loss)
    state = json.loads((tmp_path / "last" / "training_state.json").read_text())
    # 2 micro-batches a step, or 4 when --max-batch-tokens 100 cuts each batch of 4 in two.
    expected = (2, 0, 4) if "--max-batch-tokens" in extra else (3, 0, 6)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == expected
    assert not (tmp_path / "loss_curve.png").exists()

    assert train.main(args(gpt2_dir, demo_rows_file, tmp_path, *extra, "--resume", str(tmp_path))) == 0
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


def test_micro_batches_and_accumulation_give_the_gradient_of_the_whole_batch(bloom_dir, demo_rows_file, tmp_path, monkeypatch):
    """A step's loss is the mean over all its labelled tokens, however the step is cut: 8-row batches
    whole, cut into micro-batches by --max-batch-tokens (a number, or auto on CPU, here made small),
    or as 2 accumulated batches of 4 (the same rows: without length grouping a batch of 8 is two
    consecutive batches of 4). On the plain path in fp32, whose loss calls it counts (the shared-prefix
    path's micro-batches are tests/test_shared_prefix.py's)."""
    monkeypatch.setattr("soft_prompt.config.CPU_MAX_BATCH_TOKENS", 60)
    original_loss, calls = SoftPromptModel.loss, []

    def counting_loss(self, *a, **k):
        calls.append(1)
        return original_loss(self, *a, **k)

    monkeypatch.setattr(SoftPromptModel, "loss", counting_loss)

    def run(name: str, *extra: str) -> tuple[torch.Tensor, list[float], int]:
        calls.clear()
        output_dir = tmp_path / name
        arguments = ["--model", bloom_dir, "--data", demo_rows_file, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir),
                     "--num-virtual-tokens", "4", "--epochs", "1", "--seed", "3", "--save-every", "0",
                     "--no-group-by-length", "--no-shared-prefix", "--precision", "fp32", *extra]
        assert train.main(arguments) == 0
        return prompt(output_dir / "last"), losses(output_dir), len(calls)

    whole, whole_losses, whole_calls = run("whole", "--batch-size", "8", "--max-batch-tokens", "0")
    for name, extra in [("split", ["--batch-size", "8", "--max-batch-tokens", "60"]),
                        ("auto", ["--batch-size", "8"]),
                        ("accumulated", ["--batch-size", "4", "--grad-accum", "2", "--max-batch-tokens", "0"])]:
        weight, step_losses, num_calls = run(name, *extra)
        assert num_calls > whole_calls == 5  # 40 rows: 5 steps, each cut into more micro-batches
        assert len(step_losses) == len(whole_losses) == 5
        torch.testing.assert_close(step_losses, whole_losses, rtol=1e-5, atol=0)
        torch.testing.assert_close(weight, whole, rtol=1e-5, atol=1e-6)
    automatic = json.loads((tmp_path / "auto" / "train_config.json").read_text())["automatic"]
    assert automatic == {"model_dtype": "fp32", "max_batch_tokens": 60, "attention": "eager",  # BLOOM loads eager
                         "loss_path": "plain (--no-shared-prefix)", "best_metric": "macro_f1"}  # the rows have label words


def test_a_non_finite_step_is_skipped_and_counted(bloom_dir, demo_rows_file, tmp_path, monkeypatch):
    nan_loss_on(monkeypatch, {1, 2})  # the first step's two micro-batches
    config = resolve_config(parse_args(args(bloom_dir, demo_rows_file, tmp_path, "--max-steps", "2", "--no-shared-prefix")))
    summary = train.train(config)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(lines[0]["loss"]) and math.isfinite(lines[1]["loss"])
    assert torch.isfinite(prompt(tmp_path / "last")).all()


def test_non_finite_steps_in_a_row_stop_the_run(bloom_dir, demo_rows_file, tmp_path, monkeypatch, capsys):
    nan_loss_on(monkeypatch, None)
    assert train.main(args(bloom_dir, demo_rows_file, tmp_path, "--max-bad-steps", "2", "--no-shared-prefix")) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("train.py: stopped: the loss or gradient was not finite for 2 steps in a row")


@pytest.mark.parametrize(
    "precision, model_dtype, weights",
    [("bf16", "auto", torch.bfloat16), ("fp16", "auto", torch.float16), ("fp16", "fp32", torch.float32), ("fp32", "fp16", torch.float16)],
)
def test_mixed_precision_keeps_an_fp32_prompt(precision, model_dtype, weights, bloom_dir, demo_rows_file, tmp_path, monkeypatch):
    """--model-dtype auto stores the frozen weights in the --precision dtype; the prompt, its gradient
    and AdamW's moments stay fp32, and fp16 in either place brings the GradScaler."""
    original_loss, seen = SoftPromptModel.loss, []

    def loss(self, *a, **k):
        seen.append(self.base_model.dtype)
        return original_loss(self, *a, **k)

    monkeypatch.setattr(SoftPromptModel, "loss", loss)
    extra = ["--precision", precision, "--model-dtype", model_dtype, "--max-steps", "2", "--device", "cpu", "--no-shared-prefix"]
    assert train.main(args(bloom_dir, demo_rows_file, tmp_path, *extra)) == 0
    assert set(seen) == {weights}
    weight = prompt(tmp_path / "last")
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    moments = load_file(tmp_path / "last" / "training_state.safetensors")
    assert {moments[key].dtype for key in moments if key.endswith(("exp_avg", "exp_avg_sq"))} == {torch.float32}
    assert all(math.isfinite(loss) for loss in losses(tmp_path))
    scaler = json.loads((tmp_path / "last" / "training_state.json").read_text())["scaler"]
    assert ("scale" in scaler) == ("fp16" in (precision, model_dtype))
    recorded = json.loads((tmp_path / "last" / "soft_prompt.json").read_text())
    resolved = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[weights]
    assert (recorded["precision"], recorded["model_dtype"]) == (precision, resolved)
    automatic = json.loads((tmp_path / "train_config.json").read_text())["automatic"]
    assert automatic.get("model_dtype") == (resolved if model_dtype == "auto" else None)


def test_weights_in_the_compute_dtype_train_like_weights_cast_by_autocast(bloom_dir, demo_rows_file, tmp_path):
    """bf16 weights (the default under --precision bf16) against fp32 weights under the same bf16
    autocast: the matmuls see the same rounded weights, only the norms and embeddings differ."""
    curves = []
    for model_dtype in ("auto", "fp32"):
        output_dir = tmp_path / model_dtype
        assert train.main(args(bloom_dir, demo_rows_file, output_dir, "--precision", "bf16", "--model-dtype", model_dtype)) == 0
        curves.append(losses(output_dir))
    torch.testing.assert_close(curves[0], curves[1], rtol=2e-2, atol=0)
    assert curves[0] != curves[1]


def test_demo_task_runs_offline(tmp_path):
    assert train.main(["--task", "demo", "--output-dir", str(tmp_path), "--max-steps", "2"]) == 0
    model = SoftPromptModel.from_pretrained(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "demo-model"), tmp_path / "last"
    )
    assert model.metadata["label_words"] == ["hate speech", "no hate speech"]
    assert model.metadata["template"] == HATE_TEMPLATE


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
        "SetFit/ethos_binary", HATE_TEMPLATE, "text"
    )
    assert (config.optim.lr, config.data.label_words, config.optim.batch_size) == (0.1, ["no", "yes"], 8)
    defaults = resolve_config(parse_args(["--data", "d.jsonl", "--template", HATE_TEMPLATE]))
    assert (defaults.model.model, defaults.optim.lr, defaults.prompt.num_virtual_tokens) == ("bigscience/bloomz-560m", 3e-2, 20)
    assert (defaults.data.group_by_length, defaults.optim.max_batch_tokens, defaults.model.model_dtype) == (True, "auto", "auto")
    assert TASKS["hate"]["label_words"] == ["hate speech", "no hate speech"]


@pytest.mark.parametrize(
    "flags, device, native_bf16, expected, automatic",
    [
        ([], "cpu", False, (512, "fp32", "fp32"), {"precision": "fp32", "model_dtype": "fp32", "max_batch_tokens": 512}),
        ([], "cpu", True, (512, "bf16", "bf16"), {"precision": "bf16", "model_dtype": "bf16", "max_batch_tokens": 512}),
        ([], "cuda", True, (0, "bf16", "bf16"), {"precision": "bf16", "model_dtype": "bf16", "max_batch_tokens": 0}),
        (["--precision", "bf16"], "cuda", False, (0, "bf16", "bf16"), {"model_dtype": "bf16", "max_batch_tokens": 0}),
        (["--precision", "fp16"], "mps", False, (0, "fp16", "fp16"), {"model_dtype": "fp16", "max_batch_tokens": 0}),
        (["--max-batch-tokens", "300", "--precision", "bf16", "--model-dtype", "fp32"], "cpu", True, (300, "fp32", "bf16"), {}),
        (["--max-batch-tokens", "0", "--model-dtype", "bf16", "--precision", "fp32"], "cpu", True, (0, "bf16", "fp32"), {}),
    ],
)
def test_automatic_fields_resolve_from_the_device_and_precision(flags, device, native_bf16, expected, automatic):
    config = resolve_config(parse_args(["--data", "d.jsonl", "--template", HATE_TEMPLATE, *flags]))
    assert resolve_automatic(config, device, native_bf16) == automatic
    assert (config.optim.max_batch_tokens, config.model.model_dtype, config.model.precision) == expected


def test_group_by_length_can_be_turned_off_and_batch_tokens_must_be_auto_or_a_number(capsys):
    assert parse_args(["--no-group-by-length"]) == {"group_by_length": False}
    assert parse_args(["--max-batch-tokens", "auto"]) == {"max_batch_tokens": "auto"}
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--max-batch-tokens", "lots"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: argument --max-batch-tokens: give auto or a whole number, not 'lots'"
    ]
    with pytest.raises(ValueError, match="--max-batch-tokens must not be negative, got -1"):
        resolve_config(parse_args(["--data", "d.jsonl", "--template", HATE_TEMPLATE, "--max-batch-tokens", "-1"]))


@pytest.mark.parametrize("preset", [None, "7"])
def test_training_caps_onednn_kernel_cache_unless_the_environment_sets_it(bloom_dir, demo_rows_file, tmp_path, monkeypatch, preset):
    if preset is None:
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", preset)
    assert train.main(args(bloom_dir, demo_rows_file, tmp_path, "--max-steps", "1")) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == (preset or "32")
