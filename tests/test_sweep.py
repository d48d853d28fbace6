"""benchmarks/sweep.py: the grids, the --quick path end to end on a tiny model, and resuming."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soft_prompt.tiny import demo_rows, save_tiny_model

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import sweep  # noqa: E402


def test_grids():
    full = sweep.grid("full", [1, 2])
    assert len(full) == 2 * 4 * 4 * 3 * 2 and len(set(full)) == len(full)
    cpu = sweep.grid("cpu", [42])
    assert len(set(cpu)) == 12 and cpu[0] == sweep.REFERENCE and set(cpu) <= set(sweep.grid("full", [42]))
    # one setting changed at a time from the reference, except random init with its own lr or loss scope
    for cell in cpu:
        changed = [name for name in ("init", "num_virtual_tokens", "lr", "loss_on") if getattr(cell, name) != getattr(sweep.REFERENCE, name)]
        assert len(changed) <= 1 or (changed[0] == "init" and cell.init == "random" and len(changed) == 2)
    assert [cell.name for cell in sweep.grid("quick", [7])] == [
        "text-v4-lr0.03-completion-seed7", "random-v4-lr0.3-completion-seed7"
    ]  # fmt: skip


def run_sweep(model: str, data: Path, output_dir: Path, *extra: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--model", model, "--data", str(data),
         "--eval-data", str(data), "--output-dir", str(output_dir), "--quick", "--device", "cpu", *extra],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    return completed.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("sweep")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(40)))
    return save_tiny_model(folder / "model", "llama"), data


def test_quick_sweep_writes_tables_and_plots_and_resumes_without_redoing_cells(tiny, tmp_path):
    model, data = tiny
    assert "2 cells, 0 already done, 2 to run" in run_sweep(model, data, tmp_path)
    results = json.loads((tmp_path / "sweep.json").read_text())
    names = [cell.name for cell in sweep.grid("quick", [42])]
    assert sorted(cell["name"] for cell in results["cells"]) == sorted(names)
    assert results["setting"]["train_rows"] == 32 and results["setting"]["epochs"] == 1
    for cell in results["cells"]:
        assert 0 <= cell["accuracy"] <= 1 and 0 <= cell["macro_f1"] <= 1 and cell["steps"] == 4  # 32 rows / 8
        assert cell["train_loss"] > 0 and cell["eval_loss"] > 0 and cell["seconds"] > 0 and cell["device"] == "cpu"
    assert set(results["base"]) == {"accuracy", "macro_f1"}
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("| cpu |") == 2 and "| text | 4 | 0.03 | completion | 42 |" in table
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000 and (tmp_path / "loss_curves.png").is_file()

    # A half-done grid: one cell's result gone (as if it was interrupted). Only that cell runs again.
    kept, redone = (tmp_path / "cells" / f"{name}.json" for name in names)
    kept_before = (kept.read_text(), kept.stat().st_mtime_ns)
    redone.unlink()
    run_sweep(model, data, tmp_path, "--report-only")  # runs nothing: the tables hold the finished cell
    assert not redone.exists() and len(json.loads((tmp_path / "sweep.json").read_text())["cells"]) == 1
    run_sweep(model, data, tmp_path, "--cells", "text-v4-lr0.03-completion-seed7", "--seeds", "42", "7")  # another seed of one cell
    cells = json.loads((tmp_path / "sweep.json").read_text())["cells"]
    assert sorted(cell["name"] for cell in cells) == [names[0], "text-v4-lr0.03-completion-seed7"] and not redone.exists()
    (tmp_path / "cells" / "text-v4-lr0.03-completion-seed7.json").unlink()
    assert "2 cells, 1 already done, 1 to run" in run_sweep(model, data, tmp_path)
    assert (kept.read_text(), kept.stat().st_mtime_ns) == kept_before and redone.is_file()
    assert len(json.loads((tmp_path / "sweep.json").read_text())["cells"]) == 2


def test_bad_input_is_one_line(tiny, tmp_path):
    model, data = tiny
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--model", model, "--data", str(tmp_path / "none.jsonl"),
         "--eval-data", str(data), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == f"sweep.py: error: data file {tmp_path / 'none.jsonl'} does not exist"


def test_the_tables_give_the_last_probes_han_share_when_cells_probed(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    probe = lambda step, *shares: {"step": step, "probe": [{"text": "t", "continuation": "c", "scripts": s} for s in shares]}  # noqa: E731
    lines = [probe(0, {"Latin": 1.0}, {"Latin": 1.0}), {"step": 1, "loss": 2.0}, probe(1, {"Han": 0.5, "Latin": 0.5}, {"Han": 1.0})]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert sweep.last_probe_han_share(metrics) == 0.75
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert sweep.last_probe_han_share(metrics) is None
    cell = {"init": "text", "num_virtual_tokens": 20, "lr": 0.03, "loss_on": "all", "seed": 42, "train_loss": 1.0,
            "eval_loss": 1.0, "accuracy": 0.5, "macro_f1": 0.5, "seconds": 3.0, "device": "cpu", "name": "a"}
    base = {"accuracy": 0.5, "macro_f1": 0.4}
    sweep.write_tables(tmp_path, [{**cell, "probe_han": 0.75}, {**cell, "name": "b"}], base, {})
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[-4].endswith("| device | Han (probe) |") and table[-1].endswith("| cpu | - |")
    assert table[-2].endswith("| cpu | 0.75 |")
    sweep.write_tables(tmp_path, [cell], base, {})  # no cell probed: no column
    assert "Han" not in (tmp_path / "sweep.md").read_text()
