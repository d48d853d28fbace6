"""The training loop, written out: plain PyTorch, no Trainer, no Accelerate, no PEFT.

Read top to bottom: `train()` sets up (seed, device, model, data, optimizer, schedule), optionally
resumes, then loops over optimizer steps with evaluation, checkpoints and logging.

Output directory:
    train_config.json   the resolved configuration
    metrics.jsonl       one line per logged step (and per evaluation)
    loss_curve.png      at the end, when matplotlib is installed
    last/               the latest checkpoint + training state (for --resume)
    best/               the checkpoint with the lowest eval loss (when there is eval data)
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from .checkpoint import json_bytes, save_checkpoint, write_atomic
from .config import TrainConfig
from .data import Example, batch_order, check_fields, collate, load_rows, tokenize_rows
from .model import SoftPromptModel

STATE_NAME = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CONFIG_NAME = "train_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(ValueError):
    """A run that cannot start or go on; the message says what to change."""


@dataclass
class Progress:
    """Where the run is: enough, with the RNG states, to continue it bit-exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    best_eval_loss: float = math.inf
    skipped_steps: int = 0
    bad_steps_in_row: int = 0
    tokens_seen: int = 0


def train(config: TrainConfig) -> dict:
    """Train a soft prompt as `config` says; returns the final summary (also printed)."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output-dir {output_dir} is a file: choose a directory")
    if config.task == "demo":
        prepare_demo(config, output_dir)
    validate(config)
    seed_everything(config.seed)
    device = pick_device(config.device)

    # Model and soft prompt: the frozen model in eval mode (no dropout), its weights in model_dtype.
    tokenizer, base_model = load_model(config.model, DTYPES[config.model_dtype], device)
    model = SoftPromptModel(
        base_model,
        num_virtual_tokens=config.num_virtual_tokens,
        init=config.init,
        init_text=config.init_text,
        tokenizer=tokenizer,
        text_fill=config.text_fill,
        seed=config.seed,
        metadata={"task": config.task, "template": config.template, "label_words": config.label_words,
                  "loss_on": config.loss_on, "tokenizer_name_or_path": config.model},
    )

    # Data: tokenised once; the batch order of each epoch is a pure function of (seed, epoch).
    train_examples, eval_examples = load_examples(config, tokenizer)
    batches_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch

    # Optimizer on the prompt alone; the schedule is warmup then linear / cosine / constant.
    optimizer = torch.optim.AdamW(
        [model.prompt.weight], lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps, config.schedule)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    progress = Progress()
    if config.resume:
        progress = resume(config, model, optimizer, scheduler, scaler)

    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / CONFIG_NAME, json_bytes(config.to_dict()))
    metrics_file = open(output_dir / "metrics.jsonl", "a")
    autocast = torch.autocast(device.type, dtype=DTYPES[config.precision], enabled=config.precision != "fp32")
    bar = tqdm(total=total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True)
    start_time, start_tokens, last_train_loss, last_eval_loss = time.perf_counter(), progress.tokens_seen, math.nan, None

    def checkpoint(name: str) -> None:
        """Write `name`/ (the prompt, and for last/ the full training state) in one atomic swap."""
        extra = training_state_files(config, progress, optimizer, scheduler, scaler) if name == "last" else None
        save_checkpoint(output_dir / name, model.prompt.weight, base_model, model.metadata, extra)

    try:
        while progress.step < total_steps and progress.epoch < (config.epochs if not config.max_steps else math.inf):
            batches = batch_order(
                [len(example.input_ids) for example in train_examples],
                config.batch_size,
                config.seed + progress.epoch,
                config.group_by_length,
            )
            while progress.batch_in_epoch < len(batches) and progress.step < total_steps:
                # One optimizer step over up to grad_accum batches; the loss is averaged over them.
                group = batches[progress.batch_in_epoch : progress.batch_in_epoch + config.grad_accum]
                step_loss, step_tokens, finite = 0.0, 0, True
                for indices in group:
                    batch = {key: value.to(device, non_blocking=True) for key, value in
                             collate([train_examples[i] for i in indices], tokenizer.pad_token_id).items()}
                    with autocast:
                        loss = model.loss(**batch) / len(group)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    scaler.scale(loss).backward()
                    step_loss += loss.item()
                    step_tokens += int(batch["attention_mask"].sum())
                progress.batch_in_epoch += len(group)
                if not finite:
                    # Skip the step: drop its gradients; too many in a row means the run diverged.
                    optimizer.zero_grad(set_to_none=True)
                    progress.skipped_steps += 1
                    progress.bad_steps_in_row += 1
                    if progress.bad_steps_in_row >= config.max_bad_steps:
                        raise TrainingError(
                            f"the loss was not finite for {progress.bad_steps_in_row} steps in a row at step "
                            f"{progress.step}: lower --lr or use --precision bf16 or fp32"
                        )
                    continue
                progress.bad_steps_in_row = 0
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_([model.prompt.weight], config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.tokens_seen += step_tokens
                last_train_loss = step_loss

                elapsed = time.perf_counter() - start_time
                tokens_per_second = (progress.tokens_seen - start_tokens) / max(elapsed, 1e-9)
                lr = scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
                if progress.step % config.log_every == 0:
                    log(metrics_file, step=progress.step, epoch=progress.epoch, loss=step_loss, lr=lr,
                        grad_norm=float(grad_norm), tokens_per_second=tokens_per_second,
                        prompt_norm=float(model.prompt.weight.detach().norm()))
                if eval_examples and (progress.step % eval_every == 0 or progress.step == total_steps):
                    last_eval_loss = evaluate(model, eval_examples, config.batch_size, tokenizer.pad_token_id, device, autocast)
                    log(metrics_file, step=progress.step, epoch=progress.epoch, eval_loss=last_eval_loss)
                    if last_eval_loss < progress.best_eval_loss:
                        progress.best_eval_loss = last_eval_loss
                        checkpoint("best")
                if progress.step % config.save_every == 0:
                    checkpoint("last")
            if progress.batch_in_epoch >= len(batches):
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    except KeyboardInterrupt:
        bar.close()
        checkpoint("last")
        raise TrainingError(
            f"interrupted at step {progress.step}: saved {output_dir / 'last'}; continue with --resume {output_dir}"
        ) from None
    finally:
        metrics_file.close()
    bar.close()
    checkpoint("last")

    wall_time = time.perf_counter() - start_time
    summary = {
        "steps": progress.step,
        "train_loss": last_train_loss,
        "eval_loss": last_eval_loss,
        "best_eval_loss": progress.best_eval_loss if eval_examples else None,
        "skipped_steps": progress.skipped_steps,
        "wall_time_s": wall_time,
        "tokens_per_second": (progress.tokens_seen - start_tokens) / max(wall_time, 1e-9),
        "peak_memory_mib": peak_memory_mib(device),
        "output_dir": str(output_dir),
    }
    plot_loss_curve(output_dir)
    print(
        f"done: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, eval loss "
        f"{'n/a' if last_eval_loss is None else f'{last_eval_loss:.4f}'}, {wall_time:.1f} s, "
        f"{summary['tokens_per_second']:.0f} tokens/s, peak memory {summary['peak_memory_mib']:.0f} MiB, "
        f"checkpoints in {output_dir}"
    )
    return summary


# -- setup ----------------------------------------------------------------------------------------


def validate(config: TrainConfig) -> None:
    if config.data is None or config.template is None:
        raise TrainingError("pass --task (prompts, hate, demo) or both --data and --template")
    if config.num_virtual_tokens < 1:
        raise TrainingError(f"--num-virtual-tokens must be at least 1, got {config.num_virtual_tokens}")
    for name, allowed in [("precision", DTYPES), ("model_dtype", DTYPES), ("schedule", ("linear", "cosine", "constant")),
                          ("loss_on", ("all", "completion")), ("init", ("random", "uniform", "text", "vocab"))]:
        if getattr(config, name) not in allowed:
            raise TrainingError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.batch_size < 1 or config.grad_accum < 1 or config.save_every < 1:
        raise TrainingError("--batch-size, --grad-accum and --save-every must be at least 1")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str | None) -> torch.device:
    """`name` if given, else cuda, then mps, then cpu."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device cuda: no CUDA device is available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(name: str, dtype: torch.dtype, device: torch.device):
    """The tokenizer (with a pad token) and the frozen model, from the hub or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        base_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise TrainingError(
            f"could not load model {name!r} ({first_line}); without hub access pass a local folder with --model"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return tokenizer, base_model.to(device).eval()


def load_examples(config: TrainConfig, tokenizer) -> tuple[list[Example], list[Example]]:
    """Tokenised train and eval examples (eval from --eval-data, --eval-split or --val-fraction)."""
    train_rows = load_rows(config.data, config.split)
    check_fields(config.template, train_rows, config.data)
    eval_rows = []
    if config.eval_data or config.eval_split:
        eval_rows = load_rows(config.eval_data or config.data, config.eval_split or "train")
        check_fields(config.template, eval_rows, config.eval_data or config.data)
    elif config.val_fraction > 0:
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
        num_eval = max(1, round(len(train_rows) * config.val_fraction))
        eval_rows = [train_rows[i] for i in order[:num_eval]]
        train_rows = [train_rows[i] for i in order[num_eval:]]
    train_examples, truncated, dropped = tokenize_rows(tokenizer, config.template, train_rows, config.loss_on, config.max_length)
    eval_examples = tokenize_rows(tokenizer, config.template, eval_rows, config.loss_on, config.max_length)[0]
    if not train_examples:
        raise TrainingError(f"no training rows left from {config.data} (check --template, --loss-on and --max-length)")
    print(
        f"data: {len(train_examples)} train rows, {len(eval_examples)} eval rows; "
        f"{truncated} truncated to {config.max_length} tokens, {dropped} dropped without labelled tokens"
    )
    return train_examples, eval_examples


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning-rate multiplier after `step` steps: linear warmup, then the schedule's decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


def prepare_demo(config: TrainConfig, output_dir: Path) -> None:
    """The offline demo: write a tiny BLOOM and ethos-shaped rows under the output directory."""
    from .tiny import demo_rows, save_tiny_model

    if config.model == TrainConfig.model:
        model_dir = output_dir / "demo-model"
        if not (model_dir / "config.json").is_file():
            save_tiny_model(model_dir, "bloom", seed=config.seed)
        config.model = str(model_dir)
    if config.data is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        data_file = output_dir / "demo-data.jsonl"
        write_atomic(data_file, "".join(json.dumps(row) + "\n" for row in demo_rows(160, seed=config.seed)).encode())
        config.data = str(data_file)


# -- evaluation, logging ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: SoftPromptModel, examples: list[Example], batch_size: int, pad_token_id: int,
             device: torch.device, autocast) -> float:
    """Mean loss per labelled token over the eval examples."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()}
        num_tokens = int((batch["labels"] != -100).sum())
        with autocast:
            total_loss += model.loss(**batch).item() * num_tokens
        total_tokens += num_tokens
    return total_loss / max(total_tokens, 1)


def log(metrics_file, **values) -> None:
    metrics_file.write(json.dumps(values) + "\n")
    metrics_file.flush()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def plot_loss_curve(output_dir: Path) -> None:
    """loss_curve.png from metrics.jsonl: train loss per step and eval loss (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per token")
    axes.set_title(output_dir.name)
    axes.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "loss_curve.png", dpi=100)
    plt.close(figure)


# -- training state: safetensors + JSON, no pickle ---------------------------------------------


def training_state_files(config: TrainConfig, progress: Progress, optimizer, scheduler, scaler) -> dict[str, bytes]:
    """The optimizer's tensors as safetensors; everything else (steps, data position, schedule,
    scaler, RNG states) as JSON; the resolved config to check a resume against."""
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"{param_id}.{name}": value.detach().cpu().contiguous()
        for param_id, param_state in optimizer_state["state"].items()
        for name, value in param_state.items()
    }
    scheduler_state = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "progress": progress.__dict__,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler_state,
        "scaler": scaler.state_dict(),
        "rng": {
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        },
    }
    return {OPTIMIZER_NAME: save(tensors), STATE_NAME: json_bytes(state), CONFIG_NAME: json_bytes(config.to_dict())}


def resume(config: TrainConfig, model: SoftPromptModel, optimizer, scheduler, scaler) -> Progress:
    """Restore prompt, optimizer, schedule, scaler, data position and RNG states from a run."""
    from .checkpoint import load_checkpoint

    run_dir = Path(config.resume)
    last = run_dir / "last" if (run_dir / "last").is_dir() else run_dir
    if not (last / STATE_NAME).is_file():
        raise TrainingError(f"--resume {config.resume}: no {STATE_NAME} there; pass the output directory of a run")
    previous = json.loads((last / CONFIG_NAME).read_text())
    for name in ("model", "num_virtual_tokens"):
        if previous[name] != getattr(config, name):
            raise TrainingError(
                f"--resume {config.resume}: that run used {name.replace('_', '-')} {previous[name]!r}, this one "
                f"{getattr(config, name)!r}; resume with the same settings"
            )
    weight, _ = load_checkpoint(last, model.base_model)
    with torch.no_grad():
        model.prompt.weight.copy_(weight)
    state = json.loads((last / STATE_NAME).read_text())
    tensors = load_file(last / OPTIMIZER_NAME)
    optimizer_state = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        optimizer_state.setdefault(int(param_id), {})[name] = value.to(model.device) if name != "step" else value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
    scaler.load_state_dict(state["scaler"]) if state["scaler"] else None
    rng = state["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
    print(f"resumed from {last} at step {state['progress']['step']}")
    return Progress(**state["progress"])
