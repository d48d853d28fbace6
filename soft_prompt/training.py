"""The training loop, written out: AdamW on the prompt only, warmup and decay, gradient
accumulation and clipping, autocast (fp16 with a GradScaler), periodic evaluation, and resumable
checkpoints. `train(config)` runs it; `train.py` is its command line.

A run folder holds:

    train_config.json   the resolved configuration
    metrics.jsonl       one line per logged step (and one per evaluation)
    loss_curve.png      train and eval loss (when matplotlib is installed)
    best/               the prompt with the lowest eval loss so far
    last/               the latest prompt, plus the training state to resume from:
        training_state.json          step, data position, scaler, python/numpy RNG, counters
        training_state.safetensors   AdamW moments and torch RNG states (no pickle anywhere)
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from .analysis import prompt_drift
from .checkpoint import base_model_name, json_bytes, load_checkpoint, save_checkpoint, write_atomic
from .config import TrainConfig
from .data import (
    IGNORE_INDEX,
    Example,
    batch_order,
    check_template_columns,
    collate,
    label_words_of,
    load_rows,
    split_batch,
    split_validation,
    tokenize_rows,
)
from .bloom_sdpa import use_sdpa_attention
from .model import DTYPES, SoftPromptModel, load_base_model

TINY_MODEL = "tiny-bloom"  # --model tiny-bloom: a tiny random BLOOM written into the run folder
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


# -- setup --------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device: pass --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps, but torch sees no MPS device: pass --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def prepare_demo(output_dir: Path, model: str, data: str | None) -> tuple[str, str]:
    """For `--task demo`: write the tiny model (when `model` is `tiny-bloom`) and the generated
    ETHOS-shaped rows (when no `--data`) into the run folder; returns (model, data) to use."""
    from .tiny import demo_rows, save_tiny_model

    if model == TINY_MODEL:
        model = str(output_dir / "demo-model")
        if not (Path(model) / "config.json").is_file():
            # At the usual init (std 0.02) a 32-wide random model's output hardly depends on its
            # input, so a prompt cannot steer it; std 0.3 leaves the demo something to learn.
            save_tiny_model(model, "bloom", initializer_range=0.3)
    if data is None:
        data = str(output_dir / "demo-data.jsonl")
        write_atomic(data, "".join(json.dumps(row) + "\n" for row in demo_rows(256)).encode())
    return model, data


def apply_speed_options(base_model, model_cfg) -> None:
    """--attention sdpa (BLOOM), --gradient-checkpointing and --compile on the frozen model."""
    if model_cfg.attention == "sdpa" and use_sdpa_attention(base_model) == 0:
        raise ValueError(
            f"--attention sdpa is for BLOOM; {type(base_model).__name__} picks its own attention kernel: drop the flag"
        )
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: the frozen weights need no grad, only the prompt's path does.
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.compile:
        base_model.get_decoder().compile(dynamic=True)  # both loss() and forward() run through the decoder


def load_data_rows(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): loaded before the model, so that bad data fails fast."""
    data = config.data
    train_rows = load_rows(data.data, data.split)
    check_template_columns(data.template, train_rows, data.data)
    if data.val_fraction > 0:
        return split_validation(train_rows, data.val_fraction, config.run.seed)
    if data.eval_data is not None:
        eval_rows = load_rows(data.eval_data, data.eval_split or data.split)
        check_template_columns(data.template, eval_rows, data.eval_data)
        return train_rows, eval_rows
    if data.eval_split is not None:
        if not Path(data.data).is_file():
            return train_rows, load_rows(data.data, data.eval_split)
        print(f"note: --eval-split applies to hub data, not to the file {data.data}: pass --eval-data FILE "
              "or --val-fraction to evaluate", file=sys.stderr)
    return train_rows, []


def tokenize_data(
    config: TrainConfig, tokenizer, train_rows: list[dict], eval_rows: list[dict]
) -> tuple[list[Example], list[Example]]:
    """(train examples, eval examples), with a line saying how many rows survived."""
    data = config.data
    train, stats = tokenize_rows(tokenizer, data.template, train_rows, data.max_length, data.loss_on)
    evaluation, eval_stats = tokenize_rows(tokenizer, data.template, eval_rows, data.max_length, data.loss_on)
    if not train:
        raise ValueError(
            f"no rows left to train on: {data.data} gave {stats.rows} rows and {stats.dropped} were dropped "
            "(empty fields, or the completion cut off by --max-length)"
        )
    print(
        f"data: {len(train)} train rows ({stats.truncated} truncated to {data.max_length} tokens, "
        f"{stats.dropped} dropped), {len(evaluation)} eval rows ({eval_stats.truncated} truncated, "
        f"{eval_stats.dropped} dropped)",
        file=sys.stderr,
    )
    return train, evaluation


def lr_at(step: int, lr: float, scheduler: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from 0, then linear,
    cosine or no decay; the same floats as transformers' get_*_schedule_with_warmup."""
    if step < warmup_steps:
        factor = step / max(1, warmup_steps)
    elif scheduler == "constant":
        factor = 1.0
    elif scheduler == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    else:
        factor = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return lr * factor


# -- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: SoftPromptModel, examples: list[Example], batch_size: int, autocast, pad_token_id: int) -> float:
    """The mean loss per labelled token over `examples` (longest rows first, to pad little)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        with autocast():
            loss = model.loss(**batch)
        labelled = int((batch["labels"] != IGNORE_INDEX).sum())
        total, count = total + loss.item() * labelled, count + labelled
    model.train()
    return total / max(count, 1)


# -- training state (no pickle: tensors in safetensors, everything else in JSON) -----------------


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


def restore_training_state(directory: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict:
    """Load what `training_state_files` wrote into the optimizer, scaler and RNGs; returns the
    loop's own state (step, data position, counters)."""
    state = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(directory / STATE_TENSORS)
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


def find_resume_dir(path: str) -> Path:
    """`--resume` takes a run folder or its `last/`."""
    for candidate in (Path(path) / "last", Path(path)):
        if (candidate / STATE_JSON).is_file():
            return candidate
    raise ValueError(f"--resume {path}: no {STATE_JSON} there or in {path}/last: not a run folder to continue")


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the next step boundary (so `last/` is exact);
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nstopping after this step: saving last/ (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


# -- outputs ------------------------------------------------------------------------------------


def write_loss_curve(output_dir: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(line["step"], line["loss"]) for line in lines if "loss" in line]
    evals = [(line["step"], line["eval_loss"]) for line in lines if "eval_loss" in line]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy")
    axes.legend()
    figure.tight_layout()
    path = output_dir / "loss_curve.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# -- the run ------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    """Train a soft prompt as `config` says; returns the summary (also printed as one line).

    Raises `ValueError`/`FileNotFoundError` (bad input, one line each) before any training, and
    `TrainingDiverged` when `max_bad_steps` steps in a row were skipped as non-finite.
    """
    started = time.perf_counter()
    model_cfg, prompt_cfg, data_cfg, optim, run = config.model, config.prompt, config.data, config.optim, config.run

    # Where the run lives, and what it resumes from.
    resume_dir = find_resume_dir(run.resume) if run.resume else None
    if run.output_dir is None:
        resumed_run = resume_dir.parent if resume_dir and resume_dir.name == "last" else None
        run.output_dir = str(resumed_run or Path("runs") / (data_cfg.task or "custom"))
    output_dir = Path(run.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file: choose a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    if data_cfg.task == "demo":
        model_cfg.model, data_cfg.data = prepare_demo(output_dir, model_cfg.model, data_cfg.data)
    resumed = json.loads((resume_dir / STATE_JSON).read_text()) if resume_dir else None
    if resumed and (resumed["model"], resumed["num_virtual_tokens"]) != (model_cfg.model, prompt_cfg.num_virtual_tokens):
        raise ValueError(
            f"--resume {run.resume} was trained with --model {resumed['model']} --num-virtual-tokens "
            f"{resumed['num_virtual_tokens']}; this run asks for --model {model_cfg.model} --num-virtual-tokens "
            f"{prompt_cfg.num_virtual_tokens}: pass the same ones, or start a new --output-dir without --resume"
        )

    seed_everything(run.seed)
    train_rows, eval_rows = load_data_rows(config)
    label_words = data_cfg.label_words = data_cfg.label_words or label_words_of(data_cfg.template, train_rows)
    device = pick_device(model_cfg.device)
    model_cfg.device = device.type
    base_model, tokenizer = load_base_model(model_cfg.model, model_cfg.model_dtype, device)
    apply_speed_options(base_model, model_cfg)
    train_examples, eval_examples = tokenize_data(config, tokenizer, train_rows, eval_rows)
    write_atomic(output_dir / "train_config.json", json_bytes(config.to_dict()))

    # The model: the frozen LM with the prompt, the only trainable parameter ([V, D], fp32).
    metadata = {
        "template": data_cfg.template,
        "label_words": label_words,
        "task": data_cfg.task,
        "loss_on": data_cfg.loss_on,
        "max_length": data_cfg.max_length,
    }
    model = SoftPromptModel(
        base_model,
        num_virtual_tokens=prompt_cfg.num_virtual_tokens,
        init=prompt_cfg.init,
        init_text=prompt_cfg.init_text,
        tokenizer=tokenizer,
        text_fill=prompt_cfg.text_fill,
        vocab_size=prompt_cfg.vocab_size,
        seed=run.seed,
        metadata=metadata,
    )
    # The seeded init is the same on resume: what analysis measures the drift from (saved with the prompt).
    initial_weight = model.prompt.weight.detach().clone()
    if resume_dir:
        weight, _ = load_checkpoint(resume_dir, base_model)
        with torch.no_grad():
            model.prompt.weight.copy_(weight)
    model.train()  # the frozen model's dropout is on during training, as in HF Trainer
    params = [model.prompt.weight]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=device.type == "cuda")
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled="fp16" in (model_cfg.precision, model_cfg.model_dtype))

    def autocast():
        return torch.autocast(device.type, dtype=DTYPES[model_cfg.precision], enabled=model_cfg.precision != "fp32")

    # The schedule of optimizer steps: each takes `grad_accum` batches of the epoch's order.
    lengths = [len(example.input_ids) for example in train_examples]
    num_labelled = [sum(label != IGNORE_INDEX for label in example.labels) for example in train_examples]
    batches_per_epoch = math.ceil(len(train_examples) / optim.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / optim.grad_accum)
    total_steps = optim.max_steps or optim.epochs * steps_per_epoch

    state = {  # everything else a resumed run needs beside the optimizer, scaler and RNGs
        "model": model_cfg.model,
        "num_virtual_tokens": prompt_cfg.num_virtual_tokens,
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,  # batches of the current epoch already trained on
        "epoch_loss_sum": 0.0,
        "epoch_steps": 0,
        "best_eval_loss": None,
        "eval_loss": None,
        "skipped_steps": 0,
        "bad_steps_in_a_row": 0,
    }
    metrics_path = output_dir / "metrics.jsonl"
    if resume_dir:
        state.update(restore_training_state(resume_dir, optimizer, scaler))
        # Drop metrics the interrupted run logged after the step it saved: they will be redone.
        logged = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        kept = [line for line in logged if json.loads(line)["step"] <= state["step"]]
        write_atomic(metrics_path, "".join(line + "\n" for line in kept).encode())
        print(f"resuming {resume_dir} at step {state['step']} of {total_steps}", file=sys.stderr)
    else:
        metrics_path.write_text("")

    def save_last() -> None:
        save_checkpoint(
            output_dir / "last",
            model.prompt.weight,
            base_model,
            {**model.metadata, "step": state["step"]},
            extra_files=training_state_files(state, optimizer, scaler),
            initial_weight=initial_weight,
        )

    def log(line: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def run_evaluation() -> None:
        eval_loss = evaluate(model, eval_examples, optim.batch_size, autocast, tokenizer.pad_token_id)
        state["eval_loss"] = eval_loss
        log({"step": state["step"], "epoch": epoch_progress(), "eval_loss": eval_loss})
        if state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]:
            state["best_eval_loss"] = eval_loss
            best_metadata = {**model.metadata, "step": state["step"], "eval_loss": eval_loss}
            save_checkpoint(output_dir / "best", model.prompt.weight, base_model, best_metadata, initial_weight=initial_weight)

    def epoch_progress() -> float:
        return state["epoch"] + state["batch_in_epoch"] / batches_per_epoch

    batches = batch_order(lengths, optim.batch_size, run.seed, state["epoch"], data_cfg.group_by_length)
    loop_started = time.perf_counter()
    tokens_seen = window_tokens = 0
    window_started = loop_started
    progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    interrupted = False
    with StopRequest() as stop:
        while state["step"] < total_steps:
            if state["batch_in_epoch"] == 0:
                state["epoch_loss_sum"], state["epoch_steps"] = 0.0, 0
            group = batches[state["batch_in_epoch"] : state["batch_in_epoch"] + optim.grad_accum]
            lr = lr_at(state["step"], optim.lr, optim.scheduler, optim.warmup_steps, total_steps)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr

            # Forward and backward over the step's batches, each cut into micro-batches within
            # --max-batch-tokens. Each micro-batch's mean loss is weighted by its share of the step's
            # labelled tokens, so the gradient is that of the mean over all of them, however it is cut.
            step_loss = torch.zeros((), device=device)
            step_labelled = max(1, sum(num_labelled[i] for indices in group for i in indices))
            micro_batches = [
                piece
                for indices in group
                for piece in split_batch(indices, lengths, optim.max_batch_tokens, prompt_cfg.num_virtual_tokens)
            ]
            for indices in micro_batches:
                batch = collate([train_examples[i] for i in indices], tokenizer.pad_token_id)
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                with autocast():
                    # = model(**batch).loss, without materialising the [B, V + T, vocab] logits
                    loss = model.loss(**batch) * (sum(num_labelled[i] for i in indices) / step_labelled)
                scaler.scale(loss).backward()
                step_loss += loss.detach()
                window_tokens += int(batch["attention_mask"].sum())

            scaler.unscale_(optimizer)  # the clipping threshold is for the true gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm or float("inf"))
            step_loss, grad_norm = step_loss.item(), grad_norm.item()
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if finite:
                scaler.step(optimizer)  # optimizer.step(), unless an fp16 gradient overflowed
                state["bad_steps_in_a_row"] = 0
                state["epoch_loss_sum"] += step_loss
                state["epoch_steps"] += 1
            else:
                state["skipped_steps"] += 1
                state["bad_steps_in_a_row"] += 1
            scaler.update()  # no-op without fp16; otherwise backs the loss scale off after an overflow
            optimizer.zero_grad(set_to_none=True)
            if state["bad_steps_in_a_row"] >= optim.max_bad_steps:
                progress.close()
                raise TrainingDiverged(
                    f"the loss or gradient was not finite for {optim.max_bad_steps} steps in a row (up to step "
                    f"{state['step'] + 1}): lower --lr, or use --precision bf16/fp32 instead of fp16"
                )

            # Advance the step and the data position; a finished epoch starts the next order.
            state["step"] += 1
            state["batch_in_epoch"] += len(group)
            end_of_epoch = state["batch_in_epoch"] == len(batches)
            if end_of_epoch:
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
                batches = batch_order(lengths, optim.batch_size, run.seed, state["epoch"], data_cfg.group_by_length)
            step, last_step = state["step"], state["step"] == total_steps

            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_started, 1e-9)
            if step % run.log_every == 0 or last_step:
                log({
                    "step": step,
                    "epoch": epoch_progress(),
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "prompt_norm": model.prompt.weight.detach().norm().item(),
                    **prompt_drift(model.prompt.weight, initial_weight),
                })
                tokens_seen, window_tokens, window_started = tokens_seen + window_tokens, 0, now
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            progress.update(1)

            eval_due = (step % run.eval_every == 0) if run.eval_every else end_of_epoch
            if eval_examples and (eval_due or last_step):
                run_evaluation()
            if (run.save_every and step % run.save_every == 0) or last_step or stop.requested:
                save_last()
            if stop.requested and not last_step:
                interrupted = True
                break
    progress.close()
    tokens_seen += window_tokens
    train_seconds = time.perf_counter() - loop_started  # the loop alone: no loading, no setup

    summary = {
        "steps": state["step"],
        "train_loss": state["epoch_loss_sum"] / max(state["epoch_steps"], 1),
        "eval_loss": state["eval_loss"],
        "best_eval_loss": state["best_eval_loss"],
        "skipped_steps": state["skipped_steps"],
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
        "peak_memory_mib": peak_memory_mib(device),
        "interrupted": interrupted,
        "output_dir": str(output_dir),
    }
    if interrupted:
        print(
            f"interrupted at step {state['step']} of {total_steps}: saved {output_dir / 'last'}; "
            f"continue with the same arguments and --resume {output_dir}",
            file=sys.stderr,
        )
        return summary
    curve = write_loss_curve(output_dir)
    eval_text = f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a"
    print(
        f"done: {summary['steps']} steps, train loss {summary['train_loss']:.4f} (last epoch), eval loss {eval_text}, "
        f"{summary['seconds']:.1f} s, {summary['tokens_per_s']:.0f} tokens/s, peak memory "
        f"{summary['peak_memory_mib']:.0f} MiB, {summary['skipped_steps']} skipped steps; "
        f"saved {output_dir / 'last'}{' and best/' if summary['best_eval_loss'] is not None else ''}"
        f"{', ' + curve.name if curve else ''}"
    )
    return summary
