"""Train a soft prompt: `python train.py --task hate` (docs/training.md describes every flag).

Only the command line lives here; the loop is `soft_prompt.training.train`.
"""

from __future__ import annotations

import os
import sys

from soft_prompt.config import parse_args, resolve_config
from soft_prompt.distributed import close_world
from soft_prompt.training import TrainingDiverged, train


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 training diverged, 2 bad input or a write that failed (one line), 130
    stopped by Ctrl-C (SIGINT), 143 by SIGTERM (128 + the signal, as a shell reports a process it
    killed). Under torchrun every rank meets the same bad input or divergence; rank 0 says so."""
    overrides = parse_args(argv)  # bad flags exit here with code 2
    says = os.environ.get("RANK", "0") == "0"
    try:
        summary = train(resolve_config(overrides))
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        if says:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        if says:
            print(f"train.py: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: the first one (or SIGTERM) saves last/ and returns normally
        print("train.py: aborted", file=sys.stderr)
        return 130
    return 128 + summary["signal"] if summary["interrupted"] else 0


if __name__ == "__main__":
    code = main()
    close_world()
    sys.exit(code)
