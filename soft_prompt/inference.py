"""Inference: load a frozen model with a checkpoint, read inputs, generate or classify in batches,
and evaluate label scoring (accuracy, macro-F1, confusion matrix) against the frozen model alone.

`infer.py` parses the arguments and calls `run`; every problem the user can fix is an
`InferenceError` (or a `CheckpointError`) with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import METADATA_NAME, CheckpointError, check_output_folder, read_json, write_atomic
from .data import check_label_words, read_json_lines, read_lines, template_fields
from .model import DEFAULT_PROMPT, DTYPES, SoftPromptModel, limit_kernel_cache, load_base_model, pick_device
from .scoring import label_sequences, truncate_left


class InferenceError(ValueError):
    """Bad input to inference (file, flags, labels); the message says what to change."""


# -- loading and reading ---------------------------------------------------------------------------


def load_model(
    model_name: str,
    checkpoints: str | dict[str, str],
    precision: str | None = None,
    device: str | None = None,
    strict: bool = False,
) -> SoftPromptModel:
    """The frozen model `model_name` (hub id or folder) with its tokenizer and the checkpoints'
    prompts: one directory (named "default") or {name: directory}. The active prompt is "default"
    when there is one, else the first. `precision` defaults to the one the active prompt's
    checkpoint was trained with.

    A checkpoint recorded for another base model is a warning, or an error with `strict`; one with
    another embedding size, or missing or corrupt, raises `CheckpointError`.
    """
    if isinstance(checkpoints, str):
        checkpoints = {DEFAULT_PROMPT: checkpoints}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    (first_name, first_directory), *others = checkpoints.items()
    precision = precision or trained_precision(checkpoints.get(DEFAULT_PROMPT, first_directory))
    try:
        base, tokenizer = load_base_model(model_name, precision, device)
    except ValueError as error:
        raise InferenceError(str(error)) from None
    model = SoftPromptModel.from_pretrained(base, first_directory, tokenizer=tokenizer, name=first_name)
    for name, directory in others:
        model.load_prompt(directory, name)
    for name, checkpoint in checkpoints.items():
        recorded = model.prompt_metadata[name].get("base_model_name_or_path")
        if recorded and not same_model_name(recorded, model_name):
            message = f"checkpoint {checkpoint} was trained on {recorded!r}, not {model_name!r}"
            if strict:
                raise CheckpointError(message + " (--strict)")
            warnings.warn(message + ": its outputs may be meaningless (--strict makes this an error)")
    model.set_prompt(DEFAULT_PROMPT if DEFAULT_PROMPT in checkpoints else first_name)
    return model


def trained_precision(checkpoint: str) -> str:
    """The --precision the checkpoint was trained with (its soft_prompt.json), or fp32 when it
    records none (older checkpoints, PEFT's)."""
    metadata = Path(checkpoint) / METADATA_NAME
    recorded = read_json(metadata).get("precision") if metadata.is_file() else None
    return recorded if recorded in DTYPES else "fp32"


def checkpoint_names(values: Sequence[str]) -> dict[str, str]:
    """--checkpoint values as {name: directory}, in order: `NAME=DIR`, or a bare `DIR` named "default"
    (also a directory whose own name holds "=")."""
    checkpoints = {}
    for value in values:
        name, separator, directory = value.partition("=")
        if not separator or not re.fullmatch(r"[\w-]+", name) or Path(value).is_dir():
            name, directory = DEFAULT_PROMPT, value
        if name in checkpoints:
            raise InferenceError(
                f"--checkpoint: two checkpoints are named {name!r} ({checkpoints[name]} and {directory}); "
                "name each one: --checkpoint NAME=DIR"
            )
        checkpoints[name] = directory
    return checkpoints


def row_prompt_names(model: SoftPromptModel, rows: list[str | dict]) -> list[str | None]:
    """Each input row's prompt: a .jsonl row's "prompt" field (a checkpoint's name, or null for the
    frozen model alone), else the model's active prompt."""
    names = []
    for number, row in enumerate(rows, 1):
        name = row["prompt"] if isinstance(row, dict) and "prompt" in row else model.active_prompt
        if name is not None and (not isinstance(name, str) or name not in model.prompts):
            raise InferenceError(
                f"input row {number} has \"prompt\": {json.dumps(name)}, which names no checkpoint: use one of "
                f"{model.prompt_names} (--checkpoint NAME=DIR) or null for the frozen model alone"
            )
        names.append(name)
    return names


def same_model_name(a: str, b: str) -> bool:
    """Hub id or local folder of the same name ("org/name" and "/models/name" agree)."""
    return a == b or Path(a).name.lower() == Path(b).name.lower()


def read_inputs(path: str | Path) -> list[str | dict]:
    """Inputs from a file: the non-blank lines of a .txt, or one JSON object per line of a .jsonl.
    A file that cannot be read, is not UTF-8 or has a line that is not a JSON object is an
    `InferenceError` naming the file and the line."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise InferenceError(f"{path}: input files must be .txt (one input a line) or .jsonl (one object a line)")
    try:
        if path.suffix == ".txt":
            return [line for line in read_lines(path) if line.strip()]
        return read_json_lines(path)
    except ValueError as error:
        raise InferenceError(str(error)) from None


def check_options(options: argparse.Namespace) -> None:
    """An `InferenceError` for a flag out of range or flags that do not go together, so that
    `infer.py` refuses them at parse time, before anything is loaded."""
    at_least = {"--max-new-tokens": (options.max_new_tokens, 1), "--batch-size": (options.batch_size, 1),
                "--num-beams": (options.num_beams, 1), "--top-k": (options.top_k, 0)}
    for flag, (value, minimum) in at_least.items():
        if value < minimum:
            raise InferenceError(f"{flag} must be at least {minimum}, got {value}")
    if not options.repetition_penalty > 0:
        raise InferenceError(f"--repetition-penalty must be positive (1: no penalty), got {options.repetition_penalty}")
    if not 0 < options.top_p <= 1:
        raise InferenceError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.do_sample and not (options.temperature > 0 and math.isfinite(options.temperature)):
        raise InferenceError(
            f"--do-sample needs a positive --temperature, got {options.temperature} (for greedy decoding drop --do-sample)"
        )
    if not (options.input or options.input_file or options.eval):
        raise InferenceError("no input: give --input TEXT, --input-file FILE or --eval FILE")
    if options.eval is not None and (options.input or options.input_file):
        raise InferenceError("--eval reads its inputs from the labelled file: drop --input/--input-file")
    classifying = options.classify or options.eval is not None
    if not classifying and (options.labels or options.template):
        raise InferenceError("--labels and --template are for classification: add --classify (or --eval FILE)")
    if options.labels is not None:
        try:
            check_label_words(options.labels, "--labels")
        except ValueError as error:
            raise InferenceError(str(error)) from None
    if options.device is not None:
        try:
            pick_device(options.device)
        except ValueError as error:
            raise InferenceError(str(error)) from None
    files = [("--input-file", options.input_file), ("--eval", options.eval), ("--output", options.output),
             ("--metrics", options.metrics if options.eval else None)]
    files = [(flag, Path(path).resolve()) for flag, path in files if path]
    for index, (flag, path) in enumerate(files):  # an output must not overwrite an input or the other output
        for other_flag, other in files[index + 1 :]:
            if path == other:
                raise InferenceError(f"{flag} and {other_flag} are the same file {path}: give each its own")


def check_output_file(path: str, flag: str) -> None:
    """Refuse an output path that is a folder or cannot be created, before any work."""
    if Path(path).is_dir():
        raise InferenceError(f"{flag} {path} is a folder: give a file name")
    try:
        check_output_folder(Path(path).parent, f"{flag} {path}")
    except ValueError as error:
        raise InferenceError(str(error)) from None


def write_output(path: str, text: str) -> None:
    """Write an output file whole (atomically), creating its folder."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode())
    except OSError as error:
        raise InferenceError(f"cannot write {path}: {error.strerror or error}") from None


def check_room(model: SoftPromptModel, max_new_tokens: int) -> None:
    """The virtual tokens of the longest loaded prompt and `max_new_tokens` must leave the input at
    least one position."""
    num_virtual = max(model.prompt_length(name) for name in model.prompt_names)
    if model.context_length is not None and num_virtual + max_new_tokens >= model.context_length:
        raise InferenceError(
            f"--max-new-tokens {max_new_tokens} and the prompt's {num_virtual} virtual tokens leave no room "
            f"for the input in the model's context of {model.context_length} positions: lower --max-new-tokens"
        )


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
    model: SoftPromptModel,
    texts: list[str],
    batch_size: int = 8,
    use_prompt: bool = True,
    prompt_names: Sequence[str | None] | None = None,
    **generation_kwargs,
) -> list[str]:
    """The continuation of each text (decoded new tokens), generated in left-padded batches.

    `prompt_names` gives each text its own prompt (None: the frozen model alone), mixed in the same
    batches; by default the active one. `use_prompt=False` runs the frozen model's own generate()
    on the ids, for comparison. Inputs that leave no room for `max_new_tokens` in the context keep
    their end, with a warning.
    """
    tokenizer = model.tokenizer
    if prompt_names is None:
        prompt_names = [model.active_prompt] * len(texts)
    if not use_prompt:
        prompt_names = [None] * len(texts)
    outputs = []
    for chunk in batches(list(zip(texts, prompt_names)), batch_size, "generating" if use_prompt else "generating (base)"):
        ids, names = [tokenizer(text)["input_ids"] for text, _ in chunk], [name for _, name in chunk]
        if model.context_length is not None:
            room = model.context_length - (generation_kwargs.get("max_new_tokens") or 0)
            ids = [truncate_left(row, room - model.prompt_length(name)) for row, name in zip(ids, names)]
        tokenizer.padding_side = "left"
        inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        if use_prompt:
            sequences = model.generate(**inputs, prompt_names=names, **generation_kwargs)
        else:
            sequences = model.base_model.generate(**inputs, **generation_kwargs)
        copies = sequences.shape[0] // len(chunk)
        new_tokens = sequences[::copies, inputs["input_ids"].shape[1] :]  # the first returned sequence of each
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def classify_rows(
    model: SoftPromptModel,
    rows: list[str | dict],
    prompt_names: Sequence[str | None],
    tasks: Sequence[tuple[str, list[str]]],
    batch_size: int = 8,
) -> tuple[list[str], list[list[float]]]:
    """Label scoring of each row after its prompt (None: the frozen model alone) with its own
    (template, label words) from `tasks`, about `batch_size` rows a batch, longest first over all
    rows, rows of every prompt sharing the batches. Returns each row's best label and its labels'
    scores."""
    sequences, names = [], []
    for row, name, (template, labels) in zip(rows, prompt_names, tasks):
        sequences += label_sequences([row], labels, template, model.tokenizer)
        names += [name] * len(labels)
    most_labels = max(len(labels) for _, labels in tasks)
    totals = model.completion_log_probs(
        sequences, model.tokenizer.pad_token_id, batch_size=batch_size * most_labels, prompt_names=names
    ).tolist()
    predictions, scores = [], []
    for _, labels in tasks:
        row_scores, totals = totals[: len(labels)], totals[len(labels) :]
        predictions.append(labels[max(range(len(labels)), key=row_scores.__getitem__)])
        scores.append(row_scores)
    return predictions, scores


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
    limit_kernel_cache()
    check_options(options)
    classifying = options.classify or options.eval is not None
    for path, flag in ((options.output, "--output"), (options.metrics if options.eval else None, "--metrics")):
        if path:
            check_output_file(path, flag)
    if options.eval is not None:
        rows = read_inputs(options.eval)
    else:
        rows = list(options.input or []) + (read_inputs(options.input_file) if options.input_file else [])
    if not rows or any(isinstance(row, str) and not row.strip() for row in rows):
        raise InferenceError("empty input: give --input TEXT, --input-file FILE or --eval FILE with some text")

    if options.seed is not None:
        torch.manual_seed(options.seed)
    checkpoints = checkpoint_names(options.checkpoint)
    device = "cpu" if options.engine == "vllm" else options.device  # vLLM takes only the prompts and E from it
    model = load_model(options.model, checkpoints, options.precision, device, options.strict)
    if options.engine == "vllm":  # the one hand-over: vLLM generates and scores labels, all else stays the same
        from .serving import VllmModel

        try:
            model = VllmModel(model, options.model, options.seed)
        except ValueError as error:
            raise InferenceError(str(error)) from None
    if not classifying:
        check_room(model, options.max_new_tokens)
    if classifying:
        records, report = classify_command(model, rows, options)
    else:
        records, report = generate_command(model, rows, options)
    print(report)
    if options.output:
        write_output(options.output, "".join(json.dumps(record) + "\n" for record in records))


def generate_command(model: SoftPromptModel, rows: list, options: argparse.Namespace) -> tuple[list[dict], str]:
    texts = [generation_text(row) for row in rows]
    names = row_prompt_names(model, rows)
    kwargs = generation_options(options)
    tuned = generate_texts(model, texts, options.batch_size, prompt_names=names, **kwargs)
    base = generate_texts(model, texts, options.batch_size, use_prompt=False, **kwargs) if options.compare_base else None
    several = len(model.prompt_names) > 1 or None in names
    records, lines = [], []
    for i, text in enumerate(texts):
        records.append({"input": text, "prompt": names[i], "output": tuned[i], **({"base_output": base[i]} if base else {})})
        lines += [f"input:  {text}"] + ([f"prompt: {names[i]}"] if several else []) + [f"tuned:  {tuned[i]}"]
        lines += ([f"base:   {base[i]}"] if base else []) + [""]
    return records, "\n".join(lines).rstrip()


def label_task(model: SoftPromptModel, name: str | None, options: argparse.Namespace) -> tuple[str, list[str]]:
    """(template, label words) for the rows of prompt `name`: the flags, else its checkpoint's (the
    active prompt's for rows without one)."""
    owner = name if name is not None else model.active_prompt
    metadata = model.prompt_metadata[owner]
    template = options.template or metadata.get("template")
    if not template:
        raise InferenceError(f"no template: checkpoint {owner!r} records none; pass --template 'Sentence : {{text}} Label : {{label}}'")
    labels = options.labels or metadata.get("label_words")
    if not labels:
        raise InferenceError(f"no label words: checkpoint {owner!r} records none; pass --labels WORDS [WORDS ...]")
    try:
        check_label_words(labels, "--labels" if options.labels else "the checkpoint's label_words")
        template_fields(template)
    except ValueError as error:
        raise InferenceError(str(error)) from None
    return template, list(labels)


def gold_labels(rows: list, tasks: list[tuple[str, list[str]]], path: str) -> list[str]:
    """Each row's gold label: its template's last field, which must be one of its label words."""
    missing, unknown = {}, {}  # label field -> row numbers; label words -> gold labels not among them
    for number, (row, (template, labels)) in enumerate(zip(rows, tasks), 1):
        field = template_fields(template)[-1]
        if not isinstance(row, dict) or field not in row:
            missing.setdefault(field, []).append(number)
        elif row[field] not in labels:
            unknown.setdefault(tuple(labels), set()).add(row[field])
    for field, numbers in missing.items():
        raise InferenceError(f"{path}: rows {numbers[:5]} have no {field!r} field (the template's label)")
    for labels, gold in unknown.items():
        raise InferenceError(f"{path}: gold labels {sorted(gold)} are not among the label words {list(labels)}")
    return [row[template_fields(template)[-1]] for row, (template, _) in zip(rows, tasks)]


def classify_command(model: SoftPromptModel, rows: list, options: argparse.Namespace) -> tuple[list[dict], str]:
    names = row_prompt_names(model, rows)
    tasks_by_prompt = {name: label_task(model, name, options) for name in dict.fromkeys(names)}
    tasks = [tasks_by_prompt[name] for name in names]
    gold = gold_labels(rows, tasks, options.eval) if options.eval is not None else None
    try:
        predictions, scores = classify_rows(model, rows, names, tasks, options.batch_size)
        base = None
        if options.compare_base or gold is not None:
            base = classify_rows(model, rows, [None] * len(rows), tasks, options.batch_size)
    except ValueError as error:  # a row missing a template field, an empty label, ...
        raise InferenceError(str(error)) from None

    records = []
    for i, row in enumerate(rows):
        labels = tasks[i][1]
        record = {"input": row, "prompt": names[i], "prediction": predictions[i], "scores": dict(zip(labels, scores[i]))}
        if base is not None:
            record.update(base_prediction=base[0][i], base_scores=dict(zip(labels, base[1][i])))
        if gold is not None:
            record["label"] = gold[i]
        records.append(record)
    if gold is None:
        lines = [f"{record['prediction']}\t{row}" for record, row in zip(records, rows)]
        return records, "\n".join(lines)
    results = {}
    for name, (_, labels) in tasks_by_prompt.items():
        # Each prompt's rows on their own: its accuracy, and the frozen model's on the same rows.
        rows_of = [i for i, row_name in enumerate(names) if row_name == name]
        gold_of = [gold[i] for i in rows_of]
        if name is None:
            results["null rows, base (no prompt)"] = evaluate(gold_of, [base[0][i] for i in rows_of], labels)
            continue
        one = len(tasks_by_prompt) == 1
        results["tuned (soft prompt)" if one else f"{name} (soft prompt)"] = evaluate(gold_of, [predictions[i] for i in rows_of], labels)
        results["base (no prompt)" if one else f"{name} rows, base (no prompt)"] = evaluate(gold_of, [base[0][i] for i in rows_of], labels)
    write_output(options.metrics, json.dumps(results, indent=2) + "\n")
    return records, format_table(results) + f"\n\nmetrics written to {options.metrics}"
