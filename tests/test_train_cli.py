"""`python train.py` end to end in a subprocess: a tiny model folder and a tiny jsonl."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from soft_prompt import SoftPromptModel
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.runtime import native_bf16
from soft_prompt.tiny import demo_rows, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_and_writes_the_run_folder(tmp_path):
    # Weights of std 0.3 make the tiny model's output depend on its input, so the prompt can learn.
    model_dir = save_tiny_model(tmp_path / "model", "bloom", initializer_range=0.3)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(48)))
    run = tmp_path / "run"
    result = run_cli(
        "--model", model_dir, "--data", str(data), "--template", HATE_TEMPLATE, "--loss-on", "completion",
        "--init", "text", "--init-text", "hate speech or not", "--num-virtual-tokens", "8",
        "--val-fraction", "0.25", "--epochs", "3", "--batch-size", "4", "--output-dir", str(run),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: 27 steps, train loss ")

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    eval_lines = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in train_lines] == list(range(1, 28))
    assert [line["step"] for line in eval_lines] == [9, 18, 27]
    assert set(train_lines[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "prompt_norm",
                                  "prompt_distance", "prompt_cosine"}
    assert all(set(line) == {"step", "epoch", "eval_loss", "accuracy", "macro_f1"} for line in eval_lines)
    # The first step's batch is one length group (grouping is the default), so its loss is only
    # roughly the epoch's: the last epoch's mean is compared with a margin, the evaluations strictly.
    assert sum(line["loss"] for line in train_lines[-9:]) / 9 < 0.8 * train_lines[0]["loss"]
    assert eval_lines[0]["eval_loss"] > eval_lines[1]["eval_loss"] > eval_lines[2]["eval_loss"]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((run / "train_config.json").read_text())
    assert config["optim"]["lr"] == 3e-2 and config["optim"]["batch_size"] == 4
    assert config["data"]["label_words"] == ["hate speech", "no hate speech"]  # the last field's values
    assert config["model"]["device"] == "cpu"
    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"  # --precision auto on this CPU
    assert config["automatic"] == {"precision": precision, "model_dtype": precision, "max_batch_tokens": 512,
                                   "attention": "eager", "loss_path": "shared prefix",  # BLOOM: no dropout
                                   "best_metric": "macro_f1"}  # there are label words
    assert (config["model"]["model_dtype"], config["optim"]["max_batch_tokens"], config["data"]["group_by_length"]) == (precision, 512, True)
    assert config["model"]["attention"] == "eager"  # auto, resolved like the fields above

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    best = SoftPromptModel.from_pretrained(base, run / "best")
    assert best.metadata["template"] == HATE_TEMPLATE
    assert best.metadata["label_words"] == ["hate speech", "no hate speech"]
    first_best = max(eval_lines, key=lambda line: line["macro_f1"])  # max keeps the first of equals, as best/ does
    assert (best.metadata["step"], best.metadata["macro_f1"]) == (first_best["step"], first_best["macro_f1"])
    assert SoftPromptModel.from_pretrained(base, run / "last").metadata["step"] == 27

