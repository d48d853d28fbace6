"""The analysis instruments on tiny models: nearest tokens, scripts, norms, drift, ablation, the hard
prompt, attention to the prompt, the JSON and the plots, and the initial prompt in checkpoints."""

import json
from pathlib import Path

import pytest
import torch

import analyze
from soft_prompt import SoftPromptModel
from soft_prompt.analysis import analyze as analyze_prompt
from soft_prompt.analysis import attention_to_prompt, script_of, uniform_attention_share
from soft_prompt.chance import random_vectors_like
from soft_prompt.evaluation import prompt_drift
from soft_prompt.checkpoint import INITIAL_PROMPT_NAME, load_initial_prompt
from soft_prompt.config import HATE_INIT_TEXT, HATE_TEMPLATE, resolve_config
from soft_prompt.data import Example, tokenize_rows
from soft_prompt.embedding import text_init_ids
from soft_prompt.tiny import demo_rows
from soft_prompt.training import train
from tests.conftest import load

LABELS = ["hate speech", "no hate speech"]
METADATA = {"template": HATE_TEMPLATE, "label_words": LABELS, "loss_on": "completion", "max_length": 64}


def wrapped(model_dir, **kwargs) -> SoftPromptModel:
    base, tokenizer = load(model_dir)
    return SoftPromptModel(base, tokenizer=tokenizer, seed=0, metadata=METADATA, **kwargs).eval()


def test_nearest_tokens_of_an_untrained_text_prompt_are_its_text(model_dir):
    model = wrapped(model_dir, num_virtual_tokens=6, init="text", init_text=HATE_INIT_TEXT)
    ids = text_init_ids(model.tokenizer, HATE_INIT_TEXT, 6)
    figures = analyze_prompt(model, top_k=3)
    assert [token["neighbours"][0]["id"] for token in figures["tokens"]] == ids
    for token in figures["tokens"]:
        assert token["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-6)
        assert token["neighbours"][0]["text"] == model.tokenizer.decode([token["neighbours"][0]["id"]])
        assert token["neighbours"][0]["similarity"] > token["neighbours"][1]["similarity"]
    # Its own rows of the vocabulary: the same norms, so the same percentiles as those tokens.
    norms = model.base_model.get_input_embeddings().weight[ids].norm(dim=-1)
    torch.testing.assert_close(torch.tensor([token["norm"] for token in figures["tokens"]]), norms)
    assert figures["scripts"]["Latin"] > 0


def test_special_tokens_are_their_own_script(bloom_dir):
    text_tokens = len(load(bloom_dir)[1]("hate", add_special_tokens=False)["input_ids"])
    model = wrapped(bloom_dir, num_virtual_tokens=text_tokens + 1, init="text", init_text="hate")  # + a pad token
    figures = analyze_prompt(model, top_k=1)
    assert [token["neighbours"][0]["script"] for token in figures["tokens"]] == ["Latin"] * text_tokens + ["special"]


def test_script_of_decoded_tokens():
    assert [script_of(text) for text in ("hello", " Über", "中文", "привет", "مرحبا", "안녕", "γ")] == [
        "Latin", "Latin", "Han", "Cyrillic", "Arabic", "Hangul", "Greek"
    ]  # fmt: skip
    assert script_of(" 42!") == "none" and script_of("\ufffd") == "partial bytes"


def test_drift_is_zero_at_the_start_and_measures_a_move():
    initial = torch.randn(4, 8)
    assert prompt_drift(initial, initial) == pytest.approx({"prompt_distance": 0.0, "prompt_cosine": 1.0})
    moved = initial.clone()
    moved[0] = -moved[0]  # one token reversed: cosine -1 for it, 1 for the other three
    drift = prompt_drift(moved, initial)
    assert drift["prompt_cosine"] == pytest.approx(0.5)
    assert drift["prompt_distance"] == pytest.approx(2 * initial[0].norm().item())


def test_ablating_a_token_of_a_mean_embedding_prompt_changes_nothing(bloom_dir):
    model = wrapped(bloom_dir, num_virtual_tokens=3)
    mean = model.base_model.get_input_embeddings().weight.mean(dim=0)
    with torch.no_grad():
        model.prompt.weight.copy_(mean.expand(3, -1))
    data = analyze_prompt(model, rows=demo_rows(8), batch_size=4)["data"]
    for entry in data["ablation"]:
        assert {key: entry[key] for key in ("loss", "accuracy", "macro_f1")} == data["soft_prompt"]
    # and a prompt that is not the mean embedding: ablating its tokens does change the loss
    with torch.no_grad():
        model.prompt.weight.normal_(0, 0.5)
    data = analyze_prompt(model, rows=demo_rows(8), batch_size=4)["data"]
    assert all(entry["loss"] != data["soft_prompt"]["loss"] for entry in data["ablation"])


def test_hard_prompt_of_a_text_prompt_is_the_text_itself(bloom_dir):
    model = wrapped(bloom_dir, num_virtual_tokens=4, init="text", init_text=HATE_INIT_TEXT)
    data = analyze_prompt(model, rows=demo_rows(8), batch_size=4)["data"]
    assert data["hard_prompt"]["text"] == model.tokenizer.decode(text_init_ids(model.tokenizer, HATE_INIT_TEXT, 4))
    assert {key: data["hard_prompt"][key] for key in data["soft_prompt"]} == pytest.approx(data["soft_prompt"], abs=1e-6)
    assert data["no_prompt"]["loss"] != pytest.approx(data["soft_prompt"]["loss"])


def test_attention_to_the_prompt_does_not_depend_on_padding_or_batching(model_dir):
    model = wrapped(model_dir, num_virtual_tokens=3)
    examples, _ = tokenize_rows(model.tokenizer, HATE_TEMPLATE, demo_rows(6), 64)
    assert len({len(example.input_ids) for example in examples}) > 1  # batches of 3 are padded
    batched = attention_to_prompt(model, examples, batch_size=3)
    one_at_a_time = [attention_to_prompt(model, [example], batch_size=1) for example in examples]
    tokens = [len(example.input_ids) for example in examples]  # the mean is over every text position
    expected = (torch.tensor(one_at_a_time) * torch.tensor(tokens)[:, None]).sum(0) / sum(tokens)
    torch.testing.assert_close(torch.tensor(batched), expected, rtol=1e-5, atol=1e-6)
    assert len(batched) == model.base_model.config.num_hidden_layers and all(0 < share < 1 for share in batched)


def test_uniform_attention_share():
    examples = [Example([5, 6], [5, 6]), Example([7], [7])]  # text positions 1, 2 and 1
    assert uniform_attention_share(examples, 3) == pytest.approx((3 / 4 + 3 / 5 + 3 / 4) / 3)


def test_no_attention_weights_is_a_message_not_a_crash(bloom_dir, monkeypatch):
    model = wrapped(bloom_dir, num_virtual_tokens=2)

    def refuse(name):
        raise ValueError("this kernel cannot return attention weights")

    monkeypatch.setattr(model.base_model, "set_attn_implementation", refuse)
    data = analyze_prompt(model, rows=demo_rows(4))["data"]
    assert data["attention_to_prompt"] is None
    assert data["attention_note"] == "no attention figures: BloomForCausalLM cannot switch to eager attention " \
        "(this kernel cannot return attention weights)"
    assert data["ablation"]  # the rest is measured


def test_chance_levels_are_the_readings_of_the_chance_prompts(bloom_dir):
    model = wrapped(bloom_dir, num_virtual_tokens=3)
    figures = analyze_prompt(model, top_k=2, rows=demo_rows(4))
    chance = figures["chance"]
    assert set(chance) == {"random_vectors", "random_tokens"}
    # Random vectors of the prompt's norms: their nearest-token and pairwise cosines, computed here.
    embeddings = model.base_model.get_input_embeddings().weight.detach().float()
    unit = torch.nn.functional.normalize(random_vectors_like(model.prompt.weight, 0), dim=-1)  # [V, D]
    pairwise = (unit @ unit.T)[~torch.eye(3, dtype=torch.bool)]
    nearest = (unit @ torch.nn.functional.normalize(embeddings, dim=-1).T).max(dim=-1).values  # [V]
    assert chance["random_vectors"]["nearest_cosine"] == pytest.approx(nearest.mean().item(), abs=1e-6)
    assert chance["random_vectors"]["pairwise_cosine_mean"] == pytest.approx(pairwise.mean().item(), abs=1e-6)
    assert chance["random_vectors"]["pairwise_cosine_max"] == pytest.approx(pairwise.max().item(), abs=1e-6)
    # A random hard prompt: V ordinary vocabulary tokens, each its own nearest token.
    ids = chance["random_tokens"]["ids"]
    assert len(ids) == 3 and not set(ids) & set(model.tokenizer.all_special_ids)
    assert chance["random_tokens"]["nearest_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert set(chance["random_tokens"]["scripts"]) <= {"Latin", "none", "partial bytes"}
    # Its attention share is the one a checkpoint holding those vectors measures.
    as_prompt = wrapped(bloom_dir, num_virtual_tokens=3)
    with torch.no_grad():
        as_prompt.prompt.weight.copy_(embeddings[ids])
    measured = analyze_prompt(as_prompt, top_k=2, rows=demo_rows(4))["data"]["attention_to_prompt"]
    assert chance["random_tokens"]["attention_to_prompt"] == pytest.approx(measured, abs=1e-6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A trained run on a tiny Llama: metrics.jsonl, last/ and best/ with the initial prompt."""
    from soft_prompt.tiny import save_tiny_model

    folder = tmp_path_factory.mktemp("run")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(24)))
    config = resolve_config({
        "model": save_tiny_model(folder / "model", "llama"), "data": str(data), "template": HATE_TEMPLATE, "init": "text",
        "init_text": HATE_INIT_TEXT, "num_virtual_tokens": 4, "loss_on": "completion", "val_fraction": 0.25,
        "batch_size": 6, "epochs": 2, "lr": 0.3, "output_dir": str(folder / "run"), "seed": 3, "precision": "fp32",
        "probe": ["the cat"], "probe_tokens": 4,
    })  # fmt: skip
    train(config)
    return folder


def test_training_saves_the_initial_prompt_and_logs_its_drift(run_dir):
    base, tokenizer = load(run_dir / "model")
    ids = text_init_ids(tokenizer, HATE_INIT_TEXT, 4)
    text_rows = base.get_input_embeddings().weight[ids]
    for name in ("last", "best"):
        assert torch.equal(load_initial_prompt(run_dir / "run" / name), text_rows)
    lines = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 6 and all("prompt_distance" in line and "prompt_cosine" in line for line in steps)
    trained = SoftPromptModel.from_pretrained(base, run_dir / "run" / "last").prompt.weight
    assert steps[-1]["prompt_distance"] == pytest.approx((trained - text_rows).norm().item(), rel=1e-5)
    assert steps[-1]["prompt_distance"] > steps[0]["prompt_distance"] > 0


def test_peft_loads_a_checkpoint_with_the_initial_prompt_and_old_ones_still_load(run_dir, tmp_path):
    from peft import PeftModel

    base, tokenizer = load(run_dir / "model")
    ours = SoftPromptModel.from_pretrained(base, run_dir / "run" / "last", tokenizer=tokenizer)
    peft_model = PeftModel.from_pretrained(load(run_dir / "model")[0], run_dir / "run" / "last")
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, ours.prompt.weight)
    ours.save_pretrained(tmp_path / "old")  # no initial prompt: as checkpoints saved before it
    assert not (tmp_path / "old" / INITIAL_PROMPT_NAME).exists() and load_initial_prompt(tmp_path / "old") is None
    assert analyze_prompt(SoftPromptModel.from_pretrained(base, tmp_path / "old", tokenizer=tokenizer))["drift"] is None


def test_analyze_cli_writes_every_figure_and_the_plots(run_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(6)))
    figures_file, plots = tmp_path / "figures.json", tmp_path / "plots"
    assert analyze.main([
        str(run_dir / "run" / "last"), "--model", str(run_dir / "model"), "--data", str(rows), "--rows", "5",
        "--top-k", "3", "--json", str(figures_file), "--plot", str(plots), "--device", "cpu",
    ]) == 0  # fmt: skip
    assert 0 < json.loads(figures_file.read_text())["data"]["attention_uniform_share"] < 1
    report = capsys.readouterr().out
    assert "nearest tokens" in report and "hard prompt text" in report and "attention share" in report
    figures = json.loads(figures_file.read_text())
    assert set(figures) == {
        "num_virtual_tokens", "embed_dim", "metadata", "tokens", "scripts", "top1_scripts", "vocabulary_norms",
        "pairwise_cosine", "drift", "training", "probe", "readings", "chance", "data", "checkpoint", "model",
    }  # fmt: skip
    readings = {"nearest_cosine", "nearest_cosine_top_k", "scripts", "pairwise_cosine_mean", "pairwise_cosine_max"}
    assert set(figures["readings"]) == readings
    assert set(figures["chance"]["random_vectors"]) == readings | {"attention_to_prompt"}
    assert set(figures["chance"]["random_tokens"]) == readings | {"attention_to_prompt", "ids"}
    assert all(len(chance["attention_to_prompt"]) == 2 for chance in figures["chance"].values())
    # Each reading beside its two chance levels, in the report as in the JSON.
    top1 = [figures["readings"]["nearest_cosine"]] + [c["nearest_cosine"] for c in figures["chance"].values()]
    assert "  nearest-token cosine (top 1)   " + " | ".join(f"{value:6.3f}" for value in top1) in report
    assert "chance, a random hard prompt: " in report and "chance, random vectors of the prompt's norms: " in report
    # The probe: step 0 and the two evaluations (epoch ends), the first and the last in the report.
    assert [line["step"] for line in figures["probe"]] == [0, 3, 6]
    first, last = figures["probe"][0]["probe"][0], figures["probe"][-1]["probe"][0]
    assert f"probe at step 0:\n  'the cat' -> {first['continuation']!r}" in report
    assert f"probe at step 6:\n  'the cat' -> {last['continuation']!r}" in report and "probe at step 3" not in report
    assert len(figures["tokens"]) == 4 and len(figures["pairwise_cosine"]) == 4
    for token in figures["tokens"]:
        assert set(token) == {"index", "neighbours", "norm", "norm_percentile", "cosine_to_initial", "distance_to_initial"}
        assert len(token["neighbours"]) == 3 and set(token["neighbours"][0]) == {"id", "text", "similarity", "script"}
    assert set(figures["vocabulary_norms"]) == {"min", "p5", "median", "mean", "p95", "max"}
    assert set(figures["drift"]) == {"prompt_distance", "prompt_cosine"} and len(figures["training"]) == 6
    data = figures["data"]
    assert data["rows"] == 5 and len(data["ablation"]) == 4 and len(data["attention_to_prompt"]) == 2
    for scores in (data["soft_prompt"], data["no_prompt"], data["hard_prompt"], *data["ablation"]):
        assert {"loss", "accuracy", "macro_f1"} <= set(scores)
    assert sorted(path.name for path in plots.iterdir()) == [
        "ablation.png", "attention.png", "drift.png", "norms.png", "probe_scripts.png", "similarity.png"
    ]  # fmt: skip
    assert all(path.stat().st_size > 1000 for path in plots.iterdir())


def test_analyze_cli_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert analyze.main([str(tmp_path / "missing"), "--model", str(run_dir / "model")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint directory {tmp_path / 'missing'} does not exist\n"
    assert analyze.main([str(run_dir / "run" / "last"), "--model", str(run_dir / "model"), "--rows", "0"]) == 2
    assert capsys.readouterr().err == "error: --top-k, --rows and --batch-size must be at least 1\n"


def test_analyze_describe_writes_every_pair_with_its_scores_and_the_controls(run_dir, tmp_path, capsys):
    figures_file, plots = tmp_path / "figures.json", tmp_path / "plots"
    assert analyze.main([
        str(run_dir / "run" / "last"), "--model", str(run_dir / "model"), "--describe", "--layers", "1", "0",
        "--reference", "hate speech or not", "--reference", "sentiment", "--json", str(figures_file), "--plot", str(plots),
        "--device", "cpu",
    ]) == 0  # fmt: skip
    descriptions = json.loads(figures_file.read_text())["descriptions"]
    assert descriptions["layers"] == [0, 1] and descriptions["references"] == ["hate speech or not", "sentiment"]
    assert descriptions["label_words"] == LABELS
    assert list(descriptions["sources"]) == ["trained", "initial", "random"]
    for entries in descriptions["sources"].values():
        assert [(e["source_layer"], e["target_layer"]) for e in entries] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for entry in entries:
            assert entry["class_rate"] in (0.0, 0.5, 1.0) and 0 <= entry["rouge_l"] <= 1
            assert isinstance(entry["description"], str)
    assert set(descriptions["summary"]) == set(descriptions["best"]) == {"trained", "initial", "random"}
    report = capsys.readouterr().out
    assert "descriptions at 2x2 layer pairs (layers [0, 1] of 2)" in report and "\ninitial: class rate mean" in report
    assert (plots / "descriptions.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--describe", "--layers", "0", "2"], "--layers must name layers 0..1 of the model's 2, got [0, 2]"),
        (["--layers", "0"], "--layers and --reference say what --describe does: add --describe"),
        (["--reference", "a text"], "--layers and --reference say what --describe does: add --describe"),
    ],
)
def test_analyze_describe_bad_flags_are_one_line(run_dir, flags, message, capsys):
    assert analyze.main([str(run_dir / "run" / "last"), "--model", str(run_dir / "model"), "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"  # after the model's loading bar for --layers


def test_figures_keep_the_callers_matplotlib_backend(tmp_path):
    # A notebook that trains or analyses keeps its inline backend: the figures are drawn on Figures
    # of their own, where matplotlib.use("Agg") (on import of analysis_plots) switched it for good.
    import importlib

    import matplotlib

    from soft_prompt import analysis_plots
    from soft_prompt.training import write_loss_curve
    from soft_prompt.training_state import METRICS_FILE

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        importlib.reload(analysis_plots)
        figures = {"vocabulary_norms": {"p5": 0.5, "median": 1.0, "p95": 1.5}, "tokens": [{"norm": 1.2}, {"norm": 0.8}]}
        norms = analysis_plots.plot_norms(figures, tmp_path / "norms.png")
        (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "eval_loss": 1.7}\n')
        curve = write_loss_curve(tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    assert norms.read_bytes()[:8] == curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
