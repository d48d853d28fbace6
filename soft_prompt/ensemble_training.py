"""`--ensemble K`, a part of the training command: K prompts trained one after another from K
seeds on the same validation rows, then gathered into one `best/` that infer.py loads as an ensemble
(its `soft_prompt.json` lists the members) and PEFT and analyze.py as member 0's prompt.

Each member is an ordinary run (`training.train`, passed in as `train_one`, so that this module
does not import the loop) in `prompt-0/` ... `prompt-{K-1}/` of the run folder.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import CONFIG_NAME, INITIAL_PROMPT_NAME, METADATA_NAME, WEIGHTS_NAME, write_directory_atomic
from .config import TrainConfig
from .files import check_output_folder, json_bytes

CHECKPOINT_FILES = (WEIGHTS_NAME, CONFIG_NAME, METADATA_NAME, INITIAL_PROMPT_NAME)  # what a prompt's checkpoint is


def train_ensemble(config: TrainConfig, train_one: Callable[[TrainConfig], dict]) -> dict:
    """`--ensemble K`: K runs of `train_one` (`training.train`) one after another, `prompt-0/` ...
    `prompt-{K-1}/` in the run folder, seeded `--seed` ... `--seed + K - 1` and all holding out the
    same validation rows (split by `--val-seed`, default `--seed`); each keeps its own best/ and
    calibration. Then `best/` gathers them: prompt 0's checkpoint (what PEFT and analyze.py load)
    with the others in subfolders, listed in its soft_prompt.json as "ensemble", which infer.py
    loads and combines. `--resume` the run folder continues each member from its own last/."""
    started = time.perf_counter()
    output_dir = Path(config.run.output_dir or config.run.resume or Path("runs") / (config.data.task or "custom"))
    check_output_folder(output_dir, f"--output-dir {output_dir}")
    if config.run.resume and not (Path(config.run.resume) / "prompt-0").is_dir():
        raise ValueError(f"--resume {config.run.resume}: no prompt-0/ there: not an --ensemble run folder to continue")
    members = []
    for k in range(config.prompt.ensemble):
        member = copy.deepcopy(config)
        member_dir = output_dir / f"prompt-{k}"
        member.prompt.ensemble = 1
        member.run.seed = config.run.seed + k
        member.data.val_seed = config.run.seed if config.data.val_seed is None else config.data.val_seed
        member.run.output_dir = str(member_dir)
        member.run.resume = str(member_dir) if config.run.resume and (member_dir / "last").is_dir() else None
        print(f"ensemble: prompt {k + 1} of {config.prompt.ensemble}, seed {member.run.seed}", file=sys.stderr)
        summary = train_one(member)
        members.append(summary)
        if summary["interrupted"]:
            print(f"continue the ensemble with the same arguments and --resume {output_dir}", file=sys.stderr)
            return {**summary, "members": members, "seconds": time.perf_counter() - started}
    if os.environ.get("RANK", "0") == "0":
        write_ensemble(output_dir, config.prompt.ensemble)
        print(f"ensemble: {config.prompt.ensemble} prompts saved in {output_dir / 'best'}")
    return {**summary, "members": members, "seconds": time.perf_counter() - started, "output_dir": str(output_dir)}


def write_ensemble(output_dir: Path, size: int) -> None:
    """`best/`: member 0's checkpoint (each member's best/, or last/ when it had no evaluation rows),
    the others in subfolders `prompt-1/` ..., named in its soft_prompt.json under "ensemble"."""
    files = {}
    for k in range(size):
        source = output_dir / f"prompt-{k}" / "best"
        source = source if source.is_dir() else source.with_name("last")
        prefix = "" if k == 0 else f"prompt-{k}/"
        files.update({prefix + name: (source / name).read_bytes() for name in CHECKPOINT_FILES if (source / name).is_file()})
    metadata = json.loads(files[METADATA_NAME])
    metadata["ensemble"] = [f"prompt-{k}" for k in range(1, size)]
    files[METADATA_NAME] = json_bytes(metadata)
    write_directory_atomic(output_dir / "best", files)
