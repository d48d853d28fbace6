"""What a trained soft prompt learned: nearest vocabulary tokens, norms, drift, and, on rows, which
virtual tokens carry the task.

    python analyze.py runs/hate/best --model bigscience/bloomz-560m
    python analyze.py runs/hate/best --model M --data test.jsonl --rows 32 --json figures.json --plot plots/
    python analyze.py runs/hate/best --model M --describe --json figures.json --plot plots/

Errors are one line on stderr and exit code 2. The work is in soft_prompt/analysis.py.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from soft_prompt.config import OneLineParser  # a bad flag is one line and exit code 2

    parser = OneLineParser(prog="analyze.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a soft-prompt (or PEFT prompt-tuning) checkpoint directory")
    parser.add_argument("--model", required=True, help="the frozen base model: hub id or folder")
    parser.add_argument("--top-k", type=int, default=5, help="nearest vocabulary tokens per virtual token")
    parser.add_argument("--data", help="rows in the checkpoint's template (.jsonl, ...): ablation, hard prompt, attention")
    parser.add_argument("--rows", type=int, default=32, help="use the first N rows of --data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--describe", action="store_true",
                        help="the model describes the prompt: InSPEcT's patching over source x target layers, with the "
                             "initial prompt and random vectors as controls (minutes on a CPU)")
    parser.add_argument("--layers", type=int, nargs="+", metavar="L",
                        help="with --describe: the decoder layers (0-based, the input of layer L) swept on both axes "
                             "(default: about 8 evenly spaced from 0, every layer of a shallow model)")
    parser.add_argument("--reference", action="append", metavar="TEXT",
                        help="with --describe: a text to score the descriptions against by ROUGE-L (repeatable; "
                             "default: the checkpoint's init text)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--plot", help="write PNGs into this folder")
    parser.add_argument("--device", default="auto", help="auto (default): cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    from soft_prompt.analysis import run

    try:
        run(options)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError and InferenceError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
