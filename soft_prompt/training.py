"""The training loop, written out: AdamW on the prompt only, warmup and decay, gradient
accumulation and clipping, autocast (fp16 with a GradScaler), periodic evaluation, and resumable
checkpoints. `train(config)` runs `setup` (resolve a copy of the configuration, load the data and
the model, open the run folder) and then `loop`, which reads top to bottom; `train.py` is its
command line; under torchrun every rank runs it (`distributed.py`).

A run folder holds:

    train_config.json   the resolved configuration, with world_size, parallelism and "automatic"
                        (the fields resolved from `auto`)
    metrics.jsonl       one line per logged step (and one per evaluation, one per --probe)
    loss_curve.png      train and eval loss (when matplotlib is installed)
    best/               the prompt with the lowest eval loss so far (and the prompt before training)
    last/               the latest prompt, plus the training state to resume from (`training_state.py`)
    .lock               held by the live run (`run_lock.py`): one run at a time writes the folder
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibrate_model import fitted_calibration, model_label_scores, reference_calibration
from .calibration import FIT_METRICS, calibration_record
from .checkpoint import load_checkpoint, save_checkpoint, update_metadata
from .config import AUTO, TrainConfig, resolve_automatic
from .data import (
    Example,
    batch_order,
    check_fits_context,
    check_template_columns,
    collate,
    load_rows,
    split_batch,
    split_validation,
    tokenize_rows,
)
from .distributed import World, init_world, shard_frozen_model
from .ensemble_training import train_ensemble
from .evaluation import label_metrics, mean_eval_loss, prompt_drift
from .files import WriteError, append_text, check_output_folder, json_bytes, png_bytes, write_atomic, writing
from .masks import IGNORE_INDEX
from .model import SoftPromptModel
from .probe import probe
from .reparam import add_reparam, reparam_files, reparam_of, restore_reparam
from .run_lock import RunLock
from .runtime import DTYPES, apply_speed_options, limit_kernel_cache, load_base_model, native_bf16, pick_device
from .shared_prefix import shared_prefix_loss, shared_prefix_supported
from .templates import label_words_of, template_fields
from .training_state import (
    STATE_JSON,
    TrainState,
    check_resume_rows,
    check_resume_settings,
    find_resume_dir,
    metrics_up_to,
    read_training_state,
    restore_training_state,
    rows_sha256,
    training_state_files,
)

TINY_MODEL = "tiny-bloom"  # --model tiny-bloom: a tiny random BLOOM written into the run folder


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


# -- setup --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def demo_inputs(output_dir: Path, model: str, data: str | None) -> dict[str, str]:
    """For `--task demo`: what to generate into the run folder, by the field it fills: the tiny
    model (when `model` is `tiny-bloom`) and ETHOS-shaped rows (when no `--data`)."""
    inputs = {}
    if model == TINY_MODEL:
        inputs["model"] = str(output_dir / "demo-model")
    if data is None:
        inputs["data"] = str(output_dir / "demo-data.jsonl")
    return inputs


def write_demo_inputs(inputs: dict[str, str]) -> None:
    """Generate the inputs `demo_inputs` named (a tiny model already there is kept)."""
    from .tiny import demo_rows, save_tiny_model

    if "model" in inputs and not (Path(inputs["model"]) / "config.json").is_file():
        # At the usual init (std 0.02) a 32-wide random model's output hardly depends on its
        # input, so a prompt cannot steer it; std 0.3 leaves the demo something to learn.
        with writing(inputs["model"]):
            save_tiny_model(inputs["model"], "bloom", initializer_range=0.3)
    if "data" in inputs:
        write_atomic(inputs["data"], "".join(json.dumps(row) + "\n" for row in demo_rows(256)).encode())


def load_data_rows(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): loaded before the model, so that bad data fails fast."""
    data = config.data
    train_rows = load_rows(data.data, data.split)
    check_template_columns(data.template, train_rows, data.data)
    if data.val_fraction > 0:
        # Stratified when the rows are labelled: each label keeps its share on both sides.
        last = template_fields(data.template)[-1]
        labelled = data.label_words or label_words_of(data.template, train_rows)
        seed = config.run.seed if data.val_seed is None else data.val_seed
        return split_validation(train_rows, data.val_fraction, seed, label_of=(lambda row: str(row[last])) if labelled else None)
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
    write_atomic(path, png_bytes(figure, dpi=100))
    plt.close(figure)
    return path


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# -- the run ------------------------------------------------------------------------------------


def position_settings(config: TrainConfig) -> dict:
    """The settings the saved data position depends on (`training_state.POSITION_FLAGS`)."""
    model, prompt, data, optim, run = config.model, config.prompt, config.data, config.optim, config.run
    return {
        "model": model.model, "num_virtual_tokens": prompt.num_virtual_tokens, "batch_size": optim.batch_size,
        "grad_accum": optim.grad_accum, "seed": run.seed, "max_length": data.max_length, "template": data.template,
        "group_by_length": data.group_by_length,
    }  # fmt: skip


def prepare_output_dir(
    config: TrainConfig, world: World, held: contextlib.ExitStack
) -> tuple[Path, Path | None, dict | None]:
    """(the run folder, the `last/` to resume from or None, its saved training state or None).
    Fills in the default `--output-dir` and, for `--task demo`, the generated model and data;
    refuses a damaged resume state and a resume with other settings than the saved position
    depends on (`position_settings`). Then rank 0 creates the run folder (the folder alone) and
    takes its lock into `held` (one live run per folder), and writes the demo's generated inputs.
    Nothing else in the run folder is written here: every other input is checked before, so a
    rejected run leaves an existing run as it was."""
    data_cfg, run = config.data, config.run
    resume_dir = find_resume_dir(run.resume) if run.resume else None
    if run.output_dir is None:
        resumed_run = resume_dir.parent if resume_dir and resume_dir.name == "last" else None
        run.output_dir = str(resumed_run or Path("runs") / (data_cfg.task or "custom"))
    output_dir = Path(run.output_dir)
    check_output_folder(output_dir, f"--output-dir {output_dir}")
    resumed = read_training_state(resume_dir)[0] if resume_dir else None
    demo = demo_inputs(output_dir, config.model.model, data_cfg.data) if data_cfg.task == "demo" else {}
    config.model.model, data_cfg.data = demo.get("model", config.model.model), demo.get("data", data_cfg.data)
    if resumed:
        warning = check_resume_settings(run.resume, resumed, position_settings(config))
        if warning and world.is_main:
            print(warning, file=sys.stderr)
    if world.is_main:
        held.enter_context(RunLock.take(output_dir))
        write_demo_inputs(demo)
    return output_dir, resume_dir, resumed


def build_soft_prompt_model(
    config: TrainConfig, base_model, tokenizer, resume_dir: Path | None, resumed_step: int | None
) -> tuple[SoftPromptModel, torch.Tensor]:
    """(the frozen LM with the prompt, the only trainable parameter ([V, D], fp32), in train mode;
    the prompt before training). The prompt is the resumed run's (saved at `resumed_step`) when
    there is one; its seeded init is the same on resume, so the initial prompt is too."""
    model_cfg, prompt_cfg, data_cfg = config.model, config.prompt, config.data
    metadata = {
        "template": data_cfg.template,
        "label_words": data_cfg.label_words,
        "task": data_cfg.task,
        "loss_on": data_cfg.loss_on,
        "max_length": data_cfg.max_length,
        "precision": model_cfg.precision,  # infer.py's default --precision
        "model_dtype": model_cfg.model_dtype,
        "reparam": prompt_cfg.reparam,
    }
    model = SoftPromptModel(
        base_model,
        num_virtual_tokens=prompt_cfg.num_virtual_tokens,
        init=prompt_cfg.init,
        init_text=prompt_cfg.init_text,
        tokenizer=tokenizer,
        text_fill=prompt_cfg.text_fill,
        vocab_size=prompt_cfg.vocab_size,
        seed=config.run.seed,
        metadata=metadata,
        label_words=data_cfg.label_words,
    )
    initial_weight = model.prompt.weight.detach().clone()  # what the drift is measured from, saved with the prompt
    if resume_dir:
        weight, saved = load_checkpoint(resume_dir, base_model)
        if saved.get("step", resumed_step) != resumed_step:
            raise ValueError(
                f"--resume {resume_dir}: its prompt is from step {saved['step']} but its training state from step "
                f"{resumed_step}: the folder mixes two saves; start a new --output-dir without --resume"
            )
        with torch.no_grad():
            model.prompt.weight.copy_(weight)
    if prompt_cfg.reparam == "residual":
        # The prompt trains as P + LN(MLP(P)); `model.prompt.weight` is that sum wherever it is read.
        reparam = add_reparam(model.prompt, prompt_cfg.reparam_hidden, seed=config.run.seed)
        with torch.no_grad():
            initial_weight = reparam(initial_weight)  # P0 + LN(MLP0(P0)): the prompt the model saw first
        if resume_dir:
            restore_reparam(model.prompt, resume_dir)  # P and the MLP as the run saved them
    return model.train(), initial_weight  # the frozen model's dropout is on during training, as in HF Trainer


def open_metrics(path: Path, kept_lines: list[str] | None) -> None:
    """Empty metrics.jsonl for a new run; a resumed one keeps `kept_lines` (`metrics_up_to`: the
    lines up to the step it saved; the later ones will be logged again)."""
    write_atomic(path, "".join(line + "\n" for line in kept_lines or []).encode())


def log_metrics(path: Path, line: dict) -> None:
    append_text(path, json.dumps(line) + "\n")


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


def training_loss(model: SoftPromptModel, shared_prefix: bool) -> tuple[Callable[..., torch.Tensor], str]:
    """(the loss function the loop runs, what train_config.json's "automatic" says of it): the
    shared-prefix path where it was asked for and equals the plain one on this model in training
    mode, else `SoftPromptModel.loss`, with the reason."""
    if not shared_prefix:
        return SoftPromptModel.loss, "plain (--no-shared-prefix)"
    supported, reason = shared_prefix_supported(model)
    return (shared_prefix_loss, "shared prefix") if supported else (SoftPromptModel.loss, f"plain ({reason})")


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


def validation_label_metrics(run: Run) -> dict[str, float]:
    """Accuracy and macro-F1 of label scoring (`--label-score`, uncalibrated) on the evaluation
    rows, when there are label words (every rank scores every row: the same figures on each)."""
    labels, template = run.config.data.label_words, run.config.data.template
    if not labels:
        return {}
    model, last = run.model, template_fields(template)[-1]
    model.eval()  # no dropout while scoring
    with run.autocast():
        scores = model_label_scores(model, run.eval_rows, labels, template, run.config.classify.label_score, run.config.optim.batch_size)
    model.train()
    predicted = [labels[i] for i in scores.argmax(dim=1).tolist()]
    figures = label_metrics([str(row[last]) for row in run.eval_rows], predicted, labels)
    return {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"]}


def evaluate_and_keep_best(run: Run) -> None:
    """Evaluate (every rank): the eval loss and, with label words, label scoring's accuracy and
    macro-F1; log them and save `best/` when `--best-metric` is the best so far (rank 0)."""
    model, state = run.model, run.state
    eval_loss = mean_eval_loss(model, run.eval_examples, run.config.optim.batch_size, run.autocast, run.pad_token_id,
                               run.world, shared_prefix=run.config.model.shared_prefix)
    state.eval_loss = eval_loss
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss
    figures = {"eval_loss": eval_loss, **validation_label_metrics(run)}
    metric = run.config.classify.best_metric
    score = figures[metric]
    lower_is_better = metric == "eval_loss"
    is_best = state.best_score is None or (score < state.best_score if lower_is_better else score > state.best_score)
    if is_best:
        state.best_score, state.evals_without_improvement = score, 0
    else:
        state.evals_without_improvement += 1
    if run.world.is_main:
        epoch = state.epoch_progress(run.batches_per_epoch)
        log_metrics(run.metrics_path, {"step": state.step, "epoch": epoch, **figures})
        if is_best:
            metadata = {**model.metadata, "step": state.step, **figures}
            save_checkpoint(run.output_dir / "best", model.prompt.weight, model.base_model, metadata,
                            initial_weight=run.initial_weight)


def log_probe(run: Run) -> None:
    """`--probe`: the probe texts' greedy continuations with the current prompt and their letters'
    scripts, one metrics.jsonl line. Rank 0 alone generates, with no collective inside; the other
    ranks go on to the step's end, where the stop check waits for it."""
    if not run.config.run.probe or not run.world.is_main:
        return
    with run.autocast():
        lines = probe(run.model, run.config.run.probe, run.config.run.probe_tokens)
    log_metrics(run.metrics_path, {"step": run.state.step, "probe": lines})


def patience_spent(run: Run) -> bool:
    """`--patience` evaluations in a row without a better `--best-metric`: training stops."""
    patience = run.config.classify.patience
    return bool(patience) and run.state.evals_without_improvement >= patience


def calibrate_best(run: Run) -> None:
    """Fit `--calibration` for the prompt best/ holds (last/ when there were no evaluation rows) and
    store it, with `--label-score`, in its soft_prompt.json, where infer.py reads it. Every rank
    scores (FSDP needs them all), rank 0 writes."""
    labels, classify, data_cfg = run.config.data.label_words, run.config.classify, run.config.data
    if not labels:
        return
    target = run.output_dir / ("best" if run.state.best_score is not None else "last")
    run.world.barrier()  # rank 0 has written it
    model = run.model
    model.load_prompt(target, "calibrating")
    model.set_prompt("calibrating")
    model.eval()
    with run.autocast():
        if classify.calibration == "fitted":
            metric = classify.best_metric if classify.best_metric in FIT_METRICS else "macro_f1"
            record = fitted_calibration(model, run.eval_rows, labels, data_cfg.template, classify.label_score, metric,
                                        run.config.optim.batch_size)
        elif classify.calibration in ("content-free", "domain"):
            record = reference_calibration(model, classify.calibration, labels, data_cfg.template, run.train_rows,
                                           classify.label_score, run.config.run.seed, run.config.optim.batch_size)
        else:
            record = calibration_record("none", classify.label_score, labels, None)
    if run.world.is_main:
        update_metadata(target, {"calibration": record, "label_score": classify.label_score})


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


@dataclass
class Run:
    """What `setup` hands the loop: the resolved configuration and everything built from it."""

    config: TrainConfig  # the resolved copy, as train_config.json records it
    world: World
    device: torch.device
    output_dir: Path
    model: SoftPromptModel
    initial_weight: torch.Tensor  # [V, D], the prompt before training
    pad_token_id: int
    train_examples: list[Example]
    eval_examples: list[Example]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable
    loss_fn: Callable[..., torch.Tensor]  # (model, input_ids, attention_mask, labels) -> the mean loss
    state: TrainState
    total_steps: int
    batches_per_epoch: int
    train_rows: list[dict] = dataclasses.field(default_factory=list)  # as loaded: for domain calibration
    eval_rows: list[dict] = dataclasses.field(default_factory=list)  # as loaded: for label scoring

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


def check_label_setup(config: TrainConfig, eval_rows: list[dict], automatic: dict) -> None:
    """Resolve `--best-metric auto` (macro_f1 with label words, else eval_loss) and refuse what
    label scoring cannot do: a label metric without label words, evaluation rows of another label."""
    labels, classify = config.data.label_words, config.classify
    if classify.best_metric == AUTO:
        classify.best_metric = automatic["best_metric"] = "macro_f1" if labels else "eval_loss"
    if not labels:
        if classify.best_metric != "eval_loss" or classify.calibration != "none":
            raise ValueError("--best-metric accuracy/macro_f1 and --calibration score label words: pass "
                             "--label-words (the template's last field had more than 20 distinct values)")
        return
    last = template_fields(config.data.template)[-1]
    if classify.calibration == "fitted" and not eval_rows:
        raise ValueError("--calibration fitted fits on evaluation rows and there are none: add --val-fraction (e.g. 0.2)")
    unknown = sorted({str(row[last]) for row in eval_rows} - set(labels))
    if unknown:
        raise ValueError(f"evaluation rows labelled {unknown[:5]}, which are not among the label words {labels}: "
                         "pass every label in --label-words")


def setup(config: TrainConfig, held: contextlib.ExitStack) -> Run:
    """Resolve a copy of `config` (the `auto` fields, the preset's demo inputs, the output folder),
    check every input, load the data and the model, and open the run folder: the run's state,
    ready for `loop`. The run folder's lock is taken into `held` (rank 0), which the caller closes
    when the run ends. The caller's `config` is left as it was."""
    config = copy.deepcopy(config)
    model_cfg, prompt_cfg, data_cfg, optim, run = config.model, config.prompt, config.data, config.optim, config.run
    limit_kernel_cache()
    world, device = init_world(pick_device(model_cfg.device))
    model_cfg.device = device.type
    # --precision, --model-dtype, --max-batch-tokens; --attention and the loss path below
    automatic = resolve_automatic(config, device.type, native_bf16(device))
    if model_cfg.fsdp and world.size == 1:
        raise ValueError("--fsdp shards the frozen model across torchrun's processes: start it with "
                         "torchrun --nproc_per_node=N (N >= 2), or drop --fsdp")
    with world.main_first():  # rank 0 locks the run folder and writes the demo model and data, the others read them
        output_dir, resume_dir, resumed = prepare_output_dir(config, world, held)

    # Data before the model, so that bad data fails fast.
    seed_everything(run.seed)
    train_rows, eval_rows = load_data_rows(config)
    data_cfg.label_words = data_cfg.label_words or label_words_of(data_cfg.template, train_rows)
    check_label_setup(config, eval_rows, automatic)
    # --fsdp: the whole model sits only in host memory; fully_shard moves each rank's shards to its GPU.
    load_device = torch.device("cpu") if model_cfg.fsdp else device
    base_model, tokenizer = load_base_model(model_cfg.model, model_cfg.model_dtype, load_device)
    attention = apply_speed_options(base_model, model_cfg)
    if model_cfg.attention == AUTO:
        model_cfg.attention = automatic["attention"] = attention
    train_examples, eval_examples = tokenize_data(config, tokenizer, train_rows, eval_rows)
    if resumed:
        check_resume_rows(run.resume, resumed, train_examples)

    # The prompt reads embedding rows (text and vocab init) before any weight is sharded.
    model, initial_weight = build_soft_prompt_model(config, base_model, tokenizer, resume_dir, resumed["step"] if resumed else None)
    check_fits_context(train_examples + eval_examples, prompt_cfg.num_virtual_tokens, model.context_length)
    loss_fn, automatic["loss_path"] = training_loss(model, model_cfg.shared_prefix)
    metrics_path = output_dir / "metrics.jsonl"
    kept_metrics = metrics_up_to(metrics_path, resumed["step"]) if resumed else None

    # Every input is accepted: from here on the run folder is written.
    if world.is_main:
        parallelism = "fsdp" if model_cfg.fsdp else "data" if world.size > 1 else "none"
        resolved = {**config.to_dict(), "world_size": world.size, "parallelism": parallelism, "automatic": automatic}
        write_atomic(output_dir / "train_config.json", json_bytes(resolved))
    if model_cfg.fsdp:
        shard_frozen_model(base_model)
        model.to(device)  # what stays whole: the prompt, the embedding, the head, the buffers
    optimizer = torch.optim.AdamW(
        list(model.prompt.parameters()), lr=optim.lr, weight_decay=optim.weight_decay, fused=device.type == "cuda"
    )
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled="fp16" in (model_cfg.precision, model_cfg.model_dtype))
    autocast = functools.partial(
        torch.autocast, device.type, dtype=DTYPES[model_cfg.precision], enabled=model_cfg.precision != "fp32"
    )

    # Each optimizer step takes `grad_accum` batches of the epoch's order.
    batches_per_epoch = math.ceil(len(train_examples) / optim.batch_size)
    total_steps = optim.max_steps or optim.epochs * math.ceil(batches_per_epoch / optim.grad_accum)
    # The data position is global (batches of the global order), so a run resumes on any number of ranks.
    # What the data position means is saved with it (and added to a resumed older state).
    meaning = {**position_settings(config), "train_rows": len(train_examples), "train_rows_sha256": rows_sha256(train_examples)}
    state = TrainState(**meaning)
    if resume_dir:
        state = dataclasses.replace(TrainState.from_dict(restore_training_state(resume_dir, optimizer, scaler)), **meaning)
        if world.is_main:
            print(f"resuming {resume_dir} at step {state.step} of {total_steps}", file=sys.stderr)
    if world.is_main:
        open_metrics(metrics_path, kept_metrics)
    return Run(
        config, world, device, output_dir, model, initial_weight, tokenizer.pad_token_id, train_examples,
        eval_examples, optimizer, scaler, autocast, loss_fn, state, total_steps, batches_per_epoch,
        train_rows=train_rows, eval_rows=eval_rows,
    )  # fmt: skip


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
                prompt_once=run.loss_fn is shared_prefix_loss,
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
