"""Data: loading rows, tokenising them through a template (`templates.py`), and batching.

A row becomes `prompt ids + completion ids + eos` (cut to `max_length`), its labels the same ids
with -100 where no loss is taken; batches are padded on the right to their own longest row.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .masks import IGNORE_INDEX, right_padded
from .templates import split_template, template_fields

DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Length grouping sorts rows within windows of this many batches, so the order stays random.
GROUP_WINDOW_BATCHES = 50


# -- loading -----------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """A text file's contents (UTF-8, an optional BOM dropped). A file that cannot be read, is not
    UTF-8 or holds NUL bytes (a binary file) is a one-line ValueError naming it and the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}): save the file as UTF-8"
        ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ValueError(f"{path}:{line}: a NUL byte: this is a binary file, not text")
    return text


def read_lines(path: str | Path) -> list[str]:
    """The lines of a text file (see `read_text`), split on newlines only: a JSON string may hold
    U+2028 and other characters `str.splitlines` would split on."""
    return [line.removesuffix("\r") for line in read_text(path).split("\n")]


def read_json_lines(path: str | Path) -> list[dict]:
    """One JSON object per line (blank lines skipped); a line that is not a JSON object is a
    one-line ValueError naming the file and the line."""
    rows = []
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{number}: a JSON {type(row).__name__} where each line must be an object "
                '{"column": value, ...}'
            )
        rows.append(row)
    return rows


def read_json_file(path: Path) -> list[dict]:
    """A .json file: one array of objects, or one object a line (as a .jsonl)."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return read_json_lines(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not JSON ({error.msg}, column {error.colno})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {index} of the array is a JSON {type(row).__name__}, not an object")
    return rows


def same_columns(rows: list[dict]) -> list[dict]:
    """Every row with every column (in order of first appearance), None where a row lacks one,
    as `datasets` gives them."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    return [{name: row.get(name) for name in columns} for row in rows]


@contextlib.contextmanager
def quiet_datasets():
    """`datasets` logs a failed file read before it raises; the raised error is reported instead."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def datasets_error(error: Exception) -> str:
    """The first line of what `datasets` raised, or of its cause (it wraps parse errors)."""
    for candidate in (error.__cause__, error):
        if candidate is not None and str(candidate).strip():
            return str(candidate).strip().splitlines()[0]
    return type(error).__name__


def load_rows(source: str, split: str = "train") -> list[dict]:
    """The rows of a local `.jsonl`/`.json`/`.csv`/`.parquet` file (all of it), a local data-set
    folder (`split` of it) or a hub data set (`split` of it).

    JSON is read here, line by line, so an error names its line; CSV (checked to be UTF-8 text
    first) and Parquet, folders and hub data go through `datasets`. Anything that cannot be read
    is a one-line ValueError (FileNotFoundError for a missing file) naming the source. JSON files
    never import `datasets`: importing it and building its cache cost more than the read.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json") and path.is_file():
        return same_columns(read_json_lines(path) if suffix == ".jsonl" else read_json_file(path))
    import datasets

    if path.is_dir():
        try:
            with quiet_datasets():
                return datasets.load_dataset(str(path), split=split).to_list()
        except Exception as error:  # datasets raises many types for a bad folder
            raise ValueError(f"cannot load split {split!r} of data folder {source} ({datasets_error(error)})") from None
    if suffix in DATA_FILE_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file {source} does not exist")
        if suffix == ".csv":
            read_text(path)  # an encoding error names its line; datasets would not
        try:
            with quiet_datasets():
                dataset = datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files=str(path), split="train")
        except Exception as error:  # datasets raises many types for a bad file
            raise ValueError(f"cannot read {source} as {suffix[1:].upper()} ({datasets_error(error)})") from None
        return dataset.to_list()
    if path.is_file():
        raise ValueError(f"data file {source} is not .jsonl, .json, .csv or .parquet")
    try:
        with quiet_datasets():
            dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # offline, unknown name, missing split: all mean "use a local copy"
        raise ValueError(
            f"could not load data set {source!r} (split {split!r}) from the hub ({datasets_error(error)}): "
            "pass a local .jsonl/.json/.csv/.parquet file or folder with --data"
        ) from None
    return dataset.to_list()


def check_template_columns(template: str, rows: list[dict], source: str) -> None:
    """A template field that is not a column of the data is an error naming the columns there are."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    columns = list(rows[0])
    missing = [name for name in template_fields(template) if name not in columns]
    if missing:
        raise ValueError(
            f"template field {{{missing[0]}}} is not a column of {source} (its columns: {', '.join(columns) or 'none'})"
        )


def split_validation(
    rows: list[dict], fraction: float, seed: int, label_of: Callable[[dict], str] | None = None
) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded random `fraction` of the rows held out (at least one row).

    With `label_of` (a row -> its label) the split is stratified: each label keeps its share of
    the rows on both sides, up to one row (see `stratified_counts`)."""
    if fraction <= 0:
        return rows, []
    count = max(1, round(fraction * len(rows)))
    rng = random.Random(seed)
    if label_of is None:
        order = list(range(len(rows)))
        rng.shuffle(order)
        held_out = set(order[:count])
    else:
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(str(label_of(row)), []).append(index)
        groups = dict(sorted(groups.items()))  # the draws do not depend on the rows' order of labels
        held_out = set()
        quotas = stratified_counts([len(indices) for indices in groups.values()], count)
        for indices, quota in zip(groups.values(), quotas):
            rng.shuffle(indices)
            held_out.update(indices[:quota])
    return [row for i, row in enumerate(rows) if i not in held_out], [row for i, row in enumerate(rows) if i in held_out]


def stratified_counts(sizes: list[int], count: int) -> list[int]:
    """How many of each group's rows to draw so that `count` rows in all keep the groups' shares:
    each group's exact share rounded down, the rows left over going to the largest remainders
    (the earlier group on a tie)."""
    total = sum(sizes)
    shares = [count * size / total for size in sizes]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda g: -(shares[g] - counts[g]))
    for group in by_remainder[: count - sum(counts)]:
        counts[group] += 1
    return counts


# -- tokenisation -------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken


@dataclass
class TokenizeStats:
    rows: int = 0
    truncated: int = 0  # rows cut to max_length
    dropped: int = 0  # rows left out: an empty field, or (completion loss) no completion token left


def tokenize_row(tokenizer, template: str, row: dict, max_length: int, loss_on: str = "all") -> tuple[Example, bool]:
    """(example, truncated) for one row: prompt ids (the tokenizer's defaults, so any bos) +
    completion ids (no special tokens) + eos, cut to `max_length` with the eos kept last.

    `loss_on="all"` labels every token; `"completion"` only the completion's tokens and the eos.
    """
    prompt, completion = split_template(template, row)
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    text_ids = prompt_ids + completion_ids
    truncated = len(text_ids) > max_length - 1
    input_ids = text_ids[: max_length - 1] + [tokenizer.eos_token_id]
    labels = list(input_ids)
    if loss_on == "completion":
        num_prompt = min(len(prompt_ids), len(input_ids) - 1)
        labels[:num_prompt] = [IGNORE_INDEX] * num_prompt
    return Example(input_ids, labels), truncated


def tokenize_rows(
    tokenizer, template: str, rows: list[dict], max_length: int, loss_on: str = "all"
) -> tuple[list[Example], TokenizeStats]:
    """The rows as examples, leaving out rows with an empty field and, for the completion loss,
    rows cut so short that no completion token is left; `stats` counts both and the truncations."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end each row: set tokenizer.eos_token")
    fields = template_fields(template)
    examples, stats = [], TokenizeStats(rows=len(rows))
    for row in rows:
        if any(row[name] is None or str(row[name]) == "" for name in fields):
            stats.dropped += 1
            continue
        example, truncated = tokenize_row(tokenizer, template, row, max_length, loss_on)
        stats.truncated += truncated
        # The eos is always labelled; a completion row needs at least one completion token too.
        if loss_on == "completion" and sum(label != IGNORE_INDEX for label in example.labels) < 2:
            stats.dropped += 1
            continue
        examples.append(example)
    return examples, stats


def check_fits_context(examples: list[Example], num_virtual_tokens: int, context_length: int | None) -> None:
    """Every row after the virtual tokens must fit the model's positions (None: no limit, as
    BLOOM's ALiBi), or the forward fails on the first long row, maybe hours into the run."""
    longest = max((len(example.input_ids) for example in examples), default=0)
    if context_length is not None and longest + num_virtual_tokens > context_length:
        raise ValueError(
            f"rows of up to {longest} tokens after {num_virtual_tokens} virtual tokens exceed the model's context of "
            f"{context_length} positions: pass --max-length {context_length - num_virtual_tokens} or less"
        )


# -- batching -----------------------------------------------------------------------------------


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """The batches of one epoch as lists of row indices: a shuffle seeded by (seed, epoch), so any
    epoch's order can be rebuilt on resume. With `group_by_length`, rows are sorted by length
    within windows of 50 batches and the batches shuffled again, so padding shrinks but the order
    stays random."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)  # one stream per (seed, epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = batch_size * GROUP_WINDOW_BATCHES
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def split_batch(
    indices: list[int], lengths: list[int], max_tokens: int, extra_tokens: int = 0, shared_tokens: int = 0
) -> list[list[int]]:
    """A batch as micro-batches of at most `max_tokens` padded tokens each: rows x (the longest
    row + `extra_tokens`, the virtual tokens each row runs) + `shared_tokens` (those the rows
    share, run once per micro-batch: the shared-prefix path's prompt). Splitting sorts the rows longest first, so each
    micro-batch pads to its own longest row; a batch within budget (or `max_tokens` 0) stays whole,
    and a row over the budget goes alone. Summed with the right weights (`training.py`), the
    micro-batches give the batch's gradient while holding only one micro-batch's activations."""
    if not max_tokens or len(indices) * (max(lengths[i] for i in indices) + extra_tokens) + shared_tokens <= max_tokens:
        return [indices]
    pieces: list[list[int]] = [[]]
    for index in sorted(indices, key=lambda i: -lengths[i]):
        piece = pieces[-1]
        if piece and (len(piece) + 1) * (lengths[piece[0]] + extra_tokens) + shared_tokens > max_tokens:
            pieces.append(piece := [])
        piece.append(index)
    return pieces


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `labels`, each `[B, T]`, T the batch's longest row; padding
    on the right (pad id, mask 0, label -100)."""
    input_ids, attention_mask = right_padded([example.input_ids for example in examples], pad_token_id)
    labels, _ = right_padded([example.labels for example in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

