"""The figures of `analysis.analyze` as PNGs: norms against the vocabulary's, the pairwise
similarity heatmap, ablation bars, attention per layer beside its chance levels, the drift over
training, the `--probe` scripts over training and the descriptions' scores by layer pair.

Each is a matplotlib `Figure` of its own, not pyplot's: importing this module leaves the caller's
backend and open figures as they were (a notebook's inline plots too)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.ticker
from matplotlib.figure import Figure

from .files import make_folder, png_bytes, write_atomic


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    write_atomic(path, png_bytes(figure, dpi=80))
    return path


def integer_ticks(axes) -> None:
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def plot_norms(figures: dict, path: Path) -> Path:
    """Each virtual token's norm on the vocabulary's norm range (5-95% band, median line)."""
    vocabulary = figures["vocabulary_norms"]
    norms = [token["norm"] for token in figures["tokens"]]
    figure = Figure(figsize=(7, 3.5))
    axes = figure.subplots()
    axes.axhspan(vocabulary["p5"], vocabulary["p95"], color="gray", alpha=0.25, label="vocabulary 5-95%")
    axes.axhline(vocabulary["median"], color="gray", label="vocabulary median")
    axes.bar(range(len(norms)), norms, color="tab:blue", label="virtual token")
    integer_ticks(axes)
    axes.set_xlabel("virtual token")
    axes.set_ylabel("L2 norm")
    if max(norms) > 10 * vocabulary["p95"]:
        axes.set_yscale("log")
    axes.legend(fontsize=8)
    return save(figure, path)


def plot_similarity(figures: dict, path: Path) -> Path:
    """Cosine between every two virtual tokens."""
    figure = Figure(figsize=(4.5, 4))
    axes = figure.subplots()
    image = axes.imshow(figures["pairwise_cosine"], vmin=-1, vmax=1, cmap="RdBu_r")
    figure.colorbar(image, ax=axes, label="cosine")
    axes.set_xlabel("virtual token")
    axes.set_ylabel("virtual token")
    integer_ticks(axes)
    axes.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return save(figure, path)


def plot_ablation(figures: dict, path: Path) -> Path:
    """Loss increase (and accuracy change) when each virtual token is replaced by the mean embedding."""
    data = figures["data"]
    full = data["soft_prompt"]
    indices = [entry["index"] for entry in data["ablation"]]
    with_accuracy = "accuracy" in full
    figure = Figure(figsize=(7, 5 if with_accuracy else 3))
    panels = figure.subplots(2 if with_accuracy else 1, 1, sharex=True, squeeze=False)
    panels[0, 0].bar(indices, [entry["loss"] - full["loss"] for entry in data["ablation"]], color="tab:red")
    panels[0, 0].set_ylabel("loss change")
    panels[0, 0].axhline(0, color="black", linewidth=0.5)
    if with_accuracy:
        panels[1, 0].bar(indices, [entry["accuracy"] - full["accuracy"] for entry in data["ablation"]], color="tab:purple")
        panels[1, 0].set_ylabel("accuracy change")
        panels[1, 0].axhline(0, color="black", linewidth=0.5)
    panels[-1, 0].set_xlabel("virtual token replaced by the mean vocabulary embedding")
    integer_ticks(panels[-1, 0])
    return save(figure, path)


CHANCE_LABELS = {"random_vectors": "chance: random vectors, same norms", "random_tokens": "chance: random hard prompt"}


def plot_attention(figures: dict, path: Path) -> Path:
    """Share of the text's attention that goes to the virtual tokens, per layer, beside its chance
    levels (dashed)."""
    shares = figures["data"]["attention_to_prompt"]
    layers = range(1, len(shares) + 1)
    figure = Figure(figsize=(7, 3.5))
    axes = figure.subplots()
    axes.plot(layers, shares, "o-", label="measured")
    for name, chance in figures.get("chance", {}).items():
        if chance.get("attention_to_prompt"):
            axes.plot(layers, chance["attention_to_prompt"], "--", label=CHANCE_LABELS[name])
    axes.axhline(figures["data"]["attention_uniform_share"], color="gray", linestyle=":", label="evenly spread attention")
    axes.legend(fontsize=8)
    axes.set_xlabel("layer")
    axes.set_ylabel("attention share to the prompt")
    axes.set_ylim(0, 1)
    return save(figure, path)


def plot_drift(figures: dict, path: Path) -> Path:
    """Distance and mean cosine to the initial prompt over the training steps."""
    curve = figures["training"]
    steps = [line["step"] for line in curve]
    figure = Figure(figsize=(8, 3.2))
    left, right = figure.subplots(1, 2)
    left.plot(steps, [line["prompt_distance"] for line in curve])
    left.set_ylabel("distance to the initial prompt")
    right.plot(steps, [line["prompt_cosine"] for line in curve], color="tab:orange")
    right.set_ylabel("mean cosine to the initial prompt")
    for axes in (left, right):
        axes.set_xlabel("optimizer step")
    return save(figure, path)


def plot_probe_scripts(figures: dict, path: Path) -> Path:
    """The `--probe` continuations' script shares over the training steps, one panel per probe text."""
    lines = figures["probe"]
    texts = [entry["text"] for entry in lines[0]["probe"]]
    steps = [line["step"] for line in lines]
    scripts = list(dict.fromkeys(script for line in lines for entry in line["probe"] for script in entry["scripts"]))
    figure = Figure(figsize=(7, 2.4 * len(texts)))
    panels = figure.subplots(len(texts), 1, sharex=True, squeeze=False)
    for row, text in enumerate(texts):
        axes = panels[row, 0]
        for script in scripts:
            axes.plot(steps, [line["probe"][row]["scripts"].get(script, 0.0) for line in lines], "o-", label=script)
        axes.set_ylim(-0.05, 1.05)
        axes.set_ylabel("share of letters")
        axes.set_title(f"probe {text[:60]!r}", fontsize=9)
        axes.legend(fontsize=7)
    panels[-1, 0].set_xlabel("optimizer step")
    integer_ticks(panels[-1, 0])
    return save(figure, path)


def write_plots(figures: dict, directory: str | Path) -> list[Path]:
    """Every plot the figures allow, into `directory`; returns the paths written."""
    directory = Path(directory)
    make_folder(directory)
    written = [plot_norms(figures, directory / "norms.png"), plot_similarity(figures, directory / "similarity.png")]
    if figures.get("data"):
        written.append(plot_ablation(figures, directory / "ablation.png"))
        if figures["data"]["attention_to_prompt"] is not None:
            written.append(plot_attention(figures, directory / "attention.png"))
    if figures.get("training"):
        written.append(plot_drift(figures, directory / "drift.png"))
    if figures.get("probe"):
        written.append(plot_probe_scripts(figures, directory / "probe_scripts.png"))
    if figures.get("descriptions"):
        try:
            written.append(plot_descriptions(figures["descriptions"], directory / "descriptions.png"))
        except ValueError as error:  # no label words and no reference: nothing to colour the grid by
            warnings.warn(f"no descriptions.png: {error}")
    return written


def plot_descriptions(result: dict, path: Path) -> Path:
    """Class rate and ROUGE-L of the descriptions (`description.describe`) by source x target
    layer, one column per source (trained, initial, random); a score the run has not (no label
    words, no reference) leaves its row out."""
    layers = result["layers"]
    scores = [key for key in ("class_rate", "rouge_l") if any(e[key] is not None for e in result["sources"]["trained"])]
    if not scores:
        raise ValueError("the descriptions have no scores to plot: no label words and no reference text")
    names = list(result["sources"])
    figure = Figure(figsize=(3.2 * len(names), 3 * len(scores)))
    panels = figure.subplots(len(scores), len(names), squeeze=False, sharex=True, sharey=True)
    for row, key in enumerate(scores):
        for column, name in enumerate(names):
            grid = [[None] * len(layers) for _ in layers]  # [source, target]
            for entry in result["sources"][name]:
                grid[layers.index(entry["source_layer"])][layers.index(entry["target_layer"])] = entry[key]
            axes = panels[row, column]
            image = axes.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower")
            axes.set_xticks(range(len(layers)), layers)
            axes.set_yticks(range(len(layers)), layers)
            axes.set_title(f"{name}: {key.replace('_', ' ')}", fontsize=9)
            axes.set_xlabel("target layer")
            axes.set_ylabel("source layer")
        figure.colorbar(image, ax=panels[row].tolist(), shrink=0.8)
    write_atomic(path, png_bytes(figure, dpi=80))  # not save(): tight_layout fights the shared colorbars
    return path
