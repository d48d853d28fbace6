"""Inference speed: ours against PEFT on the same model and prompt weights.

    python benchmarks/bench_infer.py --model DIR --data ethos_binary_test.jsonl [--rows 400]

1. Generation tokens/s on the tutorial's inputs, batch 1 and 16, greedy, repetition_penalty 1.5:
   ours (prefix cache; and without it) vs PEFT with use_cache=False and, where it runs, cached.
2. Classification of labelled rows: ours `classify()` (label scoring, one batched forward per
   rows x labels) vs PEFT `generate(max_new_tokens=3)` read as the tutorial reads it.
Prints a table with ratios and writes benchmarks/results/infer-<model>.md/.json.
Without --model it builds a tiny Llama (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from soft_prompt import SoftPromptModel
from soft_prompt.config import TASKS
from soft_prompt.model import load_base_model

RESULTS = Path(__file__).parent / "results"
TEMPLATE = TASKS["hate"]["template"]
LABELS = TASKS["hate"]["label_words"]
TUTORIAL_INPUTS = [
    "Act as a fitness Trainer. Prompt: ",
    "Sentence : Head is the shape of a light bulb Label : ",
    "Sentence : I would beat the shit out of every Russian Label : ",
]


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def load(model_dir: str | None):
    """(model folder, frozen model, tokenizer padding on the left for generation)."""
    if model_dir is None:
        from soft_prompt.tiny import save_tiny_model

        model_dir = save_tiny_model(tempfile.mkdtemp(), "llama")
    base, tokenizer = load_base_model(model_dir)
    tokenizer.padding_side = "left"
    return model_dir, base, tokenizer


def peft_twin(model_dir: str, prompt_weight: torch.Tensor):
    """PEFT's PeftModelForCausalLM on its own copy of the base model, with our prompt weights."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base, _ = load_base_model(model_dir)
    peft_model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt_weight.shape[0]))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt_weight)
    return peft_model.eval()


def generation_rows(ours, peft_model, tokenizer, max_new_tokens: int) -> list[dict]:
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.5,
                   pad_token_id=tokenizer.pad_token_id, min_new_tokens=max_new_tokens)
    rows = []
    for batch_size in (1, 16):
        texts = (TUTORIAL_INPUTS * batch_size)[:batch_size]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        new_tokens = batch_size * max_new_tokens
        sides = {
            "ours (prefix cache)": lambda: ours.generate(**batch, **options),
            "ours (no prefix cache)": lambda: ours.generate(**batch, prefix_cache=False, **options),
            "PEFT use_cache=False": lambda: peft_model.generate(**batch, use_cache=False, **options),
            "PEFT cached": lambda: peft_model.generate(**batch, **options),
        }
        reference = None
        for side, run in sides.items():
            with torch.no_grad():
                try:
                    run()  # warm-up
                    output, seconds = timed(run)
                except Exception as error:  # PEFT's cached path is broken on some transformers versions
                    rows.append({"batch": batch_size, "side": side, "error": f"{type(error).__name__}: {error}"[:120]})
                    continue
            reference = output if reference is None else reference
            rows.append({"batch": batch_size, "side": side, "tokens_per_second": new_tokens / seconds,
                         "same_tokens_as_ours": bool(torch.equal(output, reference))})
    return rows


def classification_rows(ours, peft_model, tokenizer, data_rows: list[dict], batch_size: int) -> list[dict]:
    texts = [row["text"] for row in data_rows]
    gold = [row["label_text"] for row in data_rows]
    with torch.no_grad():
        (predicted, _), ours_seconds = timed(lambda: ours.classify(texts, LABELS, template=TEMPLATE, tokenizer=tokenizer, batch_size=batch_size))

        def peft_generate():
            answers = []
            for start in range(0, len(texts), batch_size):
                prompts = [f"Sentence : {text} Label : " for text in texts[start : start + batch_size]]
                batch = tokenizer(prompts, return_tensors="pt", padding=True)
                output = peft_model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False,
                                             pad_token_id=tokenizer.pad_token_id)
                answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            return answers

        answers, peft_seconds = timed(peft_generate)
    # The tutorial reads the generated text; anything that is not exactly a label counts as wrong.
    peft_predicted = [next((label for label in sorted(LABELS, key=len, reverse=True) if answer.strip().startswith(label)), None) for answer in answers]
    return [
        {"side": "ours classify()", "rows_per_second": len(texts) / ours_seconds,
         "accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold), "not_a_label": 0.0},
        {"side": "PEFT generate(max_new_tokens=3)", "rows_per_second": len(texts) / peft_seconds,
         "accuracy": sum(p == g for p, g in zip(peft_predicted, gold)) / len(gold),
         "not_a_label": sum(p is None for p in peft_predicted) / len(gold)},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local causal-LM folder (default: a tiny Llama built here)")
    parser.add_argument("--checkpoint", help="a trained prompt to use (default: random init, seed 0)")
    parser.add_argument("--data", help="ethos-shaped .jsonl with text and label_text (default: generated rows)")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir, base, tokenizer = load(args.model)
    if args.checkpoint:
        ours = SoftPromptModel.from_pretrained(base, args.checkpoint, tokenizer=tokenizer)
    else:
        ours = SoftPromptModel(base, num_virtual_tokens=args.num_virtual_tokens, seed=0, tokenizer=tokenizer)
    peft_model = peft_twin(model_dir, ours.prompt.weight.detach())
    if args.data:
        with open(args.data) as f:
            data_rows = [json.loads(line) for line in f if line.strip()][: args.rows]
    else:
        from soft_prompt.tiny import demo_rows

        data_rows = demo_rows(args.rows)

    generation = generation_rows(ours, peft_model, tokenizer, args.max_new_tokens)
    classification = classification_rows(ours, peft_model, tokenizer, data_rows, args.batch_size)
    write_report(args, model_dir, generation, classification)


def write_report(args, model_dir: str, generation: list[dict], classification: list[dict]) -> None:
    name = Path(args.model).name if args.model else "tiny-llama"
    command = "python benchmarks/bench_infer.py " + " ".join(
        f"{key}={value}" for key, value in [("--model", args.model), ("--data", args.data), ("--rows", args.rows)] if value
    )
    lines = [
        f"# Inference: ours vs PEFT ({name})", "", f"`{command}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}", "",
        f"## Generation ({args.max_new_tokens} new tokens, greedy, repetition_penalty 1.5)", "",
        "| batch | side | new tokens/s | ours (prefix cache) / side | same tokens as ours |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in generation:
        reference = next(r for r in generation if r["batch"] == row["batch"] and r["side"] == "ours (prefix cache)")
        if "error" in row:
            lines.append(f"| {row['batch']} | {row['side']} | fails: {row['error'].replace('|', '/')} | | |")
        else:
            lines.append(f"| {row['batch']} | {row['side']} | {row['tokens_per_second']:.1f} | "
                         f"{reference['tokens_per_second'] / row['tokens_per_second']:.2f}x | "
                         f"{'yes' if row['same_tokens_as_ours'] else 'no'} |")
    ours_rate = classification[0]["rows_per_second"]
    lines += [
        "", f"## Classification of {args.rows if args.data else 'generated'} rows (batch {args.batch_size})", "",
        "| side | rows/s | accuracy | answers not a label | ours / side |", "| --- | --- | --- | --- | --- |",
    ] + [
        f"| {row['side']} | {row['rows_per_second']:.2f} | {row['accuracy']:.3f} | {row['not_a_label']:.1%} | "
        f"{ours_rate / row['rows_per_second']:.2f}x |" for row in classification
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"infer-{name}.md").write_text(report)
    (output_dir / f"infer-{name}.json").write_text(
        json.dumps({"command": command, "generation": generation, "classification": classification}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
