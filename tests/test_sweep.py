"""benchmarks/sweep.py: the grids, the scoring variants on hand-fed scores, choosing on validation
rows, the --quick path end to end on a tiny model (test rows scored after the choice), resuming."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soft_prompt.calibration import calibrate, ensemble_mean, fit_offsets
from soft_prompt.tiny import demo_rows, save_tiny_model

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import sweep  # noqa: E402


def test_grids():
    full = sweep.grid("full", [1, 2])
    assert len(full) == 2 * 4 * 4 * 3 * 2 and len(set(full)) == len(full)
    cpu = sweep.grid("cpu", [42])
    assert len(set(cpu)) == 12 and cpu[0] == sweep.REFERENCE and set(cpu) <= set(sweep.grid("full", [42]))
    reference = dict(sweep.REFERENCE.settings)
    for cell in cpu:  # one setting changed at a time from the reference, except random init with its own lr or loss scope
        changed = [name for name, value in cell.settings if value != reference[name]]
        assert len(changed) <= 1 or (changed[0] == "init" and dict(cell.settings)["init"] == "random" and len(changed) == 2)
    assert [cell.name for cell in sweep.grid("quick", [7])] == ["old-v4-seed7", "classify-v4-seed7"]

    classify = sweep.grid("classify", [1, 2, 3])
    assert len(classify) == 21 and [cell.seed for cell in classify[:7]] == [1] * 7
    recipes = {cell.recipe: dict(cell.settings) for cell in classify}
    assert list(recipes) == ["old", "old+selection", "old+init-labels", "old+reparam", "old+ensemble3", "old+v100", "classify"]
    assert recipes["classify"] == {"task": "classify"}  # the preset itself, as train.py --task classify runs it
    for recipe, settings in recipes.items():  # each lever alone on the old recipe
        if recipe.startswith("old+"):
            assert {name: value for name, value in settings.items() if recipes["old"].get(name) != value} == sweep.LEVERS[recipe]


def test_halves_are_stratified_and_alternate():
    gold = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 1])
    assert sweep.halves(gold).tolist() == [0, 0, 1, 0, 1, 0, 1, 1, 0]  # each label's rows 0, 1, 0, 1, ... in order


def test_variant_figures_on_hand_fed_scores():
    # 6 rows, 2 labels; label 1's tokens are 2, label 0's 1, so "mean" halves label 1's totals.
    totals = torch.tensor([[-1.0, -1.5], [-1.0, -2.5], [-2.0, -1.0], [-3.0, -1.0], [-1.0, -1.8], [-2.0, -3.0]])[None]  # [1, 6, 2]
    counts = torch.tensor([[1, 2]] * 6)[None]
    gold = torch.tensor([0, 0, 1, 1, 1, 1])
    references = {f"{score}/{method}": torch.tensor([[0.0, 0.0]]) for score in ("sum", "mean") for method in ("content-free", "domain")}
    references["sum/domain"] = torch.tensor([[0.0, 5.0]])  # a large push to label 1: every row predicted 1
    figures = sweep.variant_figures(totals, counts, gold, references)
    assert set(figures) == set(sweep.VARIANTS)
    assert figures["sum/none"]["accuracy"] == pytest.approx(4 / 6)  # predicted 0, 0, 1, 1, 0, 0
    assert figures["mean/none"]["accuracy"] == pytest.approx(5 / 6)  # means -0.75, -1.25, -0.5, -0.5, -0.9, -1.5: 1 0 1 1 1 1
    assert figures["sum/domain"]["accuracy"] == pytest.approx(4 / 6)
    assert figures["sum/content-free"] == figures["sum/none"]  # zero offsets change nothing
    # fitted, cross-fitted: each half's rows scored by offsets fitted on the other half alone
    fold = sweep.halves(gold)
    predicted = torch.zeros(6, dtype=torch.long)
    for held in (0, 1):
        offsets = fit_offsets(totals[0][fold != held], gold[fold != held], "macro_f1")
        predicted[fold == held] = calibrate(totals[0][fold == held], offsets).argmax(dim=1)
    assert figures["sum/fitted"]["accuracy"] == pytest.approx((predicted == gold).float().mean().item())

    # Two prompts: their calibrated scores are averaged as infer.py does (ensemble_mean).
    pair = torch.stack([totals[0], totals[0].flip(1)])  # the second prompt prefers the other label
    two = sweep.variant_figures(pair, counts.expand(2, -1, -1), gold, {k: v.expand(2, -1) for k, v in references.items()})
    expected = ensemble_mean(torch.stack([calibrate(pair[0]), calibrate(pair[1])])).argmax(dim=1)
    assert two["sum/none"]["accuracy"] == pytest.approx((expected == gold).float().mean().item())


def test_choice_is_the_best_mean_validation_macro_f1():
    cell = lambda recipe, seed, f1, acc: {"recipe": recipe, "seed": seed, "own_variant": "sum/none", "seconds": 1.0,  # noqa: E731
                                          "variants": {v: {"accuracy": acc, "macro_f1": f1 - (v != "sum/none")} for v in sweep.VARIANTS}}
    results = [cell("a", 1, 0.6, 0.7), cell("a", 2, 0.8, 0.7), cell("b", 1, 0.7, 0.6), cell("b", 2, 0.7, 0.9), cell("c", 1, 0.99, 0.99)]
    rows = sweep.candidates(results, [1, 2])
    assert {row["recipe"] for row in rows} == {"a", "b"}  # c lacks seed 2: not a candidate
    a = next(row for row in rows if row["recipe"] == "a" and row["variant"] == "sum/none")
    assert a["macro_f1"] == pytest.approx(0.7) and a["macro_f1_sd"] == pytest.approx(0.1414, abs=1e-4) and a["own"]
    chosen = sweep.choose(rows)  # a and b tie on macro-F1 0.7: b's accuracy is higher
    assert (chosen["recipe"], chosen["variant"]) == ("b", "sum/none")


def run_sweep(model: str, data: Path, output_dir: Path, *extra: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--model", model, "--data", str(data), "--test-data", str(data),
         "--test-also", "old-v4", "--output-dir", str(output_dir), "--quick", "--device", "cpu", "--seeds", "42", *extra],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    return completed.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("sweep")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(40)))
    return save_tiny_model(folder / "model", "llama"), data


def test_quick_sweep_chooses_on_validation_scores_test_once_and_resumes(tiny, tmp_path):
    model, data = tiny
    assert "2 cells, 0 already done, 2 to run" in run_sweep(model, data, tmp_path)
    results = json.loads((tmp_path / "sweep.json").read_text())
    names = [cell.name for cell in sweep.grid("quick", [42])]
    assert [cell["name"] for cell in results["cells"]] == names
    assert results["setting"]["train_rows"] == 40 and results["setting"]["epochs"] == 1
    for cell in results["cells"]:
        assert cell["validation_rows"] == 8 and cell["steps"] == 4  # 40 rows, 8 held out, 32 / 8 a batch
        assert set(cell["variants"]) == set(sweep.VARIANTS) and cell["device"] == "cpu"
    assert [cell["own_variant"] for cell in results["cells"]] == ["sum/none", "mean/fitted"]
    chosen = results["chosen"]
    assert chosen == sweep.choose(results["candidates"]) and len(results["candidates"]) == 2 * len(sweep.VARIANTS)

    # The test rows: the chosen recipe, old-v4 at its own scoring, the frozen model and the majority class.
    test_rows = results["test"]["rows"]
    chosen_label = f"{chosen['recipe']} ({chosen['variant']}), chosen"
    assert chosen_label in test_rows and "frozen model (no prompt)" in test_rows and "majority class" in test_rows
    if chosen["recipe"] != "old-v4":
        assert "old-v4 (own scoring)" in test_rows
    chosen_cell = tmp_path / "runs" / f"{chosen['recipe']}-seed42" / "best" / "soft_prompt.json"
    assert json.loads(chosen_cell.read_text())["calibration"]["method"] == chosen["variant"].split("/")[1]
    saved = json.loads((tmp_path / "test" / f"{chosen['recipe']}-seed42.json").read_text())
    assert saved["command"].endswith(f"--checkpoint '$SWEEP/runs/{chosen['recipe']}-seed42/best' --eval {os.path.relpath(data, ROOT)}")
    assert test_rows[chosen_label] == [saved["metrics"]["tuned (soft prompt)"]]
    table = (tmp_path / "sweep.md").read_text()
    assert f"Chosen on validation: **{chosen['recipe']}** scored by **{chosen['variant']}**" in table
    assert "| majority class | 1 |" in table
    assert (tmp_path / "validation.png").stat().st_size > 1000 and (tmp_path / "loss_curves.png").is_file()

    # A half-done grid: one cell's result gone (as if it was interrupted). Only that cell runs again.
    kept, redone = (tmp_path / "cells" / f"{name}.json" for name in names)
    kept_before = (kept.read_text(), kept.stat().st_mtime_ns)
    redone.unlink()
    run_sweep(model, data, tmp_path, "--report-only")  # runs nothing: the tables hold the finished cell
    assert not redone.exists() and len(json.loads((tmp_path / "sweep.json").read_text())["cells"]) == 1
    assert "2 cells, 1 already done, 1 to run" in run_sweep(model, data, tmp_path, "--cells", names[1])
    assert (kept.read_text(), kept.stat().st_mtime_ns) == kept_before and redone.is_file()


def test_a_stopped_cell_ends_the_sweep_and_the_next_sweep_resumes_it(tiny, tmp_path, monkeypatch, capsys):
    model, data = tiny
    argv = ["--model", model, "--data", str(data), "--output-dir", str(tmp_path), "--quick", "--device", "cpu", "--seeds", "42"]
    first, second = sweep.grid("quick", [42])

    def stopped_by_sigterm(config):  # what train() returns when SIGTERM stops it: last/ saved, then the summary
        (Path(config.run.output_dir) / "last").mkdir(parents=True)
        return {"interrupted": True, "signal": 15}

    monkeypatch.setattr(sweep, "train", stopped_by_sigterm)
    assert sweep.main(argv) == 128 + 15
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sweep.py: cell {first.name} was stopped by signal 15: the same command continues it from its last/")
    assert not list((tmp_path / "cells").iterdir())  # no result for the stopped cell, and no later cell ran
    options = sweep.parse_args(argv)
    resumes = [sweep.cell_config(cell, options, tmp_path / "train_rows.jsonl", ["a", "b"]).run.resume for cell in (first, second)]
    assert resumes == [str(tmp_path / "runs" / first.name), None]


def test_bad_input_is_one_line(tiny, tmp_path):
    model, data = tiny
    for extra, message in (
        (["--data", str(tmp_path / "none.jsonl")], f"data file {tmp_path / 'none.jsonl'} does not exist"),
        (["--data", str(data), "--test-also", "nope"], "nope: not a recipe of the classify grid (old, old+selection,"),
        (["--data", str(data), "--recipes", "old", "nope"], "nope: not a recipe of the classify grid"),
    ):
        completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--model", model, *extra,
                                    "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert completed.returncode == 2
        assert completed.stderr.strip().splitlines()[-1].startswith(f"sweep.py: error: {message}")


def test_last_probe_han_share(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    probe = lambda step, *shares: {"step": step, "probe": [{"text": "t", "continuation": "c", "scripts": s} for s in shares]}  # noqa: E731
    lines = [probe(0, {"Latin": 1.0}, {"Latin": 1.0}), {"step": 1, "loss": 2.0}, probe(1, {"Han": 0.5, "Latin": 0.5}, {"Han": 1.0})]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert sweep.last_probe_han_share(metrics) == 0.75
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert sweep.last_probe_han_share(metrics) is None
    assert sweep.last_probe_han_share(tmp_path / "missing.jsonl") is None

    # The cells table gets a Han column only when some cell probed.
    figures = {variant: {"accuracy": 0.5, "macro_f1": 0.5} for variant in sweep.VARIANTS}
    cell = {"name": "a-seed1", "recipe": "a", "seed": 1, "own_variant": "sum/none", "variants": figures, "steps": 4,
            "stopped_early": False, "train_loss": 1.0, "eval_loss": 1.0, "seconds": 3.0}
    sweep.write_tables(tmp_path, [{**cell, "probe_han": 0.75}, {**cell, "name": "b-seed1", "probe_han": None}], {}, [], None, None)
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[-4].endswith("| seconds | Han (probe) |") and table[-2].endswith("| 3 | 0.75 |") and table[-1].endswith("| 3 | - |")
    sweep.write_tables(tmp_path, [cell], {}, [], None, None)
    assert "Han" not in (tmp_path / "sweep.md").read_text()
