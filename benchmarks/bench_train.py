"""Training speed and memory: ours against PEFT + HF Trainer (as the tutorial runs it) and PEFT in
a plain loop, on the same model, rows, batch size, lr, epochs, virtual tokens and precision.

    python benchmarks/bench_train.py --model DIR --data FILE.jsonl [--rows 160] [--precision fp32] [--seeds 0 1 2]

Each side runs in a fresh process (so peak memory is its own) and prints one JSON line; this
script then prints the table with ratios ours/peer and writes benchmarks/results/train-*.md/.json.
Without --model it builds a tiny BLOOM (seconds; what the test runs).
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
import threading
import time
from pathlib import Path

import torch

from soft_prompt.config import TASKS

RESULTS = Path(__file__).parent / "results"
HATE_TEMPLATE = TASKS["hate"]["template"]
PROMPTS_TEMPLATE = TASKS["prompts"]["template"]
SIDES = ("ours", "ours-micro-batches", "ours-checkpointed", "peft-trainer", "peft-loop")


class PeakMemory:
    """Peak memory while the block runs (`peak`) and its rise above the start (`extra`, what the
    training itself needs beyond the loaded model): CUDA max allocated, or RSS sampled every 5 ms."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process, self.running = psutil.Process(), True
        self.start = self.peak = self.process.memory_info().rss

        def sample():
            while self.running:
                self.peak = max(self.peak, self.process.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.extra = self.peak - self.start


def load_rows(path: str | None, num_rows: int) -> tuple[list[dict], str]:
    if path is None:
        from soft_prompt.tiny import demo_rows

        return demo_rows(num_rows), HATE_TEMPLATE
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()][:num_rows]
    return rows, HATE_TEMPLATE if "text" in rows[0] else PROMPTS_TEMPLATE


def tokenised_rows(tokenizer, rows: list[dict], template: str, max_length: int) -> list[list[int]]:
    """The tutorial's preprocessing: the filled template, tokenised, truncated (eos appended)."""
    from soft_prompt.data import fill_template

    ids = [tokenizer(fill_template(template, row), truncation=True, max_length=max_length - 1)["input_ids"] for row in rows]
    return [row_ids + [tokenizer.eos_token_id] for row_ids in ids]


def run_peft(args, model, tokenizer, token_rows, use_trainer: bool) -> dict:
    """PEFT's prompt tuning, trained by HF Trainer with the tutorial's collator, or by a plain loop."""
    from datasets import Dataset
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, get_linear_schedule_with_warmup

    torch.manual_seed(args.seed)
    peft_model = get_peft_model(
        model,
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.RANDOM, num_virtual_tokens=args.num_virtual_tokens),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if use_trainer:
        training_args = TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
            num_train_epochs=args.epochs, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
            bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
        )
        dataset = Dataset.from_dict({"input_ids": token_rows})
        trainer = Trainer(model=peft_model, args=training_args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        return {"prompt": peft_model.prompt_encoder["default"].embedding.weight.detach().cpu()}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peft_model.to(device).train()
    loader = torch.utils.data.DataLoader(
        [{"input_ids": ids} for ids in token_rows], batch_size=args.batch_size, shuffle=True,
        collate_fn=collator, generator=torch.Generator().manual_seed(args.seed),
    )
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, args.epochs * len(loader))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    scaler = torch.amp.GradScaler(device, enabled=args.precision == "fp16")
    for _ in range(args.epochs):
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.autocast(device, dtype=dtype, enabled=args.precision != "fp32"):
                loss = peft_model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    return {"prompt": peft_model.prompt_encoder["default"].embedding.weight.detach().cpu()}


def run_ours(args, model_dir: str, rows: list[dict], template: str) -> dict:
    """The shipped loop (`soft_prompt.training.train`) with length-grouped batches; the
    `ours-checkpointed` side adds gradient checkpointing (activation memory for time)."""
    from safetensors.torch import load_file

    from soft_prompt.config import resolve_config
    from soft_prompt.training import train

    data_file = Path(tempfile.mkdtemp()) / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = resolve_config({
        "model": model_dir, "data": str(data_file), "template": template, "init": "random",
        "num_virtual_tokens": args.num_virtual_tokens, "lr": args.lr, "batch_size": args.batch_size,
        "epochs": args.epochs, "max_length": args.max_length, "precision": args.precision,
        "model_dtype": args.precision if args.ours_model_dtype else "fp32", "group_by_length": True,
        "gradient_checkpointing": args.side == "ours-checkpointed",
        "max_batch_tokens": args.max_batch_tokens if args.side == "ours-micro-batches" else 0,
        "seed": args.seed, "save_every": 0, "output_dir": tempfile.mkdtemp(), "label_words": [],
    })
    train(config)
    return {"prompt": load_file(Path(config.run.output_dir) / "last" / "adapter_model.safetensors")["prompt_embeddings"]}


@torch.no_grad()
def final_loss(model_dir: str, prompt: torch.Tensor, tokenizer, token_rows: list[list[int]], batch_size: int) -> float:
    """The trained prompt's loss per token over all the training rows, the same way for every side
    (the frozen model's own loss, fp32, eval mode): what each side's training reached."""
    from soft_prompt import SoftPromptModel
    from soft_prompt.model import load_base_model
    from soft_prompt.training import Example, collate

    model = SoftPromptModel(load_base_model(model_dir)[0], num_virtual_tokens=prompt.shape[0], seed=0)
    model.prompt.weight.copy_(prompt)
    total, count = 0.0, 0
    for start in range(0, len(token_rows), batch_size):
        batch = collate([Example(ids, ids) for ids in token_rows[start : start + batch_size]], tokenizer.pad_token_id)
        tokens = int((batch["labels"] != -100).sum())
        total += model(**batch).loss.item() * tokens
        count += tokens
    return total / count


def run_side(args) -> dict:
    """One side, timed and measured from before the model is loaded to the end of training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model or build_tiny_model()
    rows, template = load_rows(args.data, args.rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    token_rows = tokenised_rows(tokenizer, rows, template, args.max_length)
    with PeakMemory() as memory:
        start = time.perf_counter()
        if args.side.startswith("ours"):
            result = run_ours(args, model_dir, rows, template)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            result = run_peft(args, model, tokenizer, token_rows, use_trainer=args.side == "peft-trainer")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {
        "side": args.side,
        "seconds_per_epoch": seconds / args.epochs,
        "tokens_per_second": args.epochs * sum(len(ids) for ids in token_rows) / seconds,
        "peak_memory_mib": memory.peak / 2**20,
        "training_memory_mib": memory.extra / 2**20,
        "final_train_loss": final_loss(model_dir, result["prompt"], tokenizer, token_rows, args.batch_size),
    }


def build_tiny_model() -> str:
    from soft_prompt.tiny import save_tiny_model

    return save_tiny_model(tempfile.mkdtemp(), "bloom")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local causal-LM folder (default: a tiny BLOOM built here)")
    parser.add_argument("--data", help="ethos- or prompts-shaped .jsonl (default: generated rows)")
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run every side once per seed (prompt init and batch order); the report takes the "
                             "median time, the highest peak memory and the mean loss")
    parser.add_argument("--max-batch-tokens", type=int, default=512,
                        help="the ours-micro-batches side splits batches over this many padded tokens (same gradient)")
    parser.add_argument("--ours-model-dtype", action="store_true",
                        help="ours stores the frozen weights in --precision (bf16/fp16) instead of fp32 under autocast")
    parser.add_argument("--side", choices=SIDES, help="run one side and print its JSON (used internally)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of one --side run (used internally)")
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for seed in args.seeds:
        for side in SIDES:
            command = [sys.executable, __file__, "--side", side, "--seed", str(seed)] + sys.argv[1:]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(output.strip().splitlines()[-1]))
            print(f"{side} seed {seed}: {runs[side][-1]}", file=sys.stderr)
    write_report(args, runs, " ".join(["python", "benchmarks/bench_train.py"] + sys.argv[1:]))


def summarise(side_runs: list[dict]) -> dict:
    """One side over its seeds: median time and tokens/s, highest memory, mean and spread of the loss."""
    losses = [run["final_train_loss"] for run in side_runs]
    return {
        "seconds_per_epoch": statistics.median(run["seconds_per_epoch"] for run in side_runs),
        "tokens_per_second": statistics.median(run["tokens_per_second"] for run in side_runs),
        "peak_memory_mib": max(run["peak_memory_mib"] for run in side_runs),
        "training_memory_mib": max(run["training_memory_mib"] for run in side_runs),
        "final_train_loss": statistics.fmean(losses),
        "final_train_loss_stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "runs": side_runs,
    }


def write_report(args, runs: dict[str, list[dict]], command: str) -> None:
    """The figures per side, then each of our sides against each PEFT side (ratio < 1: ours less)."""
    results = {side: summarise(side_runs) for side, side_runs in runs.items()}
    name = f"train-{Path(args.model).name if args.model else 'tiny-bloom'}-{args.precision}"
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"# Training: ours vs PEFT ({name[len('train-'):]})",
        "",
        f"`{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}; "
        f"{versions()}. Every side ran once per seed ({seeds}; the seed sets the prompt's init, the same on "
        "every side, and the batch order). Time and memory run from before the model is loaded to the end of "
        "training: the median time over the seeds, the highest memory (CUDA max allocated, or the process's "
        "peak RSS on CPU). The loss is each side's trained prompt scored the same way on all the rows (the "
        "frozen model's own loss, fp32), averaged over the seeds (± the standard deviation). "
        f"`ours-micro-batches` is `ours` with `--max-batch-tokens {args.max_batch_tokens}`.",
        "",
        "| side | s/epoch | tokens/s | peak memory (MiB) | rise above start (MiB) | loss after training |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side, figures in results.items():
        lines.append(
            f"| {side} | {figures['seconds_per_epoch']:.2f} | {figures['tokens_per_second']:.0f} | "
            f"{figures['peak_memory_mib']:.0f} | {figures['training_memory_mib']:.0f} | "
            f"{figures['final_train_loss']:.4f} ± {figures['final_train_loss_stdev']:.4f} |"
        )
    lines += ["", "| ours / peer | time | peak memory | rise above start | loss |", "| --- | --- | --- | --- | --- |"]
    for ours in (side for side in results if side.startswith("ours")):
        for peer in (side for side in results if side.startswith("peft")):
            a, b = results[ours], results[peer]
            lines.append(
                f"| {ours} / {peer} | {a['seconds_per_epoch'] / b['seconds_per_epoch']:.2f} | "
                f"{a['peak_memory_mib'] / b['peak_memory_mib']:.2f} | "
                f"{a['training_memory_mib'] / b['training_memory_mib']:.2f} | "
                f"{a['final_train_loss'] / b['final_train_loss']:.3f} |"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(report)
    (output_dir / f"{name}.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")


def versions() -> str:
    import peft
    import transformers

    return f"transformers {transformers.__version__}, peft {peft.__version__}"


if __name__ == "__main__":
    main()
