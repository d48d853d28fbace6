"""Parity with PEFT's prompt tuning: where this implementation equals PEFT, and where (and why) it
deliberately differs, measured on the same model and data.

    python benchmarks/parity.py [--tiny bloom|gpt2|llama | --model DIR] [--data FILE.jsonl]

Prints a table and writes benchmarks/results/parity-<model>.md and .json (or under --output-dir).
Each row is a measured figure against a stated tolerance:

    pass   we equal PEFT within the tolerance
    FAIL   we do not: a bug (the script exits 1)
    info   a documented difference (or PEFT's own breakage); its check says what was verified

Sections: 1 initialisation, 2 forward, 3 training (the shipped loop, soft_prompt.training.train()),
4 generation, 5 checkpoints. Every model is loaded fresh for each side, so no side sees another's
state. Every side, train() included, loads the model from a copy of its folder whose config sets
every dropout to 0, so that training is deterministic and compares implementations, not random
masks (train() and Trainer put the model in train mode).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train, also when loaded from a file path
from bench_train import load_rows, load_tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from soft_prompt import SoftPromptModel  # noqa: E402
from soft_prompt.checkpoint import PROMPT_KEY, WEIGHTS_NAME  # noqa: E402
from soft_prompt.config import resolve_config  # noqa: E402
from soft_prompt.data import Example, batch_order, collate  # noqa: E402
from soft_prompt.embedding import text_init_ids  # noqa: E402
from soft_prompt.files import portable_path  # noqa: E402
from soft_prompt.templates import fill_template  # noqa: E402
from soft_prompt.training import train  # noqa: E402
from soft_prompt.training_setup import load_data_rows, tokenize_data  # noqa: E402

RESULTS = Path(__file__).parent / "results"
INIT_TEXT = "Is this hate speech?"  # shorter than the prompt on every tokenizer here: the fill shows
# The tutorial's generation inputs: one prompts-task opening and two ETHOS-style sentences.
GENERATION_INPUTS = [
    "Act as a fitness Trainer. Prompt: ",
    "Sentence : Why do you insist on being so annoying? Label : ",
    "Sentence : those people are animals and should be thrown out Label : ",
]

# Tolerances. The two sides run the same frozen model on the same inputs_embeds, so fp32 and bf16
# logits are expected bit-equal up to kernel reordering; a training step only adds AdamW on top.
EXACT = 0.0
LOGITS_FP32 = 1e-5  # max |logit difference|
LOGITS_BF16 = 1e-2  # max |logit difference|: a few bf16 ulps of logits of size ~1-10
LOSS_FP32 = 1e-5  # |loss difference| / loss: our chunked head sums a 49k-way softmax in other order
LOSS_BF16 = 1e-2  # |loss difference| / loss
TRAIN_LOSS_REL = 1e-5  # max over steps of |loss difference| / loss
# |final prompt difference| / |how far training moved the prompt| (Frobenius norms): AdamW turns a
# gradient entry near its eps into a step of size ~lr either way, so max |diff| alone says little.
TRAIN_UPDATE_REL = 1e-3


@dataclass
class Row:
    section: str
    check: str
    measured: str
    tolerance: str
    status: str  # "pass", "FAIL" or "info"
    note: str = ""
    details: dict = field(default_factory=dict)


def status(ok: bool) -> str:
    return "pass" if ok else "FAIL"


# -----------------------------------------------------------------------------------------------
# Models, data and batches shared by every row


@dataclass
class Setup:
    model_dir: str
    name: str
    tokenizer: object
    rows: list[dict]  # the data rows (row 3 writes them for train())
    examples: list[list[int]]  # tokenised training texts, each at most max_length ids
    template: str
    args: argparse.Namespace


def without_dropout(model_dir: str, directory: Path) -> str:
    """`model_dir`, or where its config sets a dropout, a copy in `directory` whose config sets
    every one to 0 (the other files linked): train() loads the model itself, so the folder it is
    given must be dropout-free (see the module docstring)."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    rates = {name: value for name, value in config.to_dict().items()
             if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value}  # fmt: skip
    if not rates:
        return model_dir
    directory.mkdir()
    for path in Path(model_dir).resolve().iterdir():
        if path.name != "config.json":
            (directory / path.name).symlink_to(path)
    for name in rates:
        setattr(config, name, 0.0)
    config.save_pretrained(directory)
    return str(directory)


def load_base(model_dir: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh copy of the frozen model, eval mode; checked to have no dropout left."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # nn.Dropout's p, and rates kept as floats (Llama's attention_dropout, BLOOM's hidden_dropout).
    active = [f"{name}.{attribute}" for name, module in model.named_modules() for attribute, value in vars(module).items()
              if (attribute == "p" if isinstance(module, nn.Dropout) else "dropout" in attribute)
              and isinstance(value, float) and value]  # fmt: skip
    if active:
        raise ValueError(f"{model_dir}: dropout left after zeroing the config's rates: {', '.join(active[:5])}")
    return model


def make_setup(args: argparse.Namespace, model_dir: str, name: str) -> Setup:
    tokenizer = load_tokenizer(model_dir)
    # Right padding: prompt, text and padding then sit at the same positions on both sides.
    tokenizer.padding_side = "right"
    rows, template = load_rows(args.data, args.steps * args.batch_size)
    # The tutorial's preprocessing: tokenizer(text) with its defaults, truncated.
    examples = [
        tokenizer(fill_template(template, row), truncation=True, max_length=args.max_length)["input_ids"]
        for row in rows
    ]
    return Setup(model_dir, name, tokenizer, rows, examples, template, args)


def batches(setup: Setup) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of `batch_size` examples in order, built by the tutorial's collator
    (right padding; labels = input_ids with padding set to -100), so every side gets the same."""
    collator = DataCollatorForLanguageModeling(setup.tokenizer, mlm=False)
    size = setup.args.batch_size
    examples = [setup.examples[i % len(setup.examples)] for i in range(setup.args.steps * size)]
    return [collator([{"input_ids": ids} for ids in examples[i : i + size]]) for i in range(0, len(examples), size)]


def ours(setup: Setup, base: nn.Module | None = None, **init) -> SoftPromptModel:
    base = base if base is not None else load_base(setup.model_dir)
    init = {"init": "random", "seed": setup.args.seed, **init}
    return SoftPromptModel(base, setup.args.num_virtual_tokens, tokenizer=setup.tokenizer, **init)


def peft(setup: Setup, base: nn.Module | None = None, init: str = "RANDOM", weight: torch.Tensor | None = None):
    """PEFT's prompt tuning on a fresh model; its prompt set to `weight` when given.

    RANDOM is nn.Embedding's normal(0, 1) from the global RNG: get_peft_model draws nothing before
    it, so seeding right before the call gives the rows `torch.manual_seed(seed)` gives (row 1).
    """
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base = base if base is not None else load_base(setup.model_dir)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=setup.args.num_virtual_tokens,
        prompt_tuning_init=init,
        prompt_tuning_init_text=INIT_TEXT if init == "TEXT" else None,
        tokenizer_name_or_path=setup.model_dir if init == "TEXT" else None,
    )
    torch.manual_seed(setup.args.seed)
    model = get_peft_model(base, config)
    if weight is not None:
        with torch.no_grad():
            peft_prompt(model).copy_(weight)
    return model


def peft_prompt(model) -> torch.Tensor:
    return model.prompt_encoder["default"].embedding.weight


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def max_abs_real(ours_logits: torch.Tensor, peft_logits: torch.Tensor, batch: dict, setup: Setup) -> float:
    """max |logit difference| at the prompt's and the text's positions, not at padding: we pass
    position ids, PEFT does not; with right padding they agree on every real token, and padding's
    logits are never used."""
    prompt = torch.ones(batch["input_ids"].shape[0], setup.args.num_virtual_tokens)
    real = torch.cat([prompt, batch["attention_mask"]], dim=1).bool()  # [B, V + T]
    return max_abs(ours_logits[real], peft_logits[real])


# -----------------------------------------------------------------------------------------------
# 1. Initialisation


def initialisation_rows(setup: Setup) -> list[Row]:
    rows = []
    num_virtual = setup.args.num_virtual_tokens
    embeddings = load_base(setup.model_dir).get_input_embeddings().weight.detach()

    ours_random = ours(setup).prompt.weight
    peft_random = peft_prompt(peft(setup))
    diff = max_abs(ours_random, peft_random)
    rows.append(Row("1 init", f"random (seed={setup.args.seed}) == PEFT RANDOM (torch.manual_seed before get_peft_model)",
                    f"max|diff| {diff:.1e}", "== 0", status(diff == EXACT)))

    # PEFT's TEXT: tokenizer(text) with the tokenizer's defaults, cycled to V ids.
    ours_ids = text_init_ids(setup.tokenizer, INIT_TEXT, num_virtual, "repeat")
    peft_text_ids = setup.tokenizer(INIT_TEXT)["input_ids"]
    peft_ids = (peft_text_ids * math.ceil(num_virtual / len(peft_text_ids)))[:num_virtual]
    peft_text = peft_prompt(peft(setup, init="TEXT"))
    assert torch.equal(peft_text, embeddings[peft_ids]), "PEFT's TEXT rows are not the ids we derived for it"
    ours_repeat = ours(setup, init="text", init_text=INIT_TEXT, text_fill="repeat").prompt.weight
    diff = max_abs(ours_repeat, peft_text)
    ids = {"ours": ours_ids, "peft": peft_ids}
    if ours_ids == peft_ids:
        rows.append(Row("1 init", 'text, text_fill="repeat" == PEFT TEXT', f"max|diff| {diff:.1e}; same {len(ours_ids)} ids",
                        "== 0", status(diff == EXACT), details=ids))
    else:
        # A tokenizer that adds special tokens by default (a BOS, e.g. Llama-style): PEFT embeds it.
        extra = setup.tokenizer.convert_ids_to_tokens([i for i in peft_text_ids if i in setup.tokenizer.all_special_ids])
        ok = torch.equal(ours_repeat, embeddings[ours_ids])
        rows.append(Row("1 init", 'text, text_fill="repeat" vs PEFT TEXT', f"max|diff| {diff:.1e}; PEFT's ids add {extra}",
                        "rows == embeddings[ours ids]", "info" if ok else "FAIL",
                        "we tokenise without special tokens, PEFT with the tokenizer's defaults", details=ids))

    text_ids = setup.tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    pad_ids = text_init_ids(setup.tokenizer, INIT_TEXT, num_virtual, "pad")
    ours_pad = ours(setup, init="text", init_text=INIT_TEXT, text_fill="pad").prompt.weight
    filled = max(num_virtual - len(text_ids), 0)
    ok = torch.equal(ours_pad, embeddings[pad_ids])
    rows.append(Row("1 init", 'text, text_fill="pad" (default) vs PEFT TEXT (cycles)',
                    f"{num_virtual - filled} text rows + {filled} pad rows; {int((ours_pad != peft_text).any(1).sum())} rows differ",
                    "rows == embeddings[text ids + pad ids]", "info" if ok else "FAIL",
                    "documented: a short text is padded, not repeated; text_fill='repeat' is PEFT's",
                    details={"ours": pad_ids, "peft": peft_ids}))

    # SAMPLE_VOCAB: PEFT draws randint(vocab) from the global RNG after nn.Embedding's own draw;
    # ours from a private generator seeded `seed`. Same distribution, other draws.
    vocab = embeddings.shape[0]
    ours_vocab = ours(setup, init="vocab", vocab_size=vocab).prompt.weight
    peft_vocab = peft_prompt(peft(setup, init="SAMPLE_VOCAB"))
    ours_vocab_ids, peft_vocab_ids = row_ids(ours_vocab, embeddings), row_ids(peft_vocab, embeddings)
    ok = None not in ours_vocab_ids and None not in peft_vocab_ids
    rows.append(Row("1 init", f"vocab (vocab_size={vocab}) vs PEFT SAMPLE_VOCAB",
                    f"both embedding rows: {ok}; {sum(a == b for a, b in zip(ours_vocab_ids, peft_vocab_ids))}/{num_virtual} same ids",
                    "every row is an embedding row", "info" if ok else "FAIL",
                    "documented: uniform ids on both sides, drawn from different RNG streams; ours defaults to the "
                    "first 5000 ids (Lester et al.), PEFT samples the whole vocabulary",
                    details={"ours": ours_vocab_ids, "peft": peft_vocab_ids}))
    return rows


def row_ids(prompt: torch.Tensor, embeddings: torch.Tensor) -> list[int | None]:
    """For each prompt row, the first token id whose embedding equals it exactly (None if none)."""
    ids = []
    for row in prompt.detach():
        matches = (embeddings == row).all(dim=1).nonzero()
        ids.append(int(matches[0]) if len(matches) else None)
    return ids


# -----------------------------------------------------------------------------------------------
# 2. Forward


def forward_rows(setup: Setup) -> list[Row]:
    rows = []
    batch = batches(setup)[0]
    for dtype, logits_tol, loss_tol in ((torch.float32, LOGITS_FP32, LOSS_FP32), (torch.bfloat16, LOGITS_BF16, LOSS_BF16)):
        name = str(dtype).removeprefix("torch.")
        ours_model = ours(setup, base=load_base(setup.model_dir, dtype))
        peft_model = peft(setup, base=load_base(setup.model_dir, dtype), weight=ours_model.prompt.weight)
        with torch.no_grad():
            ours_out = ours_model(**batch)
            peft_out = peft_model(**batch)
            chunked_loss = ours_model.loss(**batch)
        diff = max_abs_real(ours_out.logits, peft_out.logits, batch, setup)
        rows.append(Row("2 forward", f"{name}: logits at real positions, batch {list(batch['input_ids'].shape)} right-padded",
                        f"max|diff| {diff:.1e}", f"<= {logits_tol:g}", status(diff <= logits_tol)))
        for label, loss in (("forward(labels).loss", ours_out.loss), ("loss() (chunked head)", chunked_loss)):
            rel = abs(loss.item() - peft_out.loss.item()) / abs(peft_out.loss.item())
            rows.append(Row("2 forward", f"{name}: {label} vs PEFT forward loss",
                            f"{loss.item():.6f} vs {peft_out.loss.item():.6f} (rel {rel:.1e})", f"rel <= {loss_tol:g}",
                            status(rel <= loss_tol)))
    return rows


# -----------------------------------------------------------------------------------------------
# 3. Training: the shipped loop, soft_prompt.training.train(), against PEFT on the same batches


def shipped_config(setup: Setup, data_path: Path, output_dir: Path):
    """The train() configuration of row 3: the script's rows, model and optimiser settings, one
    batch per step (no accumulation, no micro-batches), every step logged, fp32 on the CPU."""
    args = setup.args
    return resolve_config({
        "model": setup.model_dir, "data": str(data_path), "template": setup.template, "max_length": args.max_length,
        "num_virtual_tokens": args.num_virtual_tokens, "init": "random", "seed": args.seed,
        "batch_size": args.batch_size, "grad_accum": 1, "max_steps": args.steps, "lr": args.lr,
        "warmup_steps": args.warmup_steps, "scheduler": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0,
        "device": "cpu", "model_dtype": "fp32", "precision": "fp32", "max_batch_tokens": 0, "log_every": 1, "save_every": 0,
        "output_dir": str(output_dir),
    })  # fmt: skip


def shipped_batches(setup: Setup, config) -> list[list[Example]]:
    """The batches train() takes, in its order: its own rows and tokenisation
    (load_data_rows, tokenize_data), then data.batch_order for epoch 0, 1, ... until `steps`."""
    examples, _ = tokenize_data(config, setup.tokenizer, *load_data_rows(config))
    lengths = [len(example.input_ids) for example in examples]
    order: list[list[int]] = []
    for epoch in range(setup.args.steps):  # at least one batch per epoch
        order += batch_order(lengths, config.optim.batch_size, config.run.seed, epoch, config.data.group_by_length)
        if len(order) >= setup.args.steps:
            break
    return [[examples[i] for i in indices] for indices in order[: setup.args.steps]]


def train_shipped(setup: Setup, directory: Path) -> tuple[list[float], torch.Tensor, list[list[Example]]]:
    """Run train() on the script's rows written as jsonl; returns its per-step losses
    (metrics.jsonl), its final prompt (last/adapter_model.safetensors) and its batches, rebuilt."""
    data_path = directory / "rows.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in setup.rows))
    run_dir = directory / "run"
    train(shipped_config(setup, data_path, run_dir))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, setup.args.steps + 1)), lines
    final = load_file(run_dir / "last" / WEIGHTS_NAME)[PROMPT_KEY]
    return losses, final, shipped_batches(setup, shipped_config(setup, data_path, run_dir))


def train_peft_plain(model, batch_list: list[list[Example]], setup: Setup) -> list[float]:
    """PEFT in a plain loop, one AdamW step per batch as Trainer takes it: forward, backward, clip
    to 1.0 (Trainer's max_grad_norm), step, schedule. AdamW as Trainer builds it: betas
    0.9/0.999, eps 1e-8 and no weight decay (torch's own default would add 0.01); Trainer's linear
    schedule (warmup from 0)."""
    args, params = setup.args, [peft_prompt(model)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, eps=1e-8)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    model.train()  # as train() and Trainer do; the folder's dropout is 0, so this changes nothing
    losses = []
    for examples in batch_list:
        loss = model(**collate(examples, setup.tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train_peft_trainer(model, batch_list: list[list[Example]], setup: Setup, per_token_mean: bool) -> list[float]:
    """PEFT driven by HF Trainer as the tutorial does: default optimizer (fused AdamW), linear
    schedule, clip 1.0; only the data is ours, fed in our order: each dataset item is one of
    train()'s batches (per-device batch 1, a sequential sampler), padded by data.collate.

    Returns the loss of each step as Trainer computed it. By default Trainer passes the model a
    `num_items_in_batch` (the labels it counts), and the model divides its summed loss by that
    instead of taking the per-token mean; per_token_mean=True sets `model_accepts_loss_kwargs =
    False`, which turns that off."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    args = setup.args
    losses = []

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, *a, **kw):
            loss = super().compute_loss(*a, **kw)
            losses.append(loss.item())
            return loss

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = InOrderTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=1,  # one item = one whole batch
                max_steps=args.steps,
                learning_rate=args.lr,
                weight_decay=0.0,
                warmup_steps=args.warmup_steps,
                lr_scheduler_type="linear",
                max_grad_norm=1.0,
                use_cpu=True,
                seed=args.seed,
                report_to="none",
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
            ),
            train_dataset=batch_list,
            data_collator=lambda items: collate(items[0], setup.tokenizer.pad_token_id),
        )
        if per_token_mean:
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
    return losses


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def training_rows(setup: Setup) -> tuple[list[Row], dict]:
    args = setup.args
    # train()'s starting prompt: init "random" with its seed, as ours() builds it (row 1: == PEFT's).
    start = ours(setup).prompt.weight.detach().clone()
    with tempfile.TemporaryDirectory() as directory:
        ours_losses, ours_final, batch_list = train_shipped(setup, Path(directory))
    curves, final = {"ours": ours_losses}, {"start": start, "ours": ours_final}

    peft_model = peft(setup, weight=start)
    curves["peft-loop"] = train_peft_plain(peft_model, batch_list, setup)
    final["peft-loop"] = peft_prompt(peft_model).detach().clone()
    for side, per_token_mean in (("peft-trainer", False), ("peft-trainer-mean", True)):
        peft_model = peft(setup, weight=start)
        curves[side] = train_peft_trainer(peft_model, batch_list, setup, per_token_mean)
        final[side] = peft_prompt(peft_model).detach().clone()

    sizes = sorted({len(examples) for examples in batch_list})
    setting = (f"{args.steps} steps of train()'s batches (data.batch_order, seed {args.seed}; "
               f"{'/'.join(map(str, sizes))} rows each), lr {args.lr:g}, warmup {args.warmup_steps}, clip 1.0")
    rows = []

    def compare(side: str, check: str, note: str = "") -> Row:
        loss_rel = max_rel(curves["ours"], curves[side])
        prompt_diff = max_abs(final["ours"], final[side])
        update_rel = ((final["ours"] - final[side]).norm() / (final["ours"] - final["start"]).norm()).item()
        ok = loss_rel <= TRAIN_LOSS_REL and update_rel <= TRAIN_UPDATE_REL
        return Row("3 train", f"{check}: {setting}",
                   f"losses max rel {loss_rel:.1e}; final prompt max|diff| {prompt_diff:.1e}, |diff| / |update| {update_rel:.1e}",
                   f"losses rel <= {TRAIN_LOSS_REL:g}; |diff| / |update| <= {TRAIN_UPDATE_REL:g}", status(ok), note)

    rows.append(compare("peft-loop", "ours = soft_prompt.training.train() vs PEFT in a plain loop"))
    tutorial = compare("peft-trainer", "train() vs PEFT + HF Trainer (tutorial defaults)")
    # Trainer counts the labels over labels[:, 1:] when it knows the model's loss as the shifting
    # causal-LM loss (BLOOM, Llama; not GPT2LMHeadModel). PEFT has prepended the prompt's -100s by
    # then, so every real label is a target: the summed loss is divided by one token per row too
    # few. Predict that scale per batch and check that it explains Trainer's first loss (same
    # prompt on both sides; later steps also carry the scaled updates' effect).
    labels = [collate(examples, setup.tokenizer.pad_token_id)["labels"] for examples in batch_list]
    scale = [(b != -100).sum().item() / (b[:, 1:] != -100).sum().item() for b in labels]
    if tutorial.status == "FAIL":
        explained = abs(curves["peft-trainer"][0] / (curves["ours"][0] * scale[0]) - 1)
        tutorial.status = "info" if explained <= TRAIN_LOSS_REL else "FAIL"
        tutorial.measured += f"; first loss Trainer / ours = predicted scale to {explained:.1e}"
        tutorial.tolerance = f"the scale explains the first loss to rel <= {TRAIN_LOSS_REL:g}"
        tutorial.note = (
            f"PEFT's bias under Trainer: its loss is the per-token mean x {min(scale):.4f}..{max(scale):.4f} (real "
            "labels / labels[:, 1:]), Trainer's num_items_in_batch missing one token per row once the prompt's labels "
            "are prepended; the gradient is scaled alike, which AdamW mostly normalises away; the clip to 1.0 does not"
        )
    else:
        tutorial.note = "Trainer counts every label for this model, which with the prompt prepended is the true count"
    rows.append(tutorial)
    rows.append(compare("peft-trainer-mean", "train() vs PEFT + HF Trainer, model_accepts_loss_kwargs=False (per-token mean)"))
    return rows, {"curves": curves, "trainer_loss_scale": scale}


# -----------------------------------------------------------------------------------------------
# 4. Generation: greedy, the tutorial's settings, on the tutorial's inputs


def new_tokens(output: torch.Tensor, input_length: int, eos_token_id: int) -> list[list[int]]:
    """Each row's generated ids after the input, up to and including the first eos."""
    rows = []
    for row in output[:, input_length:].tolist():
        rows.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return rows


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return f"row {index} differs from token {at}"
    return "identical"


def generation_rows(setup: Setup) -> list[Row]:
    if not hasattr(SoftPromptModel, "generate"):
        return [Row("4 generate", "greedy outputs vs PEFT", "skipped: SoftPromptModel has no generate", "-", "info")]
    tokenizer, args = setup.tokenizer, setup.args
    # A text-initialised prompt (PEFT's TEXT rows): embeddings the model knows, so outputs vary.
    ours_model = ours(setup, init="text", init_text=INIT_TEXT, text_fill="repeat")
    peft_model = peft(setup, weight=ours_model.prompt.weight)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.5,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def generate(model, texts: list[str], **kwargs) -> list[list[int]]:
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**inputs, **settings, **kwargs)
        return new_tokens(output, inputs["input_ids"].shape[1], tokenizer.eos_token_id)

    def peft_cached(texts: list[str]) -> tuple[list[list[int]] | None, str]:
        """PEFT's cached path, informational: it is PEFT's, and broken on some transformers."""
        try:
            return generate(peft_model, texts, use_cache=True), ""
        except Exception as error:  # PEFT's failure is the measurement
            return None, f"PEFT raised {type(error).__name__}: {str(error).splitlines()[0][:120]}"

    rows = []
    tokenizer.padding_side = "left"  # for the batch; a single input has no padding
    try:
        alone = {}
        for text in GENERATION_INPUTS:
            # Both our paths: the soft prompt's cached keys/values (default) and the frozen
            # model's own generate() on [P][x].
            ours_ids, plain_ids = generate(ours_model, [text]), generate(ours_model, [text], prefix_cache=False)
            peft_ids = alone[text] = generate(peft_model, [text], use_cache=False)
            rows.append(Row("4 generate", f"{text!r}: ours (prefix cache on / off) vs PEFT use_cache=False",
                            f"{first_difference(ours_ids, peft_ids)} / {first_difference(plain_ids, peft_ids)}; "
                            f"{len(ours_ids[0])} tokens, {len(set(ours_ids[0]))} distinct", "token for token",
                            status(ours_ids == plain_ids == peft_ids),
                            details={"ours": ours_ids, "ours_prefix_cache_off": plain_ids, "peft": peft_ids,
                                     "ours_text": tokenizer.batch_decode(ours_ids)}))
            cached, error = peft_cached([text])
            rows.append(Row("4 generate", f"{text!r}: PEFT use_cache=True vs ours (informational)",
                            error or first_difference(ours_ids, cached), "token for token",
                            "pass" if cached == ours_ids else "info", details={"peft": cached}))

        # The two sentences as one left-padded batch: each row must get what it gets alone.
        texts = GENERATION_INPUTS[1:]
        expected = [alone[text][0] for text in texts]
        ours_ids, plain_ids = generate(ours_model, texts), generate(ours_model, texts, prefix_cache=False)
        rows.append(Row("4 generate", "the 2 sentences, left-padded batch: ours (prefix cache on / off) vs PEFT "
                        "use_cache=False one at a time", f"{first_difference(ours_ids, expected)} / "
                        f"{first_difference(plain_ids, expected)}", "token for token",
                        status(ours_ids == plain_ids == expected), details={"ours": ours_ids, "ours_prefix_cache_off": plain_ids}))
        peft_ids = generate(peft_model, texts, use_cache=False)
        rows.append(Row("4 generate", "the same batch: PEFT use_cache=False vs ours", first_difference(ours_ids, peft_ids),
                        "token for token", "pass" if peft_ids == ours_ids else "info",
                        "" if peft_ids == ours_ids else "PEFT puts the prompt before the padding, [P][pad][x], and drops "
                        "position ids, so a model that numbers positions itself (GPT-2) counts the padding: the padded "
                        "row is not what it gets alone",
                        details={"peft": peft_ids}))
        cached, error = peft_cached(texts)
        rows.append(Row("4 generate", "the same batch: PEFT use_cache=True vs ours (informational)",
                        error or first_difference(ours_ids, cached), "token for token",
                        "pass" if cached == ours_ids else "info", details={"peft": cached}))
    finally:
        tokenizer.padding_side = "right"
    return rows


# -----------------------------------------------------------------------------------------------
# 5. Checkpoints: each side loads the other's directory


def checkpoint_rows(setup: Setup) -> list[Row]:
    from peft import PeftModel

    batch = batches(setup)[0]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        ours_model = ours(setup)
        with torch.no_grad():
            ours_model.prompt.weight.add_(0.1)  # a prompt no initialiser gives, so loading is what is tested
        ours_model.save_pretrained(Path(directory) / "ours")
        peft_loaded = PeftModel.from_pretrained(load_base(setup.model_dir), Path(directory) / "ours")
        with torch.no_grad():
            diff = max_abs_real(ours_model(**batch).logits, peft_loaded(**batch).logits, batch, setup)
        same = torch.equal(peft_prompt(peft_loaded), ours_model.prompt.weight)
        rows.append(Row("5 checkpoint", "PEFT loads ours (PeftModel.from_pretrained): prompt and logits",
                        f"prompt equal: {same}; logits max|diff| {diff:.1e}", f"equal; <= {LOGITS_FP32:g}",
                        status(same and diff <= LOGITS_FP32)))

        peft_model = peft(setup, weight=ours_model.prompt.weight.detach() * -1)
        peft_model.save_pretrained(Path(directory) / "peft")
        ours_loaded = SoftPromptModel.from_pretrained(load_base(setup.model_dir), Path(directory) / "peft")
        with torch.no_grad():
            diff = max_abs_real(ours_loaded(**batch).logits, peft_model(**batch).logits, batch, setup)
        same = torch.equal(ours_loaded.prompt.weight, peft_prompt(peft_model))
        rows.append(Row("5 checkpoint", "we load PEFT's (SoftPromptModel.from_pretrained): prompt and logits",
                        f"prompt equal: {same}; logits max|diff| {diff:.1e}", f"equal; <= {LOGITS_FP32:g}",
                        status(same and diff <= LOGITS_FP32)))
    return rows


# -----------------------------------------------------------------------------------------------
# The report


def markdown(setup: Setup, rows: list[Row], extra: dict) -> str:
    args = setup.args
    lines = [
        f"# Parity with PEFT: {setup.name}",
        "",
        f"`{' '.join(extra['command'])}`",
        "",
        f"model `{setup.name}`, data `{args.data or 'soft_prompt.tiny.demo_rows'}` (template `{setup.template}`), "
        f"{args.num_virtual_tokens} virtual tokens, max length {args.max_length}, seed {args.seed}; "
        f"{extra['environment']}; {extra['seconds']:.0f} s",
        "",
        "| # | check | measured | tolerance | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [row.section, row.check + (f" ({row.note})" if row.note else ""), row.measured, row.tolerance, row.status]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # |x| is not a column
    if "curves" in extra:
        lines += ["", "Training losses per step:", "", "| step | " + " | ".join(extra["curves"]) + " |",
                  "| --- |" + " --- |" * len(extra["curves"])]
        for step, losses in enumerate(zip(*extra["curves"].values()), 1):
            lines.append(f"| {step} | " + " | ".join(f"{loss:.6f}" for loss in losses) + " |")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            model_dir, name = args.model, Path(args.model).resolve().name
        else:
            from soft_prompt.tiny import save_tiny_model

            model_dir, name = save_tiny_model(Path(scratch) / "model", args.tiny), f"tiny-{args.tiny}"
        model_dir = without_dropout(model_dir, Path(scratch) / "no-dropout")
        setup = make_setup(args, model_dir, name)
        rows = initialisation_rows(setup) + forward_rows(setup)
        training, curves = training_rows(setup)
        rows += training + generation_rows(setup) + checkpoint_rows(setup)

    extra = {
        "command": ["python", "benchmarks/parity.py",  # absolute paths relative to the checkout: no machine paths
                    *(portable_path(a) for a in (argv if argv is not None else sys.argv[1:]))],
        "environment": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {__import__('peft').__version__}, {platform.machine()} CPU x{torch.get_num_threads()}",
        "seconds": time.time() - started,
        **curves,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"parity-{name}.md").write_text(markdown(setup, rows, extra))
    report = {"model": name, "args": {k: portable_path(v) for k, v in vars(args).items()}, **extra, "rows": [asdict(row) for row in rows]}
    (output_dir / f"parity-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(setup, rows, extra))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local causal-LM folder; without it a tiny model is built")
    parser.add_argument("--tiny", choices=("bloom", "gpt2", "llama"), default="bloom", help="the tiny model to build")
    parser.add_argument("--data", help="ETHOS-shaped (text, label_text) or prompts-shaped (act, prompt) jsonl")
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--warmup-steps", type=int, default=0, help="0: Trainer's default, the tutorial's")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(1 if any(row.status == "FAIL" for row in run()) else 0)
