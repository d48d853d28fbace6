"""What a run saves to resume, and reading it back: the loop's state (`TrainState`), the optimizer's
moments, the loss scaler and every RNG, at a step boundary, so that Ctrl-C then `--resume` equals
an uninterrupted run. No pickle anywhere: tensors in safetensors, everything else in JSON.

    last/training_state.json          TrainState's fields, the scaler, the python and numpy RNGs
    last/training_state.safetensors   AdamW's moments and the torch (and CUDA) RNG states

Every file read back is checked: a truncated or damaged one is a one-line ValueError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shlex
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .files import json_bytes
from .data import Example, read_lines

STATE_JSON = "training_state.json"
# A run folder's log, beside last/ and best/: one JSON line per logged step, evaluation and probe.
METRICS_FILE = "metrics.jsonl"
STATE_TENSORS = "training_state.safetensors"
# What `training_state_files` writes into STATE_JSON beside the loop's counters (TrainState's fields).
STATE_EXTRA_KEYS = frozenset({"scaler", "rng_python", "rng_numpy"})
# What the saved data position means, with the flag that sets each: a run resumes only with the same.
POSITION_FLAGS = {
    "model": "--model",
    "num_virtual_tokens": "--num-virtual-tokens",
    "batch_size": "--batch-size",  # the global batch, so a run may resume on another number of ranks
    "grad_accum": "--grad-accum",
    "seed": "--seed",
    "max_length": "--max-length",
    "template": "--template",
    "group_by_length": "--group-by-length",
}
# TrainState's fields that older training states lack: the position's meaning resumes with a
# warning, unchecked; model selection's counters with their defaults.
ADDED_FIELDS = frozenset({"batch_size", "grad_accum", "seed", "max_length", "template", "group_by_length",
                          "train_rows", "train_rows_sha256", "best_score", "evals_without_improvement"})


@dataclasses.dataclass
class TrainState:
    """Where the loop is and what it has counted: everything a resumed run needs beside the
    optimizer, the scaler and the RNGs. Saved as `last/training_state.json`."""

    model: str
    num_virtual_tokens: int
    # The settings the data position depends on (POSITION_FLAGS), and the training rows: their
    # count and the sha256 of their token ids (`rows_sha256`). None in states saved before them.
    batch_size: int | None = None
    grad_accum: int | None = None
    seed: int | None = None
    max_length: int | None = None
    template: str | None = None
    group_by_length: bool | None = None
    train_rows: int | None = None
    train_rows_sha256: str | None = None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0
    best_eval_loss: float | None = None
    eval_loss: float | None = None
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0
    best_score: float | None = None  # the best --best-metric so far (what best/ holds)
    evals_without_improvement: int = 0  # evaluations since it improved (--patience)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls) if field.name in saved})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def epoch_progress(self, batches_per_epoch: int) -> float:
        return self.epoch + self.batch_in_epoch / batches_per_epoch

    def count_step(self, loss: float, finite: bool) -> None:
        """Count a step's loss toward the epoch's mean, or count it as skipped."""
        if finite:
            self.bad_steps_in_a_row = 0
            self.epoch_loss_sum += loss
            self.epoch_steps += 1
        else:
            self.skipped_steps += 1
            self.bad_steps_in_a_row += 1


def training_state_files(state: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict[str, bytes]:
    """The resumable state at a step boundary, as the two extra files of `last/`."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    for param_id, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():  # AdamW: step, exp_avg, exp_avg_sq
            tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        **state,
        "scaler": scaler.state_dict(),
        "rng_python": [python_state[0], list(python_state[1]), python_state[2]],
        "rng_numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    return {STATE_JSON: json_bytes(state), STATE_TENSORS: save(tensors)}


def read_training_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON state, the tensors) that `training_state_files` wrote. A missing, truncated or
    corrupt file is a one-line ValueError saying so, before anything of the run is changed."""
    advice = "resume from an intact copy, or start a new --output-dir without --resume"
    try:
        state = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise ValueError(f"{directory / STATE_JSON} is truncated or corrupt ({error}): {advice}") from None
    expected = STATE_EXTRA_KEYS | {field.name for field in dataclasses.fields(TrainState)} - ADDED_FIELDS
    missing = expected - set(state) if isinstance(state, dict) else expected
    if missing:
        raise ValueError(f"{directory / STATE_JSON} lacks {sorted(missing)}: it is damaged or not ours; {advice}")
    try:
        tensors = load_file(directory / STATE_TENSORS)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{directory / STATE_TENSORS} is truncated or corrupt ({error}): {advice}") from None
    # The prompt is the optimizer's first parameter (a reparameterization's MLP follows it).
    moments = [name for name in tensors if name.startswith("optimizer.0.") and not name.endswith(".step")]
    if "rng.torch" not in tensors or any(
        tensors[name].shape[:1] != (state["num_virtual_tokens"],) for name in moments
    ):
        raise ValueError(f"{directory / STATE_TENSORS} does not hold this run's optimizer and RNG state: {advice}")
    return state, tensors


def restore_training_state(directory: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict:
    """Load what `training_state_files` wrote into the optimizer, scaler and RNGs; returns the
    loop's own state (step, data position, counters)."""
    state, tensors = read_training_state(directory)
    optimizer_state = optimizer.state_dict()
    moments: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            moments.setdefault(int(param_id), {})[key] = value
    optimizer_state["state"] = moments
    optimizer.load_state_dict(optimizer_state)  # moves the moments to the prompt's device
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return {key: value for key, value in state.items() if key not in ("scaler", "rng_python", "rng_numpy")}


def rows_sha256(examples: list[Example]) -> str:
    """sha256 of the training rows' token ids, each prefixed by its length: the rows the saved
    data position counts through."""
    digest = hashlib.sha256()
    for example in examples:
        ids = np.asarray(example.input_ids, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return digest.hexdigest()


def flag_text(name: str, value) -> str:
    """A setting as the command line gives it: `--batch-size 8`, `--no-group-by-length`."""
    flag = POSITION_FLAGS[name]
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {shlex.quote(str(value))}"


def check_resume_settings(resume: str, saved: dict, settings: dict) -> str | None:
    """Refuse, as a one-line ValueError naming each setting that differs and both values, to resume
    a run saved with other `settings` (POSITION_FLAGS' fields) than this one: its data position
    would point at other rows. Returns a warning to print when the saved state (from an older
    version) does not record some of them or the training rows, else None."""
    unrecorded = [name for name in settings if saved.get(name) is None]
    differ = [name for name in settings if name not in unrecorded and saved[name] != settings[name]]
    if differ:
        raise ValueError(
            f"--resume {resume} was trained with {' '.join(flag_text(name, saved[name]) for name in differ)}; this run "
            f"asks for {' '.join(flag_text(name, settings[name]) for name in differ)}: pass the same ones, or start a new "
            "--output-dir without --resume"
        )
    unchecked = [POSITION_FLAGS[name] for name in unrecorded]
    if saved.get("train_rows_sha256") is None:
        unchecked.append("the training rows")
    if not unchecked:
        return None
    return (f"warning: --resume {resume}: its training state (from an older version) does not record "
            f"{', '.join(unchecked)}: they are not checked, so keep them as they were")


def check_resume_rows(resume: str, saved: dict, examples: list[Example]) -> None:
    """Refuse, as a one-line ValueError, to resume on other training rows than the run saved with
    (rows added, removed or changed; another --val-fraction split): its data position would point
    at other rows. A state saved before the rows were recorded is not checked (`check_resume_settings` warns)."""
    if saved.get("train_rows_sha256") is None:
        return
    count, digest = len(examples), rows_sha256(examples)
    if (saved["train_rows"], saved["train_rows_sha256"]) != (count, digest):
        raise ValueError(
            f"--resume {resume} was trained on {saved['train_rows']} rows (token ids sha256 "
            f"{saved['train_rows_sha256'][:12]}); this run has {count} rows (sha256 {digest[:12]}): the training "
            "rows changed; train on the same ones, or start a new --output-dir without --resume"
        )


def metrics_up_to(path: Path, step: int) -> list[str]:
    """The lines of a resumed run's metrics.jsonl up to `step` (the interrupted run's later lines
    are redone). A last line cut short by a crash is dropped; any other damaged line is an error."""
    lines = [line for line in read_lines(path) if line.strip()] if path.is_file() else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            done = json.loads(line)["step"] <= step
        except (ValueError, TypeError, KeyError):
            if number == len(lines):
                break  # appended when the run stopped, after the step it saved
            raise ValueError(
                f"{path}:{number}: not a metrics line (JSON with a step): mend or delete that line to resume"
            ) from None
        if done:
            kept.append(line)
    return kept


def find_resume_dir(path: str) -> Path:
    """`--resume` takes a run folder or its `last/`."""
    for candidate in (Path(path) / "last", Path(path)):
        if (candidate / STATE_JSON).is_file():
            return candidate
    raise ValueError(f"--resume {path}: no {STATE_JSON} there or in {path}/last: not a run folder to continue")
