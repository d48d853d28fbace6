"""Inference: load a frozen model with a checkpoint, read inputs, generate or classify in batches,
and evaluate label scoring (accuracy, macro-F1, confusion matrix) against the frozen model alone.

`infer.py` parses the arguments and calls `run`; every problem the user can fix is an
`InferenceError` (or a `CheckpointError`) with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .calibration import calibrate, ensemble_mean, ensemble_vote, label_scores, record_offsets
from .data import read_json_lines, read_lines
from .evaluation import label_metrics
from .files import check_output_folder, write_output
from .model import SoftPromptModel
from .runtime import checkpoint_names, ensemble_prompts, limit_kernel_cache, load_prompted_model, pick_device
from .scoring import label_sequences, truncate_left
from .templates import check_label_words, template_fields


class InferenceError(ValueError):
    """Bad input to inference (file, flags, labels); the message says what to change."""


# -- loading and reading ---------------------------------------------------------------------------


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


def score_rows(
    model: SoftPromptModel,
    rows: list[str | dict],
    prompt_names: Sequence[str | None],
    tasks: Sequence[tuple[str, list[str]]],
    batch_size: int = 8,
) -> list[list[tuple[str | None, torch.Tensor, torch.Tensor]]]:
    """Label scoring of each row after its prompt (None: the frozen model alone), or after each
    prompt of its checkpoint's ensemble, with its own (template, label words) from `tasks`, about
    `batch_size` rows a batch, longest first over all rows, rows of every prompt sharing the
    batches. Returns for each row, for each of its prompts, (the prompt, its labels' total
    log-probabilities `[L]`, their token counts `[L]`)."""
    members = [ensemble_prompts(model, name) for name in prompt_names]
    sequences, names = [], []
    for row, row_members, (template, labels) in zip(rows, members, tasks):
        for member in row_members:
            sequences += label_sequences([row], labels, template, model.tokenizer)
            names += [member] * len(labels)
    most_labels = max(len(labels) * len(row_members) for row_members, (_, labels) in zip(members, tasks))
    totals = model.completion_log_probs(
        sequences, model.tokenizer.pad_token_id, batch_size=batch_size * most_labels, prompt_names=names
    )
    counts = torch.tensor([len(completion) for _, completion in sequences])
    scored, position = [], 0
    for row_members, (_, labels) in zip(members, tasks):
        row = []
        for member in row_members:
            span = slice(position, position + len(labels))
            row.append((member, totals[span], counts[span]))
            position += len(labels)
        scored.append(row)
    return scored


def decide(
    model: SoftPromptModel, scored: list, tasks: Sequence[tuple[str, list[str]]], calibrated: bool = True, vote: bool = False
) -> tuple[list[str], list[list[float]]]:
    """Each row's label and its labels' scores from `score_rows`. A prompt's scores are calibrated
    by the record its checkpoint stores (`calibrated`; none stored: its summed log-probabilities);
    an ensemble's prompts combine by the mean of their label log-probabilities, or by majority
    vote (`vote`, ties to the mean)."""
    predictions, scores = [], []
    for row, (_, labels) in zip(scored, tasks):
        per_prompt = []
        for name, totals, counts in row:
            record = model.prompt_metadata[name].get("calibration") if calibrated and name is not None else None
            if record is None:
                per_prompt.append(totals)
            else:
                per_prompt.append(calibrate(label_scores(totals, counts, record["label_score"]), record_offsets(record, labels)))
        stacked = torch.stack(per_prompt)[:, None]  # [K, 1, L]
        row_scores = stacked[0, 0] if len(per_prompt) == 1 else ensemble_mean(stacked)[0]
        best = ensemble_vote(stacked)[0] if vote and len(per_prompt) > 1 else row_scores.argmax()
        predictions.append(labels[int(best)])
        scores.append(row_scores.tolist())
    return predictions, scores


def is_calibrated(model: SoftPromptModel, name: str | None) -> bool:
    """Whether a checkpoint's prompts store a calibration (or a label score) that changes their scores."""
    records = [model.prompt_metadata[member].get("calibration") for member in ensemble_prompts(model, name) if member]
    return any(record and (record["method"] != "none" or record["label_score"] != "sum") for record in records)


# -- evaluation ------------------------------------------------------------------------------------


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
    model = load_prompted_model(options.model, checkpoints, options.precision, device, options.strict)
    engine = None
    if options.engine == "vllm":  # the one hand-over: vLLM generates and scores labels, all else stays the same
        from .serving import VllmModel

        try:
            model = engine = VllmModel(model, options.model, options.seed)
        except ValueError as error:
            raise InferenceError(str(error)) from None
    try:
        if classifying:
            records, report = classify_command(model, rows, options)
        else:
            check_room(model, options.max_new_tokens)
            records, report = generate_command(model, rows, options)
        print(report)
        if options.output:
            write_output(options.output, "".join(json.dumps(record) + "\n" for record in records))
    finally:
        if engine is not None:
            # Now, while Python is whole: left to the interpreter's exit, vLLM's shutdown runs with
            # two of its daemon threads still live during finalisation, and now and then the
            # process aborts (SIGABRT) after the results are out.
            engine.close()


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
    calibrated = options.calibration != "none"
    try:
        scored = score_rows(model, rows, names, tasks, options.batch_size)
        predictions, scores = decide(model, scored, tasks, calibrated, options.vote)
        raw = decide(model, scored, tasks, False, options.vote)[0] if calibrated and gold is not None else None
        base = None
        if options.compare_base or gold is not None:
            base = decide(model, score_rows(model, rows, [None] * len(rows), tasks, options.batch_size), tasks)
    except ValueError as error:  # a row missing a template field, an empty label, labels the calibration lacks, ...
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
            results["null rows, base (no prompt)"] = label_metrics(gold_of, [base[0][i] for i in rows_of], labels)
            continue
        one = len(tasks_by_prompt) == 1
        results["tuned (soft prompt)" if one else f"{name} (soft prompt)"] = label_metrics(gold_of, [predictions[i] for i in rows_of], labels)
        if raw is not None and is_calibrated(model, name):
            results["tuned, uncalibrated" if one else f"{name}, uncalibrated"] = label_metrics(gold_of, [raw[i] for i in rows_of], labels)
        results["base (no prompt)" if one else f"{name} rows, base (no prompt)"] = label_metrics(gold_of, [base[0][i] for i in rows_of], labels)
    write_output(options.metrics, json.dumps(results, indent=2) + "\n")
    return records, format_table(results) + f"\n\nmetrics written to {options.metrics}"
