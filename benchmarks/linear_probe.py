"""An anchor for the classifier: a linear probe on the frozen model's hidden states, no prompt.

Each row's text before its label ("Sentence : ... Label :") runs through the frozen model once;
its features are a layer's hidden state at the last token or averaged over the tokens. For each
seed, on the same stratified split `train.py --task classify` holds out, an L2-regularised logistic
regression is fitted on the training part for every (layer, pooling, regularisation), the one with
the best validation macro-F1 is chosen, cross-validated over the whole training file (`--folds`,
never the test rows), and only that one scores the test rows, once (`linear-probe.md`, `.json`,
and `linear-probe.png`, validation macro-F1 by layer):

    python benchmarks/linear_probe.py --model $MODEL --data ../shared/data/ethos_binary_train.jsonl \
        --test-data ../shared/data/ethos_binary_test.jsonl --output-dir runs/linear-probe

It tells what a classifier reading the frozen model's own states reaches: where prompt tuning
lands near it, the model, not the prompt's training, is what limits the classifier. The
cross-validated figure tells how far a small validation split, chosen on, flatters its own rows.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from soft_prompt.config import HATE_TEMPLATE, OneLineParser, resolve_config  # noqa: E402
from soft_prompt.data import check_template_columns, load_rows  # noqa: E402
from soft_prompt.evaluation import label_metrics  # noqa: E402
from soft_prompt.files import check_output_folder, json_bytes, png_bytes, portable_path, write_atomic  # noqa: E402
from soft_prompt.masks import right_padded  # noqa: E402
from soft_prompt.runtime import load_base_model  # noqa: E402
from soft_prompt.templates import label_words_of, split_template, template_fields  # noqa: E402
from soft_prompt.training_setup import load_data_rows  # noqa: E402
from sweep import mean_sd  # noqa: E402

POOLINGS = ("last", "mean")
L2_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # on the mean cross-entropy, features standardised


@torch.no_grad()
def hidden_features(model, tokenizer, texts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Per pooling, the hidden states `[N, layers + 1, D]` (fp32; layer 0 is the embeddings): at
    each text's last token, and averaged over its tokens."""
    pooled = {pooling: [] for pooling in POOLINGS}
    all_ids = [tokenizer(text)["input_ids"] for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(all_ids[i]))  # batches of similar length: little padding
    for start in tqdm(range(0, len(texts), batch_size), desc="features", unit="batch"):
        ids = [all_ids[i] for i in order[start : start + batch_size]]
        input_ids, mask = right_padded(ids, tokenizer.pad_token_id)  # [B, T]
        states = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = torch.stack(states, dim=1).float()  # [B, layers + 1, T, D]
        last = mask.sum(1) - 1
        pooled["last"].append(states[torch.arange(len(ids)), :, last])  # [B, layers + 1, D]
        weights = mask[:, None, :, None].float()
        pooled["mean"].append((states * weights).sum(2) / weights.sum(2))
    inverse = torch.argsort(torch.tensor(order))
    return {pooling: torch.cat(parts)[inverse] for pooling, parts in pooled.items()}


def fit_logistic(features: torch.Tensor, gold: torch.Tensor, num_labels: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights `[D, K]` and bias `[K]` minimising mean cross-entropy + l2 * |W|^2 (L-BFGS, fp64)."""
    x = features.double()
    weight = torch.zeros(x.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, gold) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def standardised(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Features scaled by the training part's mean and spread, per coordinate."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(part - mean) / std for part in (train, *others)]


def fitted_predictions(train: torch.Tensor, gold: torch.Tensor, rows: torch.Tensor, num_labels: int, l2: float) -> torch.Tensor:
    """The label index `[M]` of each of `rows` `[M, D]`, by a regression fitted on `train` `[N, D]`
    and its `gold` labels `[N]`, both scaled by the training part's statistics."""
    train, rows = standardised(train, rows)
    weight, bias = fit_logistic(train, gold, num_labels, l2)
    return (rows.double() @ weight + bias).argmax(1)


def cross_validated(features: torch.Tensor, gold: torch.Tensor, labels: list[str], l2: float, folds: int, seed: int) -> dict:
    """Label metrics of out-of-fold predictions: the rows `[N, D]` cut into `folds` parts at
    random (seeded), each part predicted by a fit on the others. An estimate of what a setting
    scores on unseen rows that leans on all N rows instead of one small validation split."""
    fold = torch.randperm(len(gold), generator=torch.Generator().manual_seed(seed)) % folds  # [N]
    predicted = torch.empty_like(gold)
    for part in range(folds):
        held_out = fold == part
        predicted[held_out] = fitted_predictions(features[~held_out], gold[~held_out], features[held_out], len(labels), l2)
    return label_metrics([labels[i] for i in gold.tolist()], [labels[i] for i in predicted.tolist()], labels)


def probe_seed(features: dict[str, torch.Tensor], index: dict[str, int], parts: dict[str, list[dict]],
               template: str, labels: list[str], test_rows: list[dict] | None, folds: int, seed: int) -> dict:
    """Every setting fitted on the seed's training part and scored on its validation rows; the
    best by validation macro-F1 (then accuracy), it cross-validated over the whole training file
    (both parts, `folds` folds), and it alone on the test rows."""
    last = template_fields(template)[-1]
    rows_of = {name: [index[split_template(template, row)[0]] for row in rows] for name, rows in parts.items()}
    gold_of = {name: torch.tensor([labels.index(str(row[last])) for row in rows]) for name, rows in parts.items()}
    settings = []
    layers = next(iter(features.values())).shape[1]
    grid = list(itertools.product(POOLINGS, range(layers), L2_PENALTIES))
    for pooling, layer, l2 in tqdm(grid, desc="fits", unit="fit", leave=False):
        train, val = (features[pooling][rows_of[name], layer] for name in ("train", "val"))
        predicted = [labels[i] for i in fitted_predictions(train, gold_of["train"], val, len(labels), l2).tolist()]
        figures = label_metrics([labels[i] for i in gold_of["val"].tolist()], predicted, labels)
        settings.append({"pooling": pooling, "layer": layer, "l2": l2, "validation": figures})
    chosen = max(settings, key=lambda s: (s["validation"]["macro_f1"], s["validation"]["accuracy"]))
    # Every setting's two figures, the chosen one's in full (per-label F1, confusion matrix).
    brief = [{**setting, "validation": {key: setting["validation"][key] for key in ("accuracy", "macro_f1")}} for setting in settings]
    result = {"chosen": chosen, "settings": brief}
    if folds:
        every = rows_of["train"] + rows_of["val"]
        result["cross_validated"] = cross_validated(features[chosen["pooling"]][every, chosen["layer"]],
                                                    torch.cat([gold_of["train"], gold_of["val"]]), labels, chosen["l2"], folds, seed)
    if test_rows is not None:
        test_index = [index[split_template(template, row)[0]] for row in test_rows]
        train, test = (features[chosen["pooling"]][rows, chosen["layer"]] for rows in (rows_of["train"], test_index))
        predicted = [labels[i] for i in fitted_predictions(train, gold_of["train"], test, len(labels), chosen["l2"]).tolist()]
        result["test"] = label_metrics([str(row[last]) for row in test_rows], predicted, labels)
    return result


def mean_sd_text(values: list[float]) -> str:
    return "{:.3f} ± {:.3f}".format(*mean_sd(values))


def write_report(output_dir: Path, options: argparse.Namespace, argv: list[str], results: dict[int, dict]) -> None:
    # Quoted, in a fenced block: a --template holds spaces, quotes and newlines (a chat format).
    command = shlex.join(["python", "benchmarks/linear_probe.py", *(str(portable_path(arg)) for arg in argv)])
    test_note = "the test rows scored once, with the chosen setting." if options.test_data else "no test rows given."
    folds_note = (f" Cross-validated: the chosen setting's out-of-fold predictions over the whole --data file ({options.folds} "
                  f"folds, training and validation rows alike), an estimate of unseen rows' accuracy that rests on all of them "
                  f"instead of the validation rows alone." if options.folds else "")
    lines = [f"# Linear probe on the frozen model ({portable_path(options.model)})", "", "```bash", command, "```", "",
             f"Features: each layer's hidden state at the last token or the mean over the tokens of the text before the "
             f"label; an L2-regularised logistic regression (penalties {', '.join(map(str, L2_PENALTIES))}) per setting, "
             f"chosen by validation macro-F1 on the split of `train.py --task classify --val-fraction {options.val_fraction}` "
             f"with each seed; {test_note}{folds_note}", "",
             "| seed | chosen (pooling, layer, l2) | validation accuracy | validation macro-F1 | cross-validated accuracy | "
             "cross-validated macro-F1 | test accuracy | test macro-F1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    readings = ("validation", "cross_validated", "test")
    figures = {seed: {"validation": result["chosen"]["validation"], **{key: result[key] for key in readings[1:] if key in result}}
               for seed, result in results.items()}
    for seed, result in results.items():
        chosen = result["chosen"]
        cells = [f"{figures[seed][key][name]:.3f}" if key in figures[seed] else "" for key in readings for name in ("accuracy", "macro_f1")]
        lines.append(f"| {seed} | {chosen['pooling']}, {chosen['layer']}, {chosen['l2']:g} | " + " | ".join(cells) + " |")
    cells = []
    for key in readings:
        present = [seed_figures[key] for seed_figures in figures.values() if key in seed_figures]
        cells += [mean_sd_text([f[name] for f in present]) if present else "" for name in ("accuracy", "macro_f1")]
    lines.append("| mean ± sd | | " + " | ".join(cells) + " |")
    write_atomic(output_dir / "linear-probe.md", ("\n".join(lines) + "\n").encode())
    write_atomic(output_dir / "linear-probe.json", json_bytes({"model": portable_path(options.model), "results": results}))


def write_plot(output_dir: Path, results: dict[int, dict]) -> None:
    """linear-probe.png: validation macro-F1 by layer, at each layer's best penalty, per pooling
    (mean and range over the seeds): where in the model the label is most linearly readable."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.5))
    axes = figure.subplots()
    for pooling in POOLINGS:
        per_seed = []
        for result in results.values():
            best = {}
            for setting in result["settings"]:
                if setting["pooling"] == pooling:
                    best[setting["layer"]] = max(best.get(setting["layer"], 0.0), setting["validation"]["macro_f1"])
            per_seed.append([best[layer] for layer in sorted(best)])
        curves = torch.tensor(per_seed)  # [seeds, layers + 1]
        layers = range(curves.shape[1])
        axes.plot(layers, curves.mean(0), label=f"{pooling} token" if pooling == "last" else "mean over tokens")
        axes.fill_between(layers, curves.min(0).values, curves.max(0).values, alpha=0.2)
    axes.set_xlabel("layer (0: the embeddings)")
    axes.set_ylabel("validation macro-F1")
    axes.legend(fontsize=8)
    figure.tight_layout()
    write_atomic(output_dir / "linear-probe.png", png_bytes(figure, dpi=90))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub name or local folder of the frozen causal LM")
    parser.add_argument("--data", required=True, help="labelled training rows (.jsonl, ...), split as --task classify splits them")
    parser.add_argument("--test-data", help="test rows, scored once per seed with the setting chosen on validation")
    parser.add_argument("--template", default=HATE_TEMPLATE, help="the classifier's template; its last field holds the label")
    parser.add_argument("--label-words", nargs="+", help="the labels (default: the last field's values)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one split and fit per seed")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share, as train.py's --val-fraction")
    parser.add_argument("--folds", type=int, default=10, help="cross-validate each seed's choice over the whole --data file in this many folds (0: not)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass of the frozen model")
    parser.add_argument("--output-dir", required=True, help="where linear-probe.md, .json and .png go")
    return parser.parse_args(argv)


def probe(options: argparse.Namespace, argv: list[str]) -> None:
    """Features, then every seed's choice and test figures, then the report."""
    check_output_folder(options.output_dir, f"--output-dir {options.output_dir}")  # before minutes of features
    if options.folds < 0 or options.folds == 1:
        raise ValueError(f"--folds {options.folds}: give 2 or more folds, or 0 for no cross-validation")
    train_rows_all = load_rows(options.data)
    if options.folds > len(train_rows_all):
        raise ValueError(f"--folds {options.folds}: {options.data} has only {len(train_rows_all)} rows to cross-validate")
    test_rows = load_rows(options.test_data) if options.test_data else None
    labels = options.label_words or label_words_of(options.template, train_rows_all)
    if not labels:
        raise ValueError(f"no label words: the last field of {options.template!r} has too many values; pass --label-words")
    last = template_fields(options.template)[-1]
    for rows, source in ((train_rows_all, options.data), (test_rows, options.test_data)):
        if rows is not None:
            check_template_columns(options.template, rows, source)
            unknown = sorted({str(row[last]) for row in rows} - set(labels))
            if unknown:
                raise ValueError(f"{source} has rows labelled {unknown[:5]}, which are not among the label words {labels}")
    model, tokenizer = load_base_model(options.model, "fp32", "cpu")  # in eval mode
    texts = sorted({split_template(options.template, row)[0] for row in train_rows_all + (test_rows or [])})
    index = {text: i for i, text in enumerate(texts)}
    features = hidden_features(model, tokenizer, texts, options.batch_size)
    results = {}
    for seed in options.seeds:
        config = resolve_config({"task": "classify", "model": options.model, "data": options.data, "template": options.template,
                                 "label_words": labels, "val_fraction": options.val_fraction, "seed": seed})
        train_rows, val_rows = load_data_rows(config)
        results[seed] = probe_seed(features, index, {"train": train_rows, "val": val_rows}, options.template, labels, test_rows,
                                   options.folds, seed)
        chosen = results[seed]["chosen"]
        print(f"seed {seed}: {chosen['pooling']} layer {chosen['layer']} l2 {chosen['l2']:g}: validation macro-F1 "
              f"{chosen['validation']['macro_f1']:.3f}" + (f", test accuracy {results[seed]['test']['accuracy']:.3f}" if test_rows else ""))
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_report(output_dir, options, argv, results)
    write_plot(output_dir, results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    try:
        probe(options, argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"linear_probe.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {Path(options.output_dir) / 'linear-probe.md'}, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
