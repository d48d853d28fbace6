"""torchrun on the CPU (gloo): 2 ranks train the prompt 1 process trains, in data-parallel and in
--fsdp mode, on the shared-prefix path and on the plain one; a run resumes on another number of ranks; a killed rank ends the run; SIGTERM to
torchrun stops every rank after the same step and rank 0 saves.

The 2-rank runs share one torchrun launch (this file run as a script trains each argument list in
turn), since starting 2 Python processes with torch costs more than the tiny runs themselves."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from soft_prompt import SoftPromptModel
from soft_prompt.checkpoint import load_checkpoint
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.tiny import demo_rows, save_tiny_model
from tests.test_train import losses, prompt

ROOT = Path(__file__).resolve().parent.parent
INIT_TEXT = "hate speech or not"
ARCHITECTURES = ("bloom", "llama")  # BLOOM ties its LM head to the input embedding, Llama does not
MODES = ("data", "fsdp")


def torchrun(*argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv]


def rank_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def args(model_dir: str, data: str, output_dir, *extra: str) -> list[str]:
    # 29 train rows in batches of 4, 2 batches a step: the last batch has 1 row, so rank 1 has none
    # of it; micro-batches of at most 40 tokens, so the ranks cut their shares into different counts.
    return [
        "--model", model_dir, "--data", data, "--template", HATE_TEMPLATE, "--output-dir", str(output_dir),
        "--batch-size", "4", "--grad-accum", "2", "--epochs", "2", "--val-fraction", "0.25", "--seed", "1",
        "--save-every", "2", "--eval-every", "3", "--warmup-steps", "2", "--group-by-length",
        "--max-batch-tokens", "40", "--num-virtual-tokens", "4", "--init", "text", "--init-text", INIT_TEXT,
        "--device", "cpu", *extra,
    ]  # fmt: skip


def assert_same_training(output_dir, reference_dir, initial: torch.Tensor) -> None:
    """Losses to 1e-6 relative; the final prompt to 1e-5 of how far training moved it."""
    torch.testing.assert_close(losses(output_dir), losses(reference_dir), rtol=1e-6, atol=0)
    final, reference = prompt(Path(output_dir) / "last"), prompt(Path(reference_dir) / "last")
    update = (reference - initial).abs().max()
    assert update > 0.01
    assert (final - reference).abs().max() <= 1e-5 * update
    torch.testing.assert_close(prompt(Path(output_dir) / "best"), prompt(Path(reference_dir) / "best"), rtol=0, atol=1e-5 * update)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(39)))
    models = {name: save_tiny_model(root / name, name, initializer_range=0.3) for name in ARCHITECTURES}
    return {"root": root, "data": str(data), "models": models}


@pytest.fixture(scope="module")
def two_rank_runs(setup) -> dict:
    """One torchrun launch, 2 ranks: every architecture in every mode, and the first 3 steps of a
    run to resume on 1 process."""
    root, data, models = setup["root"], setup["data"], setup["models"]
    runs = {}
    for name in ARCHITECTURES:
        for mode in MODES:
            runs[name, mode] = args(models[name], data, root / f"{name}-{mode}-2", *(["--fsdp"] if mode == "fsdp" else []))
        runs[name, "plain"] = args(models[name], data, root / f"{name}-plain-2", "--no-shared-prefix")
    runs["first-3-steps"] = args(models["bloom"], data, root / "resumed", "--max-steps", "3", "--scheduler", "constant")
    result = subprocess.run(torchrun(__file__, json.dumps(list(runs.values()))), cwd=ROOT, env=rank_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {key: Path(argv[argv.index("--output-dir") + 1]) for key, argv in runs.items()}


def initial_prompt(model_dir: str) -> torch.Tensor:
    base, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return SoftPromptModel(base, num_virtual_tokens=4, init="text", init_text=INIT_TEXT, tokenizer=tokenizer).prompt.weight.detach()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_two_ranks_train_the_prompt_one_process_trains(name, setup, two_rank_runs):
    reference = setup["root"] / f"{name}-1"
    assert train.main(args(setup["models"][name], setup["data"], reference)) == 0
    initial = initial_prompt(setup["models"][name])
    for mode in MODES:
        output_dir = two_rank_runs[name, mode]
        assert_same_training(output_dir, reference, initial)
        config = json.loads((output_dir / "train_config.json").read_text())
        assert (config["world_size"], config["parallelism"], config["model"]["fsdp"]) == (2, mode, mode == "fsdp")
        logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in logged if "loss" in line] == list(range(1, 9))  # rank 0 alone writes
        assert config["automatic"]["loss_path"] == "shared prefix"  # the default path, sharded or not
    assert json.loads((reference / "train_config.json").read_text())["parallelism"] == "none"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_two_ranks_train_what_one_process_trains_on_the_plain_path_too(name, setup, two_rank_runs):
    reference = setup["root"] / f"{name}-plain-1"
    assert train.main(args(setup["models"][name], setup["data"], reference, "--no-shared-prefix")) == 0
    output_dir = two_rank_runs[name, "plain"]
    assert_same_training(output_dir, reference, initial_prompt(setup["models"][name]))
    for run in (output_dir, reference):
        assert json.loads((run / "train_config.json").read_text())["automatic"]["loss_path"] == "plain (--no-shared-prefix)"


def test_a_two_rank_run_resumes_on_one_process(setup, two_rank_runs):
    """Global data position: 3 steps on 2 ranks, then 3 more on 1 process, equal 6 on 1 process."""
    model_dir, data = setup["models"]["bloom"], setup["data"]
    reference = setup["root"] / "six-steps-1"
    assert train.main(args(model_dir, data, reference, "--max-steps", "6", "--scheduler", "constant")) == 0
    resumed = two_rank_runs["first-3-steps"]
    assert json.loads((resumed / "last" / "training_state.json").read_text())["step"] == 3
    extra = ("--max-steps", "6", "--scheduler", "constant", "--resume", str(resumed))
    assert train.main(args(model_dir, data, resumed, *extra)) == 0
    assert_same_training(resumed, reference, initial_prompt(model_dir))


def test_fsdp_without_torchrun_is_bad_input(setup, tmp_path, capsys):
    assert train.main(args(setup["models"]["bloom"], setup["data"], tmp_path, "--fsdp")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "train.py: error: --fsdp shards the frozen model across torchrun's processes"
    )


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=`rank` (Linux /proc), None until it has started."""
    for children in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process in /proc (Linux)")
def test_a_killed_rank_ends_the_run_and_last_stays_loadable(setup, tmp_path):
    output_dir = tmp_path / "run"
    argv = args(setup["models"]["bloom"], setup["data"], output_dir, "--epochs", "500", "--save-every", "1")
    launcher = subprocess.Popen(torchrun("train.py", *argv), cwd=ROOT, env=rank_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (output_dir / "last" / "training_state.json").is_file():
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        os.kill(rank_pid(launcher, 1), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:  # torchrun and its ranks
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 60
    assert "exitcode  : -9" in stderr or "Signal 9" in stderr, stderr[-2000:]
    state = json.loads((output_dir / "last" / "training_state.json").read_text())
    weight, metadata = load_checkpoint(output_dir / "last", AutoModelForCausalLM.from_pretrained(setup["models"]["bloom"]))
    assert metadata["step"] == state["step"] >= 1 and torch.isfinite(weight).all()


def test_sigterm_to_torchrun_stops_the_ranks_after_one_step_and_the_run_resumes_on_one_process(setup, tmp_path):
    model_dir, data = setup["models"]["bloom"], setup["data"]
    output_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    argv = args(model_dir, data, output_dir, "--epochs", "6")  # 24 steps
    launcher = subprocess.Popen(torchrun("train.py", *argv), cwd=ROOT, env=rank_env(), stdout=subprocess.DEVNULL,
                                stderr=log.open("w"), start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not ((output_dir / "metrics.jsonl").is_file() and '"loss"' in (output_dir / "metrics.jsonl").read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)  # as a scheduler does; torchrun sends it on to the ranks
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:  # torchrun and its ranks
            os.killpg(launcher.pid, signal.SIGKILL)
    step = json.loads((output_dir / "last" / "training_state.json").read_text())["step"]
    assert 1 <= step < 24
    assert f"interrupted (SIGTERM) at step {step} of 24: saved {output_dir / 'last'}" in log.read_text()

    reference = tmp_path / "reference"
    assert train.main(args(model_dir, data, reference, "--epochs", "6")) == 0
    assert train.main(argv + ["--resume", str(output_dir)]) == 0
    assert_same_training(output_dir, reference, initial_prompt(model_dir))


if __name__ == "__main__":  # under torchrun, from `two_rank_runs`: train each argument list in turn
    from soft_prompt.distributed import close_world

    codes = [train.main(argv) for argv in json.loads(sys.argv[1])]
    close_world()
    sys.exit(max(codes))
