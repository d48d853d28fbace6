"""Inference: load a frozen model with a checkpoint, read inputs, generate or classify in batches,
and evaluate label scoring (accuracy, macro-F1, confusion matrix) against the frozen model alone.

`infer.py` parses the arguments and calls `run`; every problem the user can fix is an
`InferenceError` (or a `CheckpointError`) with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import METADATA_NAME, CheckpointError, read_json
from .data import parse_jsonl, template_fields
from .model import DTYPES, SoftPromptModel, load_base_model
from .scoring import truncate_left


class InferenceError(ValueError):
    """Bad input to inference (file, flags, labels); the message says what to change."""


# -- loading and reading ---------------------------------------------------------------------------


def load_model(
    model_name: str, checkpoint: str, precision: str | None = None, device: str | None = None, strict: bool = False
) -> SoftPromptModel:
    """The frozen model `model_name` (hub id or folder) in `precision` (default: the one the
    checkpoint was trained with) with its tokenizer and the checkpoint's prompt.

    A checkpoint recorded for another base model is a warning, or an error with `strict`; one with
    another embedding size, or missing or corrupt, raises `CheckpointError`.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or trained_precision(checkpoint)
    try:
        base, tokenizer = load_base_model(model_name, precision, device)
    except ValueError as error:
        raise InferenceError(str(error)) from None
    model = SoftPromptModel.from_pretrained(base, checkpoint, tokenizer=tokenizer)
    recorded = model.metadata.get("base_model_name_or_path")
    if recorded and not same_model_name(recorded, model_name):
        message = f"checkpoint {checkpoint} was trained on {recorded!r}, not {model_name!r}"
        if strict:
            raise CheckpointError(message + " (--strict)")
        warnings.warn(message + ": its outputs may be meaningless (--strict makes this an error)")
    return model


def trained_precision(checkpoint: str) -> str:
    """The --precision the checkpoint was trained with (its soft_prompt.json), or fp32 when it
    records none (older checkpoints, PEFT's)."""
    metadata = Path(checkpoint) / METADATA_NAME
    recorded = read_json(metadata).get("precision") if metadata.is_file() else None
    return recorded if recorded in DTYPES else "fp32"


def same_model_name(a: str, b: str) -> bool:
    """Hub id or local folder of the same name ("org/name" and "/models/name" agree)."""
    return a == b or Path(a).name.lower() == Path(b).name.lower()


def read_inputs(path: str | Path) -> list[str | dict]:
    """Inputs from a file: the non-blank lines of a .txt, or one JSON object per line of a .jsonl."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise InferenceError(f"{path}: input files must be .txt (one input a line) or .jsonl (one object a line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InferenceError(f"cannot read {path}: {error.strerror}") from None
    if path.suffix == ".txt":
        return [line for line in lines if line.strip()]
    try:
        return parse_jsonl(lines, path)
    except ValueError as error:
        raise InferenceError(str(error)) from None


def generation_text(row: str | dict) -> str:
    """The text to continue: a line, or a .jsonl row's "input" (else "text") field."""
    if isinstance(row, str):
        return row
    for key in ("input", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    raise InferenceError(f"a .jsonl row for generation needs an 'input' or 'text' field, got {sorted(row)}")


def batches(items: list, batch_size: int, description: str):
    """`items` in slices of `batch_size`, with a progress bar when there are several (on a terminal)."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=description, disable=None if len(starts) > 1 else True, leave=False):
        yield items[start : start + batch_size]


# -- generation and classification ------------------------------------------------------------------


@torch.no_grad()
def generate_texts(
    model: SoftPromptModel, texts: list[str], batch_size: int = 8, use_prompt: bool = True, **generation_kwargs
) -> list[str]:
    """The continuation of each text (decoded new tokens), generated in left-padded batches.

    `use_prompt=False` runs the frozen model's own generate() on the ids, for comparison. Inputs
    that leave no room for `max_new_tokens` in the context keep their end, with a warning.
    """
    tokenizer = model.tokenizer
    room = model.context_length
    if room is not None:
        room -= generation_kwargs.get("max_new_tokens") or 0
        room -= model.num_virtual_tokens if use_prompt else 0
    outputs = []
    for chunk in batches(texts, batch_size, "generating" if use_prompt else "generating (base)"):
        ids = [tokenizer(text)["input_ids"] for text in chunk]
        ids = [truncate_left(row, room) if room is not None else row for row in ids]
        tokenizer.padding_side = "left"
        inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        if use_prompt:
            sequences = model.generate(**inputs, **generation_kwargs)
        else:
            sequences = model.base_model.generate(**inputs, **generation_kwargs)
        copies = sequences.shape[0] // len(chunk)
        new_tokens = sequences[::copies, inputs["input_ids"].shape[1] :]  # the first returned sequence of each
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def classify_rows(
    model: SoftPromptModel,
    rows: list[str | dict],
    labels: list[str],
    template: str,
    batch_size: int = 8,
    use_prompt: bool = True,
) -> tuple[list[str], torch.Tensor]:
    """`model.classify` over all rows, a batch of rows at a time (with a progress bar)."""
    predictions, scores = [], []
    for chunk in batches(rows, batch_size, "scoring labels" if use_prompt else "scoring labels (base)"):
        chunk_predictions, chunk_scores = model.classify(
            chunk, labels, template=template, batch_size=batch_size * len(labels), use_prompt=use_prompt
        )
        predictions += chunk_predictions
        scores.append(chunk_scores)
    return predictions, torch.cat(scores)


# -- evaluation ------------------------------------------------------------------------------------


def evaluate(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, per-label and macro F1 (the unweighted mean over `labels`; a label never gold nor
    predicted scores 0) and the confusion matrix (rows: gold label, columns: predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g]][index[p]] += 1
    f1 = {}
    for i, label in enumerate(labels):
        true_positive = confusion[i][i]
        false_positive = sum(row[i] for row in confusion) - true_positive
        false_negative = sum(confusion[i]) - true_positive
        denominator = 2 * true_positive + false_positive + false_negative
        f1[label] = 2 * true_positive / denominator if denominator else 0.0
    return {
        "count": len(gold),
        "accuracy": sum(confusion[i][i] for i in range(len(labels))) / len(gold),
        "macro_f1": sum(f1.values()) / len(labels),
        "f1": f1,
        "labels": list(labels),
        "confusion": confusion,
    }


def format_table(results: dict[str, dict]) -> str:
    """The figures of each model side by side, then each confusion matrix (rows gold, columns predicted)."""
    names = list(results)
    width = max(len(name) for name in names) + 2
    lines = [f"{'':{width}}{'accuracy':>10}{'macro-F1':>10}"]
    lines += [f"{name:{width}}{r['accuracy']:>10.3f}{r['macro_f1']:>10.3f}" for name, r in results.items()]
    for name, r in results.items():
        labels = r["labels"]
        label_width = max(len(label) for label in labels) + 2
        lines += ["", f"confusion, {name} (rows: gold label, columns: predicted)"]
        lines.append(" " * label_width + "".join(f"{label:>{label_width}}" for label in labels))
        for label, row in zip(labels, r["confusion"]):
            lines.append(f"{label:<{label_width}}" + "".join(f"{count:>{label_width}}" for count in row))
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------


def generation_options(options: argparse.Namespace) -> dict:
    """The flags as generate() options; greedy unless --do-sample."""
    kwargs = {
        "max_new_tokens": options.max_new_tokens,
        "repetition_penalty": options.repetition_penalty,
        "num_beams": options.num_beams,
        "do_sample": options.do_sample,
    }
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    return kwargs


def run(options: argparse.Namespace) -> None:
    """What `infer.py` does (see its --help)."""
    if options.batch_size < 1:
        raise InferenceError("--batch-size must be at least 1")
    classifying = options.classify or options.eval is not None
    if options.eval is not None:
        if options.input or options.input_file:
            raise InferenceError("--eval reads its inputs from the labelled file: drop --input/--input-file")
        rows = read_inputs(options.eval)
    else:
        rows = list(options.input or []) + (read_inputs(options.input_file) if options.input_file else [])
    if not rows or any(isinstance(row, str) and not row.strip() for row in rows):
        raise InferenceError("empty input: give --input TEXT, --input-file FILE or --eval FILE with some text")

    if options.seed is not None:
        torch.manual_seed(options.seed)
    model = load_model(options.model, options.checkpoint, options.precision, options.device, options.strict)
    if classifying:
        records, report = classify_command(model, rows, options)
    else:
        records, report = generate_command(model, rows, options)
    print(report)
    if options.output:
        Path(options.output).write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def generate_command(model: SoftPromptModel, rows: list, options: argparse.Namespace) -> tuple[list[dict], str]:
    texts = [generation_text(row) for row in rows]
    kwargs = generation_options(options)
    tuned = generate_texts(model, texts, options.batch_size, **kwargs)
    base = generate_texts(model, texts, options.batch_size, use_prompt=False, **kwargs) if options.compare_base else None
    records, lines = [], []
    for i, text in enumerate(texts):
        records.append({"input": text, "output": tuned[i], **({"base_output": base[i]} if base else {})})
        lines += [f"input:  {text}", f"tuned:  {tuned[i]}"] + ([f"base:   {base[i]}"] if base else []) + [""]
    return records, "\n".join(lines).rstrip()


def classify_command(model: SoftPromptModel, rows: list, options: argparse.Namespace) -> tuple[list[dict], str]:
    template = options.template or model.metadata.get("template")
    if not template:
        raise InferenceError("no template: the checkpoint records none; pass --template 'Sentence : {text} Label : {label}'")
    labels = options.labels or model.metadata.get("label_words")
    if not labels:
        raise InferenceError("no label words: the checkpoint records none; pass --labels WORDS [WORDS ...]")
    try:
        fields = template_fields(template)
    except ValueError as error:
        raise InferenceError(str(error)) from None
    gold = None
    if options.eval is not None:
        missing = [i for i, row in enumerate(rows, 1) if not isinstance(row, dict) or fields[-1] not in row]
        if missing:
            raise InferenceError(f"{options.eval}: rows {missing[:5]} have no {fields[-1]!r} field (the template's label)")
        gold = [row[fields[-1]] for row in rows]
        unknown = sorted(set(gold) - set(labels))
        if unknown:
            raise InferenceError(f"{options.eval}: gold labels {unknown} are not among the label words {labels}")
    try:
        runs = {"tuned (soft prompt)": classify_rows(model, rows, labels, template, options.batch_size)}
        if options.compare_base or gold is not None:
            runs["base (no prompt)"] = classify_rows(model, rows, labels, template, options.batch_size, use_prompt=False)
    except ValueError as error:  # a row missing a template field, an empty label, ...
        raise InferenceError(str(error)) from None

    (predictions, scores), base = runs["tuned (soft prompt)"], runs.get("base (no prompt)")
    records = []
    for i, row in enumerate(rows):
        record = {"input": row, "prediction": predictions[i], "scores": dict(zip(labels, scores[i].tolist()))}
        if base is not None:
            record.update(base_prediction=base[0][i], base_scores=dict(zip(labels, base[1][i].tolist())))
        if gold is not None:
            record["label"] = gold[i]
        records.append(record)
    if gold is None:
        lines = [f"{record['prediction']}\t{row}" for record, row in zip(records, rows)]
        return records, "\n".join(lines)
    results = {name: evaluate(gold, run_predictions, labels) for name, (run_predictions, _) in runs.items()}
    Path(options.metrics).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return records, format_table(results) + f"\n\nmetrics written to {options.metrics}"
