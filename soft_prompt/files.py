"""File I/O every command shares: atomic writes (readers see the old file or the new one, whole),
output folders checked before any work, JSON as the project writes it, and one way to report a
write that failed.

A write that fails (no space left, over quota, an I/O error, a read-only file system, no
permission) is a `WriteError`, a ValueError naming the path and the reason, which the scripts print
as one line. Every file and folder is created by open()/mkdir() with 0o666/0o777, so it gets the
modes the process's umask gives (0644/0755 under umask 022), temporary files of atomic writes
included: `tempfile.mkstemp`/`mkdtemp` create them private (0600/0700), and the rename keeps that.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
from pathlib import Path


class WriteError(ValueError):
    """A file or folder that could not be written; the message names it and the reason."""


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Turn an OSError raised while writing `path` into a one-line `WriteError`, e.g.
    "cannot write runs/x/last: No space left on device (ENOSPC)"."""
    try:
        yield
    except OSError as error:
        code = f" ({errno.errorcode[error.errno]})" if error.errno in errno.errorcode else ""
        raise WriteError(f"cannot write {path}: {error.strerror or error}{code}") from None


def new_sibling(path: Path, folder: bool = False) -> Path:
    """Create an empty file (or folder) with a fresh hidden name beside `path`, as open() and
    mkdir() create any other (0o666/0o777 less the umask), and return its path."""
    while True:
        candidate = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
        try:
            if folder:
                os.mkdir(candidate)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling, fsync and rename: readers see old or new, whole.
    A failure leaves the old file as it was and is a `WriteError`."""
    path = Path(path)
    with writing(path):
        tmp = new_sibling(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a file (a `WriteError` when it cannot be)."""
    with writing(path), open(path, "a") as f:
        f.write(text)


def make_folder(path: str | os.PathLike) -> None:
    """mkdir -p, a failure being a `WriteError`."""
    with writing(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def png_bytes(figure, dpi: int) -> bytes:
    """A matplotlib figure as PNG bytes, for `write_atomic`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def check_output_folder(directory: str | os.PathLike, what: str) -> None:
    """Refuse, before any work and creating nothing, a folder that cannot be written: a file
    where it or a parent folder would be, a read-only file system, or no permission to write where
    it would be created.
    `what` starts the one-line ValueError, e.g. "--output-dir runs/x"."""
    existing = Path(directory)
    while not existing.exists():  # ends at "." or "/" at the latest
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise ValueError(f"{what}: {existing} is on a read-only file system")
        raise ValueError(f"{what}: no permission to write in {existing}")


def json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_output(path: str, text: str) -> None:
    """Write an output file whole (atomically), creating its folder."""
    make_folder(Path(path).parent)
    write_atomic(path, text.encode())


def portable_path(value: object) -> object:
    """An absolute path as seen from the working folder (anything else as it is): what reports
    record, so that they name no folder of the machine they were made on."""
    return os.path.relpath(value) if isinstance(value, str) and os.path.isabs(value) else value
