"""benchmarks/parity.py on the tiny BLOOM: every row passes or is a documented difference."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "parity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_parity_on_tiny_bloom_has_no_failing_row(tmp_path):
    rows = load_script().run(["--tiny", "bloom", "--output-dir", str(tmp_path)])
    failing = [f"{row.section}: {row.check}: {row.measured}" for row in rows if row.status == "FAIL"]
    assert not failing, "\n".join(failing)
    assert {row.status for row in rows} <= {"pass", "info"}
    sections = {row.section.split()[0] for row in rows}
    assert sections == {"1", "2", "3", "4", "5"}, sections

    # Row 3 drives the shipped loop (soft_prompt.training.train()), one logged loss per step.
    training = [row for row in rows if row.section == "3 train"]
    assert training[0].check.startswith("ours = soft_prompt.training.train() vs PEFT in a plain loop")
    assert training[0].status == "pass"

    report = json.loads((tmp_path / "parity-tiny-bloom.json").read_text())
    steps = report["args"]["steps"]
    assert {side: len(losses) for side, losses in report["curves"].items()} == dict.fromkeys(report["curves"], steps)
    assert [row["status"] for row in report["rows"]] == [row.status for row in rows]
    table = (tmp_path / "parity-tiny-bloom.md").read_text()
    assert table.count("| pass |") == sum(row.status == "pass" for row in rows)
