"""Where a training step's time goes: the shared-prefix loss against the plain one, batch by batch,
and the prompt's own pass.

    python benchmarks/bench_step.py --model DIR --data ethos_binary_train.jsonl [--rows 160] [--precision bf16]

It trains nothing. It sorts the rows by length, takes batches of `--batch-size` at the shortest,
the quartiles and the longest, and times one forward and backward of each loss on each (the fastest
of `--repeats`): `shared_prefix_loss` (the prompt once per batch: in one sequence with the rows, or
on a model whose attention is not pluggable, in a pass of its own before them) and
`SoftPromptModel.loss` (the prompt in every row). On a two-pass model the prompt pass alone is
timed too: the decoder on the `[1, V]` prompt with the gradient of every layer's keys and values,
which is what that path adds to each micro-batch. Beside each time: positions, matmul TFLOP
(`batch_cost`) and TFLOP/s.
Without --model it builds a tiny BLOOM and its demo rows (seconds; what the test runs). Writes
results/step-<name>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench_train import load_rows
from soft_prompt.config import HATE_INIT_TEXT
from soft_prompt.data import collate, tokenize_rows
from soft_prompt.files import portable_path
from soft_prompt.masks import IGNORE_INDEX
from soft_prompt.model import SoftPromptModel
from soft_prompt.runtime import DTYPES, load_base_model, set_attention
from soft_prompt.prefix_attention import prefix_attention_kernel
from soft_prompt.shared_prefix import batch_cost, prompt_pass, shared_prefix_loss, text_columns
from soft_prompt.tiny import save_tiny_model

RESULTS = Path(__file__).parent / "results"


def fastest_seconds(step, repeats: int) -> float:
    step()  # warm-up: kernels for this shape
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def prompt_pass_step(model: SoftPromptModel) -> None:
    """`prompt_pass`, forward and backward into the prompt through the output and every layer's
    cached keys and values (the gradient the text rows would send)."""
    hidden, cache = prompt_pass(model, model.base_model.get_input_embeddings().weight.dtype)  # as the shared path
    total = hidden.float().sum() + sum(layer.keys.float().sum() + layer.values.float().sum() for layer in cache.layers)
    total.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local causal-LM folder (default: a tiny BLOOM)")
    parser.add_argument("--data", help="ethos- or prompts-shaped .jsonl (default: generated rows)")
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", help="a sentence added to the report, e.g. how loaded the machine was")
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()

    model_dir = args.model or str(save_tiny_model(Path(tempfile.mkdtemp()) / "tiny-bloom", "bloom"))
    name = Path(args.model).name if args.model else "tiny-bloom"
    base, tokenizer = load_base_model(model_dir, args.precision)  # the weights in the compute dtype, as train.py
    attention = set_attention(base, "auto", "cpu", args.precision)
    model = SoftPromptModel(base, args.num_virtual_tokens, "text", init_text=HATE_INIT_TEXT, tokenizer=tokenizer).train()
    rows, template = load_rows(args.data, args.rows)
    examples, _ = tokenize_rows(tokenizer, template, rows, args.max_length)  # the loss on every token, as the tutorial
    examples.sort(key=lambda example: len(example.input_ids))
    last = len(examples) - args.batch_size
    starts = sorted({round(last * q) for q in (0, 0.25, 0.5, 0.75, 1)})
    autocast = lambda: torch.autocast("cpu", DTYPES[args.precision], enabled=args.precision != "fp32")  # noqa: E731

    def loss_step(loss_fn, batch):
        def step():
            with autocast():
                loss = loss_fn(model, **batch)
            loss.backward()
        return step

    def prompt_step():
        with autocast():
            prompt_pass_step(model)

    V = args.num_virtual_tokens
    results = []
    if prefix_attention_kernel(base) is None:  # the shared path runs the prompt in a pass of its own
        cost = batch_cost(base, V, 0, 0, 0, shared=True)
        seconds = fastest_seconds(prompt_step, args.repeats)
        results.append({"batch": "prompt pass alone", "rows": 1, "length": V, "shared_positions": cost.positions,
                        "shared_tflop": cost.flops / 1e12, "shared_ms": 1000 * seconds, "shared_tflops": cost.flops / 1e12 / seconds})
    for start in starts:
        batch = collate(examples[start : start + args.batch_size], tokenizer.pad_token_id)
        rows_in, length = batch["input_ids"].shape
        labelled = int((batch["labels"] != IGNORE_INDEX).sum())
        line = {"batch": f"rows {start}-{start + rows_in - 1} by length", "rows": rows_in, "length": length}
        for side, loss_fn, shared in (("shared", shared_prefix_loss, True), ("plain", SoftPromptModel.loss, False)):
            columns = text_columns(batch["labels"]) if shared else length  # the shared path stops at the last label
            cost = batch_cost(base, V, rows_in, columns, labelled, shared=shared)
            seconds = fastest_seconds(loss_step(loss_fn, batch), args.repeats)
            line |= {f"{side}_positions": cost.positions, f"{side}_tflop": cost.flops / 1e12, f"{side}_ms": 1000 * seconds,
                     f"{side}_tflops": cost.flops / 1e12 / seconds}
        results.append(line)

    command = " ".join(["python benchmarks/bench_step.py", *(f"--{key.replace('_', '-')} {portable_path(value)}"
                        for key, value in vars(args).items() if value is not None and key not in ("output_dir", "note"))])
    setting = {"model": name, "precision": args.precision, "attention": attention, "num_virtual_tokens": V,
               "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    lines = [f"# One training step, shared prefix against plain ({name}, {args.precision}, V = {V})", "", f"`{command}`", "",
             f"Setting: {json.dumps(setting)}. Each time is the fastest of {args.repeats}, forward and backward. "
             + (args.note or ""), "",
             "| batch | rows x length | shared: ms | positions | TFLOP/s | plain: ms | positions | TFLOP/s | shared / plain |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for line in results:
        plain = (f"{line['plain_ms']:.0f} | {line['plain_positions']} | {line['plain_tflops']:.3f} | "
                 f"{line['shared_ms'] / line['plain_ms']:.2f}") if "plain_ms" in line else "- | - | - | -"
        lines.append(f"| {line['batch']} | {line['rows']} x {line['length']} | {line['shared_ms']:.0f} | {line['shared_positions']} | "
                     f"{line['shared_tflops']:.3f} | {plain} |")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step-{name.lower()}-{args.precision}"
    (output_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (output_dir / f"{stem}.json").write_text(json.dumps({"command": command, "setting": setting, "results": results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
