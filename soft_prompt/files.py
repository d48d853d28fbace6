"""File I/O every command shares: atomic writes (readers see the old file or the new one, whole),
output folders checked before any work, JSON as the project writes it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling, fsync and rename: readers see old or new, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_folder(directory: str | os.PathLike, what: str) -> None:
    """Refuse, before any work and creating nothing, a folder that cannot be written: a file
    where it or a parent folder would be, or no permission to write where it would be created.
    `what` starts the one-line ValueError, e.g. "--output-dir runs/x"."""
    existing = Path(directory)
    while not existing.exists():  # ends at "." or "/" at the latest
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: no permission to write in {existing}")


def json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_output(path: str, text: str) -> None:
    """Write an output file whole (atomically), creating its folder."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode())
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None


def portable_path(value: object) -> object:
    """An absolute path as seen from the working folder (anything else as it is): what reports
    record, so that they name no folder of the machine they were made on."""
    return os.path.relpath(value) if isinstance(value, str) and os.path.isabs(value) else value
