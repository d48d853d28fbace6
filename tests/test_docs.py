"""The documentation matches the code: every flag a command line in README.md or docs/ gives
train.py, infer.py or analyze.py exists in that script's --help; no tracked file names a path of
the machine it was made on; the README stays a short front door that links every docs/ page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "infer.py", "analyze.py")
# a script named as a word of a command (not bench_train.py), then what follows it on that command
SCRIPT_CALL = re.compile(r"(?:^|[\s/`])(train|infer|analyze)\.py(?=\s|`|$)(.*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# split so that this file does not match itself
MACHINE_PATH = re.compile("/(wo" "rk|ro" "ot)/|/tmp/py" "test")
LINK = re.compile(r"\]\(((?:\.\./)?docs/[^)#\s]+\.md)(?:#[^)]*)?\)")


def documentation() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[str]:
    """Every command line of a markdown text: each line of a fenced block, with its backslash
    continuations joined, and each inline code span of the prose (paragraphs joined, so that a
    span may wrap)."""
    found, paragraph, block, fenced = [], [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                found += " ".join(block).replace("\\ ", " ").split("\n")
                block = []
            else:
                found += re.findall(r"`([^`]+)`", " ".join(paragraph))
                paragraph = []
            fenced = not fenced
        elif fenced:
            block.append(line + ("" if line.rstrip().endswith("\\") else "\n"))
        elif line.strip():
            paragraph.append(line.strip())
        else:
            found += re.findall(r"`([^`]+)`", " ".join(paragraph))
            paragraph = []
    found += re.findall(r"`([^`]+)`", " ".join(paragraph))
    return found


def flags_by_script(text: str) -> dict[str, set[str]]:
    """The flags each script is given in `text`'s command lines: those after the script's name, up
    to the end of that shell command (a comment, `;`, `&&`, `|`)."""
    flags: dict[str, set[str]] = {script: set() for script in SCRIPTS}
    for command in commands(text):
        for part in re.split(r"\s#|;|&&|\|", command):
            match = SCRIPT_CALL.search(part)
            if match:
                flags[f"{match.group(1)}.py"] |= set(FLAG.findall(match.group(2)))
    return flags


def help_flags(script: str) -> set[str]:
    env = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(FLAG.findall(result.stdout))


def test_commands_are_parsed_per_script():
    text = "\n".join([
        "Run `python train.py --task demo\n--output-dir runs/demo` first.",
        "",
        "```bash",
        "torchrun --nproc_per_node=2 train.py --fsdp \\",
        "    --lr 0.1   # --not-a-flag",
        "python infer.py --eval x.jsonl && python analyze.py runs/x --top-k 3",
        "python benchmarks/bench_train.py --sides plain",
        "```",
    ])
    assert flags_by_script(text) == {
        "train.py": {"--task", "--output-dir", "--fsdp", "--lr"},
        "infer.py": {"--eval"},
        "analyze.py": {"--top-k"},
    }


def test_documented_flags_exist():
    documented: dict[str, set[str]] = {script: set() for script in SCRIPTS}
    for page in documentation():
        for script, flags in flags_by_script(page.read_text()).items():
            documented[script] |= flags
    assert documented["train.py"] and documented["infer.py"] and documented["analyze.py"]
    for script in SCRIPTS:
        missing = documented[script] - help_flags(script)
        assert not missing, f"{script} --help has no {sorted(missing)}, which README.md or docs/ give it"


def test_no_machine_paths_in_tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    offending = []
    for name in filter(None, files.decode().split("\0")):
        path = ROOT / name
        if path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if MACHINE_PATH.search(line):
                    offending.append(f"{name}:{number}")
    assert not offending, f"machine paths (use $MODEL, $OUT or ../shared/data/...): {offending[:20]}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move the detail to a docs/ page"


def test_readme_links_every_docs_page():
    linked = {ROOT / link for link in LINK.findall((ROOT / "README.md").read_text())}
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages, "no docs/ pages"
    assert not linked - pages, f"README.md links missing pages: {sorted(map(str, linked - pages))}"
    assert not pages - linked, f"docs pages the README does not link: {sorted(map(str, pages - linked))}"
