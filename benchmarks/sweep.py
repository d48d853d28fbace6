"""Sweep the settings that matter for prompt tuning: init x virtual tokens x lr x loss scope x seed.

    python benchmarks/sweep.py --model M --data TRAIN --eval-data TEST --output-dir DIR [--quick]

Each cell trains with the package's own `train()` on the first `--train-rows` rows, then scores
the labels of the first `--eval-rows` eval rows with the final prompt (`SoftPromptModel.classify`,
`evaluation.label_metrics`). A finished cell leaves `DIR/cells/<cell>.json` (written atomically) and is
not redone when the sweep is run again: an interrupted grid resumes where it stopped. The tables
(`sweep.md`, `sweep.json`) and plots (`accuracy_vs_tokens.png`, `loss_curves.png`) are rewritten
from every finished cell at the end.

Grids: `full` (init random/uniform/text/vocab x V 1/8/20/50 x lr 3e-3/3e-2/0.3 x loss all/completion,
96 cells a seed), `cpu` (12 cells: one setting at a time changed from the reference recipe, text
init, V 20, lr 3e-2, loss on the completion), `quick` (2 cells; `--quick` also cuts rows and epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from soft_prompt import SoftPromptModel
from soft_prompt.config import HATE_INIT_TEXT, TASKS, OneLineParser, resolve_config
from soft_prompt.data import load_rows
from soft_prompt.evaluation import label_metrics
from soft_prompt.files import json_bytes, portable_path, write_atomic
from soft_prompt.runtime import load_base_model
from soft_prompt.templates import label_words_of, template_fields
from soft_prompt.training import train


@dataclasses.dataclass(frozen=True)
class Cell:
    init: str
    num_virtual_tokens: int
    lr: float
    loss_on: str
    seed: int = 42

    @property
    def name(self) -> str:
        return f"{self.init}-v{self.num_virtual_tokens}-lr{self.lr:g}-{self.loss_on}-seed{self.seed}"


INITS = ("random", "uniform", "text", "vocab")
REFERENCE = Cell("text", 20, 3e-2, "completion")  # the hate recipe with the loss on the label


def grid(name: str, seeds: list[int]) -> list[Cell]:
    """The cells of grid `name`, for each seed."""
    if name == "full":
        settings = itertools.product(INITS, (1, 8, 20, 50), (3e-3, 3e-2, 0.3), ("all", "completion"))
        cells = [Cell(*setting) for setting in settings]
    elif name == "cpu":
        # The tutorial's questions first, most important first (a sweep stopped early still answers
        # them): does the init matter, does the loss belong on the label only (the tutorial's hate
        # recipe is text init with the loss on every token), which lr, how many tokens? One change
        # at a time from the reference, plus random init with a larger lr and on every token.
        change = dataclasses.replace
        cells = [REFERENCE, change(REFERENCE, init="random"), change(REFERENCE, loss_on="all")]
        cells += [change(REFERENCE, lr=lr) for lr in (0.3, 3e-3)]
        cells += [change(REFERENCE, num_virtual_tokens=count) for count in (8, 1)]
        cells += [change(REFERENCE, init="vocab"), change(REFERENCE, init="random", lr=0.3)]
        cells += [change(REFERENCE, init="uniform"), change(REFERENCE, num_virtual_tokens=50)]
        cells += [change(REFERENCE, init="random", loss_on="all")]
    elif name == "quick":
        cells = [Cell("text", 4, 3e-2, "completion"), Cell("random", 4, 0.3, "completion")]
    else:
        raise ValueError(f"unknown grid {name!r}: choose full, cpu or quick")
    return [dataclasses.replace(cell, seed=seed) for seed in seeds for cell in cells]


# -- one cell -------------------------------------------------------------------------------------


def run_cell(cell: Cell, options: argparse.Namespace, files: dict[str, Path], labels: list[str], eval_rows: list[dict]) -> dict:
    """Train the cell's prompt with `train()` and score the labels of `eval_rows` with it."""
    run_dir = Path(options.output_dir) / "runs" / cell.name
    config = resolve_config({
        "model": options.model,
        "data": str(files["train"]),
        "eval_data": str(files["eval"]),
        "template": options.template,
        "label_words": labels,
        "init": cell.init,
        "init_text": options.init_text if cell.init == "text" else None,
        "num_virtual_tokens": cell.num_virtual_tokens,
        "lr": cell.lr,
        "loss_on": cell.loss_on,
        "seed": cell.seed,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "max_length": options.max_length,
        "group_by_length": True,  # ETHOS rows run from 5 to 1500 tokens: batch similar lengths
        "device": options.device,
        "output_dir": str(run_dir),
        "save_every": 0,
        "eval_every": 10**9,  # the eval loss once, after the last step
        "probe": options.probe or [],
    })
    started = time.perf_counter()
    summary = train(config)
    base, tokenizer = load_base_model(options.model, device=config.model.device)
    model = SoftPromptModel.from_pretrained(base, run_dir / "last", tokenizer=tokenizer)
    predictions, _ = model.classify(eval_rows, labels, options.template, batch_size=options.batch_size * len(labels))
    scores = label_metrics([row[label_field(options.template)] for row in eval_rows], predictions, labels)
    return {
        **dataclasses.asdict(cell),
        "name": cell.name,
        "train_loss": summary["train_loss"],
        "eval_loss": summary["eval_loss"],
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "seconds": time.perf_counter() - started,
        "device": config.model.device,
        "steps": summary["steps"],
        "probe_han": last_probe_han_share(run_dir / "metrics.jsonl"),
    }


def last_probe_han_share(metrics_file: Path) -> float | None:
    """The Han share of the letters of the last --probe continuations (mean over the probe texts),
    the tutorial's "it answers in Chinese" as a number; None when the run logged no probe."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    probes = [line["probe"] for line in lines if "probe" in line]
    if not probes:
        return None
    return sum(entry["scripts"].get("Han", 0.0) for entry in probes[-1]) / len(probes[-1])


def base_scores(options: argparse.Namespace, labels: list[str], eval_rows: list[dict]) -> dict:
    """Accuracy and macro-F1 of the frozen model alone (no prompt), for reference."""
    base, tokenizer = load_base_model(options.model, device="cuda" if torch.cuda.is_available() else "cpu")
    model = SoftPromptModel(base, num_virtual_tokens=1, tokenizer=tokenizer, seed=0)  # the prompt is not used
    predictions, _ = model.classify(
        eval_rows, labels, options.template, batch_size=options.batch_size * len(labels), use_prompt=False
    )
    scores = label_metrics([row[label_field(options.template)] for row in eval_rows], predictions, labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def label_field(template: str) -> str:
    return template_fields(template)[-1]


# -- tables and plots -----------------------------------------------------------------------------


def write_tables(output_dir: Path, results: list[dict], base: dict, setting: dict) -> None:
    """sweep.json (every figure) and sweep.md (one row a cell, best accuracy first)."""
    results = sorted(results, key=lambda r: (-r["accuracy"], r["name"]))
    write_atomic(output_dir / "sweep.json", json_bytes({"setting": setting, "base": base, "cells": results}))
    lines = [
        f"Setting: {json.dumps(setting)}",
        "",
        f"Base model without a prompt: accuracy {base['accuracy']:.3f}, macro-F1 {base['macro_f1']:.3f}.",
        "eval loss is over the labelled tokens of each cell's loss scope (the label only for `completion`,",
        "every token for `all`): compare it within one scope only.",
        "",
        "| init | V | lr | loss on | seed | train loss | eval loss | accuracy | macro-F1 | seconds | device |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    probed = any(r.get("probe_han") is not None for r in results)  # a column only when cells ran --probe
    if probed:
        lines[-2:] = [lines[-2] + " Han (probe) |", lines[-1] + " ---: |"]
    for r in results:
        lines.append(
            f"| {r['init']} | {r['num_virtual_tokens']} | {r['lr']:g} | {r['loss_on']} | {r['seed']} | "
            f"{r['train_loss']:.3f} | {r['eval_loss']:.3f} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['seconds']:.0f} | {r['device']} |"
            + (f" {'-' if r.get('probe_han') is None else format(r['probe_han'], '.2f')} |" if probed else "")
        )
    write_atomic(output_dir / "sweep.md", ("\n".join(lines) + "\n").encode())


def write_plots(output_dir: Path, results: list[dict], base: dict) -> None:
    """Accuracy against the number of virtual tokens (a line per init, lr and loss scope), and the
    train loss curves of the three most accurate cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    series: dict[tuple, list[dict]] = {}
    for r in results:
        series.setdefault((r["init"], r["lr"], r["loss_on"]), []).append(r)
    for (init, lr, loss_on), cells in sorted(series.items()):
        by_tokens: dict[int, list[float]] = {}
        for r in cells:
            by_tokens.setdefault(r["num_virtual_tokens"], []).append(r["accuracy"])
        tokens = sorted(by_tokens)
        means = [sum(by_tokens[v]) / len(by_tokens[v]) for v in tokens]  # the mean over seeds
        axes.plot(tokens, means, "o-" if len(tokens) > 1 else "o", label=f"{init}, lr {lr:g}, {loss_on}")
    axes.axhline(base["accuracy"], color="gray", linestyle="--", label="no prompt")
    axes.set_xscale("log")
    token_counts = sorted({r["num_virtual_tokens"] for r in results})
    axes.set_xticks(token_counts, [str(count) for count in token_counts])
    axes.set_xlabel("virtual tokens V")
    axes.set_ylabel("eval accuracy (label scoring)")
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(output_dir / "accuracy_vs_tokens.png", dpi=90)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6.5, 4))
    for r in sorted(results, key=lambda r: -r["accuracy"])[:3]:
        metrics = Path(output_dir) / "runs" / r["name"] / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        curve = [(line["step"], line["loss"]) for line in lines if "loss" in line]
        if curve:
            axes.plot(*zip(*curve), label=f"{r['name']} (acc {r['accuracy']:.2f})", linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("train loss")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "loss_curves.png", dpi=90)
    plt.close(figure)


# -- the sweep ------------------------------------------------------------------------------------


def subset_files(options: argparse.Namespace) -> tuple[dict[str, Path], list[dict], list[dict]]:
    """The first rows of the train and eval data, written once into the output folder (so that
    every cell, and a resumed sweep, trains on the same rows)."""
    output_dir = Path(options.output_dir)
    files = {"train": output_dir / "train_rows.jsonl", "eval": output_dir / "eval_rows.jsonl"}
    subsets = {"train": load_rows(options.data)[: options.train_rows], "eval": load_rows(options.eval_data)[: options.eval_rows]}
    for split, rows in subsets.items():
        write_atomic(files[split], "".join(json.dumps(row) + "\n" for row in rows).encode())
    return files, subsets["train"], subsets["eval"]


def sweep(options: argparse.Namespace) -> list[dict]:
    """Run every unfinished cell of the grid, then rewrite the tables and plots; returns the results."""
    output_dir = Path(options.output_dir)
    (output_dir / "cells").mkdir(parents=True, exist_ok=True)
    files, train_rows, eval_rows = subset_files(options)
    labels = options.labels or label_words_of(options.template, train_rows)
    if not labels:
        raise ValueError(f"no label words: the last field of {options.template!r} has too many values; pass --labels")
    cells = grid(options.grid, options.seeds)
    setting = {key: getattr(options, key) for key in ("model", "data", "eval_data", "grid", "train_rows", "eval_rows",
                                                       "epochs", "batch_size", "max_length", "template", "seeds")}
    for key in ("model", "data", "eval_data"):  # the tables name no folder of this machine
        setting[key] = portable_path(setting[key])
    setting["labels"] = labels

    base_file = output_dir / "cells" / "base.json"
    if not base_file.is_file():
        write_atomic(base_file, json_bytes(base_scores(options, labels, eval_rows)))
    unknown = sorted(set(options.cells or []) - {cell.name for cell in cells})
    if unknown:
        raise ValueError(f"--cells {unknown[0]} is not a cell of the {options.grid} grid with --seeds {options.seeds}")
    todo = [cell for cell in cells if not (output_dir / "cells" / f"{cell.name}.json").is_file()]
    todo = [cell for cell in todo if not options.cells or cell.name in options.cells]
    print(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    base = json.loads(base_file.read_text())
    for cell in tqdm([] if options.report_only else todo, desc="cells", unit="cell"):
        result = run_cell(cell, options, files, labels, eval_rows)
        write_atomic(output_dir / "cells" / f"{cell.name}.json", json_bytes(result))
        print(f"cell {cell.name}: accuracy {result['accuracy']:.3f}, {result['seconds']:.0f} s", file=sys.stderr)
        report(output_dir, cells, base, setting)  # a sweep stopped early keeps its tables and plots
    return report(output_dir, cells, base, setting)


def report(output_dir: Path, cells: list[Cell], base: dict, setting: dict) -> list[dict]:
    """Rewrite the tables and plots from the finished cells of `cells`; returns their results."""
    results = finished(output_dir, cells)
    write_tables(output_dir, results, base, setting)
    if results:
        write_plots(output_dir, results, base)
    return results


def finished(output_dir: Path, cells: list[Cell]) -> list[dict]:
    """The results of the cells of `cells` that have finished, in grid order."""
    paths = [output_dir / "cells" / f"{cell.name}.json" for cell in cells]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description="Sweep prompt-tuning settings; resumable (finished cells are kept).")
    parser.add_argument("--model", required=True, help="the frozen base model: hub id or folder")
    parser.add_argument("--data", required=True, help="labelled training rows (.jsonl, ...)")
    parser.add_argument("--eval-data", required=True, help="labelled rows for eval loss, accuracy and macro-F1")
    parser.add_argument("--output-dir", required=True, help="cells/, runs/, sweep.md, sweep.json and the plots")
    parser.add_argument("--quick", action="store_true", help="a 2-cell grid on 32 + 32 rows for 1 epoch: minutes")
    parser.add_argument("--grid", choices=("full", "cpu", "quick"), help="default: full (quick with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--train-rows", type=int, help="train on the first N rows (default: all; 32 with --quick)")
    parser.add_argument("--eval-rows", type=int, help="evaluate on the first N rows (default: all; 32 with --quick)")
    parser.add_argument("--epochs", type=int, help="default: 5 (1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--template", default=TASKS["hate"]["template"])
    parser.add_argument("--init-text", default=HATE_INIT_TEXT, help="for the text-initialised cells")
    parser.add_argument("--labels", nargs="+", help="label words (default: the values of the template's last field)")
    parser.add_argument("--probe", action="append", metavar="TEXT",
                        help="train.py's --probe in every cell (repeatable); the tables give the last probe's Han share")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--cells", nargs="+", metavar="NAME", help="run only these cells of the grid (e.g. another seed of "
                        "the best ones); the tables still show every finished cell")
    parser.add_argument("--report-only", action="store_true", help="run no cell: rewrite the tables and plots from the finished ones")
    options = parser.parse_args(argv)
    quick_default = {"grid": ("quick", "full"), "train_rows": (32, None), "eval_rows": (32, None), "epochs": (1, 5)}
    for name, (quick, normal) in quick_default.items():
        if getattr(options, name) is None:
            setattr(options, name, quick if options.quick else normal)
    for name in ("train_rows", "eval_rows", "epochs", "batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        sweep(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {Path(options.output_dir) / 'sweep.md'}, sweep.json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
