"""The faults a shared machine or a cluster brings (issue 22): SIGTERM from a scheduler, two runs
on one folder and a lock left by a killed one, a full or read-only disk, the umask, and a resume
with changed settings (the last are rows of test_bad_inputs.py). Live processes get real signals;
the disk faults use a small tmpfs, mounted when the tests run as root (skipped elsewhere)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import analyze
import infer
import train
from soft_prompt.checkpoint import load_checkpoint
from soft_prompt.run_lock import LOCK_NAME, RunLock
from soft_prompt.training_state import read_training_state
from tests.test_bad_inputs import one_line_error, snapshot
from tests.test_infer_cli import checkpoint  # noqa: F401 (a fixture)
from tests.test_train import args, gpt2_dir, losses, prompt  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
LONG = ("--epochs", "20")  # 80 steps: time enough to signal a live run after its first step


def start_train(output_dir: Path, argv: list[str], log: Path, program: list[str] = ["train.py"]) -> subprocess.Popen:
    """`python train.py argv` (or another program) in its own process, stderr into `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *program, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), start_new_session=True)  # fmt: skip


def wait_until(condition, process: subprocess.Popen, what: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def has_logged_a_step(output_dir: Path) -> bool:
    metrics = output_dir / "metrics.jsonl"
    return metrics.is_file() and '"loss"' in metrics.read_text()


@pytest.fixture
def processes():
    """The processes a test starts; any still running at its end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def long_reference(gpt2_dir, demo_rows_file, tmp_path_factory) -> Path:  # noqa: F811
    output_dir = tmp_path_factory.mktemp("long-reference")
    assert train.main(args(gpt2_dir, demo_rows_file, output_dir, *LONG)) == 0
    return output_dir


# -- SIGTERM ---------------------------------------------------------------------------------------


def test_sigterm_saves_last_and_resume_reaches_the_uninterrupted_prompt(long_reference, gpt2_dir, demo_rows_file, tmp_path, processes):  # noqa: F811
    output_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    processes.append(run := start_train(output_dir, args(gpt2_dir, demo_rows_file, output_dir, *LONG), log))
    wait_until(lambda: has_logged_a_step(output_dir), run, "first metrics line", log)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 143
    stderr = log.read_text()
    assert "SIGTERM: stopping after this step, saving last/ (SIGTERM again to abort)" in stderr
    step = json.loads((output_dir / "last" / "training_state.json").read_text())["step"]
    assert 1 <= step < 80
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM) at step {step} of 80: saved {output_dir / 'last'}; continue with the same arguments "
        f"and --resume {output_dir}"
    )

    assert train.main(args(gpt2_dir, demo_rows_file, output_dir, *LONG, "--resume", str(output_dir))) == 0
    assert torch.equal(prompt(output_dir / "last"), prompt(long_reference / "last"))
    assert torch.equal(prompt(output_dir / "best"), prompt(long_reference / "best"))
    resumed, reference = (load_file(run / "last" / "training_state.safetensors") for run in (output_dir, long_reference))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[key], reference[key]) for key in reference)
    assert losses(output_dir) == losses(long_reference)


# Sends SIGTERM twice from inside step 3 (micro-batch 5 of 2 a step), as a scheduler's second signal.
TWICE = """
import os, signal, sys
import train
from soft_prompt import SoftPromptModel

original, calls = SoftPromptModel.loss, []

def loss(self, *args, **kwargs):
    if self.training:
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)

SoftPromptModel.loss = loss
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_sigterm_aborts_at_once(gpt2_dir, demo_rows_file, tmp_path, processes):  # noqa: F811
    output_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    processes.append(run := start_train(output_dir, args(gpt2_dir, demo_rows_file, output_dir), log, ["-c", TWICE]))
    assert run.wait(timeout=300) == -signal.SIGTERM  # killed by the default action, mid-step
    assert "SIGTERM: stopping after this step" in log.read_text()
    assert json.loads((output_dir / "last" / "training_state.json").read_text())["step"] == 2  # --save-every 2


# -- one live run per folder -----------------------------------------------------------------------


def test_a_second_run_on_a_live_runs_folder_is_refused_and_a_killed_runs_lock_blocks_nothing(gpt2_dir, demo_rows_file, tmp_path, processes, capsys):  # noqa: F811
    output_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    argv = args(gpt2_dir, demo_rows_file, output_dir, "--epochs", "500", "--save-every", "1")
    processes.append(run := start_train(output_dir, argv, log))
    wait_until(lambda: (output_dir / "last" / "training_state.json").is_file(), run, "first save", log)

    code, stderr = one_line_error(capsys, lambda: train.main(argv))
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        f"train.py: error: --output-dir {output_dir} is in use by a live run (pid {run.pid}): wait for it to end, "
        "stop it, or choose another --output-dir"
    )

    run.send_signal(signal.SIGKILL)  # nothing of it runs on: its lock file stays, its lock goes with it
    run.wait()
    step = json.loads((output_dir / "last" / "training_state.json").read_text())["step"]
    assert (output_dir / LOCK_NAME).read_text() == f"{run.pid}\n"
    assert train.main(argv[:-4] + ["--max-steps", str(step + 2), "--resume", str(output_dir)]) == 0
    assert json.loads((output_dir / "last" / "training_state.json").read_text())["step"] == step + 2
    assert (output_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_refused_run_changes_nothing_in_the_folder(gpt2_dir, demo_rows_file, tmp_path, capsys):  # noqa: F811
    argv = args(gpt2_dir, demo_rows_file, tmp_path, "--max-steps", "2")
    assert train.main(argv) == 0
    before = snapshot(tmp_path)
    with RunLock.take(tmp_path):  # as another process would hold it (a second open file is a second holder)
        code, stderr = one_line_error(capsys, lambda: train.main(argv + ["--resume", str(tmp_path)]))
    assert code == 2 and f"is in use by a live run (pid {os.getpid()})" in stderr
    assert snapshot(tmp_path) == before


# -- a full or read-only disk ---------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted on a folder for the test, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` but `leave` bytes with a file; returns its path."""
    info = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(bytes(max(0, info.f_bavail * info.f_frsize - leave)))
    return filler


NO_SPACE = "No space left on device (ENOSPC)"


def test_a_full_disk_mid_run_is_one_line_keeps_last_whole_and_resumes_once_there_is_room(gpt2_dir, demo_rows_file, tmp_path, tmpfs, capsys):  # noqa: F811
    constant = ("--scheduler", "constant")
    reference = tmp_path / "reference"
    assert train.main(args(gpt2_dir, demo_rows_file, reference, *constant)) == 0
    output_dir = tmpfs / "run"
    assert train.main(args(gpt2_dir, demo_rows_file, output_dir, *constant, "--max-steps", "4")) == 0

    # Room for the config and the metrics, not for the next checkpoint (about 13 pages).
    filler = fill(tmpfs, leave=8 * 4096)
    resume = args(gpt2_dir, demo_rows_file, output_dir, *constant, "--resume", str(output_dir))
    code, stderr = one_line_error(capsys, lambda: train.main(resume))
    assert code == 2 and "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"train.py: error: cannot write {output_dir}/")
    assert last_line.endswith(f": {NO_SPACE}; {output_dir / 'last'} is whole: once there is room, continue with the "
                              f"same arguments and --resume {output_dir}")
    assert sorted(path.name for path in output_dir.glob(".*")) == [LOCK_NAME]  # no staging folder left
    state, _ = read_training_state(output_dir / "last")
    _, metadata = load_checkpoint(output_dir / "last", AutoModelForCausalLM.from_pretrained(gpt2_dir))
    assert state["step"] == metadata["step"] == 4

    filler.unlink()
    assert train.main(resume) == 0
    assert torch.equal(prompt(output_dir / "last"), prompt(reference / "last"))


def test_a_new_run_on_a_tiny_disk_is_one_line(gpt2_dir, demo_rows_file, tmpfs, capsys):  # noqa: F811
    fill(tmpfs, leave=12 * 4096)
    code, stderr = one_line_error(capsys, lambda: train.main(args(gpt2_dir, demo_rows_file, tmpfs / "run")))
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"train.py: error: cannot write {tmpfs / 'run'}")
    assert NO_SPACE in stderr.strip().splitlines()[-1]


def infer_output(bloom_dir, checkpoint, path):  # noqa: F811
    return ["--model", bloom_dir, "--checkpoint", checkpoint, "--input", "the cat", "--max-new-tokens", "2", "--output", str(path)]


def infer_metrics(bloom_dir, checkpoint, path):  # noqa: F811
    rows = path.parent.parent / "rows.jsonl"
    rows.write_text(json.dumps({"text": "the cat", "label_text": "hate speech"}) + "\n")
    return ["--model", bloom_dir, "--checkpoint", checkpoint, "--eval", str(rows), "--metrics", str(path)]


def analyze_json(bloom_dir, checkpoint, path):  # noqa: F811
    return [checkpoint, "--model", bloom_dir, "--top-k", "2", "--json", str(path)]


def analyze_plot(bloom_dir, checkpoint, path):  # noqa: F811
    return [checkpoint, "--model", bloom_dir, "--top-k", "2", "--plot", str(path)]


WRITERS = [(infer, infer_output, "out.jsonl"), (infer, infer_metrics, "metrics.json"),
           (analyze, analyze_json, "figures.json"), (analyze, analyze_plot, "plots")]  # fmt: skip


@pytest.mark.parametrize("script, argv, name", WRITERS, ids=["infer-output", "infer-metrics", "analyze-json", "analyze-plot"])
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_infer_and_analyze_writes_that_fail_are_one_line(script, argv, name, fault, bloom_dir, checkpoint, tmpfs, capsys):  # noqa: F811
    if fault == "full":
        fill(tmpfs)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    path = tmpfs / name
    code, stderr = one_line_error(capsys, lambda: script.main(argv(bloom_dir, checkpoint, path)))
    assert code == 2 and "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    if fault == "full":  # found when writing
        assert last_line.startswith(f"error: cannot write {path}") and last_line.endswith(NO_SPACE)
    else:  # found before any work where the script checks its output folders first
        assert last_line.startswith("error: ") and str(path) in last_line
        assert last_line.endswith((f"{tmpfs} is on a read-only file system", "Read-only file system (EROFS)"))


# -- modes under the umask -------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process's umask for a test, and restore it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.rglob("*")]}


def expected_modes(folder: Path, mask: int) -> dict[str, int]:
    """What open() and mkdir() would give every file and folder there under `mask`."""
    return {name: (0o777 if (folder / name).is_dir() else 0o666) & ~mask for name in modes(folder)}


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_a_run_folder_follows_the_umask(mask, gpt2_dir, demo_rows_file, tmp_path, umask):  # noqa: F811
    umask(mask)
    output_dir = tmp_path / "run"
    assert train.main(args(gpt2_dir, demo_rows_file, output_dir, "--max-steps", "3")) == 0
    found = modes(output_dir)
    assert {"last", "best", "last/adapter_model.safetensors", "last/training_state.json", "metrics.jsonl",
            "train_config.json", LOCK_NAME} <= found.keys()  # fmt: skip
    assert found == expected_modes(output_dir, mask)


def test_infer_and_analyze_outputs_follow_the_umask(bloom_dir, checkpoint, tmp_path, umask):  # noqa: F811
    umask(0o007)
    out = tmp_path / "out"
    assert infer.main(infer_output(bloom_dir, checkpoint, out / "infer" / "out.jsonl")) == 0
    assert infer.main(infer_metrics(bloom_dir, checkpoint, out / "infer" / "metrics.json")) == 0
    assert analyze.main(analyze_json(bloom_dir, checkpoint, out / "analysis" / "figures.json")) == 0
    assert analyze.main(analyze_plot(bloom_dir, checkpoint, out / "analysis" / "plots")) == 0
    found = modes(out)
    assert {"infer/out.jsonl", "infer/metrics.json", "analysis/figures.json", "analysis/plots/norms.png"} <= found.keys()
    assert found == expected_modes(out, 0o007)
