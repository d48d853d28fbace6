"""infer.py with several checkpoints on one model: NAME=DIR, rows routed by their "prompt" field,
each prompt with its own template and label words, per-prompt accuracy, one-line errors."""

import json

import pytest
import torch

import infer
from soft_prompt import SoftPromptModel
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.evaluation import label_metrics
from soft_prompt.inference import generate_texts
from soft_prompt.runtime import checkpoint_names, load_prompted_model
from soft_prompt.tiny import build_tiny_model, save_tiny_model
from tests.conftest import load

LABELS = ["no hate speech", "hate speech"]
TOPIC_TEMPLATE = "Topic of {text} is {topic}"
TOPICS = ["music", "the cat", "people"]


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory) -> str:
    """A tiny BLOOM with large weights (std 0.3), on which every prompt changes the greedy tokens."""
    return save_tiny_model(tmp_path_factory.mktemp("sharp-bloom"), "bloom", initializer_range=0.3)


@pytest.fixture(scope="module")
def checkpoints(bloom_dir, tmp_path_factory) -> dict[str, str]:
    """Two checkpoints of different lengths, templates and label words for the tiny BLOOM."""
    model, _ = load(bloom_dir)
    directory = tmp_path_factory.mktemp("prompts")
    SoftPromptModel(model, num_virtual_tokens=4, seed=0).save_pretrained(directory / "hate", template=HATE_TEMPLATE, label_words=LABELS)
    SoftPromptModel(model, num_virtual_tokens=2, seed=1).save_pretrained(
        directory / "topic", template=TOPIC_TEMPLATE, label_words=TOPICS
    )
    return {"hate": str(directory / "hate"), "topic": str(directory / "topic")}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_main(capsys, *args):
    code = infer.main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()[-1] if code else ""


def test_checkpoint_flags_name_the_prompts(tmp_path):
    odd = tmp_path / "run=3"  # a folder whose name holds "=" stays a folder
    odd.mkdir()
    assert checkpoint_names(["runs/a", "topic=runs/b", "x=y=z"]) == {"default": "runs/a", "topic": "runs/b", "x": "y=z"}
    assert checkpoint_names([str(odd)]) == {"default": str(odd)}
    assert checkpoint_names(["runs/x=1/best"]) == {"default": "runs/x=1/best"}  # not a NAME: a path
    with pytest.raises(ValueError, match="two checkpoints are named 'default'"):
        checkpoint_names(["runs/a", "runs/b"])


def test_generation_routes_each_row_to_its_prompt(bloom_dir, checkpoints, tmp_path):
    rows = [
        {"input": "the cat is lovely", "prompt": "topic"},
        {"input": "the cat is lovely"},  # no field: the default prompt (the bare DIR)
        {"input": "the cat is lovely", "prompt": None},
        {"input": "our team made me smile", "prompt": "topic"},
    ]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    code = infer.main(["--model", bloom_dir, "--checkpoint", checkpoints["hate"], "--checkpoint",
                       f"topic={checkpoints['topic']}", "--input-file", path, "--max-new-tokens", "6",
                       "--batch-size", "4", "--output", str(tmp_path / "out.jsonl")])
    assert code == 0
    out = read_rows(tmp_path / "out.jsonl")
    assert [row["prompt"] for row in out] == ["topic", "default", None, "topic"]
    model = load_prompted_model(bloom_dir, {"default": checkpoints["hate"], "topic": checkpoints["topic"]})
    options = dict(max_new_tokens=6, repetition_penalty=1.5, num_beams=1, do_sample=False)
    for row, written in zip(rows, out):  # each row alone, after its own prompt
        alone = generate_texts(model, [row["input"]], prompt_names=[written["prompt"]], **options)
        assert written["output"] == alone[0]
    assert out[2]["output"] == generate_texts(model, [rows[2]["input"]], use_prompt=False, **options)[0]
    assert len({row["output"] for row in out[:3]}) == 3  # one text, three prompts: three continuations


def test_eval_scores_each_prompt_with_its_own_template_and_labels(bloom_dir, checkpoints, tmp_path):
    rows = [
        {"text": "the cat is lovely", "label_text": "no hate speech", "prompt": "hate"},
        {"text": "those people are animals", "label_text": "hate speech", "prompt": "hate"},
        {"text": "that song", "topic": "music", "prompt": "topic"},
        {"text": "the cat is lovely", "topic": "the cat", "prompt": "topic"},
        {"text": "the cat is lovely", "label_text": "no hate speech", "prompt": None},
    ]
    path = write_rows(tmp_path / "eval.jsonl", rows)
    code = infer.main(["--model", bloom_dir, "--checkpoint", f"hate={checkpoints['hate']}", "--checkpoint",
                       f"topic={checkpoints['topic']}", "--eval", path, "--batch-size", "2",
                       "--output", str(tmp_path / "pred.jsonl"), "--metrics", str(tmp_path / "metrics.json")])
    assert code == 0
    predictions = read_rows(tmp_path / "pred.jsonl")
    model = load_prompted_model(bloom_dir, checkpoints)
    gold = [row.get("label_text") or row.get("topic") for row in rows]
    for row, written, want in zip(rows, predictions, gold):
        name = row["prompt"]
        template, labels = (TOPIC_TEMPLATE, TOPICS) if name == "topic" else (HATE_TEMPLATE, LABELS)  # null: the first's
        _, alone = model.classify([row], labels, template, prompt_names=[name])
        assert written["prompt"] == name and list(written["scores"]) == labels and written["label"] == want
        torch.testing.assert_close(torch.tensor(list(written["scores"].values())), alone[0], rtol=0, atol=1e-5)
        _, base = model.classify([row], labels, template, use_prompt=False)
        torch.testing.assert_close(torch.tensor(list(written["base_scores"].values())), base[0], rtol=0, atol=1e-5)
    # Same text and labels: the hate prompt and no prompt score it differently.
    assert abs(predictions[0]["scores"]["hate speech"] - predictions[4]["scores"]["hate speech"]) > 1e-3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    hate, topic = [0, 1], [2, 3]
    assert metrics == {
        "hate (soft prompt)": label_metrics([gold[i] for i in hate], [predictions[i]["prediction"] for i in hate], LABELS),
        "hate rows, base (no prompt)": label_metrics([gold[i] for i in hate], [predictions[i]["base_prediction"] for i in hate], LABELS),
        "topic (soft prompt)": label_metrics([gold[i] for i in topic], [predictions[i]["prediction"] for i in topic], TOPICS),
        "topic rows, base (no prompt)": label_metrics([gold[i] for i in topic], [predictions[i]["base_prediction"] for i in topic], TOPICS),
        "null rows, base (no prompt)": label_metrics([gold[4]], [predictions[4]["prediction"]], LABELS),
    }


def test_prompt_errors_are_one_line_and_exit_2(bloom_dir, checkpoints, tmp_path, capsys):
    path = write_rows(tmp_path / "rows.jsonl", [{"input": "hi"}, {"input": "hi", "prompt": "topc"}])
    both = ("--model", bloom_dir, "--checkpoint", f"hate={checkpoints['hate']}", "--checkpoint", f"topic={checkpoints['topic']}")
    code, message = run_main(capsys, *both, "--input-file", path, "--max-new-tokens", "2")
    assert code == 2
    assert message == ("error: input row 2 has \"prompt\": \"topc\", which names no checkpoint: use one of "
                       "['hate', 'topic'] (--checkpoint NAME=DIR) or null for the frozen model alone")
    code, message = run_main(capsys, "--model", bloom_dir, "--checkpoint", f"a={checkpoints['hate']}",
                             "--checkpoint", f"a={checkpoints['topic']}", "--input", "hi")
    assert code == 2 and message.startswith("error: --checkpoint: two checkpoints are named 'a'")
    wide = tmp_path / "wide"  # a prompt for a model with another embedding size
    SoftPromptModel(build_tiny_model("bloom", 400, hidden_size=48), num_virtual_tokens=2, seed=0).save_pretrained(wide)
    code, message = run_main(capsys, *both, "--checkpoint", f"wide={wide}", "--input", "hi")
    assert code == 2 and f"checkpoint {wide} has embedding size 48 but the model has 32" in message


def test_eval_rows_need_their_own_templates_label_field(bloom_dir, checkpoints, tmp_path, capsys):
    rows = [{"text": "the cat", "label_text": "hate speech", "prompt": "hate"},
            {"text": "that song", "label_text": "music", "prompt": "topic"}]  # topic's label field is "topic"
    path = write_rows(tmp_path / "eval.jsonl", rows)
    code, message = run_main(capsys, "--model", bloom_dir, "--checkpoint", f"hate={checkpoints['hate']}",
                             "--checkpoint", f"topic={checkpoints['topic']}", "--eval", path)
    assert code == 2 and message == f"error: {path}: rows [2] have no 'topic' field (the template's label)"
