"""The training loop, written out: AdamW on the prompt only, warmup and decay, gradient
accumulation and clipping, autocast (fp16 with a GradScaler), periodic evaluation, and resumable
checkpoints. `train(config)` runs `setup` (`training_setup.py`: resolve a copy of the
configuration, load the data and the model, open the run folder) and then `loop`, which reads top
to bottom, evaluating as `training_evaluation.py` says; `train.py` is its command line; under
torchrun every rank runs it (`distributed.py`).

A run folder holds:

    train_config.json   the resolved configuration, with world_size, parallelism and "automatic"
                        (the fields resolved from `auto`)
    metrics.jsonl       one line per logged step (and one per evaluation, one per --probe)
    loss_curve.png      train and eval loss (when matplotlib is installed)
    best/               the prompt with the best --best-metric so far (and the prompt before training)
    last/               the latest prompt, plus the training state to resume from (`training_state.py`)
    .lock               held by the live run (`run_lock.py`): one run at a time writes the folder
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .config import TrainConfig
from .data import batch_order, collate, split_batch
from .distributed import World
from .ensemble_training import train_ensemble
from .evaluation import prompt_drift
from .files import WriteError, png_bytes, write_atomic
from .masks import IGNORE_INDEX
from .model import SoftPromptModel
from .reparam import reparam_files, reparam_of
from .training_evaluation import calibrate_best, evaluate_and_keep_best, log_probe, patience_spent
from .training_setup import Run, log_metrics, setup
from .training_state import METRICS_FILE, STATE_JSON, training_state_files


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


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


# -- stopping -----------------------------------------------------------------------------------


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and `docker stop` send before
    killing) asks the loop to stop at the next step boundary, so that `last/` is exact; a second
    one aborts at once (the handlers before ours are back: KeyboardInterrupt for SIGINT, the
    default kill for SIGTERM). Under torchrun every signal only asks (torchrun passes the
    terminal's Ctrl-C on as a second SIGINT, and kills ranks that have not ended 30 s later)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world: World = World()) -> None:
        self.signal: int | None = None  # the first signal received
        self.world = world

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:
            return
        self.signal = signum
        if self.world.size == 1:
            self.restore()
        if self.world.is_main:
            again = f" ({signal.Signals(signum).name} again to abort)" if self.world.size == 1 else ""
            print(f"\n{signal.Signals(signum).name}: stopping after this step, saving last/{again}", file=sys.stderr)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __exit__(self, *exc) -> None:
        if self.installed:
            self.restore()


# -- outputs ------------------------------------------------------------------------------------


def write_loss_curve(output_dir: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl, or None when matplotlib is not installed."""
    try:
        # A Figure of its own, not pyplot: the caller's backend and open figures stay as they were
        # (a notebook's inline plots too).
        from matplotlib.figure import Figure
    except ImportError:
        return None
    lines = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    train = [(line["step"], line["loss"]) for line in lines if "loss" in line]
    evals = [(line["step"], line["eval_loss"]) for line in lines if "eval_loss" in line]
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy")
    axes.legend()
    figure.tight_layout()
    path = output_dir / "loss_curve.png"
    write_atomic(path, png_bytes(figure, dpi=100))
    return path


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# -- the step -----------------------------------------------------------------------------------


def rank_micro_batches(
    group: list[list[int]], lengths: list[int], max_batch_tokens: int, num_virtual_tokens: int, world: World,
    prompt_once: bool,
) -> list[list[int]]:
    """`world.rank`'s share of each of the step's batches, cut within `max_batch_tokens` (the
    virtual tokens counted once per micro-batch when `prompt_once`, the shared-prefix path)."""
    per_row, shared = (0, num_virtual_tokens) if prompt_once else (num_virtual_tokens, 0)
    shares = [world.share(indices) for indices in group]
    return [piece for share in shares if share for piece in split_batch(share, lengths, max_batch_tokens, per_row, shared)]


def step_micro_batches(
    group: list[list[int]], lengths: list[int], num_labelled: list[int], max_batch_tokens: int,
    num_virtual_tokens: int, world: World, lockstep: bool, prompt_once: bool = False,
) -> tuple[list[list[int]], list[float]]:
    """This rank's micro-batches of a step (row indices) and their loss weights. The step is
    `group`, its global batches; this rank takes its share of each and cuts it within
    `max_batch_tokens`. A weight is the micro-batch's share of the whole step's labelled tokens, so
    the weighted losses, summed over the micro-batches and the ranks, are the step's mean.
    `lockstep` (FSDP, whose forward and backward gather weights from every rank) pads every rank to
    the same number of micro-batches with the step's first row at weight 0. `prompt_once`: the
    loss runs the prompt once per micro-batch (`shared_prefix.py`), so the budget counts it once."""
    step_labelled = max(1, sum(num_labelled[i] for indices in group for i in indices))
    pieces = rank_micro_batches(group, lengths, max_batch_tokens, num_virtual_tokens, world, prompt_once)
    weights = [sum(num_labelled[i] for i in piece) / step_labelled for piece in pieces]
    if lockstep:
        most = max(
            len(rank_micro_batches(group, lengths, max_batch_tokens, num_virtual_tokens, World(rank, world.size), prompt_once))
            for rank in range(world.size)
        )
        padding = most - len(pieces)
        pieces, weights = pieces + [group[0][:1]] * padding, weights + [0.0] * padding
    return pieces, weights


def train_step(
    model: SoftPromptModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[dict[str, torch.Tensor]],
    weights: list[float],
    autocast,
    max_grad_norm: float,
    world: World = World(),
    loss_fn: Callable[..., torch.Tensor] = SoftPromptModel.loss,
) -> tuple[float, float, bool]:
    """One optimizer step over collated micro-batches: forward and backward, each micro-batch's mean
    loss times its weight (its share of the step's labelled tokens, so the gradient is that of the
    mean over all of them, however the step is cut), the sum over the ranks, clip, AdamW. A step
    whose loss or gradient is not finite leaves the prompt as it was. Returns (loss, gradient norm
    before clipping, finite), the same on every rank. `loss_fn(model, **batch)` is the mean loss of a
    micro-batch: `SoftPromptModel.loss`, or `shared_prefix_loss` (equal, less work)."""
    step_loss = torch.zeros((), device=model.device)
    for batch, weight in zip(micro_batches, weights):
        batch = {key: value.to(model.device, non_blocking=True) for key, value in batch.items()}
        with autocast():
            # = model(**batch).loss, without materialising the [B, V + T, vocab] logits
            loss = loss_fn(model, **batch) * weight
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    # The prompt [V, D] (with --reparam: P and the MLP; clipping `prompt.weight` would then do nothing).
    params = list(model.prompt.parameters())
    if world.size > 1:
        # One all-reduce for the step: this rank's (scaled) gradients and loss, summed.
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in params]
        summed = world.sum_(torch.cat([grad.flatten() for grad in grads] + [step_loss.view(1).to(grads[0].dtype)]))
        for param, grad in zip(params, summed[:-1].split([param.numel() for param in params])):
            param.grad = grad.view_as(param)
        step_loss = summed[-1]
    scaler.unscale_(optimizer)  # the clipping threshold is for the true gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    step_loss, grad_norm = step_loss.item(), grad_norm.item()
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if finite:
        scaler.step(optimizer)  # optimizer.step(), unless an fp16 gradient overflowed
    scaler.update()  # no-op without fp16; otherwise backs the loss scale off after an overflow
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, finite


# -- the loop -----------------------------------------------------------------------------------


def save_last(run: Run) -> None:
    """`last/`: the prompt, the prompt before training and all the loop needs to resume
    (`training_state_files`)."""
    model = run.model
    save_checkpoint(
        run.output_dir / "last",
        model.prompt.weight,
        model.base_model,
        {**model.metadata, "step": run.state.step},
        extra_files={
            **training_state_files(run.state.to_dict(), run.optimizer, run.scaler),
            **(reparam_files(model.prompt) if reparam_of(model.prompt) is not None else {}),
        },
        initial_weight=run.initial_weight,
    )


def report(summary: dict, output_dir: Path, total_steps: int) -> None:
    """The run's last line: where it stopped and how to continue, or what it reached; the loss
    curve of a finished run."""
    if summary["interrupted"]:
        print(
            f"interrupted ({signal.Signals(summary['signal']).name}) at step {summary['steps']} of {total_steps}: "
            f"saved {output_dir / 'last'}; "
            f"continue with the same arguments and --resume {output_dir}",
            file=sys.stderr,
        )
        return
    curve = write_loss_curve(output_dir)
    eval_text = f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a"
    early = " (stopped early: --patience)" if summary["stopped_early"] else ""
    print(
        f"done: {summary['steps']} steps{early}, train loss {summary['train_loss']:.4f} (last epoch), eval loss {eval_text}, "
        f"{summary['seconds']:.1f} s, {summary['tokens_per_s']:.0f} tokens/s, peak memory "
        f"{summary['peak_memory_mib']:.0f} MiB, {summary['skipped_steps']} skipped steps; "
        f"saved {output_dir / 'last'}{' and best/' if summary['best_eval_loss'] is not None else ''}"
        f"{', ' + curve.name if curve else ''}"
    )


def loop(run: Run) -> dict:
    """The training loop: optimizer steps until `run.total_steps` (or a Ctrl-C or SIGTERM, which
    finishes the step and saves `last/`), logging, evaluating and saving as the configuration says. Returns the
    summary (without the setup's seconds)."""
    optim, run_cfg, data_cfg = run.config.optim, run.config.run, run.config.data
    model, state, world = run.model, run.state, run.world
    num_virtual = run.config.prompt.num_virtual_tokens
    lengths = [len(example.input_ids) for example in run.train_examples]
    num_labelled = [sum(label != IGNORE_INDEX for label in example.labels) for example in run.train_examples]
    batches = batch_order(lengths, optim.batch_size, run_cfg.seed, state.epoch, data_cfg.group_by_length)
    loop_started = time.perf_counter()
    tokens_seen = window_tokens = 0
    window_started = loop_started
    progress = tqdm(
        total=run.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not world.is_main
    )
    interrupted, stop_signal = False, 0
    if state.step == 0:  # what the prompt makes the model say before training (a resumed run has it)
        log_probe(run)
    with StopRequest(world) as stop, progress:  # the bar is closed before any error line is printed
        while state.step < run.total_steps and not patience_spent(run):
            if state.batch_in_epoch == 0:
                state.epoch_loss_sum, state.epoch_steps = 0.0, 0
            group = batches[state.batch_in_epoch : state.batch_in_epoch + optim.grad_accum]
            lr = lr_at(state.step, optim.lr, optim.scheduler, optim.warmup_steps, run.total_steps)
            for param_group in run.optimizer.param_groups:
                param_group["lr"] = lr

            # This rank's share of the step's batches, cut into micro-batches within --max-batch-tokens.
            pieces, weights = step_micro_batches(
                group, lengths, num_labelled, optim.max_batch_tokens, num_virtual, world, run.config.model.fsdp,
                prompt_once=run.prompt_once,
            )
            micro_batches = [collate([run.train_examples[i] for i in piece], run.pad_token_id) for piece in pieces]
            step_loss, grad_norm, finite = train_step(
                model, run.optimizer, run.scaler, micro_batches, weights, run.autocast, optim.max_grad_norm, world, run.loss_fn
            )
            window_tokens += sum(lengths[i] for indices in group for i in indices)  # every rank's rows
            state.count_step(step_loss, finite)
            if state.bad_steps_in_a_row >= optim.max_bad_steps:
                raise TrainingDiverged(
                    f"the loss or gradient was not finite for {optim.max_bad_steps} steps in a row (up to step "
                    f"{state.step + 1}): lower --lr, or use --precision bf16/fp32 instead of fp16"
                )

            # Advance the step and the data position; a finished epoch starts the next order.
            state.step += 1
            state.batch_in_epoch += len(group)
            end_of_epoch = state.batch_in_epoch == len(batches)
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                batches = batch_order(lengths, optim.batch_size, run_cfg.seed, state.epoch, data_cfg.group_by_length)
            last_step = state.step == run.total_steps

            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_started, 1e-9)
            if world.is_main and (state.step % run_cfg.log_every == 0 or last_step):
                log_metrics(run.metrics_path, {
                    "step": state.step,
                    "epoch": state.epoch_progress(run.batches_per_epoch),
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "prompt_norm": model.prompt.weight.detach().norm().item(),
                    **prompt_drift(model.prompt.weight, run.initial_weight),
                })  # fmt: skip
            if state.step % run_cfg.log_every == 0 or last_step:
                tokens_seen, window_tokens, window_started = tokens_seen + window_tokens, 0, now
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            progress.update(1)

            eval_due = (state.step % run_cfg.eval_every == 0) if run_cfg.eval_every else end_of_epoch
            if run.eval_examples and (eval_due or last_step):
                evaluate_and_keep_best(run)
            if eval_due or last_step:  # at the evaluations, or where they would be without eval rows
                log_probe(run)
            stop_signal = world.max(stop.signal or 0, run.device)  # every rank stops after the same step
            stopping = stop_signal > 0
            out_of_patience = patience_spent(run)  # the same on every rank
            if world.is_main and ((run_cfg.save_every and state.step % run_cfg.save_every == 0) or last_step or stopping
                                  or out_of_patience):
                save_last(run)
            if stopping and not last_step:
                interrupted = True
                break
    tokens_seen += window_tokens
    train_seconds = time.perf_counter() - loop_started  # the loop alone: no loading, no setup
    return {
        "steps": state.step,
        "train_loss": state.epoch_loss_sum / max(state.epoch_steps, 1),
        "eval_loss": state.eval_loss,
        "best_eval_loss": state.best_eval_loss,
        "skipped_steps": state.skipped_steps,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
        "peak_memory_mib": peak_memory_mib(run.device),
        "interrupted": interrupted,
        "signal": stop_signal if interrupted else None,  # the one that stopped it: SIGINT or SIGTERM
        "stopped_early": patience_spent(run) and state.step < run.total_steps,  # not when patience ran out at the end
        "output_dir": str(run.output_dir),
    }


def train(config: TrainConfig) -> dict:
    """Train a soft prompt as `config` says (`setup`, then `loop`); returns the summary (also
    printed as one line). `config` itself is not changed; the run folder's train_config.json holds
    the resolved one.

    Raises `ValueError`/`FileNotFoundError` (bad input, one line each) before any training, and
    `TrainingDiverged` when `max_bad_steps` steps in a row were skipped as non-finite.

    Under torchrun every rank runs it (see `distributed.py`): the same global batches, each rank its
    share; rank 0 alone writes the run folder and prints.
    """
    started = time.perf_counter()
    if config.prompt.ensemble > 1:
        return train_ensemble(config, train)  # each member is a run of this function
    with contextlib.ExitStack() as held:  # the run folder's lock, from setup to the end
        run = setup(config, held)
        try:
            summary = loop(run)
            if not summary["interrupted"]:
                calibrate_best(run)
            summary["seconds"] = time.perf_counter() - started
            if run.world.is_main:
                report(summary, run.output_dir, run.total_steps)
        except WriteError as error:
            if (run.output_dir / "last" / STATE_JSON).is_file():
                raise WriteError(f"{error}; {run.output_dir / 'last'} is whole: once there is room, continue with the "
                                 f"same arguments and --resume {run.output_dir}") from None
            raise
    return summary
