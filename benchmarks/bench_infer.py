"""Inference speed: ours against PEFT on the same model and prompt weights.

    python benchmarks/bench_infer.py --model DIR --data ethos_binary_test.jsonl [--rows 400]

1. Generation tokens/s on the tutorial's inputs, batch 1 and 16, greedy, repetition_penalty 1.5:
   ours (prefix cache; and without it) vs PEFT with use_cache=False and, where it runs, cached.
2. Classification of labelled rows: ours `classify()` (label scoring: one pass over each row's
   prefix, every label scored after it) vs PEFT `generate(max_new_tokens=3)` read as the tutorial reads it.
Prints a table with ratios and writes benchmarks/results/infer-<model>.md/.json
(--classification-only: 2. alone, to infer-classification-<model>.md/.json).
Without --model it builds a tiny Llama (seconds).

    python benchmarks/bench_infer.py --many-prompts --model DIR --data FILE.jsonl [--rows 48] [--prompt-counts 1 4 16]

3. Many prompts on one model: K random prompts (V each), the same rows, row i answered by prompt
   i mod K; ours in mixed batches against (a) ours switching prompt per group of rows and (b) PEFT
   `load_adapter` + `set_adapter` per group (the tutorial's way, `use_cache=False`: its cached
   path gives other tokens on transformers 5.24). Each side and K runs in a fresh process (its
   own peak memory); the tokens of every side are compared with ours mixed. Writes
   benchmarks/results/infer-many-prompts-<model>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from soft_prompt import SoftPromptModel
from soft_prompt.config import TASKS
from soft_prompt.files import portable_path
from soft_prompt.runtime import load_base_model

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
    # eos_token_id=None makes every row generate max_new_tokens (min_new_tokens would too, but it
    # is no option of the prefix-cache loop and would send ours through generate() instead).
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.5,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
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


# -- many prompts on one model ---------------------------------------------------------------------

MANY_PROMPTS_SIDES = ("ours mixed batches", "ours switching per group", "PEFT set_adapter per group")


def equal_length_inputs(tokenizer, data_rows: list[dict], num_rows: int, input_tokens: int) -> list[list[int]]:
    """`num_rows` inputs of exactly `input_tokens` ids, cut from the rows' texts run together: no
    batch needs padding, so PEFT's batches give each row what it gives alone (its left-padded ones
    do not; see benchmarks/README.md) and every side's tokens can be compared."""
    ids = tokenizer(" ".join(row["text"] for row in data_rows), add_special_tokens=False)["input_ids"]
    chunks = [ids[start : start + input_tokens] for start in range(0, len(ids) - input_tokens + 1, input_tokens)]
    return (chunks * (num_rows // len(chunks) + 1))[:num_rows]


def many_prompts_side(args) -> dict:
    """One side in this process: at one K (seconds, peak memory, bytes each prompt holds, the new
    tokens), or with --interleave ours mixed at each of those K in turn (the fastest run of each;
    with --keep-prompt-cache each prompt's cache is computed once, before the timed runs)."""
    from bench_train import PeakMemory

    setup = json.loads(Path(args.setup).read_text())
    counts = args.interleave or [args.num_prompts]
    directories = setup["prompt_dirs"][: max(counts)]
    names = [Path(directory).name for directory in directories]
    inputs = setup["inputs"]
    base, tokenizer = load_base_model(setup["model_dir"])
    # eos_token_id=None: every row makes exactly max_new_tokens, on every side.
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.5, eos_token_id=None)
    if args.side == "PEFT set_adapter per group":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, directories[0], adapter_name=names[0])
        for name, directory in zip(names[1:], directories[1:]):
            model.load_adapter(directory, adapter_name=name)
        model.eval()
        options["use_cache"] = False
        prompt_bytes = sum(p.numel() * p.element_size() for p in model.prompt_encoder.parameters())

        def generate(batch, name):
            model.set_adapter(name)
            return model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **options)
    else:
        model = SoftPromptModel.from_pretrained(base, directories[0], tokenizer=tokenizer, name=names[0])
        for name, directory in zip(names[1:], directories[1:]):
            model.load_prompt(directory, name)
        prompt_bytes = sum(p.numel() * p.element_size() for p in model.prompts.parameters())

        def generate(batch, name):
            if isinstance(name, list):  # mixed: one name per row
                return model.generate(batch, prompt_names=name, **options)
            model.set_prompt(name)
            return model.generate(batch, **options)

    def plan(num_prompts: int) -> tuple[list[str], list[tuple[list[int], str | None]]]:
        """Each row's prompt (row i: prompt i mod K) and the batches: (rows, their prompt or None: mixed)."""
        row_names = [names[row % num_prompts] for row in range(len(inputs))]
        if args.side == "ours mixed batches":
            return row_names, [(list(range(start, min(start + args.batch_size, len(inputs)))), None)
                               for start in range(0, len(inputs), args.batch_size)]
        batches = []  # each prompt's rows together, in batches of at most --batch-size
        for name in names[:num_prompts]:
            rows = [row for row in range(len(inputs)) if row_names[row] == name]
            batches += [(rows[start : start + args.batch_size], name) for start in range(0, len(rows), args.batch_size)]
        return row_names, batches

    def run(row_names, batches):
        if hasattr(model, "prompt_cache") and not args.keep_prompt_cache:
            model.prompt_cache.clear()  # every prompt's cache is computed in each timed run
        new_tokens = [None] * len(inputs)
        for rows, name in batches:
            batch = torch.tensor([inputs[row] for row in rows])
            output = generate(batch, name if name is not None else [row_names[row] for row in rows])
            for row, tokens in zip(rows, output[:, batch.shape[1] :].tolist()):
                new_tokens[row] = tokens
        return new_tokens

    plans = {num_prompts: plan(num_prompts) for num_prompts in counts}
    seconds = {num_prompts: [] for num_prompts in counts}
    repeats = args.peft_repeats if args.side == "PEFT set_adapter per group" else args.repeats
    with torch.no_grad(), PeakMemory() as memory:
        generate(torch.tensor(inputs[:2]), names[0])  # warm-up
        if args.keep_prompt_cache:
            run(*plans[max(counts)])  # computes every prompt's cache, as a server that keeps them would
        for _ in range(repeats):  # the fastest run: the least disturbed by other processes
            for num_prompts, (row_names, batches) in plans.items():  # with --interleave, the Ks take turns
                new_tokens, run_seconds = timed(lambda: run(row_names, batches))
                seconds[num_prompts].append(run_seconds)
    if args.interleave:
        return {"side": args.side, "interleaved_seconds": {k: min(v) for k, v in seconds.items()}, "all_seconds": seconds}
    cache_bytes = model.prompt_cache.size() if hasattr(model, "prompt_cache") else 0  # the prompts' keys and values (ours)
    (_, batches), seconds = plans[args.num_prompts], seconds[args.num_prompts]
    return {"side": args.side, "num_prompts": args.num_prompts, "seconds": min(seconds), "all_seconds": seconds,
            "batches": len(batches), "peak_memory_mib": memory.peak / 2**20, "rise_mib": memory.extra / 2**20,
            "prompt_bytes_each": prompt_bytes / args.num_prompts, "prompt_cache_bytes_each": cache_bytes / args.num_prompts,
            "new_tokens": new_tokens}


def many_prompts(args, model_dir: str, base, tokenizer, data_rows: list[dict]) -> None:
    """Save the prompts and the inputs once, run every side at every K in a fresh process, report."""
    work = Path(tempfile.mkdtemp())
    prompt_dirs = []
    for index in range(max(args.prompt_counts)):  # distinct random prompts p00, p01, ...
        directory = work / f"p{index:02d}"
        SoftPromptModel(base, num_virtual_tokens=args.num_virtual_tokens, seed=index).save_pretrained(directory)
        prompt_dirs.append(str(directory))
    inputs = equal_length_inputs(tokenizer, data_rows, args.rows, args.input_tokens)
    setup = work / "setup.json"
    setup.write_text(json.dumps({"model_dir": model_dir, "prompt_dirs": prompt_dirs, "inputs": inputs}))
    results = []
    for num_prompts in args.prompt_counts:
        for side in args.sides:
            command = [sys.executable, __file__, "--setup", str(setup), "--side", side, "--num-prompts", str(num_prompts),
                       "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                       "--repeats", str(args.repeats), "--peft-repeats", str(args.peft_repeats)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(f"K={num_prompts} {side}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    interleaved = {}
    if MANY_PROMPTS_SIDES[0] in args.sides and len(args.prompt_counts) > 1:
        # The target's ratio with the load of the machine shared: every K in one process, in turn;
        # with each prompt's cache computed in every run, and computed once before them.
        for caches, flags in (("computed in each run", []), ("computed once, before the runs", ["--keep-prompt-cache"])):
            command = [sys.executable, __file__, "--setup", str(setup), "--side", MANY_PROMPTS_SIDES[0], "--interleave",
                       *map(str, args.prompt_counts), "--max-new-tokens", str(args.max_new_tokens),
                       "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), *flags]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            interleaved[caches] = json.loads(output.strip().splitlines()[-1])["interleaved_seconds"]
    write_many_prompts_report(args, model_dir, inputs, results, interleaved)


def write_many_prompts_report(
    args, model_dir: str, inputs: list[list[int]], results: list[dict], interleaved: dict[str, dict]
) -> None:
    name = Path(args.model).name if args.model else "tiny-llama"
    shown = {"model": portable_path(args.model), "data": portable_path(args.data)}
    command = (f"python benchmarks/bench_infer.py --many-prompts --model {shown['model']} --data {shown['data']} "
               f"--rows {args.rows} --prompt-counts {' '.join(map(str, args.prompt_counts))} --repeats {args.repeats} "
               f"--peft-repeats {args.peft_repeats}")
    new_tokens = len(inputs) * args.max_new_tokens
    reference = {r["num_prompts"]: r for r in results if r["side"] == MANY_PROMPTS_SIDES[0]}
    for r in results:
        mixed = reference.get(r["num_prompts"])
        r["rows_with_same_tokens_as_mixed"] = sum(a == b for a, b in zip(r["new_tokens"], mixed["new_tokens"])) if mixed else None
    lines = [
        f"# Many prompts on one model: ours vs PEFT ({name})", "", f"`{command}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}", "",
        f"{len(inputs)} rows of {args.input_tokens} tokens, {args.max_new_tokens} new tokens each (greedy, "
        f"repetition_penalty 1.5), K random prompts of V = {args.num_virtual_tokens}, row i answered by prompt i mod K, "
        f"batches of at most {args.batch_size} rows. Mixed batches take the rows in order; the other sides "
        f"group each prompt's rows. Seconds: the fastest of {args.repeats} runs for our sides (each computing "
        f"every prompt's cache anew), of {args.peft_repeats} for PEFT's. Peak memory is the process's (the model "
        "included); rise: above the loaded model and prompts.", "",
        "| K | side | batches | seconds | new tokens/s | side / ours mixed (time) | peak memory (MiB) | rise (MiB) | rows with the same tokens as ours mixed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mixed = reference.get(r["num_prompts"])
        ratio = f"{r['seconds'] / mixed['seconds']:.2f}x" if mixed else "-"
        same = f"{r['rows_with_same_tokens_as_mixed']} / {len(inputs)}" if mixed else "-"
        lines.append(f"| {r['num_prompts']} | {r['side']} | {r['batches']} | {r['seconds']:.1f} | "
                     f"{new_tokens / r['seconds']:.1f} | {ratio} | {r['peak_memory_mib']:.0f} | {r['rise_mib']:.0f} | {same} |")
    if interleaved:
        low, high = min(args.prompt_counts), max(args.prompt_counts)
        lines += ["", f"Ours mixed, every K in one process in turn ({args.repeats} rounds, the fastest run of each), "
                  f"K = {high} / K = {low} on the same rows (target <= 1.2x):", "",
                  "| prompts' caches | " + " | ".join(f"K = {k}" for k in args.prompt_counts) + f" | K = {high} / K = {low} |",
                  "| --- |" + " --- |" * (len(args.prompt_counts) + 1)]
        for caches, seconds in interleaved.items():  # JSON keys: the K as text
            lines.append(f"| {caches} | " + " | ".join(f"{seconds[str(k)]:.1f} s" for k in args.prompt_counts)
                         + f" | **{seconds[str(high)] / seconds[str(low)]:.2f}x** |")
    lines += ["", "Memory each extra prompt holds:", "", "| side | prompt weights | cached keys and values | total |",
              "| --- | --- | --- | --- |"]
    for side in args.sides:
        r = next(r for r in results if r["side"] == side)
        weights, cache = r["prompt_bytes_each"] / 1024, r["prompt_cache_bytes_each"] / 1024
        lines.append(f"| {side} | {weights:.0f} KiB | {cache:.0f} KiB | {weights + cache:.0f} KiB |")
    save_report(args.output_dir, f"infer-many-prompts-{name}", lines,
                {"command": command, "inputs": inputs, "results": results, "interleaved_seconds": interleaved})


def save_report(output_dir: str, stem: str, lines: list[str], figures: dict) -> None:
    """Print the report and write it to `<stem>.md`, with the figures as `<stem>.json`."""
    report = "\n".join(lines) + "\n"
    print(report)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.md").write_text(report)
    (output_dir / f"{stem}.json").write_text(json.dumps(figures, indent=2) + "\n")


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
    parser.add_argument("--classification-only", action="store_true", help="skip the generation sides")
    many = parser.add_argument_group("many prompts on one model")
    many.add_argument("--many-prompts", action="store_true", help="run the many-prompts comparison instead")
    many.add_argument("--prompt-counts", type=int, nargs="+", default=[1, 4, 16], help="the values of K")
    many.add_argument("--input-tokens", type=int, default=24, help="tokens in each input row")
    many.add_argument("--repeats", type=int, default=2, help="timed runs of our sides per K; the fastest is reported")
    many.add_argument("--peft-repeats", type=int, default=1, help="timed runs of PEFT's side per K (minutes each on a CPU)")
    many.add_argument("--sides", nargs="+", choices=MANY_PROMPTS_SIDES, default=list(MANY_PROMPTS_SIDES))
    many.add_argument("--setup", help=argparse.SUPPRESS)  # a side's process: what the parent saved
    many.add_argument("--side", help=argparse.SUPPRESS)
    many.add_argument("--num-prompts", type=int, help=argparse.SUPPRESS)
    many.add_argument("--interleave", type=int, nargs="+", help=argparse.SUPPRESS)
    many.add_argument("--keep-prompt-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.setup:
        print(json.dumps(many_prompts_side(args)))
        return

    model_dir, base, tokenizer = load(args.model)
    if args.data:
        with open(args.data) as f:
            data_rows = [json.loads(line) for line in f if line.strip()][: args.rows]
    else:
        from soft_prompt.tiny import demo_rows

        data_rows = demo_rows(args.rows)
    if args.many_prompts:
        many_prompts(args, model_dir, base, tokenizer, data_rows)
        return
    if args.checkpoint:
        ours = SoftPromptModel.from_pretrained(base, args.checkpoint, tokenizer=tokenizer)
    else:
        ours = SoftPromptModel(base, num_virtual_tokens=args.num_virtual_tokens, seed=0, tokenizer=tokenizer)
    peft_model = peft_twin(model_dir, ours.prompt.weight.detach())

    generation = [] if args.classification_only else generation_rows(ours, peft_model, tokenizer, args.max_new_tokens)
    classification = classification_rows(ours, peft_model, tokenizer, data_rows, args.batch_size)
    write_report(args, model_dir, generation, classification)


def write_report(args, model_dir: str, generation: list[dict], classification: list[dict]) -> None:
    name = Path(args.model).name if args.model else "tiny-llama"
    command = "python benchmarks/bench_infer.py " + " ".join(
        f"{key}={portable_path(value)}"
        for key, value in [("--model", args.model), ("--data", args.data), ("--rows", args.rows)] if value
    ) + (" --classification-only" if args.classification_only else "")
    lines = [
        f"# Inference: ours vs PEFT ({name})", "", f"`{command}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}",
    ]
    if generation:
        lines += ["", f"## Generation ({args.max_new_tokens} new tokens, greedy, repetition_penalty 1.5)", "",
                  "| batch | side | new tokens/s | ours (prefix cache) / side | same tokens as ours |",
                  "| --- | --- | --- | --- | --- |"]
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
    stem = f"infer-classification-{name}" if args.classification_only else f"infer-{name}"
    save_report(args.output_dir, stem, lines,
                {"command": command, "generation": generation, "classification": classification})


if __name__ == "__main__":
    main()
