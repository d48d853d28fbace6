"""Every documented --device value this machine has works on all three scripts, which share one
device rule (auto: cuda, then mps, then cpu); and train() leaves the caller's configuration as
it was (setup resolves a copy)."""

import copy
import json
from pathlib import Path

import pytest
import torch

import analyze
import infer
import train as train_script
from soft_prompt.config import HATE_TEMPLATE, resolve_config
from soft_prompt.runtime import pick_device
from soft_prompt.tiny import demo_rows, save_tiny_model
from soft_prompt.training import train

DEVICES = ["auto", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Path, Path]:
    """(a tiny model folder, a data file, a run folder trained 2 steps on it)."""
    root = tmp_path_factory.mktemp("devices")
    model_dir = save_tiny_model(root / "model", "bloom")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(8)))
    run = root / "run"
    config = resolve_config({"model": model_dir, "data": str(data), "template": HATE_TEMPLATE, "num_virtual_tokens": 2,
                             "max_steps": 2, "batch_size": 4, "output_dir": str(run)})
    train(config)
    return model_dir, data, run


def test_auto_is_the_best_device_this_machine_has():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto") == torch.device(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_train_py_takes_each_device(device, trained, tmp_path):
    model_dir, data, _ = trained
    code = train_script.main(["--model", model_dir, "--data", str(data), "--template", HATE_TEMPLATE, "--num-virtual-tokens", "2",
                              "--max-steps", "1", "--batch-size", "4", "--device", device, "--output-dir", str(tmp_path / "run")])
    assert code == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["model"]["device"] == pick_device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_infer_py_takes_each_device(device, trained, tmp_path, capsys):
    model_dir, _, run = trained
    output = tmp_path / "out.jsonl"
    code = infer.main(["--model", model_dir, "--checkpoint", str(run / "last"), "--input", "Sentence : hi Label :",
                       "--max-new-tokens", "2", "--device", device, "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    assert len(output.read_text().splitlines()) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_analyze_py_takes_each_device(device, trained, tmp_path, capsys):
    model_dir, _, run = trained
    code = analyze.main([str(run / "last"), "--model", model_dir, "--device", device, "--json", str(tmp_path / "f.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "f.json").read_text())["num_virtual_tokens"] == 2


def exit_code(main, argv: list[str]) -> int:
    """A script's exit code, whether its main() returns it or its parser exits with it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("script", [infer, analyze], ids=["infer", "analyze"])
def test_a_device_this_machine_lacks_is_one_line(script, trained, capsys):
    model_dir, _, run = trained
    missing = "mps" if torch.cuda.is_available() else "cuda"
    argv = (["--model", model_dir, "--checkpoint", str(run / "last"), "--input", "x"] if script is infer
            else [str(run / "last"), "--model", model_dir])
    assert exit_code(script.main, argv + ["--device", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--device {missing}" in err


def test_train_leaves_the_callers_config_as_it_was(trained, tmp_path):
    model_dir, data, _ = trained
    config = resolve_config({"model": model_dir, "data": str(data), "template": HATE_TEMPLATE, "num_virtual_tokens": 2,
                             "max_steps": 1, "batch_size": 4, "output_dir": str(tmp_path / "run")})
    before = copy.deepcopy(config)
    train(config)
    assert config == before
    assert config.model.device == "auto" and config.model.attention == "auto" and config.data.label_words is None
    resolved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert resolved["model"]["device"] == "cpu" and resolved["data"]["label_words"] == ["hate speech", "no hate speech"]
