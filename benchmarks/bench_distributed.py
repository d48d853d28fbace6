"""Step time of the shipped loop on 1 process against N under torchrun (data parallel and --fsdp),
and the cost of combining the prompt's gradient: our one all-reduce against DDP's.

    python benchmarks/bench_distributed.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --data ../shared/data/ethos_binary_train.jsonl --rows 96
    python benchmarks/bench_distributed.py --model DIR --data FILE --device cuda --ranks 8 --precision bf16

Each configuration is a fresh `torchrun --standalone` launch running `soft_prompt.training.train`
(this script with --worker) on the first `--rows` rows, the same flags and the same global batch;
rank 0 writes its summary. On the CPU the ranks split the machine's cores (`OMP_NUM_THREADS` =
cores / ranks), so the comparison is N processes against 1 process with all the threads; on CUDA
each rank has its own GPU. Results go to benchmarks/results/distributed-<model>-<device>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.files import portable_path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def time_it(function, repeats: int, device: torch.device) -> float:
    """Median seconds of `function()` over `repeats` calls, after 5 warm-up calls."""
    for _ in range(5):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gradient_sum_costs(num_virtual_tokens: int, embed_dim: int, device: torch.device, repeats: int = 200) -> dict:
    """Microseconds per step to combine a [V, D] gradient over the ranks: `train_step`'s one
    all-reduce (gradient and loss in one buffer) against DDP's bucketed all-reduce after the same
    backward, each minus the backward alone."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Prompt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(num_virtual_tokens, embed_dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.weight * x).sum()

    prompt, x = Prompt().to(device), torch.randn(num_virtual_tokens, embed_dim, device=device)
    ddp = DistributedDataParallel(Prompt().to(device), device_ids=[device] if device.type == "cuda" else None)

    def backward_alone() -> None:
        prompt.weight.grad = None
        prompt(x).backward()

    def backward_and_all_reduce() -> None:
        backward_alone()
        dist.all_reduce(torch.cat([prompt.weight.grad.flatten(), torch.zeros(1, device=device)]))

    def ddp_backward() -> None:
        ddp.module.weight.grad = None
        ddp(x).backward()

    alone = time_it(backward_alone, repeats, device)
    return {
        "all_reduce_us": (time_it(backward_and_all_reduce, repeats, device) - alone) * 1e6,
        "ddp_us": (time_it(ddp_backward, repeats, device) - alone) * 1e6,
        "gradient_kib": num_virtual_tokens * embed_dim * 4 / 1024,
    }


def worker(summary_path: str, train_args: list[str]) -> None:
    """Under torchrun: train, then (several ranks) time the gradient sum; rank 0 writes the summary."""
    from soft_prompt.config import parse_args, resolve_config
    from soft_prompt.distributed import close_world
    from soft_prompt.training import train

    config = resolve_config(parse_args(train_args))
    summary = train(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        import transformers

        embed_dim = transformers.AutoConfig.from_pretrained(config.model.model).hidden_size
        device = torch.device(config.model.device, int(os.environ.get("LOCAL_RANK", "0")) if config.model.device == "cuda" else None)
        summary["gradient_sum"] = gradient_sum_costs(config.prompt.num_virtual_tokens, embed_dim, device)
    if os.environ.get("RANK", "0") == "0":
        Path(summary_path).write_text(json.dumps({**summary, "world_size": world_size}))
    close_world()


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # under torchrun: --worker SUMMARY, then train.py's flags
        return worker(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local causal-LM folder")
    parser.add_argument("--data", required=True, help="ETHOS-shaped .jsonl (text, label_text)")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast and frozen-weight dtype")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="processes of the several-rank runs")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration, interleaved")
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    configurations = [  # (name, processes, threads per process, extra train.py flags)
        ("1 process", 1, cores, []), (f"{args.ranks} ranks, data parallel", args.ranks, cores // args.ranks, []),
        (f"{args.ranks} ranks, --fsdp", args.ranks, cores // args.ranks, ["--fsdp"]),
    ]  # fmt: skip
    if args.device == "cpu" and cores > 1:  # the same threads per process as the ranks have
        configurations.insert(1, ("1 process, 1 thread", 1, 1, []))
    results: dict[str, list[dict]] = {name: [] for name, *_ in configurations}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rows = Path(args.data).read_text().splitlines()[: args.rows]
        (scratch / "rows.jsonl").write_text("\n".join(rows) + "\n")
        # Rounds interleave the configurations, so that a change in the machine's load shows as spread.
        for run_index, (name, processes, threads, extra) in enumerate(configurations * args.rounds):
            train_args = [
                "--model", args.model, "--data", str(scratch / "rows.jsonl"), "--template", HATE_TEMPLATE,
                "--batch-size", str(args.batch_size), "--epochs", "1", "--max-length", str(args.max_length),
                "--num-virtual-tokens", str(args.num_virtual_tokens), "--max-batch-tokens", str(args.max_batch_tokens),
                "--group-by-length", "--save-every", "0", "--seed", "0", "--device", args.device,
                "--precision", args.precision, "--model-dtype", args.precision,
                "--output-dir", str(scratch / f"run-{run_index}"), *extra,
            ]  # fmt: skip
            summary_path = scratch / f"summary-{run_index}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads)), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       __file__, "--worker", str(summary_path), *train_args]  # fmt: skip
            subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            summary = json.loads(summary_path.read_text())
            summary["threads_per_rank"] = max(1, threads)
            summary["seconds_per_step"] = summary["train_seconds"] / summary["steps"]
            summary["load_average"] = os.getloadavg()[0]
            results[name].append(summary)
            print(f"{name}: {summary['seconds_per_step']:.2f} s/step, {summary['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    # absolute paths are printed relative to the checkout, so the recorded command runs on another machine
    argv = [portable_path(a) for a in sys.argv[1:]]
    write_report(args, results, " ".join(["python", "benchmarks/bench_distributed.py", *argv]))


def write_report(args, results: dict[str, list[dict]], command: str) -> None:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = f"distributed-{Path(args.model).name}-{args.device}"
    if args.device == "cuda":
        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}; torch {torch.__version__}, nccl"
    else:
        loads = [run["load_average"] for runs in results.values() for run in runs]
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU; torch {torch.__version__}, gloo; "
                   f"1-minute load average after each run {min(loads):.1f} to {max(loads):.1f}")  # fmt: skip
    median = {config: statistics.median(run["seconds_per_step"] for run in runs) for config, runs in results.items()}
    lines = [
        f"# Training on several processes: step time ({Path(args.model).name}, {args.device})",
        "",
        f"`{command}`",
        "",
        f"Machine: {machine}. One epoch over {args.rows} rows, global batch {args.batch_size}, max length "
        f"{args.max_length}, V = {args.num_virtual_tokens}, --max-batch-tokens {args.max_batch_tokens}, {args.precision}; "
        f"{args.rounds} rounds, the configurations interleaved; the median s/step, then each round's. "
        + ("On the CPU the ranks share the cores. " if args.device == "cpu" else "")
        + "Time is the loop's alone (no loading).",
        "",
        "| configuration | ranks x threads | s/step (median) | each round | time / 1 process | final train loss | peak memory, rank 0 (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    first = next(iter(results))
    for config, runs in results.items():
        threads = runs[0]["threads_per_rank"] if args.device == "cpu" else "GPU"
        rounds = ", ".join(f"{run['seconds_per_step']:.2f}" for run in runs)
        lines.append(
            f"| {config} | {runs[0]['world_size']} x {threads} | {median[config]:.2f} | {rounds} | "
            f"{median[config] / median[first]:.2f} | {runs[0]['train_loss']:.4f} | {max(run['peak_memory_mib'] for run in runs):.0f} |"
        )
    costs = [run["gradient_sum"] for run in results[f"{args.ranks} ranks, data parallel"]]
    all_reduce = ", ".join(f"{cost['all_reduce_us']:.0f}" for cost in costs)
    ddp = ", ".join(f"{cost['ddp_us']:.0f}" for cost in costs)
    lines += [
        "",
        f"Combining the prompt's gradient ({costs[0]['gradient_kib']:.0f} KiB) over {args.ranks} ranks, per step "
        f"(median of 200 after the same backward, minus the backward alone; each round): one all-reduce "
        f"{all_reduce} us, DDP {ddp} us.",
    ]
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (output_dir / f"{name}.json").write_text(json.dumps({"command": command, "machine": machine, "results": results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
