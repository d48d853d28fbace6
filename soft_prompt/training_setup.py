"""What `training.loop` starts from: `setup(config, held)` resolves a copy of the configuration
(the `auto` fields, the preset's demo inputs, the output folder), checks every input, loads the
data and the model, opens the run folder and returns the `Run`. Nothing in the run folder is
written until every input is accepted, so a rejected run leaves an existing one as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import AUTO, TrainConfig, resolve_automatic
from .data import Example, check_fits_context, check_template_columns, load_rows, split_validation, tokenize_rows
from .distributed import World, init_world, shard_frozen_model
from .files import append_text, check_output_folder, json_bytes, write_atomic, writing
from .model import SoftPromptModel
from .reparam import add_reparam, restore_reparam
from .run_lock import RunLock
from .runtime import DTYPES, apply_speed_options, limit_kernel_cache, load_base_model, native_bf16, pick_device
from .shared_prefix import shared_prefix_loss, shared_prefix_supported
from .templates import label_words_of, template_fields
from .training_state import (
    METRICS_FILE,
    TrainState,
    check_resume_rows,
    check_resume_settings,
    find_resume_dir,
    metrics_up_to,
    read_training_state,
    restore_training_state,
    rows_sha256,
)

TINY_MODEL = "tiny-bloom"  # --model tiny-bloom: a tiny random BLOOM written into the run folder


# -- the inputs ---------------------------------------------------------------------------------


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


def training_loss(model: SoftPromptModel, shared_prefix: bool) -> tuple[Callable[..., torch.Tensor], str]:
    """(the loss function the loop runs, what train_config.json's "automatic" says of it): the
    shared-prefix path where it was asked for and equals the plain one on this model in training
    mode, else `SoftPromptModel.loss`, with the reason."""
    if not shared_prefix:
        return SoftPromptModel.loss, "plain (--no-shared-prefix)"
    supported, reason = shared_prefix_supported(model)
    return (shared_prefix_loss, "shared prefix") if supported else (SoftPromptModel.loss, f"plain ({reason})")


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
        return self.output_dir / METRICS_FILE

    @property
    def prompt_once(self) -> bool:
        """Whether `loss_fn` runs the prompt once per micro-batch (`shared_prefix.py`)."""
        return self.loss_fn is shared_prefix_loss


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
    metrics_path = output_dir / METRICS_FILE
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
        config=config, world=world, device=device, output_dir=output_dir, model=model, initial_weight=initial_weight,
        pad_token_id=tokenizer.pad_token_id, train_examples=train_examples, eval_examples=eval_examples,
        optimizer=optimizer, scaler=scaler, autocast=autocast, loss_fn=loss_fn, state=state,
        total_steps=total_steps, batches_per_epoch=batches_per_epoch, train_rows=train_rows, eval_rows=eval_rows,
    )  # fmt: skip


