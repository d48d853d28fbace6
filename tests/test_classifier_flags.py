"""train.py's classifier flags and infer.py applying what they store: the stratified split, best/
following --best-metric, --patience, --calibration in best/ applied by infer.py (by hand),
--reparam residual (by hand, PEFT, resume), --ensemble (mean and vote by hand) and --task classify
end to end with three label words."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import infer
import train
from soft_prompt import SoftPromptModel
from soft_prompt.config import HATE_TEMPLATE, parse_args, resolve_config
from soft_prompt.scoring import label_sequences
from soft_prompt.tiny import demo_rows, save_tiny_model
from soft_prompt.training_setup import load_data_rows
from tests.conftest import load

LABELS = ["hate speech", "no hate speech"]
COLOURS = ["red", "green", "blue"]


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # std 0.3: the tiny model's output depends on its input, so prompts differ in what they score
    return save_tiny_model(tmp_path_factory.mktemp("model"), "bloom", initializer_range=0.3)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    return write_rows(tmp_path_factory.mktemp("data") / "rows.jsonl", demo_rows(40))


def flags(model_dir: str, data: str, output_dir, *extra: str) -> list[str]:
    # 30 train rows, 10 validation rows; batches of 8: 4 steps an epoch
    return ["--model", model_dir, "--data", data, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir),
            "--num-virtual-tokens", "4", "--batch-size", "8", "--val-fraction", "0.25", "--loss-on", "completion",
            "--epochs", "1", "--precision", "fp32", *extra]  # fmt: skip


def metadata(directory) -> dict:
    return json.loads((Path(directory) / "soft_prompt.json").read_text())


def eval_lines(run) -> list[dict]:
    return [line for line in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in line]


def label_totals(model_dir: str, checkpoint, texts: list[str], labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the labels' summed log-probabilities [N, L], their token counts [N, L]) after a checkpoint's prompt."""
    base, tokenizer = load(model_dir)
    model = SoftPromptModel.from_pretrained(base, checkpoint, tokenizer=tokenizer)
    totals = model.classify(texts, labels, HATE_TEMPLATE)[1]
    counts = [len(label) for _, label in label_sequences(texts, labels, HATE_TEMPLATE, tokenizer)]
    return totals, torch.tensor(counts, dtype=torch.float32).view(len(texts), len(labels))


def calibrated_by_hand(totals: torch.Tensor, counts: torch.Tensor, record: dict, labels: list[str]) -> torch.Tensor:
    """log_softmax(log_softmax(score) + offsets), score the summed or the mean per-token log-probability."""
    scores = totals / counts if record["label_score"] == "mean" else totals
    offsets = torch.tensor([record["offsets"][label] for label in labels])
    return (scores.log_softmax(-1) + offsets).log_softmax(-1)


def test_val_fraction_is_stratified_by_label(tmp_path):
    labelled = [{"text": f"row {i}", "label_text": label} for i, label in enumerate(["a"] * 20 + ["b"] * 12 + ["c"] * 8)]
    data = write_rows(tmp_path / "rows.jsonl", labelled)
    for seed in ("1", "2"):
        config = resolve_config(parse_args(["--data", data, "--template", HATE_TEMPLATE, "--val-fraction", "0.25", "--seed", seed]))
        train_rows, val_rows = load_data_rows(config)
        shares = [sum(row["label_text"] == label for row in val_rows) for label in "abc"]
        assert shares == [5, 3, 2] and len(train_rows) == 30
    # --val-seed fixes the held-out rows whatever --seed is (what an ensemble's members share)
    splits = [load_data_rows(resolve_config(parse_args(["--data", data, "--template", HATE_TEMPLATE, "--val-fraction", "0.25",
                                                        "--seed", seed, "--val-seed", "7"])))[1] for seed in ("1", "2")]
    assert splits[0] == splits[1]


@pytest.mark.parametrize("metric", ["macro_f1", "eval_loss"])
def test_best_follows_the_metric_and_patience_stops(metric, model_dir, rows, tmp_path, monkeypatch, capsys):
    scripted = iter([0.5, 0.7, 0.6, 0.7] + [0.9] * 4)  # macro_f1 of evaluations 1, 2, ...: best at step 2
    monkeypatch.setattr("soft_prompt.training_evaluation.validation_label_metrics",
                        lambda run: {"accuracy": 0.0, "macro_f1": next(scripted)})
    extra = ("--eval-every", "1", "--epochs", "2", "--patience", "2", "--best-metric", metric)
    assert train.main(flags(model_dir, rows, tmp_path, *extra)) == 0
    lines = eval_lines(tmp_path)
    if metric == "macro_f1":
        assert [line["step"] for line in lines] == [1, 2, 3, 4]  # 0.6 and 0.7 do not beat 0.7: stop after step 4
        assert "done: 4 steps (stopped early: --patience)," in capsys.readouterr().out  # of 8
        assert metadata(tmp_path / "best")["step"] == 2 and metadata(tmp_path / "last")["step"] == 4
        state = json.loads((tmp_path / "last" / "training_state.json").read_text())
        assert (state["best_score"], state["evals_without_improvement"]) == (0.7, 2)
        # resuming a run that ran out of patience trains no further
        assert train.main(flags(model_dir, rows, tmp_path, *extra, "--resume", str(tmp_path))) == 0
        assert metadata(tmp_path / "last")["step"] == 4 and len(eval_lines(tmp_path)) == 4
    else:
        best = min(lines, key=lambda line: line["eval_loss"])
        assert metadata(tmp_path / "best")["step"] == best["step"]
        assert metadata(tmp_path / "best")["macro_f1"] == best["macro_f1"]


def test_patience_spent_at_the_last_step_is_not_a_stop(model_dir, rows, tmp_path, monkeypatch, capsys):
    scripted = iter([0.5, 0.7, 0.6, 0.7])  # the 2nd evaluation without a better score is the 4th, at the last step
    monkeypatch.setattr("soft_prompt.training_evaluation.validation_label_metrics",
                        lambda run: {"accuracy": 0.0, "macro_f1": next(scripted)})
    assert train.main(flags(model_dir, rows, tmp_path, "--eval-every", "1", "--patience", "2")) == 0
    assert "done: 4 steps, train loss" in capsys.readouterr().out


def test_content_free_calibration_is_stored_and_applied_by_infer(model_dir, rows, tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(model_dir, rows, run, "--calibration", "content-free", "--label-score", "mean")) == 0
    record = metadata(run / "best")["calibration"]
    assert (record["method"], record["label_score"], sorted(record["offsets"])) == ("content-free", "mean", LABELS)
    totals, counts = label_totals(model_dir, run / "best", ["N/A", "", "[MASK]"], LABELS)
    prior = (totals / counts).softmax(-1).mean(0)  # the label probabilities for content-free inputs
    assert [record["offsets"][label] for label in LABELS] == pytest.approx((-prior.log()).tolist(), abs=1e-5)

    test_rows = demo_rows(6, seed=3)
    data = write_rows(tmp_path / "test.jsonl", test_rows)
    argv = ["--model", model_dir, "--checkpoint", str(run / "best"), "--eval", data, "--metrics", str(tmp_path / "m.json")]
    assert infer.main([*argv, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert infer.main([*argv, "--output", str(tmp_path / "raw.jsonl"), "--calibration", "none"]) == 0
    out, raw = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in ("out.jsonl", "raw.jsonl"))
    totals, counts = label_totals(model_dir, run / "best", [row["text"] for row in test_rows], LABELS)
    want = calibrated_by_hand(totals, counts, record, LABELS)
    torch.testing.assert_close(torch.tensor([[r["scores"][label] for label in LABELS] for r in out]), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor([[r["scores"][label] for label in LABELS] for r in raw]), totals, rtol=0, atol=1e-4)
    assert [r["prediction"] for r in out] == [LABELS[i] for i in want.argmax(-1).tolist()]
    assert list(json.loads((tmp_path / "m.json").read_text())) == ["tuned (soft prompt)", "base (no prompt)"]  # the --calibration none run


def hand_reparam(tensors: dict[str, torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """P + LayerNorm(Linear2(ReLU(Linear1(P)))) from the saved tensors."""
    h = torch.relu(p @ tensors["reparam.mlp.0.weight"].T + tensors["reparam.mlp.0.bias"])
    h = h @ tensors["reparam.mlp.2.weight"].T + tensors["reparam.mlp.2.bias"]
    normed = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return p + normed * tensors["reparam.norm.weight"] + tensors["reparam.norm.bias"]


def test_reparam_saves_p_plus_layernorm_mlp_peft_loads_it_and_resume_is_exact(tmp_path, monkeypatch):
    from peft import PeftModel

    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2")  # dropout: exact resume needs the RNG states too
    data = write_rows(tmp_path / "rows.jsonl", demo_rows(40))
    extra = ("--reparam", "residual", "--reparam-hidden", "8", "--epochs", "2", "--save-every", "2", "--seed", "3")
    reference = tmp_path / "reference"
    assert train.main(flags(gpt2, data, reference, *extra)) == 0
    tensors = load_file(reference / "last" / "reparam.safetensors")
    saved = load_file(reference / "last" / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(saved, hand_reparam(tensors, tensors["prompt"]), rtol=0, atol=1e-5)
    # the prompt before training is P0 + LN(MLP0(P0)): the plain run's initial prompt through the seeded MLP
    plain = tmp_path / "plain"
    assert train.main(flags(gpt2, data, plain, "--max-steps", "1", "--seed", "3")) == 0
    p0 = load_file(plain / "last" / "initial_prompt.safetensors")["prompt_embeddings"]
    base, _ = load(gpt2)
    fresh = SoftPromptModel(base, num_virtual_tokens=4, seed=3)
    from soft_prompt.reparam import add_reparam

    mlp0 = {f"reparam.{name}": value for name, value in add_reparam(fresh.prompt, 8, seed=3).state_dict().items()}
    initial = load_file(reference / "last" / "initial_prompt.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(initial, hand_reparam(mlp0, p0), rtol=0, atol=1e-5)

    peft_model = PeftModel.from_pretrained(load(gpt2)[0], reference / "best")
    best = load_file(reference / "best" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, best)

    original_loss, calls = SoftPromptModel.loss, []

    def interrupt_in_step_three(self, *a, **k):
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return original_loss(self, *a, **k)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(SoftPromptModel, "loss", interrupt_in_step_three)
    assert train.main(flags(gpt2, data, resumed, *extra)) == 130
    monkeypatch.setattr(SoftPromptModel, "loss", original_loss)
    assert json.loads((resumed / "last" / "training_state.json").read_text())["step"] == 3
    assert train.main(flags(gpt2, data, resumed, *extra, "--resume", str(resumed))) == 0
    for name in ("adapter_model.safetensors", "reparam.safetensors", "training_state.safetensors"):
        got, want = load_file(resumed / "last" / name), load_file(reference / "last" / name)
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want), name


def test_ensemble_mean_and_vote_through_infer_equal_a_hand_computation(model_dir, rows, tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(model_dir, rows, run, "--ensemble", "3", "--calibration", "content-free")) == 0
    best = run / "best"
    assert metadata(best)["ensemble"] == ["prompt-1", "prompt-2"]
    members = [best, best / "prompt-1", best / "prompt-2"]
    assert [metadata(member)["seed"] for member in members] == [42, 43, 44]
    configs = [json.loads((run / f"prompt-{k}" / "train_config.json").read_text()) for k in range(3)]
    assert {config["data"]["val_seed"] for config in configs} == {42}  # the same validation rows for all

    test_rows = demo_rows(8, seed=5)
    data = write_rows(tmp_path / "test.jsonl", test_rows)
    texts = [row["text"] for row in test_rows]
    per_prompt = []
    for member in members:
        totals, counts = label_totals(model_dir, member, texts, LABELS)
        per_prompt.append(calibrated_by_hand(totals, counts, metadata(member)["calibration"], LABELS))
    stacked = torch.stack(per_prompt)  # [3, N, L]
    mean = stacked.log_softmax(-1).mean(0)
    votes = torch.nn.functional.one_hot(stacked.argmax(-1), 2).sum(0)  # [N, L]; 3 voters, 2 labels: no ties
    argv = ["--model", model_dir, "--checkpoint", str(best), "--eval", data, "--metrics", str(tmp_path / "m.json")]
    assert infer.main([*argv, "--output", str(tmp_path / "mean.jsonl")]) == 0
    assert infer.main([*argv, "--output", str(tmp_path / "vote.jsonl"), "--vote"]) == 0
    out_mean, out_vote = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in ("mean.jsonl", "vote.jsonl"))
    torch.testing.assert_close(torch.tensor([[r["scores"][label] for label in LABELS] for r in out_mean]), mean, rtol=0, atol=1e-4)
    assert [r["prediction"] for r in out_mean] == [LABELS[i] for i in mean.argmax(-1).tolist()]
    assert [r["prediction"] for r in out_vote] == [LABELS[i] for i in votes.argmax(-1).tolist()]
    assert "tuned, uncalibrated" in json.loads((tmp_path / "m.json").read_text())


def test_task_classify_starts_from_the_init_text_where_one_is_given_else_from_the_label_words():
    given = {"task": "classify", "data": "rows.jsonl", "template": HATE_TEMPLATE, "label_words": ["a", "b"]}
    assert resolve_config(given).prompt.init == "labels"
    assert resolve_config({**given, "init_text": "Is it hate speech?"}).prompt.init == "text"
    assert resolve_config({**given, "init": "random"}).prompt.init == "random"  # a flag wins over the preset
    with pytest.raises(ValueError, match="--init text needs --init-text"):
        resolve_config({**given, "init": "text"})


def test_task_classify_with_three_label_words_end_to_end(model_dir, tmp_path):
    coloured = [{"text": row["text"], "label_text": COLOURS[i % 3]} for i, row in enumerate(demo_rows(45))]
    data = write_rows(tmp_path / "rows.jsonl", coloured)
    run = tmp_path / "run"
    argv = ["--task", "classify", "--model", model_dir, "--data", data, "--template", HATE_TEMPLATE, "--label-words", *COLOURS,
            "--num-virtual-tokens", "5", "--epochs", "2", "--output-dir", str(run)]
    assert train.main(argv) == 0
    config = json.loads((run / "train_config.json").read_text())
    assert (config["data"]["val_fraction"], config["classify"]["best_metric"]) == (0.2, "macro_f1")
    assert [line["step"] for line in eval_lines(run)] == [5, 10]  # 36 train rows in batches of 8, one evaluation an epoch
    saved = metadata(run / "best")
    assert (saved["template"], saved["label_words"], saved["init"]) == (HATE_TEMPLATE, COLOURS, "labels")
    assert (saved["calibration"]["method"], saved["calibration"]["label_score"], saved["label_score"]) == ("fitted", "mean", "mean")
    # --init labels: virtual token i starts as label word i's mean token embedding
    base, tokenizer = load(model_dir)
    embeddings = base.get_input_embeddings().weight
    initial = load_file(run / "best" / "initial_prompt.safetensors")["prompt_embeddings"]
    for i, word in enumerate(COLOURS):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(initial[i], embeddings.to(torch.bfloat16)[ids].mean(0).float(), rtol=0, atol=0)  # bf16 weights

    test_data = write_rows(tmp_path / "test.jsonl", coloured[:9])
    metrics = tmp_path / "metrics.json"
    assert infer.main(["--model", model_dir, "--checkpoint", str(run / "best"), "--eval", test_data, "--metrics", str(metrics)]) == 0
    results = json.loads(metrics.read_text())
    assert list(results) == ["tuned (soft prompt)", "tuned, uncalibrated", "base (no prompt)"]
    assert all(len(result["confusion"]) == 3 and result["count"] == 9 for result in results.values())
