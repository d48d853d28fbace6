"""Data: loading, tokenisation (eos, truncation, loss scope), padding and batch order."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.data import (
    Example,
    batch_order,
    check_template_columns,
    collate,
    load_rows,
    split_batch,
    split_validation,
    stratified_counts,
    tokenize_row,
    tokenize_rows,
)
from soft_prompt.masks import IGNORE_INDEX
from soft_prompt.templates import label_words_of
from soft_prompt.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ROW = {"text": "the cat is lovely", "label": 0, "label_text": "no hate speech"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_row_is_the_whole_text_tokenised_plus_eos(tokenizer):
    example, truncated = tokenize_row(tokenizer, HATE_TEMPLATE, ROW, max_length=256, loss_on="all")
    whole = tokenizer("Sentence : the cat is lovely Label : no hate speech")["input_ids"]
    assert example.input_ids == whole + [tokenizer.eos_token_id]
    assert example.labels == example.input_ids
    assert truncated is False


def test_completion_loss_labels_exactly_the_label_tokens_and_eos(tokenizer):
    example, _ = tokenize_row(tokenizer, HATE_TEMPLATE, ROW, max_length=256, loss_on="completion")
    label_ids = tokenizer(" no hate speech", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer("Sentence : the cat is lovely Label :")["input_ids"]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + label_ids + [tokenizer.eos_token_id]
    assert example.input_ids == prompt_ids + label_ids + [tokenizer.eos_token_id]


def test_truncation_keeps_eos_last_and_is_counted(tokenizer):
    example, truncated = tokenize_row(tokenizer, HATE_TEMPLATE, ROW, max_length=4, loss_on="all")
    whole = tokenizer("Sentence : the cat is lovely Label : no hate speech")["input_ids"]
    assert example.input_ids == whole[:3] + [tokenizer.eos_token_id]
    assert truncated is True
    rows = [ROW, {**ROW, "text": "x"}, {**ROW, "text": None}, {**ROW, "label_text": ""}]
    # 22 and 20 text tokens, + eos: only the first row is longer than 22
    examples, stats = tokenize_rows(tokenizer, HATE_TEMPLATE, rows, max_length=22, loss_on="all")
    assert (stats.rows, stats.truncated, stats.dropped, len(examples)) == (4, 1, 2, 2)


def test_completion_rows_cut_before_their_label_are_dropped(tokenizer):
    # At 4 tokens the label is cut off: only the eos would be labelled, which teaches nothing.
    examples, stats = tokenize_rows(tokenizer, HATE_TEMPLATE, [ROW], max_length=4, loss_on="completion")
    assert (examples, stats.truncated, stats.dropped) == ([], 1, 1)


def test_collate_pads_right_to_the_longest_row():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batch_order_is_a_seeded_permutation_per_epoch():
    lengths = list(range(1, 22))
    first = batch_order(lengths, 4, seed=1, epoch=0)
    assert [len(batch) for batch in first] == [4, 4, 4, 4, 4, 1]
    assert sorted(i for batch in first for i in batch) == list(range(21))
    assert batch_order(lengths, 4, seed=1, epoch=0) == first
    assert batch_order(lengths, 4, seed=1, epoch=1) != first
    assert batch_order(lengths, 4, seed=2, epoch=0) != first


def test_group_by_length_cuts_padding():
    lengths = [1, 50] * 16

    def padding(batches):
        return sum(len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch) for batch in batches)

    grouped = batch_order(lengths, 4, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for batch in grouped for i in batch) == list(range(32))
    assert padding(grouped) == 0
    assert padding(batch_order(lengths, 4, seed=0, epoch=0)) > 0


def test_split_batch_keeps_each_micro_batch_within_the_token_budget():
    lengths = [5, 9, 3, 7, 20, 4]
    # 2 virtual tokens: row 4 (22) alone is within 24 but not with another; 2 x (9 + 2) fits, 3 x does not.
    assert split_batch([0, 1, 2, 3, 4, 5], lengths, 24, extra_tokens=2) == [[4], [1, 3], [0, 5, 2]]
    # A row longer than the budget still trains, alone.
    assert split_batch([4, 2], lengths, 10, extra_tokens=2) == [[4], [2]]
    # Within budget, or no budget: the batch stays whole and in its order.
    assert split_batch([2, 0], lengths, 14, extra_tokens=2) == [[2, 0]]
    assert split_batch([0, 1, 2, 3, 4, 5], lengths, 0, extra_tokens=2) == [[0, 1, 2, 3, 4, 5]]
    # A prompt the rows share counts once per micro-batch: 2 x 5 + 4 fits 14; 2 x (5 + 4) does not.
    assert split_batch([2, 0], lengths, 14, shared_tokens=4) == [[2, 0]]
    assert split_batch([2, 0], lengths, 14, extra_tokens=4) == [[0], [2]]
    assert split_batch([0, 1, 2, 3, 4, 5], lengths, 20, shared_tokens=4) == [[4], [1], [3, 0], [5, 2]]


def test_local_files_load(tmp_path):
    rows = [{"text": "a b", "label_text": "x"}, {"text": "c", "label_text": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "d.csv").write_text("text,label_text\na b,x\nc,y\n")
    assert load_rows(str(tmp_path / "d.jsonl")) == rows
    assert load_rows(str(tmp_path / "d.csv")) == rows
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="not .jsonl, .json, .csv or .parquet"):
        load_rows(str(tmp_path / "d.txt"))


def test_json_is_read_here_into_the_same_rows_as_datasets_gives(tmp_path):
    import datasets

    rows = [
        {"text": "caf\u00e9 \u2028 line", "label": 1, "score": 0.5, "ok": True, "tags": ["a", "b"], "extra": None},
        {"text": "b", "label": 0, "score": 1.5, "ok": False, "tags": [], "extra": "x"},
        {"label": 2, "text": "c", "score": 2.0, "ok": True, "tags": ["c"]},  # other key order, one key missing
    ]
    (tmp_path / "d.jsonl").write_text("\ufeff" + "".join(json.dumps(row, ensure_ascii=False) + "\n\n" for row in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    reference = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train").to_list()
    for name in ("d.jsonl", "d.json"):
        ours = load_rows(str(tmp_path / name))
        assert ours == reference
        assert [list(row) for row in ours] == [list(row) for row in reference]  # column order
        assert [[type(value) for value in row.values()] for row in ours] == [
            [type(value) for value in row.values()] for row in reference
        ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.jsonl", b'{"a": 1}\n\n{"a": 2\n', r"broken.jsonl:3: not JSON \(Expecting ',' delimiter, column 8\)"),
        ("arrays.jsonl", b"[1, 2]\n", r"arrays.jsonl:1: a JSON list where each line must be an object"),
        ("binary.jsonl", b'{"a": 1}\n\xff\xfe', r"binary.jsonl:2: not UTF-8 text \(byte 0xff\)"),
        ("nul.jsonl", b'{"a": 1}\n\x00', r"nul.jsonl:2: a NUL byte"),
        ("items.json", b'[{"a": 1}, 2]', r"items.json: item 1 of the array is a JSON int, not an object"),
        ("broken.json", b'[\n{"a": 1},\n]', r"broken.json:3: not JSON"),
        ("latin1.csv", "a\n\xe9\n".encode("latin-1"), r"latin1.csv:2: not UTF-8 text \(byte 0xe9\)"),
        ("empty.csv", b"", r"cannot read .*empty.csv as CSV \(No columns to parse from file\)"),
        ("bad.parquet", b"nope", r"cannot read .*bad.parquet as PARQUET"),
    ],
)
def test_unreadable_data_files_are_one_line_naming_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_rows(str(tmp_path / name))
    assert "\n" not in str(error.value)


def test_empty_json_lines_give_no_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    assert load_rows(str(tmp_path / "empty.jsonl")) == []


def test_json_files_are_read_without_importing_datasets(tmp_path):
    """Importing `datasets` costs about a second of startup: a .jsonl or .json never needs it."""
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n')
    (tmp_path / "d.json").write_text('[{"text": "a", "label": 1}]')
    for name in ("d.jsonl", "d.json"):
        probe = (f"import sys; from soft_prompt.data import load_rows; load_rows({str(tmp_path / name)!r}); "
                 "print('datasets' in sys.modules)")
        imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
        assert imported.stdout.strip() == "False"


def test_unreachable_hub_data_says_to_pass_a_local_file():
    with pytest.raises(ValueError, match="could not load data set 'nobody/nothing'.*pass a local"):
        load_rows("nobody/nothing")


def test_template_columns_are_checked():
    with pytest.raises(ValueError, match=r"template field \{label_text\} is not a column of d.jsonl \(its columns: text, label\)"):
        check_template_columns(HATE_TEMPLATE, [{"text": "a", "label": 0}], "d.jsonl")
    with pytest.raises(ValueError, match="d.jsonl has no rows"):
        check_template_columns(HATE_TEMPLATE, [], "d.jsonl")


def test_validation_split_is_seeded_and_disjoint():
    rows = [{"i": i} for i in range(20)]
    train, held_out = split_validation(rows, 0.25, seed=3)
    assert (len(train), len(held_out)) == (15, 5)
    assert sorted(row["i"] for row in train + held_out) == list(range(20))
    assert split_validation(rows, 0.25, seed=3) == (train, held_out)
    assert split_validation(rows, 0.0, seed=3) == (rows, [])


def test_stratified_split_keeps_label_shares():
    # 60 "a", 30 "b", 10 "c": a 20% split holds 12 / 6 / 2.
    rows = [{"i": i, "label": "a" if i % 10 < 6 else "b" if i % 10 < 9 else "c"} for i in range(100)]
    train, held_out = split_validation(rows, 0.2, seed=3, label_of=lambda row: row["label"])
    assert [sum(row["label"] == label for row in held_out) for label in "abc"] == [12, 6, 2]
    assert [sum(row["label"] == label for row in train) for label in "abc"] == [48, 24, 8]
    assert sorted(row["i"] for row in train + held_out) == list(range(100))
    assert split_validation(rows, 0.2, seed=3, label_of=lambda row: row["label"]) == (train, held_out)
    assert split_validation(rows, 0.2, seed=4, label_of=lambda row: row["label"])[1] != held_out


def test_stratified_counts_give_leftover_rows_to_the_largest_remainders():
    # ETHOS' 347 / 251 rows at 20%: 69.4 and 50.2, 120 in all -> the 0.4 gets the leftover row.
    assert stratified_counts([347, 251], 120) == [70, 50]
    assert stratified_counts([1, 1, 1], 2) == [1, 1, 0]  # equal remainders: the earlier groups
    assert stratified_counts([5, 5], 10) == [5, 5]


def test_label_words_are_the_last_fields_values_when_few():
    rows = [{"text": str(i), "label_text": ["no", "yes"][i % 2]} for i in range(30)]
    assert label_words_of(HATE_TEMPLATE, rows) == ["no", "yes"]
    assert label_words_of("{label_text}: {text}", rows) is None  # 30 distinct texts: not labels


def test_eos_is_required():
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        tokenize_rows(tokenizer, HATE_TEMPLATE, [ROW], 16)
