"""benchmarks/linear_probe.py: the features equal each text's own unpadded hidden states, the
logistic regression reaches its optimum, the choice is the best on validation rows (the split of
--task classify), cross-validation predicts each row from a fit without it, and the test rows are
scored with that choice alone."""

import json
import shlex
import sys
from pathlib import Path

import torch

from soft_prompt.config import HATE_TEMPLATE, resolve_config
from soft_prompt.evaluation import label_metrics
from soft_prompt.files import portable_path
from soft_prompt.tiny import demo_rows
from soft_prompt.training_setup import load_data_rows
from tests.conftest import load

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import linear_probe  # noqa: E402


def test_features_are_each_texts_own_hidden_states(bloom_dir):
    model, tokenizer = load(bloom_dir)
    texts = ["those people are not welcome here at all", "the cat", "a dog"]  # one padded batch, in length order
    features = linear_probe.hidden_features(model, tokenizer, texts, batch_size=3)
    for i, text in enumerate(texts):
        with torch.no_grad():
            states = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        alone = torch.cat(states)  # [layers + 1, T, D]
        torch.testing.assert_close(features["last"][i], alone[:, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(features["mean"][i], alone.mean(1), rtol=0, atol=1e-5)


def test_the_fit_is_the_regularised_optimum():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 5, generator=generator)
    gold = (features[:, 0] + 0.5 * torch.randn(60, generator=generator) > 0).long()
    for l2 in (1e-3, 1.0):
        weight, bias = linear_probe.fit_logistic(features, gold, 2, l2)
        weight.requires_grad_(), bias.requires_grad_()
        objective = torch.nn.functional.cross_entropy(features.double() @ weight + bias, gold) + l2 * weight.pow(2).sum()
        objective.backward()
        assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5  # a stationary point of a convex objective
    assert linear_probe.fit_logistic(features, gold, 2, 1.0)[0].norm() < linear_probe.fit_logistic(features, gold, 2, 1e-3)[0].norm()


def test_chooses_on_validation_and_scores_the_test_rows_once(bloom_dir, tmp_path):
    rows = demo_rows(40)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    template = 'Sentence :\n"{text}" Label : {label_text}'  # a newline and quotes, as in a chat format
    argv = ["--model", bloom_dir, "--data", str(data), "--test-data", str(data), "--seeds", "3", "--template", template,
            "--output-dir", str(tmp_path / "out")]
    assert linear_probe.main(argv) == 0
    result = json.loads((tmp_path / "out" / "linear-probe.json").read_text())["results"]["3"]
    settings = result["settings"]
    layers = load(bloom_dir)[0].config.n_layer + 1
    assert len(settings) == len(linear_probe.POOLINGS) * layers * len(linear_probe.L2_PENALTIES)
    best = max((s["validation"]["macro_f1"], s["validation"]["accuracy"]) for s in settings)
    assert (result["chosen"]["validation"]["macro_f1"], result["chosen"]["validation"]["accuracy"]) == best
    labels = sorted({row["label_text"] for row in rows})
    config = resolve_config({"task": "classify", "model": bloom_dir, "data": str(data), "template": HATE_TEMPLATE,
                             "label_words": labels, "val_fraction": 0.2, "seed": 3})
    assert result["chosen"]["validation"]["count"] == len(load_data_rows(config)[1]) == 8  # train.py's own split
    assert result["test"]["count"] == 40
    assert result["cross_validated"]["count"] == 40  # the whole --data file, both parts of the split
    report = (tmp_path / "out" / "linear-probe.md").read_text()
    assert "| 3 | " in report
    command = report.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert shlex.split(command) == ["python", "benchmarks/linear_probe.py", *map(portable_path, argv)]  # reruns it
    assert (tmp_path / "out" / "linear-probe.png").read_bytes().startswith(b"\x89PNG")


def test_bad_input_is_one_line_and_exit_code_2(bloom_dir, tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert linear_probe.main(["--model", bloom_dir, "--data", missing, "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("linear_probe.py: error: ") and "missing.jsonl" in error and "\n" not in error
    assert not (tmp_path / "out").exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(10)))
    for flags, message in ((["--label-words", "yes", "no"], "not among the label words"),
                           (["--template", "Text : {sentence} Label : {label_text}"], "{sentence} is not a column"),
                           (["--folds", "1"], "give 2 or more folds"), (["--folds", "11"], "only 10 rows")):
        assert linear_probe.main(["--model", bloom_dir, "--data", str(rows), "--output-dir", str(tmp_path / "out"), *flags]) == 2
        assert message in capsys.readouterr().err


def test_cross_validation_predicts_each_row_from_a_fit_without_it():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(9, 4, generator=generator)
    gold = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    labels = ["no", "yes"]
    predicted = []
    for i in range(len(gold)):  # leave one out, by hand: the fold assignment cannot matter
        keep = torch.arange(len(gold)) != i
        train, held = linear_probe.standardised(features[keep], features[i : i + 1])
        weight, bias = linear_probe.fit_logistic(train, gold[keep], 2, 0.1)
        predicted.append(labels[(held.double() @ weight + bias).argmax(1).item()])
    expected = label_metrics([labels[i] for i in gold.tolist()], predicted, labels)
    assert linear_probe.cross_validated(features, gold, labels, 0.1, folds=9, seed=5) == expected
    assert linear_probe.cross_validated(features, gold, labels, 0.1, folds=3, seed=5)["count"] == 9
