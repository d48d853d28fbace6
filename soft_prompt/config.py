"""Training configuration: one dataclass whose defaults reproduce the tutorial, and the task presets.

`train.py` maps each flag onto one field (`--num-virtual-tokens` -> `num_virtual_tokens`); a preset
(`--task`) fills the fields it names unless a flag sets them; every run writes the resolved
configuration to `train_config.json` next to its checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

HATE_INIT_TEXT = "Indicates whether the sentence contains hate speech or not"

TASKS: dict[str, dict] = {
    # The tutorial's prompt-generation experiment.
    "prompts": dict(
        data="fka/awesome-chatgpt-prompts",
        template="Act as a {act}. Prompt: {prompt}",
        init="random",
        val_fraction=0.1,
    ),
    # The tutorial's hate-speech classification experiment.
    "hate": dict(
        data="SetFit/ethos_binary",
        template="Sentence : {text} Label : {label_text}",
        init="text",
        init_text=HATE_INIT_TEXT,
        label_words=["hate speech", "no hate speech"],
        val_fraction=0.1,
    ),
    # Offline: a tiny BLOOM, a tokenizer and ethos-shaped rows, all made on the spot.
    "demo": dict(
        template="Sentence : {text} Label : {label_text}",
        init="text",
        init_text=HATE_INIT_TEXT,
        label_words=["hate speech", "no hate speech"],
        num_virtual_tokens=8,
        val_fraction=0.2,
        max_steps=30,
        batch_size=8,
        lr=3e-2,
        eval_every=10,
    ),
}


@dataclass
class TrainConfig:
    # what to train
    task: str | None = None
    model: str = "bigscience/bloomz-560m"
    data: str | None = None
    split: str = "train"
    eval_data: str | None = None
    eval_split: str | None = None
    val_fraction: float = 0.0
    template: str | None = None
    label_words: list[str] | None = None
    loss_on: str = "all"
    max_length: int = 256
    group_by_length: bool = False
    # the soft prompt
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    text_fill: str = "pad"
    # optimisation
    lr: float = 3e-2
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 5
    max_steps: int | None = None
    max_bad_steps: int = 10
    seed: int = 42
    # hardware and precision
    device: str | None = None
    precision: str = "fp32"
    model_dtype: str = "fp32"
    # outputs
    output_dir: str = "runs/soft-prompt"
    save_every: int = 100
    eval_every: int | None = None
    log_every: int = 1
    resume: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_config(given: dict) -> TrainConfig:
    """The configuration from a task preset (if any) overridden by the given fields."""
    task = given.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)} or pass --data and --template")
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(given) - names
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    return TrainConfig(**{**TASKS.get(task, {}), **given})
