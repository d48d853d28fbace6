"""Sweep prompt-tuning recipes and choose one on validation rows only; score the test rows once.

    python benchmarks/sweep.py --model M --data TRAIN --output-dir DIR [--grid classify] [--seeds 1 2 3] \
        [--recipes RECIPE ...] [--test-data TEST] [--test-also old] [--quick]

Each cell is a recipe (train.py settings) and a seed. It trains with the package's own `train()` on
`--data` (its first `--train-rows` rows), which holds out `--val-fraction` of them as validation
rows, stratified by label and seeded by the cell's seed. The cell's best/ prompt then scores the
validation rows once, and every label-scoring variant is computed from those scores: a label's
summed or mean token log-probability, times calibration none, content-free, domain or fitted.
`fitted` is cross-fitted here: offsets fitted on one half of the validation rows score the other
half, and the reverse, so that its figure is not measured on the rows it was fitted to.

The sweep chooses the (recipe, variant) with the best mean validation macro-F1 over the seeds.
Only then, with `--test-data`, it scores the test rows, once per seed, for the chosen recipe and
for the anchors (the frozen model, the majority class, and each `--test-also` recipe at its own
scoring, for comparison), never to choose: infer.py's own `--eval` on the cell's best/, with the
chosen calibration fitted on all the validation rows written into it.

A finished cell leaves `DIR/cells/<cell>.json` (written atomically) and is not redone when the
sweep runs again: an interrupted sweep resumes where it stopped. The tables (`sweep.md`,
`sweep.json`) and plots (`validation.png`, `loss_curves.png`) are rewritten from every finished
cell.

Grids: `classify` (the old classifier recipe, each lever of issue 19 alone on it, and the
`--task classify` preset), `full` (init random/uniform/text/vocab x V 1/8/20/50 x lr
3e-3/3e-2/0.3 x loss all/completion, 96 cells a seed), `cpu` (12 cells: one setting at a time
changed from the reference recipe), `quick` (2 cells; `--quick` also cuts rows and epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from soft_prompt.calibrate_model import fitted_calibration, reference_calibration
from soft_prompt.calibration import (
    CALIBRATIONS,
    LABEL_SCORES,
    calibrate,
    calibration_record,
    ensemble_mean,
    fit_offsets,
    label_scores,
    prediction_metric,
    record_offsets,
)
from soft_prompt.checkpoint import update_metadata
from soft_prompt.config import HATE_INIT_TEXT, TASKS, OneLineParser, resolve_config
from soft_prompt.data import load_rows
from soft_prompt.evaluation import label_metrics
from soft_prompt.files import json_bytes, portable_path, write_atomic
from soft_prompt.inference import score_rows
from soft_prompt.runtime import ensemble_prompts, load_prompted_model
from soft_prompt.templates import label_words_of, template_fields
from soft_prompt.training import train
from soft_prompt.training_setup import load_data_rows

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [f"{score}/{method}" for score in LABEL_SCORES for method in CALIBRATIONS]  # "sum/none", ...


@dataclasses.dataclass(frozen=True)
class Cell:
    recipe: str
    settings: tuple[tuple[str, object], ...]  # train.py fields over the sweep's own (data, template, labels, seed)
    seed: int = 42

    @property
    def name(self) -> str:
        return f"{self.recipe}-seed{self.seed}"


def setting_cell(init: str, num_virtual_tokens: int, lr: float, loss_on: str) -> Cell:
    """A cell of the init x V x lr x loss grids: 5 epochs, evaluated once at the end."""
    settings = {"init": init, "num_virtual_tokens": num_virtual_tokens, "lr": lr, "loss_on": loss_on, "epochs": 5,
                "eval_every": 10**9}  # the validation rows once, after the last step
    return Cell(f"{init}-v{num_virtual_tokens}-lr{lr:g}-{loss_on}", tuple(settings.items()))


# The classifier recipe before issue 19 (text init, V 20, lr 3e-2, loss on the label, 5 epochs, the
# final prompt scored by summed log-probabilities, uncalibrated), on the classify preset's split.
OLD = {"task": "classify", "init": "text", "epochs": 5, "patience": 0, "eval_every": 10**9, "label_score": "sum", "calibration": "none"}
LEVERS = {  # each alone on the old recipe
    "old": {},
    "old+selection": {"epochs": 8, "patience": 3, "eval_every": 0},  # best/ by validation macro-F1 each epoch
    "old+init-labels": {"init": "labels"},
    "old+reparam": {"reparam": "residual"},
    "old+ensemble3": {"ensemble": 3},
    "old+v100": {"num_virtual_tokens": 100},  # Lester et al.'s default length; the init text padded with pad tokens
}
REFERENCE = setting_cell("text", 20, 3e-2, "completion")  # the hate recipe with the loss on the label
INITS = ("random", "uniform", "text", "vocab")


def grid(name: str, seeds: list[int]) -> list[Cell]:
    """The cells of grid `name`, for each seed."""
    if name == "classify":
        cells = [Cell(recipe, tuple({**OLD, **lever}.items())) for recipe, lever in LEVERS.items()]
        cells.append(Cell("classify", (("task", "classify"),)))  # the preset as train.py --task classify runs it
    elif name == "full":
        cells = [setting_cell(*setting) for setting in itertools.product(INITS, (1, 8, 20, 50), (3e-3, 3e-2, 0.3), ("all", "completion"))]
    elif name == "cpu":
        # One change at a time from the reference, most important first (a sweep stopped early still
        # answers them): the init, the loss scope, the lr, the tokens; random init with a larger lr.
        text = lambda **change: setting_cell(**{"init": "text", "num_virtual_tokens": 20, "lr": 3e-2, "loss_on": "completion", **change})  # noqa: E731
        cells = [REFERENCE, text(init="random"), text(loss_on="all"), text(lr=0.3), text(lr=3e-3), text(num_virtual_tokens=8),
                 text(num_virtual_tokens=1), text(init="vocab"), text(init="random", lr=0.3), text(init="uniform"),
                 text(num_virtual_tokens=50), text(init="random", loss_on="all")]  # fmt: skip
    elif name == "quick":
        cells = [Cell("old-v4", tuple({**OLD, "num_virtual_tokens": 4}.items())),
                 Cell("classify-v4", (("task", "classify"), ("num_virtual_tokens", 4)))]  # fmt: skip
    else:
        raise ValueError(f"unknown grid {name!r}: choose classify, full, cpu or quick")
    return [dataclasses.replace(cell, seed=seed) for seed in seeds for cell in cells]


# -- one cell -------------------------------------------------------------------------------------


class CellInterrupted(Exception):
    """A signal stopped a cell's training; its run folder keeps last/, from which the next sweep continues."""

    def __init__(self, cell: str, signal: int) -> None:
        super().__init__(f"cell {cell} was stopped by signal {signal}")
        self.signal = signal


def cell_config(cell: Cell, options: argparse.Namespace, train_file: Path, labels: list[str]):
    """The cell's resolved TrainConfig: the sweep's data, template and labels, the cell's settings;
    a cell whose training was stopped (its run folder holds last/, or an ensemble's prompt-0/)
    resumes from where it stopped."""
    settings = dict(cell.settings)
    run_dir = Path(options.output_dir) / "runs" / cell.name
    stopped = (run_dir / "last").is_dir() or (run_dir / "prompt-0").is_dir()
    uses_text = settings.get("init") in ("text", "labels") or (settings.get("task") == "classify" and "init" not in settings)
    overrides = {
        "model": options.model,
        "data": str(train_file),
        "template": options.template,
        "label_words": labels,
        "init_text": options.init_text if uses_text else None,
        "val_fraction": options.val_fraction,
        "seed": cell.seed,
        "batch_size": options.batch_size,
        "max_length": options.max_length,
        "device": options.device,
        "output_dir": str(run_dir),
        "resume": str(run_dir) if stopped else None,
        "save_every": 0,
        "probe": options.probe or [],
        **settings,
        **({"epochs": options.epochs} if options.epochs is not None else {}),
    }
    return resolve_config(overrides)


def run_cell(cell: Cell, options: argparse.Namespace, train_file: Path, labels: list[str]) -> dict:
    """Train the cell's prompt with `train()`, then every scoring variant on its validation rows."""
    config = cell_config(cell, options, train_file, labels)
    started = time.perf_counter()
    summary = train(config)
    if summary["interrupted"]:
        raise CellInterrupted(cell.name, summary["signal"])
    seconds = time.perf_counter() - started
    run_dir = Path(config.run.output_dir)
    train_rows, val_rows = load_data_rows(config)  # the rows train() held out: the same seeded split
    model = load_prompted_model(options.model, str(run_dir / "best"), device=options.device)
    gold = gold_indices(val_rows, labels, options.template)
    totals, counts = member_scores(model, val_rows, labels, options.template, options.batch_size)
    references = reference_offsets(model, labels, options.template, train_rows, cell.seed, options.batch_size)
    classify = config.classify
    return {
        "name": cell.name,
        "recipe": cell.recipe,
        "settings": dict(cell.settings),
        "seed": cell.seed,
        "own_variant": f"{classify.label_score}/{classify.calibration}",
        "variants": variant_figures(totals, counts, gold, references),
        "validation_rows": len(val_rows),
        "train_loss": summary["train_loss"],
        "eval_loss": summary["eval_loss"],
        "steps": summary["steps"],
        "stopped_early": summary.get("stopped_early", False),
        "seconds": seconds,
        "device": str(model.base_model.device.type),
        "probe_han": last_probe_han_share(run_dir / ("prompt-0" if config.prompt.ensemble > 1 else "") / "metrics.jsonl"),
    }


def gold_indices(rows: list[dict], labels: list[str], template: str) -> torch.Tensor:
    last = template_fields(template)[-1]
    return torch.tensor([labels.index(str(row[last])) for row in rows])


def member_scores(model, rows: list[dict], labels: list[str], template: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt of the active checkpoint (one, or an ensemble's K) on the rows: the labels' total
    token log-probabilities and their token counts, both `[K, N, L]`."""
    scored = score_rows(model, rows, [model.active_prompt] * len(rows), [(template, labels)] * len(rows), batch_size)
    totals = torch.stack([torch.stack([member[1] for member in row]) for row in scored], dim=1)  # [K, N, L]
    counts = torch.stack([torch.stack([member[2] for member in row]) for row in scored], dim=1)
    return totals.float(), counts


def reference_offsets(model, labels: list[str], template: str, train_rows: list[dict], seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The content-free and domain offsets `[K, L]` of each prompt, by label score ("sum/domain", ...),
    as train.py's --calibration computes them (domain texts drawn from the training rows)."""
    active, offsets = model.active_prompt, {}
    for score, method in itertools.product(LABEL_SCORES, ("content-free", "domain")):
        per_member = []
        for member in ensemble_prompts(model, active):
            model.set_prompt(member)
            record = reference_calibration(model, method, labels, template, train_rows, score, seed, batch_size)
            per_member.append(record_offsets(record, labels))
        offsets[f"{score}/{method}"] = torch.stack(per_member)
    model.set_prompt(active)
    return offsets


def halves(gold: torch.Tensor) -> torch.Tensor:
    """A fold (0 or 1) per row, each label's rows alternating between the folds in order: two
    stratified halves for cross-fitting."""
    fold = torch.zeros_like(gold)
    for label in gold.unique():
        rows = (gold == label).nonzero().flatten()
        fold[rows[1::2]] = 1
    return fold


def cross_fitted_offsets(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per-row offsets `[N, L]`: each half's rows get the offsets `fit_offsets` fits on the other half."""
    fold, offsets = halves(gold), torch.zeros_like(scores)
    for held in (0, 1):
        fitted_on = fold != held
        offsets[fold == held] = fit_offsets(scores[fitted_on], gold[fitted_on], "macro_f1")
    return offsets


def variant_figures(totals: torch.Tensor, counts: torch.Tensor, gold: torch.Tensor, references: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Accuracy and macro-F1 of every scoring variant ("sum/none", ..., "mean/fitted") from the K
    prompts' label totals and token counts `[K, N, L]`: each prompt's scores calibrated on their
    own, then the prompts' mean (`ensemble_mean`, as infer.py combines them)."""
    figures = {}
    for variant in VARIANTS:
        score, method = variant.split("/")
        calibrated = []
        for k in range(totals.shape[0]):
            scores = label_scores(totals[k], counts[k], score)  # [N, L]
            if method == "none":
                offsets = None
            elif method == "fitted":
                offsets = cross_fitted_offsets(scores, gold)
            else:
                offsets = references[variant][k]
            calibrated.append(calibrate(scores, offsets))
        predicted = ensemble_mean(torch.stack(calibrated)).argmax(dim=1)
        num_labels = totals.shape[-1]
        figures[variant] = {metric: prediction_metric(predicted, gold, num_labels, metric) for metric in ("accuracy", "macro_f1")}
    return figures


def last_probe_han_share(metrics_file: Path) -> float | None:
    """The Han share of the letters of the last --probe continuations (mean over the probe texts),
    the tutorial's "it answers in Chinese" as a number; None when the run logged no probe."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] if metrics_file.is_file() else []
    probes = [line["probe"] for line in lines if "probe" in line]
    if not probes:
        return None
    return sum(entry["scripts"].get("Han", 0.0) for entry in probes[-1]) / len(probes[-1])


# -- choosing on validation rows ------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def candidates(results: list[dict], seeds: list[int]) -> list[dict]:
    """Every (recipe, variant) whose recipe finished on every seed, with its validation accuracy and
    macro-F1 as mean and standard deviation over the seeds, in grid order."""
    by_recipe: dict[str, list[dict]] = {}
    for result in results:
        by_recipe.setdefault(result["recipe"], []).append(result)
    rows = []
    for recipe, cells in by_recipe.items():
        if sorted(cell["seed"] for cell in cells) != sorted(seeds):
            continue
        for variant in VARIANTS:
            row = {"recipe": recipe, "variant": variant, "own": variant == cells[0]["own_variant"]}
            for metric in ("accuracy", "macro_f1"):
                row[metric], row[metric + "_sd"] = mean_sd([cell["variants"][variant][metric] for cell in cells])
            row["seconds"] = statistics.fmean(cell["seconds"] for cell in cells)
            rows.append(row)
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The candidate with the best mean validation macro-F1 (then accuracy; then the earlier one)."""
    best = None
    for row in rows:
        if best is None or (row["macro_f1"], row["accuracy"]) > (best["macro_f1"], best["accuracy"]):
            best = row
    return best


# -- the test rows, once, after the choice --------------------------------------------------------


def write_calibration(options: argparse.Namespace, cell: Cell, train_file: Path, variant: str, labels: list[str]) -> None:
    """Fit `variant`'s calibration on all the cell's validation rows, as train.py does, and store it
    in every prompt of the cell's best/ (an ensemble's members included), where infer.py reads it."""
    score, method = variant.split("/")
    config = cell_config(cell, options, train_file, labels)
    cell_dir = Path(config.run.output_dir)
    train_rows, val_rows = load_data_rows(config)
    model = load_prompted_model(options.model, str(cell_dir / "best"), device=options.device)
    active = model.active_prompt
    for member in ensemble_prompts(model, active):
        model.set_prompt(member)
        if method == "fitted":
            record = fitted_calibration(model, val_rows, labels, options.template, score, "macro_f1", options.batch_size)
        elif method == "none":
            record = calibration_record("none", score, labels, None)
        else:
            record = reference_calibration(model, method, labels, options.template, train_rows, score, config.run.seed, options.batch_size)
        folder = cell_dir / "best" / (member.split("/", 1)[1] if member != active else "")
        update_metadata(folder, {"calibration": record, "label_score": score})


def infer_eval(options: argparse.Namespace, checkpoint: Path, metrics_file: Path) -> tuple[dict, str]:
    """infer.py --eval on the test rows: its metrics, and the command as the tables show it."""
    command = ["infer.py", "--model", options.model, "--checkpoint", str(checkpoint), "--eval", options.test_data,
               "--metrics", str(metrics_file), "--output", str(metrics_file.with_suffix(".predictions.jsonl")),
               "--batch-size", str(options.batch_size), "--device", options.device]  # fmt: skip
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    shown = ["python", "infer.py", "--model", portable_path(options.model), "--checkpoint", f"$SWEEP/runs/{checkpoint.parent.name}/best",
             "--eval", portable_path(options.test_data)]  # $SWEEP: the sweep's --output-dir
    return json.loads(metrics_file.read_text()), shlex.join(shown)


def score_test(options: argparse.Namespace, cells: list[Cell], chosen: dict, labels: list[str], train_file: Path) -> dict:
    """The test rows scored once per seed: the chosen recipe at the chosen variant, each --test-also
    recipe at its own, the frozen model and the majority class. Kept in DIR/test/ (not redone)."""
    output_dir = Path(options.output_dir)
    test_dir = output_dir / "test"
    test_dir.mkdir(exist_ok=True)
    last = template_fields(options.template)[-1]
    gold = [str(row[last]) for row in load_rows(options.test_data)]
    train_labels = [str(row[last]) for row in load_rows(str(train_file))]
    majority = max(labels, key=train_labels.count)  # the training rows' most frequent label
    rows = {"majority class": [label_metrics(gold, [majority] * len(gold), labels)]}
    commands = {}
    scored = [(chosen["recipe"], chosen["variant"])] + [(recipe, None) for recipe in options.test_also or [] if recipe != chosen["recipe"]]
    for recipe, variant in scored:
        for cell in [cell for cell in cells if cell.recipe == recipe]:
            metrics_file = test_dir / f"{cell.name}.json"
            if not metrics_file.is_file():
                cell_dir = output_dir / "runs" / cell.name
                own = json.loads((output_dir / "cells" / f"{cell.name}.json").read_text())["own_variant"]
                if variant is not None and variant != own:
                    write_calibration(options, cell, train_file, variant, labels)
                metrics, command = infer_eval(options, cell_dir / "best", metrics_file)
                write_atomic(metrics_file, json_bytes({"command": command, "metrics": metrics}))
            saved = json.loads(metrics_file.read_text())
            label = f"{recipe} ({variant or 'own scoring'})" + (", chosen" if variant else "")
            rows.setdefault(label, []).append(saved["metrics"]["tuned (soft prompt)"])
            rows.setdefault("frozen model (no prompt)", []).append(saved["metrics"]["base (no prompt)"])
            commands[label] = saved["command"]
    frozen = rows.pop("frozen model (no prompt)")[:1]  # the same rows and model in every file
    return {"rows": {"frozen model (no prompt)": frozen, **rows}, "commands": commands}


# -- tables and plots -----------------------------------------------------------------------------


def write_tables(output_dir: Path, results: list[dict], options_setting: dict, rows: list[dict], chosen: dict | None,
                 test: dict | None) -> None:
    """sweep.json (every figure) and sweep.md: the recipes at their own scoring, every scoring
    variant's validation macro-F1, the cells, and the test rows scored after the choice."""
    write_atomic(output_dir / "sweep.json", json_bytes({"setting": options_setting, "cells": results, "candidates": rows,
                                                        "chosen": chosen, "test": test}))
    pm = lambda row, metric: f"{row[metric]:.3f} ± {row[metric + '_sd']:.3f}"  # noqa: E731
    lines = [f"Setting: {json.dumps(options_setting)}", ""]
    if rows:
        lines += ["Validation rows only (held out of the training data, stratified; mean ± sd over the seeds). "
                  "`fitted` is cross-fitted on halves of the validation rows.", "",
                  "| recipe | scoring (own) | accuracy | macro-F1 | best scoring | its macro-F1 | seconds |",
                  "| --- | --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
        for recipe in dict.fromkeys(row["recipe"] for row in rows):
            of_recipe = [row for row in rows if row["recipe"] == recipe]
            own, best = next(row for row in of_recipe if row["own"]), choose(of_recipe)
            lines.append(f"| {recipe} | {own['variant']} | {pm(own, 'accuracy')} | {pm(own, 'macro_f1')} | {best['variant']} | "
                         f"{pm(best, 'macro_f1')} | {own['seconds']:.0f} |")
        lines += ["", "Validation macro-F1 of every scoring variant (label score / calibration):", "",
                  "| recipe | " + " | ".join(VARIANTS) + " |", "| --- |" + " ---: |" * len(VARIANTS)]
        for recipe in dict.fromkeys(row["recipe"] for row in rows):
            figures = {row["variant"]: row["macro_f1"] for row in rows if row["recipe"] == recipe}
            lines.append(f"| {recipe} | " + " | ".join(f"{figures[variant]:.3f}" for variant in VARIANTS) + " |")
    if chosen:
        lines += ["", f"Chosen on validation: **{chosen['recipe']}** scored by **{chosen['variant']}** "
                  f"(macro-F1 {pm(chosen, 'macro_f1')}, accuracy {pm(chosen, 'accuracy')})."]
    if test:
        lines += ["", "Test rows, scored once after the choice (mean ± sd over the seeds):", "",
                  "| on the test rows | seeds | accuracy | macro-F1 | predicted share per label |", "| --- | ---: | ---: | ---: | --- |"]
        anchors = ("frozen model (no prompt)", "majority class")  # then the chosen, then the --test-also recipes
        order = lambda label: (anchors.index(label) if label in anchors else 2 + (not label.endswith(", chosen")), label)  # noqa: E731
        for label, metrics in sorted(test["rows"].items(), key=lambda item: order(item[0])):
            figures = {metric: mean_sd([m[metric] for m in metrics]) for metric in ("accuracy", "macro_f1")}
            shares = [sum(sum(row[i] for row in m["confusion"]) for m in metrics) / sum(m["count"] for m in metrics)
                      for i in range(len(metrics[0]["labels"]))]  # fmt: skip
            share_text = ", ".join(f"{name} {share:.2f}" for name, share in zip(metrics[0]["labels"], shares))
            lines.append(f"| {label} | {len(metrics)} | {figures['accuracy'][0]:.3f} ± {figures['accuracy'][1]:.3f} | "
                         f"{figures['macro_f1'][0]:.3f} ± {figures['macro_f1'][1]:.3f} | {share_text} |")
        lines += ["", "Commands (the last seed's; `$SWEEP` is the sweep's --output-dir):", ""] + [f"- {label}: `{command}`" for label, command in sorted(test["commands"].items(), key=lambda item: order(item[0]))]
    probed = any(r.get("probe_han") is not None for r in results)  # a Han column only when some cell probed
    lines += ["", "Cells:", "", "| cell | steps | stopped early | train loss | eval loss | own scoring | accuracy | macro-F1 | seconds |"
              + (" Han (probe) |" if probed else ""),
              "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |" + (" ---: |" if probed else "")]
    for r in results:
        own = r["variants"][r["own_variant"]]
        probe = "" if not probed else " - |" if r.get("probe_han") is None else f" {r['probe_han']:.2f} |"
        lines.append(f"| {r['name']} | {r['steps']} | {'yes' if r['stopped_early'] else 'no'} | {r['train_loss']:.3f} | "
                     f"{r['eval_loss']:.3f} | {r['own_variant']} | {own['accuracy']:.3f} | {own['macro_f1']:.3f} | {r['seconds']:.0f} |" + probe)
    write_atomic(output_dir / "sweep.md", ("\n".join(lines) + "\n").encode())


def write_plots(output_dir: Path, results: list[dict], rows: list[dict]) -> None:
    """validation.png: each recipe's validation macro-F1 at its own scoring and at its best variant
    (mean ± sd over the seeds); loss_curves.png: the train loss of the three best cells."""
    from matplotlib.figure import Figure

    recipes = list(dict.fromkeys(row["recipe"] for row in rows))
    if recipes:
        figure = Figure(figsize=(6.5, 0.5 + 0.45 * len(recipes)))
        axes = figure.subplots()
        for offset, pick, color, text in ((-0.2, lambda rs: next(r for r in rs if r["own"]), "tab:gray", "own scoring"),
                                          (0.2, choose, "tab:blue", "best scoring variant")):
            picked = [pick([row for row in rows if row["recipe"] == recipe]) for recipe in recipes]
            axes.barh([i + offset for i in range(len(recipes))], [r["macro_f1"] for r in picked], height=0.4,
                      xerr=[r["macro_f1_sd"] for r in picked], color=color, label=text)
        axes.set_yticks(range(len(recipes)), recipes)
        axes.invert_yaxis()
        axes.set_xlabel("validation macro-F1 (mean ± sd over seeds)")
        axes.set_xlim(0, 1)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        figure.tight_layout()
        figure.savefig(output_dir / "validation.png", dpi=90)

    figure = Figure(figsize=(6.5, 4))
    axes = figure.subplots()
    for r in sorted(results, key=lambda r: -r["variants"][r["own_variant"]]["macro_f1"])[:3]:
        run_dir = output_dir / "runs" / r["name"]
        metrics = run_dir / "metrics.jsonl" if (run_dir / "metrics.jsonl").is_file() else run_dir / "prompt-0" / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        curve = [(line["step"], line["loss"]) for line in lines if "loss" in line]
        if curve:
            axes.plot(*zip(*curve), label=f"{r['name']} (val macro-F1 {r['variants'][r['own_variant']]['macro_f1']:.2f})", linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("train loss")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "loss_curves.png", dpi=90)


# -- the sweep ------------------------------------------------------------------------------------


def sweep(options: argparse.Namespace) -> dict:
    """Run every unfinished cell, choose on validation rows, score the test rows for the choice (with
    --test-data), and rewrite the tables and plots; returns what sweep.json holds."""
    output_dir = Path(options.output_dir)
    (output_dir / "cells").mkdir(parents=True, exist_ok=True)
    rows = load_rows(options.data)[: options.train_rows]
    train_file = output_dir / "train_rows.jsonl"  # every cell, and a resumed sweep, trains on the same rows
    write_atomic(train_file, "".join(json.dumps(row) + "\n" for row in rows).encode())
    labels = options.labels or label_words_of(options.template, rows)
    if not labels:
        raise ValueError(f"no label words: the last field of {options.template!r} has too many values; pass --labels")
    cells = grid(options.grid, options.seeds)
    recipes = list(dict.fromkeys(cell.recipe for cell in cells))
    for recipe in (options.recipes or []) + (options.test_also or []):
        if recipe not in recipes:
            raise ValueError(f"{recipe}: not a recipe of the {options.grid} grid ({', '.join(recipes)})")
    if options.recipes:
        recipes = [recipe for recipe in recipes if recipe in options.recipes]
        cells = [cell for cell in cells if cell.recipe in recipes]
    unknown = sorted(set(options.cells or []) - {cell.name for cell in cells})
    if unknown:
        raise ValueError(f"--cells {unknown[0]} is not a cell of the {options.grid} grid with --seeds {options.seeds}")
    for cell in cells:
        cell_config(cell, options, train_file, labels)  # a bad setting fails here, before hours of training
    setting = {key: getattr(options, key) for key in ("model", "data", "test_data", "grid", "train_rows", "val_fraction",
                                                       "epochs", "batch_size", "max_length", "template", "seeds")}
    for key in ("model", "data", "test_data"):  # the tables name no folder of this machine
        setting[key] = portable_path(setting[key]) if setting[key] else None
    setting["labels"] = labels

    todo = [cell for cell in cells if not (output_dir / "cells" / f"{cell.name}.json").is_file()]
    todo = [cell for cell in todo if not options.cells or cell.name in options.cells]
    todo.sort(key=lambda cell: recipes.index(cell.recipe))  # recipe by recipe: a stopped sweep has whole recipes to compare
    print(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    for cell in tqdm([] if options.report_only else todo, desc="cells", unit="cell"):
        result = run_cell(cell, options, train_file, labels)
        write_atomic(output_dir / "cells" / f"{cell.name}.json", json_bytes(result))
        own = result["variants"][result["own_variant"]]
        print(f"cell {cell.name}: validation macro-F1 {own['macro_f1']:.3f}, {result['seconds']:.0f} s", file=sys.stderr)
        report(output_dir, cells, options, setting, None)  # a sweep stopped early keeps its tables and plots
    results = finished(output_dir, cells)
    chosen = choose(candidates(results, options.seeds))
    test = None
    if options.test_data and chosen and not options.report_only and len(results) == len(cells):
        test = score_test(options, cells, chosen, labels, train_file)
    elif options.test_data and (output_dir / "sweep.json").is_file():
        test = json.loads((output_dir / "sweep.json").read_text()).get("test")  # --report-only keeps what was scored
    return report(output_dir, cells, options, setting, test)


def report(output_dir: Path, cells: list[Cell], options: argparse.Namespace, setting: dict, test: dict | None) -> dict:
    """Rewrite the tables and plots from the finished cells of `cells`."""
    results = finished(output_dir, cells)
    rows = candidates(results, options.seeds)
    chosen = choose(rows)
    write_tables(output_dir, results, setting, rows, chosen, test)
    if results:
        write_plots(output_dir, results, rows)
    return {"cells": results, "candidates": rows, "chosen": chosen, "test": test}


def finished(output_dir: Path, cells: list[Cell]) -> list[dict]:
    """The results of the cells of `cells` that have finished, in grid order."""
    paths = [output_dir / "cells" / f"{cell.name}.json" for cell in cells]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description="Sweep prompt-tuning recipes, choose on validation rows, score the test rows once; resumable.")
    parser.add_argument("--model", required=True, help="the frozen base model: hub id or folder")
    parser.add_argument("--data", required=True, help="labelled training rows (.jsonl, ...); the validation rows are held out of them")
    parser.add_argument("--test-data", help="labelled test rows, scored once after the choice (never to choose)")
    parser.add_argument("--test-also", nargs="+", metavar="RECIPE", help="recipes also scored on the test rows at their own scoring, "
                        "for comparison (e.g. old)")
    parser.add_argument("--output-dir", required=True, help="cells/, runs/, test/, sweep.md, sweep.json and the plots")
    parser.add_argument("--quick", action="store_true", help="a 2-cell grid on 40 rows for 1 epoch: minutes")
    parser.add_argument("--grid", choices=("classify", "full", "cpu", "quick"), help="default: classify (quick with --quick)")
    parser.add_argument("--recipes", nargs="+", metavar="RECIPE", help="only these recipes of the grid (default: all of them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--train-rows", type=int, help="use the first N rows of --data (default: all; 40 with --quick)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation rows held out of --data by each cell")
    parser.add_argument("--epochs", type=int, help="every cell's epochs (default: each recipe's own; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--template", default=TASKS["hate"]["template"])
    parser.add_argument("--init-text", default=HATE_INIT_TEXT, help="for the text- and label-initialised cells")
    parser.add_argument("--labels", nargs="+", help="label words (default: the values of the template's last field)")
    parser.add_argument("--probe", action="append", metavar="TEXT",
                        help="train.py's --probe in every cell (repeatable); the tables give the last probe's Han share")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--cells", nargs="+", metavar="NAME", help="run only these cells of the grid; the tables still show every finished cell")
    parser.add_argument("--report-only", action="store_true", help="run no cell: rewrite the tables and plots from the finished ones")
    options = parser.parse_args(argv)
    quick_default = {"grid": ("quick", "classify"), "train_rows": (40, None), "epochs": (1, None)}
    for name, (quick, normal) in quick_default.items():
        if getattr(options, name) is None:
            setattr(options, name, quick if options.quick else normal)
    for name in ("train_rows", "epochs", "batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < options.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1 (the sweep chooses on validation rows), got {options.val_fraction}")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        sweep(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    except CellInterrupted as stop:
        print(f"sweep.py: {stop}: the same command continues it from its last/", file=sys.stderr)
        return 128 + stop.signal  # as train.py and a shell report a process a signal stopped
    print(f"wrote {Path(options.output_dir) / 'sweep.md'}, sweep.json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
