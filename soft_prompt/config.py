"""Training configuration: dataclasses whose defaults reproduce the tutorial, the task presets, and
the command line, whose flags map one to one onto the fields (`--batch-size` is `optim.batch_size`).

A run's configuration is resolved in three layers: the dataclass defaults, then the `--task`
preset, then the flags given on the command line. Fields left at `auto` are then filled in once
the device is known (`resolve_automatic`). The result is written to `train_config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from .calibration import CALIBRATIONS, FIT_METRICS, LABEL_SCORES
from .templates import check_label_words, template_fields
from .embedding import INIT_STRATEGIES, TEXT_FILLS

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"  # a field left to be chosen from the device and --precision (`resolve_automatic`)
# --max-batch-tokens auto on CPU: micro-batches of 512 padded tokens take no more time than whole
# batches and less memory (measured in benchmarks/README.md).
CPU_MAX_BATCH_TOKENS = 512
SCHEDULERS = ("linear", "cosine", "constant")
LOSS_SCOPES = ("all", "completion")
DEVICES = ("auto", "cuda", "mps", "cpu")
REPARAMS = ("none", "residual")
BEST_METRICS = (AUTO, "eval_loss", *FIT_METRICS)  # auto: macro_f1 with label words, else eval_loss
HATE_TEMPLATE = "Sentence : {text} Label : {label_text}"
HATE_INIT_TEXT = "Indicates whether the sentence contains hate speech or not"


def auto_or_count(value: str) -> int | str:
    """The value of a flag that takes `auto` or a whole number."""
    if value == AUTO:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give auto or a whole number, not {value!r}") from None


@dataclass
class ModelConfig:
    model: str = field(
        default="bigscience/bloomz-560m",
        metadata={"help": "hub name or local folder of a causal LM; tiny-bloom builds a tiny random one (no download)"},
    )
    model_dtype: str = field(
        default=AUTO,
        metadata={"help": "dtype of the frozen weights (auto: the --precision dtype); the prompt and its optimizer stay fp32",
                  "choices": (AUTO, *PRECISIONS)},
    )
    precision: str = field(
        default=AUTO,
        metadata={"help": "autocast compute dtype (fp16 adds a GradScaler); auto: bf16 where the device runs it "
                          "natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), fp32 elsewhere",
                  "choices": (AUTO, *PRECISIONS)},
    )
    device: str = field(default="auto", metadata={"help": "auto = cuda, then mps, then cpu", "choices": DEVICES})
    attention: str = field(
        default=AUTO,
        metadata={"help": "the frozen model's attention kernel: eager, or sdpa (scaled_dot_product_attention; BLOOM's "
                          "through bloom_sdpa.py, equal to round-off); auto: eager on CPU under bf16/fp16, whose SDPA "
                          "backward is slower there, otherwise the kernel the model loads with",
                  "choices": (AUTO, "eager", "sdpa")},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the frozen model's activations in the backward: less memory for long rows, more time"}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile each of the frozen decoder's blocks, one compile serving them all (dynamic "
                          "shapes; the first steps pay for compiling)"},
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "under torchrun: shard the frozen transformer blocks across the processes (FSDP2); "
                          "the prompt, input embedding and LM head stay whole on each"},
    )
    shared_prefix: bool = field(
        default=True,
        metadata={"help": "run the prompt's V positions once per micro-batch and the rows' text against their keys "
                          "and values (equal loss and gradient, less work); --no-shared-prefix runs [P][x] for every "
                          "row. Models or modes that cannot take it run the plain path (train_config.json says why)"},
    )


@dataclass
class PromptConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": "V, the number of virtual tokens"})
    init: str = field(default="random", metadata={"help": "prompt initialisation", "choices": INIT_STRATEGIES})
    init_text: str | None = field(default=None, metadata={"help": "text whose embeddings start the prompt (--init text)"})
    text_fill: str = field(
        default="pad", metadata={"help": "fill a short --init-text with pad tokens or by repeating it", "choices": TEXT_FILLS}
    )
    vocab_size: int | None = field(default=None, metadata={"help": "--init vocab draws ids below this; unset means 5000"})
    reparam: str = field(
        default="none",
        metadata={"help": "residual: train the prompt as P + LayerNorm(MLP(P)), one MLP shared by the virtual tokens "
                          "(Razdaibiedina et al. 2023); checkpoints hold the resulting prompt", "choices": REPARAMS},
    )
    reparam_hidden: int = field(default=128, metadata={"help": "hidden size of the --reparam residual MLP"})
    ensemble: int = field(
        default=1,
        metadata={"help": "train this many prompts, seeded --seed, --seed + 1, ..., one after another, saved together "
                          "in best/ (infer.py combines their label scores)"},
    )


@dataclass
class DataConfig:
    task: str | None = field(default=None, metadata={"help": "preset: prompts, hate, demo (offline) or classify (any labelled --data)"})
    data: str | None = field(default=None, metadata={"help": "hub data set, local folder or .jsonl/.json/.csv/.parquet file"})
    template: str | None = field(default=None, metadata={"help": "text with {column} fields, e.g. 'Sentence : {text} Label : {label_text}'"})
    split: str = field(default="train", metadata={"help": "split of a hub data set (or folder) to train on"})
    eval_data: str | None = field(default=None, metadata={"help": "evaluation data: hub name, folder or file"})
    eval_split: str | None = field(default=None, metadata={"help": "split of --eval-data, or of hub --data when no --eval-data"})
    val_fraction: float = field(
        default=0.0,
        metadata={"help": "hold out this fraction of the training rows for evaluation instead (stratified by label "
                          "when there are label words)"},
    )
    val_seed: int | None = field(default=None, metadata={"help": "seed of the --val-fraction split (unset: --seed)"})
    loss_on: str = field(
        default="all", metadata={"help": "loss on every text token, or only from the template's last field on", "choices": LOSS_SCOPES}
    )
    max_length: int = field(default=256, metadata={"help": "tokens per row, eos included; longer rows are cut"})
    group_by_length: bool = field(
        default=True, metadata={"help": "batch rows of similar length to cut padding, batches still shuffled (--no-group-by-length: plain shuffle)"}
    )
    label_words: list[str] | None = field(
        default=None,
        metadata={"help": "label words recorded for classification (default: the preset's, or the last field's values when at most 20)"},
    )


@dataclass
class ClassifyConfig:
    best_metric: str = field(
        default=AUTO,
        metadata={"help": "what best/ keeps the best of, on the evaluation rows (auto: macro_f1 when there are label "
                          "words, else eval_loss)", "choices": BEST_METRICS},
    )
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without a better --best-metric (0: never)"})
    label_score: str = field(
        default="sum",
        metadata={"help": "a label's score: its tokens' summed or mean log-probability", "choices": LABEL_SCORES},
    )
    calibration: str = field(
        default="none",
        metadata={"help": "fitted after training and stored in best/ for infer.py: content-free (Zhao et al. 2021), "
                          "domain (Fei et al. 2023), fitted (per-label offsets on the evaluation rows) or none",
                  "choices": CALIBRATIONS},
    )


@dataclass
class OptimConfig:
    lr: float = field(default=3e-2, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="linear", metadata={"help": "decay after warmup", "choices": SCHEDULERS})
    warmup_steps: int = field(default=0, metadata={"help": "optimizer steps of linear warmup from 0"})
    batch_size: int = field(
        default=8, metadata={"help": "rows per batch; under torchrun the global batch, split across the processes"}
    )
    grad_accum: int = field(
        default=1, metadata={"help": "batches per optimizer step; the loss is the mean over all their labelled tokens"}
    )
    max_batch_tokens: int | str = field(
        default=AUTO,
        metadata={"help": "split a batch over this many padded tokens (rows x longest row, virtual tokens included) "
                          f"into micro-batches: the same gradient, less activation memory (0: never split; auto: "
                          f"{CPU_MAX_BATCH_TOKENS} on CPU, 0 on CUDA and MPS, whose matmuls need whole batches)",
                  "parse": auto_or_count},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the prompt's gradient norm to this (0: no clipping)"})
    epochs: int = field(default=5, metadata={"help": "passes over the training rows"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps instead (0: use --epochs)"})
    max_bad_steps: int = field(default=25, metadata={"help": "stop after this many skipped (non-finite) steps in a row"})


@dataclass
class RunConfig:
    output_dir: str | None = field(default=None, metadata={"help": "run folder: last/, best/, metrics (default runs/<task>)"})
    seed: int = field(default=42, metadata={"help": "seeds python, numpy, torch, the prompt and the data order"})
    save_every: int = field(default=100, metadata={"help": "save last/ every this many steps (0: only at the end)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many steps (0: at each epoch's end)"})
    log_every: int = field(default=1, metadata={"help": "write a metrics.jsonl line every this many steps"})
    resume: str | None = field(default=None, metadata={"help": "continue the run saved in this folder (or its last/)"})
    probe: list[str] = field(
        default_factory=list,
        metadata={"help": "a text to continue greedily with the current prompt at step 0 and at each evaluation, logged "
                          "in metrics.jsonl with the scripts of its letters (repeat the flag for several)"},
    )
    probe_tokens: int = field(default=30, metadata={"help": "tokens each --probe continuation generates"})


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The tutorial's two experiments and the offline demo: the fields each preset sets. Flags win.
TASKS: dict[str, dict] = {
    "prompts": {
        "data": "fka/awesome-chatgpt-prompts",
        "template": "Act as a {act}. Prompt: {prompt}",
        "init": "random",
    },
    "hate": {
        "data": "SetFit/ethos_binary",
        "template": HATE_TEMPLATE,
        "init": "text",
        "init_text": HATE_INIT_TEXT,
        "label_words": ["hate speech", "no hate speech"],
        "eval_split": "test",
    },
    # A tiny BLOOM and ETHOS-shaped rows, generated into the run folder: nothing is downloaded.
    "demo": {
        "model": "tiny-bloom",
        "template": HATE_TEMPLATE,
        "init": "text",
        "init_text": HATE_INIT_TEXT,
        "label_words": ["hate speech", "no hate speech"],
        "loss_on": "completion",
        "val_fraction": 0.25,
        "epochs": 3,
        "save_every": 20,
    },
    # Any labelled data: the user gives --data, --template and --label-words. It holds out its own
    # stratified validation rows, picks best/ and fits the calibration on them (docs/training.md).
    # Its init is the --init-text where one is given, else the label words (`resolve_config`).
    "classify": {
        "loss_on": "completion",
        "val_fraction": 0.2,
        "init": "text",
        "epochs": 8,
        "patience": 3,
        "label_score": "mean",
        "calibration": "fitted",
    },
}


def config_fields(config: TrainConfig) -> dict[str, tuple[object, str]]:
    """Every leaf field by its name (unique across groups): name -> (group object, name)."""
    leaves = {}
    for group in dataclasses.fields(config):
        section = getattr(config, group.name)
        for leaf in dataclasses.fields(section):
            leaves[leaf.name] = (section, leaf.name)
    return leaves


def resolve_config(overrides: dict) -> TrainConfig:
    """Defaults, then the preset of `overrides["task"]`, then `overrides` (field name -> value)."""
    config = TrainConfig()
    leaves = config_fields(config)
    task = overrides.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}, or pass --data and --template")
    for name, value in {**TASKS.get(task, {}), **overrides}.items():
        if name not in leaves:
            raise ValueError(f"unknown configuration field {name!r}")
        section, leaf = leaves[name]
        setattr(section, leaf, value)
    if task == "classify" and "init" not in overrides and not config.prompt.init_text:
        config.prompt.init = "labels"  # no text to start from: the label words, the rest sampled vocabulary
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """A one-line `ValueError` for an impossible setting, before anything is loaded."""
    prompt, data, optim, run = config.prompt, config.data, config.optim, config.run
    if prompt.num_virtual_tokens < 1:
        raise ValueError(f"--num-virtual-tokens must be at least 1, got {prompt.num_virtual_tokens}")
    if data.data is None and data.task != "demo":
        raise ValueError("no training data: pass --task prompts|hate|demo, or --data FILE_OR_HUB_NAME and --template")
    if data.task == "classify" and not data.label_words:
        raise ValueError("--task classify needs --label-words (two or more), e.g. --label-words \"hate speech\" \"no hate speech\"")
    if data.template is None:
        raise ValueError("no template: pass --template with {column} fields, e.g. 'Sentence : {text} Label : {label_text}'")
    if prompt.init == "text" and not prompt.init_text:
        raise ValueError("--init text needs --init-text")
    if not 0.0 <= data.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {data.val_fraction}")
    if data.max_length < 2:
        raise ValueError(f"--max-length must be at least 2 (a token and eos), got {data.max_length}")
    at_least_one = {"reparam_hidden": prompt.reparam_hidden, "ensemble": prompt.ensemble, "batch_size": optim.batch_size, "grad_accum": optim.grad_accum, "epochs": optim.epochs,
                    "max_bad_steps": optim.max_bad_steps, "log_every": run.log_every,
                    "probe_tokens": run.probe_tokens}
    not_negative = {"warmup_steps": optim.warmup_steps, "max_steps": optim.max_steps, "weight_decay": optim.weight_decay,
                    "max_grad_norm": optim.max_grad_norm, "save_every": run.save_every, "eval_every": run.eval_every,
                    "patience": config.classify.patience}
    if optim.max_batch_tokens != AUTO:
        not_negative["max_batch_tokens"] = optim.max_batch_tokens
    for name, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name, value in not_negative.items():
        if value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if not optim.lr > 0:
        raise ValueError(f"--lr must be positive, got {optim.lr}")
    for name, value in {"lr": optim.lr, "weight_decay": optim.weight_decay, "max_grad_norm": optim.max_grad_norm}.items():
        if not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if prompt.vocab_size is not None and prompt.vocab_size < 1:
        raise ValueError(f"--vocab-size must be at least 1, got {prompt.vocab_size}")
    template_fields(data.template)  # a malformed template fails here, before anything is loaded
    if data.val_fraction > 0 and data.eval_data is not None:
        raise ValueError(
            f"--val-fraction {data.val_fraction} and --eval-data both give evaluation rows: "
            "drop --eval-data, or pass --val-fraction 0"
        )
    if run.probe and config.model.fsdp:
        raise ValueError("--probe generates on rank 0 alone, which a model sharded by --fsdp cannot do: drop one of them")
    if data.label_words:  # [] (only from Python) records no label words
        check_label_words(data.label_words, "--label-words")
    if config.classify.calibration == "fitted" and data.val_fraction == 0 and data.eval_data is None and data.eval_split is None:
        raise ValueError("--calibration fitted fits on evaluation rows: add --val-fraction (e.g. 0.2), or choose another --calibration")


def resolve_automatic(config: TrainConfig, device_type: str, native_bf16: bool) -> dict:
    """Replace the fields left at `auto` by their values on `device_type` ("cpu", "cuda", "mps"),
    which runs bf16 natively or not; returns {field: value} of those, which `train_config.json`
    records under "automatic".

    --precision auto is bf16 where the device runs it natively and fp32 elsewhere (the prompt and its
    optimizer state stay fp32 either way). --model-dtype auto is the --precision dtype: autocast
    casts every weight to it at each matmul anyway, so storing it so saves the casts and half the
    weight memory. --max-batch-tokens auto is `CPU_MAX_BATCH_TOKENS` on CPU and 0 (never split) on a
    GPU, whose throughput needs whole batches.
    """
    automatic = {}
    if config.model.precision == AUTO:
        config.model.precision = automatic["precision"] = "bf16" if native_bf16 else "fp32"
    if config.model.model_dtype == AUTO:
        config.model.model_dtype = automatic["model_dtype"] = config.model.precision
    if config.optim.max_batch_tokens == AUTO:
        budget = CPU_MAX_BATCH_TOKENS if device_type == "cpu" else 0
        config.optim.max_batch_tokens = automatic["max_batch_tokens"] = budget
    return automatic


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """One flag per configuration field. Defaults stay out of the namespace (SUPPRESS) so that
    only the flags actually given override the preset; `--help` shows every default."""
    parser = OneLineParser(
        prog="train.py", description="Train a soft prompt for a frozen causal LM.", argument_default=argparse.SUPPRESS
    )
    config = TrainConfig()
    for group in dataclasses.fields(config):
        section = getattr(config, group.name)
        arguments = parser.add_argument_group(group.name)
        for leaf in dataclasses.fields(section):
            flag = "--" + leaf.name.replace("_", "-")
            help_text = f"{leaf.metadata['help']} (default: {getattr(section, leaf.name)})"
            if leaf.type == "bool":
                arguments.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            elif leaf.type == "list[str] | None":
                arguments.add_argument(flag, nargs="+", metavar="WORDS", help=help_text)
            elif leaf.type == "list[str]":  # repeatable: --probe A --probe B
                arguments.add_argument(flag, action="append", metavar="TEXT", help=help_text)
            else:
                kind = leaf.metadata.get("parse") or {"int": int, "int | None": int, "float": float}.get(leaf.type, str)
                arguments.add_argument(flag, type=kind, choices=leaf.metadata.get("choices"), help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> dict:
    """The flags given on the command line, as {field name: value} for `resolve_config`."""
    return vars(build_parser().parse_args(argv))
