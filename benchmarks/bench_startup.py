"""Startup: the seconds `train.py` spends before its first training step, phase by phase.

    python benchmarks/bench_startup.py --model DIR --data FILE.jsonl [--repeats 3] [--checkouts OLD .]

Each run is a fresh process (cold imports, warm disk cache) that trains with the given flags and
stops at the first step's forward. Phases: python and the imports, reading the rows, loading the
tokenizer and model, tokenising, and the rest up to the step (prompt, optimizer, folders), each in
wall seconds and in the process's CPU seconds (steadier on a shared machine). `--checkouts`
times each checkout's own code the same way (e.g. main against this branch); the report gives the
median of each phase and writes benchmarks/results/startup-<model>-<precision>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.files import portable_path

RESULTS = Path(__file__).parent / "results"
PHASES = {"load_data_rows": "read rows", "load_base_model": "load tokenizer and model", "tokenize_data": "tokenise"}

# Run inside the timed process: wrap the phases of train() and stop at the first training forward.
CHILD = """
import json, sys, time
spawned = float(sys.argv[1])
started = time.time()
import soft_prompt.training as training
# where setup's phases live: training_setup.py; training.py in older checkouts (the oldest have no setup)
setup_module = sys.modules[training.setup.__module__] if hasattr(training, "setup") else training
from soft_prompt.config import parse_args, resolve_config
from soft_prompt.model import SoftPromptModel
seconds = {"python and imports": time.time() - spawned}
cpu_seconds = {"python and imports": time.process_time()}  # the process's CPU time, all threads, since its start
for name, label in PHASES.items():
    def timed(*args, _run=getattr(setup_module, name), _label=label, **kwargs):
        begun, cpu_begun = time.time(), time.process_time()
        try:
            return _run(*args, **kwargs)
        finally:
            seconds[_label], cpu_seconds[_label] = time.time() - begun, time.process_time() - cpu_begun
    setattr(setup_module, name, timed)
class FirstStep(Exception):
    pass
def first_step(self, *args, **kwargs):
    raise FirstStep
SoftPromptModel.loss = first_step
if hasattr(setup_module, "shared_prefix_loss"):  # the one-pass loss, the default path since it exists
    setup_module.shared_prefix_loss = first_step
try:
    training.train(resolve_config(parse_args(sys.argv[2:])))
except FirstStep:
    seconds["to the first step"], cpu_seconds["to the first step"] = time.time() - spawned, time.process_time()
for times in (seconds, cpu_seconds):
    phases = sum(value for label, value in times.items() if label != "to the first step")
    times["other setup"] = times["to the first step"] - phases
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "datasets imported": "datasets" in sys.modules}))
"""


def time_startup(checkout: Path, train_args: list[str]) -> dict:
    """One fresh process of `checkout`'s code, timed from its spawn."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = f"PHASES = {PHASES!r}\n{CHILD}"
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-c", code, str(time.time()), *train_args, "--output-dir", output_dir]
        result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the timed process of {checkout} exited with {result.returncode}: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local causal-LM folder")
    parser.add_argument("--data", required=True, help="ETHOS-shaped .jsonl (text, label_text)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per checkout (the median is reported)")
    parser.add_argument("--checkouts", nargs="+", default=["."], help="checkouts whose code to time (default: this one)")
    parser.add_argument("--note", help="a sentence added to the report, e.g. how loaded the machine was")
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()
    train_args = ["--model", args.model, "--data", args.data, "--template", HATE_TEMPLATE, "--precision", args.precision]

    runs: dict[str, list[dict]] = {checkout: [] for checkout in args.checkouts}
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits every checkout
        for checkout in args.checkouts:
            runs[checkout].append(time_startup(Path(checkout).resolve(), train_args))
            print(f"{checkout}: {runs[checkout][-1]}", file=sys.stderr)

    phases = ["python and imports", *PHASES.values(), "other setup", "to the first step"]
    # absolute paths (model, data, checkouts) are printed relative to this checkout, so the report names no machine
    shown = {a: portable_path(a) for a in sys.argv[1:]}
    command = " ".join(["python", "benchmarks/bench_startup.py"] + [shlex.quote(a) for a in shown.values()])  # --note has spaces
    lines = [
        f"# Startup: seconds before the first training step ({Path(args.model).name})", "", f"`{command}`", "",
        f"{os.cpu_count()} CPUs. Median over {args.repeats} fresh processes per checkout, run interleaved; "
        f"train.py given the model, the data, the template and --precision {args.precision}. Wall seconds, "
        "then the process's CPU seconds (all threads) in brackets." + (f" {args.note}" if args.note else ""),
        "", "| checkout | " + " | ".join(phases) + " | imports `datasets` |", "|" + " --- |" * (len(phases) + 2),
    ]
    for checkout, checkout_runs in runs.items():
        cells = [
            f"{statistics.median(run['seconds'][phase] for run in checkout_runs):.2f} "
            f"({statistics.median(run['cpu_seconds'][phase] for run in checkout_runs):.2f})"
            for phase in phases
        ]
        imports = "yes" if any(run["datasets imported"] for run in checkout_runs) else "no"
        lines.append(f"| {shown.get(checkout, checkout)} | " + " | ".join(cells) + f" | {imports} |")
    report = "\n".join(lines) + "\n"
    print(report)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"startup-{Path(args.model).name}-{args.precision}"
    (output_dir / f"{name}.md").write_text(report)
    (output_dir / f"{name}.json").write_text(json.dumps({"command": command, "runs": {shown.get(c, c): r for c, r in runs.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
