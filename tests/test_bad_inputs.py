"""Every bad input to train.py and infer.py, as a table: the input, the exit code, a phrase the
one-line message must hold. Rows run `main(argv)` in process; two subprocess runs check the
whole path (one line on stderr, exit code 2, no traceback). A rejected training run must leave
the run folder it points at (last/, best/, metrics, config) exactly as it was."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import infer
import train
from soft_prompt import SoftPromptModel
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.tiny import build_tiny_model, demo_rows, save_tiny_model
from tests.conftest import load
from tests.test_infer_cli import cli
from tests.test_train_cli import run_cli

LABELS = ["no hate speech", "hate speech"]


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good and bad data and input files, by name."""
    directory = tmp_path_factory.mktemp("files")
    rows = demo_rows(16)
    contents = {
        "rows.jsonl": jsonl(rows),
        "more-rows.jsonl": jsonl(rows + rows[:1]),  # a row appended
        "edited-rows.jsonl": jsonl({**row, "text": row["text"] + "!"} for row in rows),
        "empty.jsonl": "",
        "blank.jsonl": "\n\n",
        "broken.jsonl": jsonl(rows[:1]) + '{"text": "a", "label_text": "hate speech"\n' + jsonl(rows[1:]),
        "arrays.jsonl": "[1, 2]\n[3, 4]\n",
        "binary.jsonl": bytes(range(128, 256)) * 3,
        "nul.jsonl": b"\x00" * 64,
        "latin1.csv": "text,label_text\nok,hate speech\ncaf\xe9,no hate speech\n".encode("latin-1"),
        "ragged.csv": "text,label_text\na,hate speech\nb,no hate speech,extra\n",
        "bad.parquet": b"PAR1 not really parquet",
        "rows.txt": "one input a line\n",
        "empty.txt": "\n\n",
        "latin1.txt": "first line\nsecond caf\xe9\n".encode("latin-1"),
        "binary.txt": bytes(range(128, 256)),
        "no-label.jsonl": jsonl([{"text": "a"}]),
        "other-labels.jsonl": jsonl([{"text": "a", "label_text": "spam"}]),
        "a-file": "",
        "long.jsonl": jsonl([{"text": "the cat is lovely " * 100, "label_text": "hate speech"}] * 8),
    }
    for name, content in contents.items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return directory


def expand(argv, names: dict, files: Path) -> list[str]:
    """`@NAME` is a path from `names`, else the file `NAME` of the `files` fixture."""
    return [str(names.get(arg[1:], files / arg[1:])) if arg.startswith("@") else arg for arg in argv]


def one_line_error(capsys, call) -> tuple[int, str]:
    """(exit code, stderr) of `main(argv)`; argparse's errors arrive as SystemExit."""
    try:
        code = call()
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# -- train.py -------------------------------------------------------------------------------------


def train_args(model: str, data: str, output_dir, *extra: str) -> list[str]:
    return [
        "--model", model, "--data", data, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir),
        "--num-virtual-tokens", "4", "--batch-size", "4", "--max-steps", "2", "--save-every", "1",
        "--val-fraction", "0.25", "--seed", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run_folder(bloom_dir, files, tmp_path_factory) -> Path:
    """A finished 2-step run: last/ with its training state, best/, metrics.jsonl."""
    output_dir = tmp_path_factory.mktemp("run") / "run"
    assert train.main(train_args(bloom_dir, str(files / "rows.jsonl"), output_dir)) == 0
    return output_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def cut(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the row is about a machine without CUDA")
STATE = "last/training_state"
TRAIN_ROWS = [
    # flags: argparse and config.validate
    (["--precision", "fp8"], None, 2, "argument --precision: invalid choice: 'fp8'"),
    (["--batch-size", "x"], None, 2, "argument --batch-size: invalid int value: 'x'"),
    (["--task", "nope"], None, 2, "unknown task 'nope'"),
    (["--num-virtual-tokens", "0"], None, 2, "--num-virtual-tokens must be at least 1, got 0"),
    (["--batch-size", "0"], None, 2, "--batch-size must be at least 1, got 0"),
    (["--lr", "0"], None, 2, "--lr must be positive, got 0.0"),
    (["--lr", "nan"], None, 2, "--lr must be positive, got nan"),
    (["--max-grad-norm", "inf"], None, 2, "--max-grad-norm must be a finite number"),
    (["--val-fraction", "1"], None, 2, "--val-fraction must be in [0, 1)"),
    (["--max-length", "1"], None, 2, "--max-length must be at least 2"),
    (["--vocab-size", "0"], None, 2, "--vocab-size must be at least 1"),
    (["--init", "text"], None, 2, "--init text needs --init-text"),
    (["--template", "Sentence : {text!r}"], None, 2, "is not a plain column name"),
    (["--template", "Sentence : {text"], None, 2, "is malformed"),
    (["--template", "no fields"], None, 2, "has no {column} field"),
    (["--label-words", "hate speech,no hate speech"], None, 2,
     '1 label word [\'hate speech,no hate speech\'], classifying needs at least 2; one word per argument: '
     '--label-words "hate speech" "no hate speech"'),
    (["--label-words", "a", "a"], None, 2, "--label-words repeats a label word"),
    (["--eval-data", "@rows.jsonl"], None, 2, "--val-fraction 0.25 and --eval-data both give evaluation rows"),
    # data files
    (["--data", "@missing.jsonl"], None, 2, "missing.jsonl does not exist"),
    (["--data", "@empty.jsonl"], None, 2, "empty.jsonl has no rows"),
    (["--data", "@blank.jsonl"], None, 2, "blank.jsonl has no rows"),
    (["--data", "@broken.jsonl"], None, 2, "broken.jsonl:2: not JSON (Expecting ',' delimiter"),
    (["--data", "@arrays.jsonl"], None, 2, "arrays.jsonl:1: a JSON list where each line must be an object"),
    (["--data", "@binary.jsonl"], None, 2, "binary.jsonl:1: not UTF-8 text (byte 0x80)"),
    (["--data", "@nul.jsonl"], None, 2, "nul.jsonl:1: a NUL byte: this is a binary file"),
    (["--data", "@latin1.csv"], None, 2, "latin1.csv:3: not UTF-8 text (byte 0xe9)"),
    (["--data", "@ragged.csv"], None, 2, "ragged.csv as CSV (Error tokenizing data"),
    (["--data", "@bad.parquet"], None, 2, "bad.parquet as PARQUET"),
    (["--data", "@rows.txt"], None, 2, "is not .jsonl, .json, .csv or .parquet"),
    (["--data", "nobody/no-such-data"], None, 2, "could not load data set 'nobody/no-such-data'"),
    (["--val-fraction", "0", "--eval-data", "@broken.jsonl"], None, 2, "broken.jsonl:2: not JSON"),
    (["--template", "Sentence : {text} Label : {category}"], None, 2, "template field {category} is not a column"),
    (["--loss-on", "completion", "--max-length", "3"], None, 2, "no rows left to train on"),
    # model, device, output folder
    (["--model", "nobody/no-such-model"], None, 2, "pass a local model folder with --model"),
    (["--model", "@a-file"], None, 2, "is a file: pass a model folder"),
    (["--model", "@TRUNCATED_MODEL"], None, 2, "cannot load a causal LM from folder"),
    pytest.param(["--device", "cuda"], None, 2, "--device cuda, but torch sees no CUDA device", marks=NEEDS_NO_CUDA),
    (["--output-dir", "@a-file"], None, 2, "a-file is a file, not a folder"),
    (["--output-dir", "@a-file/run"], None, 2, "a-file is a file, not a folder"),
    (["--model", "@GPT2", "--data", "@long.jsonl"], None, 2,
     "rows of up to 256 tokens after 4 virtual tokens exceed the model's context of 256 positions: pass --max-length 252"),
    # resume: the folder and its state
    (["--resume", "@nowhere"], None, 2, "no training_state.json there"),
    (["--resume", "@RUN", "--num-virtual-tokens", "3"], None, 2, "--num-virtual-tokens 4; this run asks for"),
    (["--resume", "@RUN", "--model", "@GPT2"], None, 2, "was trained with --model"),
    (["--resume", "@RUN"], lambda run: cut(run / f"{STATE}.safetensors"), 2,
     "training_state.safetensors is truncated or corrupt"),
    (["--resume", "@RUN"], lambda run: cut(run / f"{STATE}.json"), 2, "training_state.json is truncated or corrupt"),
    (["--resume", "@RUN"], lambda run: (run / f"{STATE}.json").write_text("[]"), 2, "training_state.json lacks"),
    (["--resume", "@RUN"], lambda run: cut(run / "last/adapter_model.safetensors"), 2,
     "adapter_model.safetensors is truncated or corrupt"),
    (["--resume", "@RUN"], lambda run: edit_json(run / "last/soft_prompt.json", step=1), 2, "the folder mixes two saves"),
    (["--resume", "@RUN"], lambda run: edit_json(run / f"{STATE}.json", num_virtual_tokens=5), 2,
     "training_state.safetensors does not hold this run's optimizer and RNG state"),
    (["--resume", "@RUN"], lambda run: (run / "metrics.jsonl").write_text("{oops\n" + (run / "metrics.jsonl").read_text()),
     2, "metrics.jsonl:1: not a metrics line"),
    # resume: what the saved data position depends on
    (["--resume", "@RUN", "--batch-size", "2"], None, 2,
     "was trained with --batch-size 4; this run asks for --batch-size 2: pass the same ones"),
    (["--resume", "@RUN", "--grad-accum", "2"], None, 2, "was trained with --grad-accum 1; this run asks for --grad-accum 2"),
    (["--resume", "@RUN", "--seed", "2"], None, 2, "was trained with --seed 1; this run asks for --seed 2"),
    (["--resume", "@RUN", "--max-length", "64"], None, 2, "was trained with --max-length 256; this run asks for --max-length 64"),
    (["--resume", "@RUN", "--template", "Text : {text} Label : {label_text}"], None, 2,
     "was trained with --template 'Sentence : {text} Label : {label_text}'; this run asks for --template "
     "'Text : {text} Label : {label_text}'"),
    (["--resume", "@RUN", "--no-group-by-length"], None, 2,
     "was trained with --group-by-length; this run asks for --no-group-by-length"),
    (["--resume", "@RUN", "--data", "@more-rows.jsonl"], None, 2, "was trained on 12 rows (token ids sha256 "),
    (["--resume", "@RUN", "--data", "@edited-rows.jsonl"], None, 2, "this run has 12 rows (sha256 "),
]  # fmt: skip


@pytest.fixture(scope="module")
def model_folders(bloom_dir, tmp_path_factory) -> dict[str, str]:
    gpt2 = save_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")
    truncated = tmp_path_factory.mktemp("truncated") / "model"
    shutil.copytree(bloom_dir, truncated)
    cut(truncated / "model.safetensors", 1000)
    return {"GPT2": gpt2, "TRUNCATED_MODEL": str(truncated)}


@pytest.mark.parametrize("extra, damage, code, phrase", TRAIN_ROWS)
def test_train_bad_input(extra, damage, code, phrase, run_folder, model_folders, bloom_dir, files, tmp_path, capsys):
    run = tmp_path / "run"  # every row points at a copy of a finished run, which must stay as it was
    shutil.copytree(run_folder, run)
    if damage:
        damage(run)
    before = snapshot(run)
    argv = expand(train_args(bloom_dir, "@rows.jsonl", run, *extra), {"RUN": run, **model_folders}, files)
    exit_code, stderr = one_line_error(capsys, lambda: train.main(argv))
    assert exit_code == code
    assert "Traceback" not in stderr and len([line for line in stderr.splitlines() if "error" in line]) == 1
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: error: ") and phrase in last_line
    assert snapshot(run) == before


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(run_folder, bloom_dir, files, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    metrics = run / "metrics.jsonl"
    logged = metrics.read_text()
    metrics.write_text(logged + '{"step": 3, "lo')  # a crash while appending
    argv = train_args(bloom_dir, str(files / "rows.jsonl"), run, "--max-steps", "3", "--resume", str(run))
    assert train.main(argv) == 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines[: len(logged.splitlines())] == [json.loads(line) for line in logged.splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]


def test_resume_of_a_state_from_before_the_position_checks_warns_and_runs(run_folder, bloom_dir, files, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    state = json.loads((run / f"{STATE}.json").read_text())
    added = ("batch_size", "grad_accum", "seed", "max_length", "template", "group_by_length", "train_rows", "train_rows_sha256")
    (run / f"{STATE}.json").write_text(json.dumps({key: value for key, value in state.items() if key not in added}))
    argv = train_args(bloom_dir, str(files / "rows.jsonl"), run, "--max-steps", "3", "--resume", str(run))
    assert train.main(argv) == 0
    assert (
        f"warning: --resume {run}: its training state (from an older version) does not record --batch-size, "
        "--grad-accum, --seed, --max-length, --template, --group-by-length, the training rows: they are not checked, "
        "so keep them as they were"
    ) in capsys.readouterr().err.splitlines()
    saved = json.loads((run / f"{STATE}.json").read_text())
    assert {key: saved[key] for key in added} == {key: state[key] for key in added}  # recorded again


def test_train_end_to_end_bad_data_is_one_line_without_traceback(files, tmp_path):
    result = run_cli("--data", str(files / "broken.jsonl"), "--template", HATE_TEMPLATE, "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"train.py: error: {files / 'broken.jsonl'}:2: not JSON (Expecting ',' delimiter, column 42)"
    ]
    assert [path.name for path in (tmp_path / "run").iterdir()] == [".lock"]  # the folder and its lock, taken first


# -- infer.py -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(bloom_dir, tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("checkpoints")
    model = load(bloom_dir)[0]

    def save(name: str, wrapper=None, **metadata) -> Path:
        wrapper = wrapper or SoftPromptModel(model, num_virtual_tokens=2, seed=0)
        wrapper.save_pretrained(directory / name, **metadata)
        return directory / name

    save("CKPT", template=HATE_TEMPLATE, label_words=LABELS)
    save("ONE_LABEL", template=HATE_TEMPLATE, label_words=["hate speech"])
    save("WIDE", SoftPromptModel(build_tiny_model("bloom", 400, hidden_size=48), num_virtual_tokens=2, seed=0))
    cut(save("CORRUPT") / "adapter_model.safetensors", 30)
    (save("BINARY_META") / "soft_prompt.json").write_bytes(bytes(range(128, 256)))
    (save("LIST_META") / "soft_prompt.json").write_text("[]")
    llama = save_tiny_model(directory / "llama", "llama")  # 256 positions (BLOOM has no limit)
    save("LLAMA_CKPT", SoftPromptModel(load(llama)[0], num_virtual_tokens=4, seed=0))
    nan = SoftPromptModel(model, num_virtual_tokens=2, seed=0)
    with torch.no_grad():
        nan.prompt.weight[0, 0] = float("nan")
    save("NAN", nan)
    names = ("CKPT", "ONE_LABEL", "WIDE", "CORRUPT", "BINARY_META", "LIST_META", "NAN", "LLAMA_CKPT")
    return {"LLAMA": llama} | {name: str(directory / name) for name in names}


PARSE, RUN = "infer.py: error: ", "error: "  # refused while parsing the flags; refused by run()
INFER_ROWS = [
    # flags, refused at parse time
    (["--NO-MODEL"], PARSE, 2, "the following arguments are required: --model"),
    (["--max-new-tokens", "0"], PARSE, 2, "--max-new-tokens must be at least 1, got 0"),
    (["--max-new-tokens", "two"], PARSE, 2, "argument --max-new-tokens: invalid int value: 'two'"),
    (["--do-sample", "--temperature", "0"], PARSE, 2, "--do-sample needs a positive --temperature, got 0.0"),
    (["--top-p", "0"], PARSE, 2, "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], PARSE, 2, "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], PARSE, 2, "--top-k must be at least 0, got -1"),
    (["--num-beams", "0"], PARSE, 2, "--num-beams must be at least 1, got 0"),
    (["--batch-size", "0"], PARSE, 2, "--batch-size must be at least 1, got 0"),
    (["--repetition-penalty", "0"], PARSE, 2, "--repetition-penalty must be positive"),
    (["--precision", "fp8"], PARSE, 2, "argument --precision: invalid choice: 'fp8'"),
    (["--device", "gpu0"], PARSE, 2, "--device gpu0 is not a device"),
    pytest.param(["--device", "cuda"], PARSE, 2, "--device cuda, but torch sees no CUDA device", marks=NEEDS_NO_CUDA),
    (["--classify", "--labels", "hate speech,no hate speech"], PARSE, 2,
     "classifying needs at least 2; one word per argument: --labels \"hate speech\" \"no hate speech\""),
    (["--classify", "--labels", "yes", "yes"], PARSE, 2, "--labels repeats a label word"),
    (["--classify", "--labels", "yes", " "], PARSE, 2, "--labels: label words must be non-empty text"),
    (["--labels", "yes", "no"], PARSE, 2, "--labels and --template are for classification: add --classify"),
    (["--eval", "@rows.jsonl"], PARSE, 2, "--eval reads its inputs from the labelled file"),
    (["--eval", "@rows.jsonl", "--output", "@same.json", "--metrics", "@same.json", "--NO-INPUT"], PARSE, 2,
     "--output and --metrics are the same file"),
    (["--input-file", "@rows.txt", "--output", "@rows.txt", "--NO-INPUT"], PARSE, 2,
     "--input-file and --output are the same file"),
    (["--NO-INPUT"], PARSE, 2, "no input: give --input TEXT, --input-file FILE or --eval FILE"),
    # checkpoints and the model
    (["--checkpoint", "@missing"], RUN, 2, "missing does not exist"),
    (["--checkpoint", "@WIDE"], RUN, 2, "embedding size 48 but the model has 32"),
    (["--checkpoint", "@CORRUPT"], RUN, 2, "adapter_model.safetensors is truncated or corrupt"),
    (["--checkpoint", "@BINARY_META"], RUN, 2, "soft_prompt.json is not readable JSON"),
    (["--checkpoint", "@LIST_META"], RUN, 2, "soft_prompt.json holds a JSON list, not an object"),
    (["--checkpoint", "@NAN"], RUN, 2, "holds NaN or infinite values"),
    (["--model", "nobody/no-such-model"], RUN, 2, "pass a local model folder with --model"),
    (["--model", "@LLAMA", "--checkpoint", "@LLAMA_CKPT", "--max-new-tokens", "300"], RUN, 2,
     "--max-new-tokens 300 and the prompt's 4 virtual tokens leave no room for the input in the model's context of 256"),
    (["--checkpoint", "@ONE_LABEL", "--classify"], RUN, 2,
     "the checkpoint's label_words: 1 label word ['hate speech'], classifying needs at least 2"),
    # input files
    (["--input", "  "], RUN, 2, "empty input"),
    (["--input-file", "@empty.txt", "--NO-INPUT"], RUN, 2, "empty input"),
    (["--input-file", "@missing.txt", "--NO-INPUT"], RUN, 2, "cannot read"),
    (["--input-file", "@latin1.txt", "--NO-INPUT"], RUN, 2, "latin1.txt:2: not UTF-8 text (byte 0xe9)"),
    (["--input-file", "@binary.txt", "--NO-INPUT"], RUN, 2, "binary.txt:1: not UTF-8 text"),
    (["--input-file", "@broken.jsonl", "--NO-INPUT"], RUN, 2, "broken.jsonl:2: not JSON"),
    (["--input-file", "@arrays.jsonl", "--NO-INPUT"], RUN, 2, "arrays.jsonl:1: a JSON list"),
    (["--input-file", "@ragged.csv", "--NO-INPUT"], RUN, 2, "input files must be .txt"),
    (["--eval", "@binary.jsonl", "--NO-INPUT"], RUN, 2, "binary.jsonl:1: not UTF-8 text"),
    (["--eval", "@no-label.jsonl", "--NO-INPUT"], RUN, 2, "have no 'label_text' field"),
    (["--eval", "@other-labels.jsonl", "--NO-INPUT"], RUN, 2, "gold labels ['spam'] are not among the label words"),
    (["--classify", "--template", "Sentence : {text!r}"], RUN, 2, "is not a plain column name"),
    # outputs
    (["--output", "@a-file/out.jsonl"], RUN, 2, "a-file is a file, not a folder"),
    (["--output", "@OUT_DIR"], RUN, 2, "is a folder: give a file name"),
    (["--eval", "@rows.jsonl", "--metrics", "@a-file/m.json", "--NO-INPUT"], RUN, 2, "a-file is a file, not a folder"),
    # accepted: the output's new folder is created
    (["--output", "@NEW_OUT", "--max-new-tokens", "2"], None, 0, ""),
]  # fmt: skip


@pytest.mark.parametrize("extra, prefix, code, phrase", INFER_ROWS)
def test_infer_bad_input(extra, prefix, code, phrase, bloom_dir, checkpoints, files, tmp_path, capsys):
    markers = {"--NO-MODEL", "--NO-INPUT"}  # leave out --model, or the default --input
    base = [] if "--NO-MODEL" in extra or "--model" in extra else ["--model", bloom_dir]
    base += [] if "--checkpoint" in extra else ["--checkpoint", "@CKPT"]
    base += [] if "--NO-INPUT" in extra else ["--input", "hi"]
    names = {**checkpoints, "OUT_DIR": tmp_path, "NEW_OUT": tmp_path / "new/folder/out.jsonl", "same.json": tmp_path / "same.json"}
    argv = expand(base + [arg for arg in extra if arg not in markers], names, files)
    exit_code, stderr = one_line_error(capsys, lambda: infer.main(argv))
    assert exit_code == code, stderr
    assert "Traceback" not in stderr and len([line for line in stderr.splitlines() if "error" in line]) == (1 if code else 0)
    if code == 0:
        assert json.loads((tmp_path / "new/folder/out.jsonl").read_text())["input"] == "hi"
        return
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(prefix) and phrase in last_line


def test_infer_end_to_end_binary_input_file_is_one_line_without_traceback(bloom_dir, checkpoints, files, tmp_path):
    result = cli("--model", bloom_dir, "--checkpoint", checkpoints["CKPT"], "--input-file", str(files / "binary.txt"),
                 "--output", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {files / 'binary.txt'}:1: not UTF-8 text (byte 0x80): save the file as UTF-8"]
    assert not (tmp_path / "out.jsonl").exists()
