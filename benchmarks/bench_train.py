"""Training speed and memory: ours against PEFT + HF Trainer (as the tutorial runs it) and PEFT in
a plain loop, on the same model, rows, batch size, lr, epochs, virtual tokens and precision.

    python benchmarks/bench_train.py --model DIR --data FILE.jsonl [--rows 160] [--seeds 0 1 2]
    python benchmarks/bench_train.py --arch bloomz-560m --tokenizer DIR --data FILE.jsonl --rows 48
    python benchmarks/bench_train.py --arch bloomz-560m --tokenizer DIR --data FILE.jsonl --largest-batch

Each side runs in a fresh process (so peak memory is its own) and prints one JSON line; this
script then prints the table with ratios ours/peer and writes benchmarks/results/train-*.md/.json.
Beside the times: the whole process's time, the positions and model FLOPs each side computed per
epoch (ours on the shared-prefix path and with --no-shared-prefix; PEFT runs B x (V + T) positions
and its LM head on all of them), and the model TFLOP/s against this machine's measured matmul peak.
Without --model it builds `--arch`: a tiny BLOOM (seconds; what the test runs) or the bloomz-560m
architecture with random weights (the real model's cost). `--largest-batch` instead doubles the
batch, on the longest rows, until a side fails (runs out of memory) or reaches `--batch-limit`.
"""

from __future__ import annotations

import argparse
import gc
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

from soft_prompt.config import HATE_TEMPLATE, TASKS
from soft_prompt.files import portable_path

RESULTS = Path(__file__).parent / "results"
PROMPTS_TEMPLATE = TASKS["prompts"]["template"]
SIDES = ("defaults", "defaults-no-shared-prefix", "plain", "ours", "ours-micro-batches", "ours-checkpointed", "peft-trainer", "peft-loop")


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


def load_rows(path: str | None, num_rows: int, longest: bool = False) -> tuple[list[dict], str]:
    """The first `num_rows` rows (generated ETHOS-shaped ones without `path`) and their template,
    ETHOS-shaped (text, label_text) or prompts-shaped (act, prompt); with `longest` the longest
    rows, repeated if need be, to measure the memory of the worst batch."""
    if path is None:
        from soft_prompt.tiny import demo_rows

        rows, template = demo_rows(max(num_rows, 64)), HATE_TEMPLATE
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if {"text", "label_text"} <= rows[0].keys():
            template = HATE_TEMPLATE
        elif {"act", "prompt"} <= rows[0].keys():
            template = PROMPTS_TEMPLATE
        else:
            raise ValueError(f"{path}: rows need text+label_text or act+prompt columns, got {sorted(rows[0])}")
    if longest:
        from soft_prompt.templates import fill_template

        rows = sorted(rows, key=lambda row: -len(fill_template(template, row)))
        rows = (rows[:num_rows] * num_rows)[:num_rows]
    return rows[:num_rows], template


def tokenised_rows(tokenizer, rows: list[dict], template: str, max_length: int) -> list[list[int]]:
    """The tutorial's preprocessing: the filled template, tokenised, truncated (eos appended)."""
    from soft_prompt.templates import fill_template

    ids = [tokenizer(fill_template(template, row), truncation=True, max_length=max_length - 1)["input_ids"] for row in rows]
    return [row_ids + [tokenizer.eos_token_id] for row_ids in ids]


def load_tokenizer(model_dir: str):
    """The model's tokenizer, padding with eos where it has no pad token (as the tutorial does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    # Every pass of the frozen decoder, (rows, V + T): what PEFT computes, counted as it runs.
    passes: list[tuple[int, int]] = []
    model.get_decoder().register_forward_pre_hook(
        lambda module, inputs, kwargs: passes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
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
        train_seconds = trainer.train().metrics["train_runtime"]
        return {"prompt": peft_model.prompt_encoder["default"].embedding.weight.detach().cpu(), "train_seconds": train_seconds,
                "passes": passes}

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
    started = time.perf_counter()
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
    if device == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - started
    return {"prompt": peft_model.prompt_encoder["default"].embedding.weight.detach().cpu(), "train_seconds": train_seconds,
            "passes": passes}


def run_ours(args, model_dir: str, rows: list[dict], template: str) -> dict:
    """The shipped loop (`soft_prompt.training.train`). `defaults` is given only the tutorial's own
    settings (what a new user types), so it runs whatever train.py chooses by default;
    `defaults-no-shared-prefix` is that with `--no-shared-prefix` (the prompt run in every row);
    `plain` turns every lever off (the plain shuffle, whole batches, fp32 weights, the attention
    kernel the model loads with, the prompt in every row: the defaults before they were made fast).
    The other sides set each lever: `ours`
    length-grouped batches, whole, with fp32 weights (bf16/fp16 with --ours-model-dtype);
    `ours-micro-batches` adds `--max-batch-tokens` and `ours-checkpointed` gradient checkpointing
    (each trades time for activation memory in its own way)."""
    from safetensors.torch import load_file

    from soft_prompt.config import resolve_config
    from soft_prompt.training import train

    data_file = Path(tempfile.mkdtemp()) / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tutorial = {
        "model": model_dir, "data": str(data_file), "template": template, "init": "random",
        "num_virtual_tokens": args.num_virtual_tokens, "lr": args.lr, "batch_size": args.batch_size,
        "epochs": args.epochs, "max_length": args.max_length, "precision": args.precision,
        "seed": args.seed, "save_every": 0, "output_dir": tempfile.mkdtemp(), "label_words": [],
    }
    levers = {
        "model_dtype": args.precision if args.ours_model_dtype and args.side != "plain" else "fp32",
        "group_by_length": args.side != "plain",
        # plain: the kernel transformers gives the model (what train.py ran before --attention auto)
        "attention": meta_model(model_dir).config._attn_implementation if args.side == "plain" else args.ours_attention,
        "gradient_checkpointing": args.side == "ours-checkpointed",
        "max_batch_tokens": args.max_batch_tokens if args.side == "ours-micro-batches" else 0,
        "shared_prefix": args.side != "plain",
    }
    settings = {"defaults": tutorial, "defaults-no-shared-prefix": {**tutorial, "shared_prefix": False}}
    config = resolve_config(settings.get(args.side, {**tutorial, **levers}))
    summary = train(config)
    prompt = load_file(Path(config.run.output_dir) / "last" / "adapter_model.safetensors")["prompt_embeddings"]
    automatic = json.loads((Path(config.run.output_dir) / "train_config.json").read_text())["automatic"]
    return {"prompt": prompt, "train_seconds": summary["train_seconds"], "automatic": automatic, "config": config}


def ours_cost(config, automatic: dict) -> dict:
    """What `train(config)` computed: its micro-batches rebuilt with the loop's own functions (its
    tokenisation, batch order and cuts, `automatic`'s budget), each counted by `batch_cost` on the
    loss path it ran. The LM head runs only on the labelled tokens."""
    from soft_prompt.data import batch_order, collate
    from soft_prompt.distributed import World
    from soft_prompt.masks import IGNORE_INDEX
    from soft_prompt.shared_prefix import batch_cost, text_columns
    from soft_prompt.training import step_micro_batches
    from soft_prompt.training_setup import load_data_rows, tokenize_data

    examples, _ = tokenize_data(config, load_tokenizer(config.model.model), *load_data_rows(config))
    lengths = [len(example.input_ids) for example in examples]
    labelled = [sum(label != IGNORE_INDEX for label in example.labels) for example in examples]
    num_virtual, optim = config.prompt.num_virtual_tokens, config.optim
    budget = automatic.get("max_batch_tokens", optim.max_batch_tokens)
    shared = automatic["loss_path"] == "shared prefix"
    pieces = []
    for epoch in range(optim.epochs):
        batches = batch_order(lengths, optim.batch_size, config.run.seed, epoch, config.data.group_by_length)
        for start in range(0, len(batches), optim.grad_accum):
            group = batches[start : start + optim.grad_accum]
            pieces += step_micro_batches(group, lengths, labelled, budget, num_virtual, World(), lockstep=False,
                                         prompt_once=shared)[0]
    base_model = meta_model(config.model.model)

    def columns(piece: list[int]) -> int:  # what the loss path runs of the piece's padded length
        if not shared:
            return max(lengths[i] for i in piece)
        return text_columns(collate([examples[i] for i in piece], pad_token_id=0)["labels"])

    costs = [batch_cost(base_model, num_virtual, len(piece), columns(piece), sum(labelled[i] for i in piece), shared) for piece in pieces]
    return {
        "positions": sum(cost.positions for cost in costs), "flops": sum(cost.flops for cost in costs),
        "head_positions": sum(labelled[i] for piece in pieces for i in piece), "micro_batches": len(pieces),
        "loss_path": automatic["loss_path"],
    }


def peft_cost(model_dir: str, num_virtual: int, passes: list[tuple[int, int]]) -> dict:
    """What PEFT computed: every decoder pass it ran, `[B, V + T]`, counted by `batch_cost` on the
    plain path with the LM head on all B x (V + T) positions (transformers' model forms the logits
    of every position, prompt and padding included, and the backward multiplies their gradient,
    zero where no label is, through the head too)."""
    from soft_prompt.shared_prefix import batch_cost

    base_model = meta_model(model_dir)
    costs = [batch_cost(base_model, num_virtual, rows, length - num_virtual, rows * length, shared=False) for rows, length in passes]
    return {
        "positions": sum(cost.positions for cost in costs), "flops": sum(cost.flops for cost in costs),
        "head_positions": sum(rows * length for rows, length in passes), "micro_batches": len(passes),
        "loss_path": "plain (PEFT)",
    }


@torch.no_grad()
def final_loss(model_dir: str, prompt: torch.Tensor, tokenizer, token_rows: list[list[int]], batch_size: int) -> float:
    """The trained prompt's loss per token over all the training rows, the same way for every side
    (the frozen model's own loss, fp32, eval mode): what each side's training reached."""
    from soft_prompt import SoftPromptModel
    from soft_prompt.runtime import load_base_model
    from soft_prompt.data import Example, collate

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
    """One side: an epoch, timed and measured from before the model is loaded to the end of
    training; or with --largest-batch, the batch sizes it trained on."""
    if args.largest_batch:
        return {"side": args.side, "tried": largest_batch(args)}
    rows, template = load_rows(args.data, args.rows)
    peft = args.side.startswith("peft")
    # PEFT's tutorial tokenises before it trains; ours tokenises inside train(), so the harness's
    # copy for scoring waits until training is over (out of the whole-process time).
    tokenizer = load_tokenizer(args.model) if peft else None
    token_rows = tokenised_rows(tokenizer, rows, template, args.max_length) if peft else None
    result, seconds, memory = train_once(args, rows, template, tokenizer, token_rows)
    trained = time.perf_counter()
    if not peft:
        tokenizer = load_tokenizer(args.model)
        token_rows = tokenised_rows(tokenizer, rows, template, args.max_length)
    cost = peft_cost(args.model, args.num_virtual_tokens, result["passes"]) if peft else ours_cost(result["config"], result["automatic"])
    return {
        "side": args.side,
        "seconds_per_epoch": seconds / args.epochs,
        "train_seconds_per_epoch": result["train_seconds"] / args.epochs,
        "cpu_seconds_per_epoch": result["cpu_seconds"] / args.epochs,
        "tokens_per_second": args.epochs * sum(len(ids) for ids in token_rows) / seconds,
        # the model FLOPs that ran (see ours_cost, peft_cost) over the training loop's own time
        "model_tflops_per_second": cost["flops"] / result["train_seconds"] / 1e12,
        "positions_per_epoch": cost["positions"] / args.epochs,
        "head_positions_per_epoch": cost["head_positions"] / args.epochs,
        "tflop_per_epoch": cost["flops"] / args.epochs / 1e12,
        "micro_batches_per_epoch": cost["micro_batches"] / args.epochs,
        "loss_path": cost["loss_path"],
        "peak_memory_mib": memory.peak / 2**20,
        "training_memory_mib": memory.extra / 2**20,
        "final_train_loss": final_loss(args.model, result["prompt"], tokenizer, token_rows, args.batch_size),
        **({"automatic": result["automatic"]} if "automatic" in result else {}),
        # the harness's own work after training (scoring, counting), taken out of the process's time
        "seconds_after_training": time.perf_counter() - trained,
    }


def train_once(args, rows: list[dict], template: str, tokenizer, token_rows: list[list[int]]) -> tuple[dict, float, PeakMemory]:
    """(the side's result with its CPU seconds, seconds, peak memory) of one training run, the
    model's loading included."""
    from transformers import AutoModelForCausalLM

    with PeakMemory() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        if not args.side.startswith("peft"):
            result = run_ours(args, args.model, rows, template)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model)
            result = run_peft(args, model, tokenizer, token_rows, use_trainer=args.side == "peft-trainer")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start  # every thread's; less swayed by other load
    return result, seconds, memory


def largest_batch(args) -> list[dict]:
    """The batch doubled from --batch-size, one optimizer step on that many of the longest rows,
    until the side runs out of memory or passes --batch-limit."""
    tried, tokenizer = [], load_tokenizer(args.model)
    while args.batch_size <= args.batch_limit:
        rows, template = load_rows(args.data, args.batch_size, longest=True)
        token_rows = tokenised_rows(tokenizer, rows, template, args.max_length)
        try:
            memory = train_once(args, rows, template, tokenizer, token_rows)[2]
            tried.append({"batch_size": args.batch_size, "peak_memory_mib": memory.peak / 2**20})
        except torch.OutOfMemoryError as error:
            tried.append({"batch_size": args.batch_size, "error": str(error).splitlines()[0][:200]})
            break
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"{args.side}: batch {args.batch_size} trained", file=sys.stderr)
        args.batch_size *= 2
    return tried


def meta_model(model_dir: str):
    """The model built from its config alone on the meta device: no weights, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def save_random_model(arch: str, tokenizer_dir: str | None, directory: str) -> str:
    """A model folder for `--arch`: a tiny BLOOM, or bloomz-560m's architecture (24 layers, width
    1024, 16 heads, a 250,880-token vocabulary) with random weights and `tokenizer_dir`'s tokenizer
    (the tiny one when none; its ids all fall in the vocabulary)."""
    from soft_prompt.tiny import build_tokenizer, save_tiny_model

    if arch == "tiny-bloom":
        return save_tiny_model(directory, "bloom")
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = BloomConfig(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    BloomForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local causal-LM folder (default: build --arch)")
    parser.add_argument("--arch", choices=["tiny-bloom", "bloomz-560m"], default="tiny-bloom",
                        help="without --model: a tiny BLOOM, or bloomz-560m's architecture with random weights")
    parser.add_argument("--tokenizer", help="tokenizer folder for --arch bloomz-560m (default: the tiny one)")
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
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak TFLOP/s at --precision for model-FLOPs utilisation (MFU); "
                             "default: measured here (the best of 5 square matmuls)")
    parser.add_argument("--largest-batch", action="store_true",
                        help="find the largest batch each side trains on (the longest rows) instead of timing an epoch")
    parser.add_argument("--batch-limit", type=int, default=1024, help="--largest-batch stops doubling here")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="the sides to run (default: all)")
    parser.add_argument("--ours-attention", choices=["auto", "eager", "sdpa"], default="auto",
                        help="ours' --attention (sdpa: BLOOM's too, through scaled_dot_product_attention)")
    parser.add_argument("--side", choices=SIDES, help="run one side and print its JSON (used internally)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of one --side run (used internally)")
    parser.add_argument("--note", help="a sentence added to the report, e.g. how loaded the machine was")
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return

    # absolute paths are printed relative to the checkout, so the recorded command runs on another machine
    command = " ".join(["python", "benchmarks/bench_train.py"] + [portable_path(a) for a in sys.argv[1:]])
    name = Path(args.model).name if args.model else args.arch
    name += f"-v{args.num_virtual_tokens}" if args.num_virtual_tokens != 20 else ""
    name += f"-{args.precision}" + ("-weights" if args.ours_model_dtype else "")
    name += f"-{args.ours_attention}" if args.ours_attention != "auto" else ""
    name += f"-b{args.batch_size}" if args.batch_size != 8 else ""
    with tempfile.TemporaryDirectory(prefix="bench-model-") as scratch:
        model_arguments = ["--model", args.model or save_random_model(args.arch, args.tokenizer, scratch)]
        if args.largest_batch:
            write_largest_batch_report(args, name, largest_batches(args, model_arguments), command)
            return
        peak = {"tflops": args.peak_tflops, "how": "given by --peak-tflops"} if args.peak_tflops else matmul_peak(args.precision)
        runs: dict[str, list[dict]] = {side: [] for side in args.sides}
        for seed in args.seeds:
            for side in args.sides:
                result, wall = run_subprocess(side, ["--seed", str(seed)] + model_arguments)
                # Start to exit, as `time python train.py` would see it, less the harness's scoring.
                result["process_seconds"] = wall - result.pop("seconds_after_training")
                runs[side].append(result)
                print(f"{side} seed {seed}: {result}", file=sys.stderr)
    write_report(args, name, runs, command, peak)


def run_subprocess(side: str, arguments: list[str]) -> tuple[dict, float]:
    """One side in a fresh process (the flags given to this script, then `arguments`, which win):
    its JSON, and the seconds from starting the process to its exit."""
    command = [sys.executable, __file__] + sys.argv[1:] + ["--side", side] + arguments
    started = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1]), time.perf_counter() - started


def matmul_peak(precision: str) -> dict:
    """This machine's matmul peak at `precision`: the fastest of 5 square matmuls (8192 on a GPU,
    2048 on a CPU, after one to warm up) through torch's own kernels, with the threads every side
    gets. What "model-FLOPs utilisation" is measured against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 2048
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"tflops": 2 * size**3 / min(times[1:]) / 1e12,
            "how": f"measured here: the fastest of 5 {size}x{size} {precision} matmuls, {torch.get_num_threads()} threads"}


def largest_batches(args, model_arguments: list[str]) -> dict[str, dict]:
    """Per side, the batch sizes tried and the largest that trained (see `largest_batch`)."""
    found = {}
    for side in args.sides:
        tried = run_subprocess(side, model_arguments)[0]["tried"]
        fitted = [entry["batch_size"] for entry in tried if "error" not in entry]
        found[side] = {"largest": max(fitted, default=0), "reached_limit": not tried or "error" not in tried[-1], "tried": tried}
    return found


def write_largest_batch_report(args, name: str, found: dict[str, dict], command: str) -> None:
    lines = [
        f"# Largest training batch: ours vs PEFT + Trainer ({name})", "", f"`{command}`", "",
        f"{machine()}. One optimizer step on the longest rows of the data (max length {args.max_length}), "
        f"the batch doubled from {args.batch_size} until the side failed or reached {args.batch_limit}. "
        f"`ours-micro-batches` is `ours` with `--max-batch-tokens {args.max_batch_tokens}`: it holds one "
        "micro-batch's activations whatever the batch.",
        "", "| side | largest batch | peak memory there (MiB) | first failure |", "| --- | --- | --- | --- |",
    ]
    for side, result in found.items():
        fitted = [entry for entry in result["tried"] if "error" not in entry]
        failure = next((entry["error"] for entry in result["tried"] if "error" in entry), "none")
        largest = f"{result['largest']}{'+ (limit)' if result['reached_limit'] else ''}"
        peak = f"{fitted[-1]['peak_memory_mib']:.0f}" if fitted else "-"
        lines.append(f"| {side} | {largest} | {peak} | {failure} |")
    write_files(args, f"largest-batch-{name}", "\n".join(lines) + "\n", {"command": command, "results": found})


def summarise(side_runs: list[dict]) -> dict:
    """One side over its seeds: median time and tokens/s, highest memory, mean and spread of the loss."""
    losses = [run["final_train_loss"] for run in side_runs]
    return {
        "seconds_per_epoch": statistics.median(run["seconds_per_epoch"] for run in side_runs),
        "process_seconds": statistics.median(run["process_seconds"] for run in side_runs),
        "cpu_seconds_per_epoch": statistics.median(run["cpu_seconds_per_epoch"] for run in side_runs),
        "model_tflops_per_second": statistics.median(run["model_tflops_per_second"] for run in side_runs),
        "tokens_per_second": statistics.median(run["tokens_per_second"] for run in side_runs),
        "peak_memory_mib": max(run["peak_memory_mib"] for run in side_runs),
        "training_memory_mib": max(run["training_memory_mib"] for run in side_runs),
        "final_train_loss": statistics.fmean(losses),
        "final_train_loss_stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        # the counts depend on the seed only through the batches' padding: their mean
        "positions_per_epoch": statistics.fmean(run["positions_per_epoch"] for run in side_runs),
        "tflop_per_epoch": statistics.fmean(run["tflop_per_epoch"] for run in side_runs),
        "loss_path": side_runs[0]["loss_path"],
        "runs": side_runs,
    }


def write_report(args, name: str, runs: dict[str, list[dict]], command: str, peak: dict) -> None:
    """The figures per side, then each of our sides against each PEFT side (ratio < 1: ours less)."""
    results = {side: summarise(side_runs) for side, side_runs in runs.items()}
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"# Training: ours vs PEFT ({name})",
        "",
        f"`{command}`",
        "",
        f"{machine()}. Every side ran once per seed ({seeds}; the seed sets the prompt's init, the same on "
        "every side, and the batch order). Time and memory run from before the model is loaded to the end of "
        "training: the median time over the seeds, the highest memory (CUDA max allocated, or the process's "
        "peak RSS on CPU); CPU s is the process's CPU time over the same span, all threads (it counts the "
        "threads' spin-waiting too, so on a loaded machine it swings as well). Whole process: the side's "
        "process from its start to its exit (imports, data, loading, training, saving), less the harness's "
        "own scoring after training; the median over the seeds. Positions: what the frozen decoder computed "
        "in an epoch, padding included (the prompt once per micro-batch, V + B x T, on the shared-prefix path, "
        "T up to the column before the last label; "
        "B x (V + T) on the plain one), the mean over the seeds. TFLOP: the matmuls that ran, counted by "
        "`soft_prompt.shared_prefix.batch_cost` on each micro-batch or PEFT pass: 2 per weight and position "
        "forward, 2 more backward (the input's gradient; the frozen weights get none), attention's scores and "
        "mixing over each pass's (queries, keys) block, and the LM head on the labelled tokens (ours) or on all "
        "B x (V + T) positions (PEFT: transformers forms every position's logits and multiplies their gradient "
        "back through the head). Model TFLOP/s: that over the training loop's own time (no loading); MFU: it "
        f"over this machine's matmul peak, {peak['tflops']:.3g} TFLOP/s ({peak['how']}). The loss is each "
        "side's trained prompt scored the same way on all the rows (the frozen model's own loss, fp32), "
        "averaged over the seeds (± the standard deviation). "
        + side_notes(args, runs) + (f" {args.note}" if args.note else ""),
        "",
        "| side | s/epoch | CPU s/epoch | tokens/s | model TFLOP/s | peak memory (MiB) | rise above start (MiB) | "
        "loss after training | whole process s | positions/epoch | TFLOP/epoch | loss path |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, figures in results.items():
        tflops = f"{figures['model_tflops_per_second']:.3g} (MFU {figures['model_tflops_per_second'] / peak['tflops']:.1%})"
        lines.append(
            f"| {side} | {figures['seconds_per_epoch']:.2f} | {figures['cpu_seconds_per_epoch']:.2f} | "
            f"{figures['tokens_per_second']:.0f} | {tflops} | "
            f"{figures['peak_memory_mib']:.0f} | {figures['training_memory_mib']:.0f} | "
            f"{figures['final_train_loss']:.4f} ± {figures['final_train_loss_stdev']:.4f} | "
            f"{figures['process_seconds']:.2f} | {figures['positions_per_epoch']:.0f} | "
            f"{figures['tflop_per_epoch']:.4g} | {figures['loss_path']} |"
        )
    lines += [
        "",
        "| ours / peer | time | CPU time | peak memory | rise above start | loss | whole process | positions | FLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ours in (side for side in results if not side.startswith("peft")):
        for peer in (side for side in results if side.startswith("peft")):
            a, b = results[ours], results[peer]
            lines.append(
                f"| {ours} / {peer} | {a['seconds_per_epoch'] / b['seconds_per_epoch']:.2f} | "
                f"{a['cpu_seconds_per_epoch'] / b['cpu_seconds_per_epoch']:.2f} | "
                f"{a['peak_memory_mib'] / b['peak_memory_mib']:.2f} | "
                f"{a['training_memory_mib'] / b['training_memory_mib']:.2f} | "
                f"{a['final_train_loss'] / b['final_train_loss']:.3f} | "
                f"{a['process_seconds'] / b['process_seconds']:.2f} | "
                f"{a['positions_per_epoch'] / b['positions_per_epoch']:.2f} | "
                f"{a['tflop_per_epoch'] / b['tflop_per_epoch']:.2f} |"
            )
    write_files(args, f"train-{name}", "\n".join(lines) + "\n", {"command": command, "matmul_peak": peak, "results": results})


def side_notes(args, runs: dict[str, list[dict]]) -> str:
    """What each of our sides that ran sets, as the report says it (the `defaults` side with what
    its automatic fields resolved to)."""
    automatic = runs["defaults"][0]["automatic"] if runs.get("defaults") else {}
    resolved = ", ".join(  # the loss path has its own column
        f"--{name.replace('_', '-')} auto = {value}" for name, value in automatic.items() if name != "loss_path"
    )
    notes = {
        "defaults": f"train.py given only the tutorial's settings (length-grouped batches; here {resolved})",
        "defaults-no-shared-prefix": "`defaults` with `--no-shared-prefix` (the prompt's V positions computed in every row)",
        "plain": "every lever off (plain shuffle, whole batches, fp32 weights, the model's own attention kernel, "
                 "--no-shared-prefix: the defaults before they were made fast)",
        "ours": f"length-grouped batches, whole, with {args.precision if args.ours_model_dtype else 'fp32'} weights"
                + (f", --attention {args.ours_attention}" if args.ours_attention != "auto" else ""),
        "ours-micro-batches": f"`ours` with `--max-batch-tokens {args.max_batch_tokens}`",
        "ours-checkpointed": "`ours` with `--gradient-checkpointing`",
    }
    described = [f"`{side}`: {note}" for side, note in notes.items() if side in runs]
    return "; ".join(described) + "." if described else ""


def write_files(args, name: str, report: str, data: dict) -> None:
    print(report)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(report)
    (output_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {device}; torch {torch.__version__}; {versions()}"


def versions() -> str:
    import peft
    import transformers

    return f"transformers {transformers.__version__}, peft {peft.__version__}"


if __name__ == "__main__":
    main()
