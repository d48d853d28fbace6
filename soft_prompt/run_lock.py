"""One live run per run folder: an OS lock (`flock`) on `<run folder>/.lock`, which holds the pid of
the run that took it last. The kernel drops the lock when the process ends, however it ends (kill
-9 included), so a lock file left behind never blocks a later run or `--resume`; only a live
process holding it does."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .files import make_folder, writing

LOCK_NAME = ".lock"


class RunLock:
    """The lock of a run folder, held from `take` until `release` (or the end of a `with` block,
    or of the process)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    @classmethod
    def take(cls, directory: Path) -> "RunLock":
        """Create `directory` (the folder alone) if needed and lock it. A folder locked by a live
        process is a one-line ValueError naming its pid; nothing else in the folder is touched."""
        make_folder(directory)
        path = directory / LOCK_NAME
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"  # empty for the instant before it writes
            os.close(fd)
            raise ValueError(
                f"--output-dir {directory} is in use by a live run (pid {holder}): wait for it to end, stop it, "
                "or choose another --output-dir"
            ) from None
        lock = cls(fd)
        try:
            with writing(path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            lock.release()
            raise
        return lock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None
