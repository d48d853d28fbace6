import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from soft_prompt.chance import text_script_shares
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.model import SoftPromptModel
from soft_prompt.probe import probe
from soft_prompt.tiny import build_tiny_model, build_tokenizer, save_tiny_model


def reference_continuation(model: SoftPromptModel, text: str, max_new_tokens: int, penalty: float) -> list[int]:
    """Greedy decoding by full recomputation at each step, Hugging Face's repetition penalty over
    the text's ids and the generated ones (never the virtual tokens)."""
    ids = model.tokenizer(text)["input_ids"]
    generated = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + generated])).logits[0, -1]
        seen = torch.tensor(sorted(set(ids + generated)))
        logits[seen] = torch.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        generated.append(int(logits.argmax()))
        if generated[-1] == model.tokenizer.eos_token_id:
            break
    return generated


def test_probe_gives_the_greedy_continuation_and_its_scripts():
    tokenizer = build_tokenizer()
    model = SoftPromptModel(build_tiny_model("llama", len(tokenizer), initializer_range=0.3), 4, tokenizer=tokenizer, seed=0)
    model.train()
    texts = ["the cat is lovely", "my neighbour"]  # different lengths: one row is padded
    lines = probe(model, texts, max_new_tokens=12)
    assert model.training  # left as it was found
    assert [line["text"] for line in lines] == texts
    for line, text in zip(lines, texts):
        model.eval()
        expected = tokenizer.decode(reference_continuation(model, text, 12, 1.5), skip_special_tokens=True)
        assert line["continuation"] == expected
        assert line["scripts"] == text_script_shares(expected)
    assert probe(model, []) == []


# -- train.py --probe ---------------------------------------------------------------------------

PROBES = ["the cat is lovely", "my neighbour"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", initializer_range=0.3)


def train_args(model: str, data: str, output_dir, *extra: str) -> list[str]:
    # 40 rows (30 with --val-fraction 0.25) in batches of 4, 2 per step: 4 (5) steps an epoch.
    return [
        "--model", model, "--data", data, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir), "--batch-size", "4",
        "--grad-accum", "2", "--epochs", "2", "--seed", "1", "--save-every", "2", "--precision", "fp32", "--probe", PROBES[0],
        "--probe", PROBES[1], "--probe-tokens", "6", *extra,
    ]  # fmt: skip


def probe_lines(output_dir) -> list[dict]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "probe" in line]


def eval_steps(output_dir) -> list[int]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "eval_loss" in line]


def test_train_probes_at_step_0_and_every_evaluation_and_a_resumed_run_continues_them(llama_dir, demo_rows_file, tmp_path, monkeypatch):
    # --no-shared-prefix: the interruption below counts calls of the plain loss.
    with_eval = ("--val-fraction", "0.25", "--eval-every", "3", "--no-shared-prefix")
    reference = tmp_path / "reference"
    assert train.main(train_args(llama_dir, demo_rows_file, reference, *with_eval)) == 0
    lines = probe_lines(reference)
    assert eval_steps(reference) == [3, 6, 8]
    assert [line["step"] for line in lines] == [0, 3, 6, 8]
    for line in lines:
        assert [entry["text"] for entry in line["probe"]] == PROBES
        assert all(entry["scripts"] == text_script_shares(entry["continuation"]) for entry in line["probe"])
    # What the probe logs is what probe() says with the prompt of that step: the final one here.
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = SoftPromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), reference / "last", tokenizer=tokenizer)
    assert lines[-1]["probe"] == probe(model, PROBES, max_new_tokens=6)
    assert lines[0]["probe"] != lines[-1]["probe"]  # training changed what the model says

    # Ctrl-C inside step 3 (micro-batches 5 and 6): last/ holds step 3 and its probe line; the
    # resumed run logs the later ones once each, the same as the uninterrupted run's.
    interrupted, original_loss, calls = tmp_path / "interrupted", SoftPromptModel.loss, []

    def interrupt_at_fifth_micro_batch(self, *a, **k):
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGINT)
        return original_loss(self, *a, **k)

    monkeypatch.setattr(SoftPromptModel, "loss", interrupt_at_fifth_micro_batch)
    assert train.main(train_args(llama_dir, demo_rows_file, interrupted, *with_eval)) == 130
    monkeypatch.undo()
    assert [line["step"] for line in probe_lines(interrupted)] == [0, 3]
    assert train.main(train_args(llama_dir, demo_rows_file, interrupted, *with_eval, "--resume", str(interrupted))) == 0
    assert probe_lines(interrupted) == lines


def test_train_without_eval_rows_probes_at_each_epoch_end_and_the_last_step(llama_dir, demo_rows_file, tmp_path):
    assert train.main(train_args(llama_dir, demo_rows_file, tmp_path, "--max-steps", "6")) == 0  # epochs end at 5 and 10
    assert eval_steps(tmp_path) == []
    assert [line["step"] for line in probe_lines(tmp_path)] == [0, 5, 6]


def test_probe_flags_are_checked_before_anything_loads(capsys):
    base = ["--data", "rows.jsonl", "--template", HATE_TEMPLATE, "--probe", "hello"]
    assert train.main([*base, "--probe-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--probe-tokens must be at least 1, got 0")
    assert train.main([*base, "--fsdp"]) == 2
    assert "--probe generates on rank 0 alone" in capsys.readouterr().err
