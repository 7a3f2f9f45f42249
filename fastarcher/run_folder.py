"""The run folder at start: can it be written, and is another run writing into it?

    lock = RunLock(run_dir); problem = run_folder_problem(run_dir) or lock.acquire()

Both run on rank 0 before the model is built (fastarcher/train.py shares the outcome with every rank),
so a read-only or occupied folder costs seconds instead of a training run that ends in a traceback at
its first save. The lock is `flock` on `<run_dir>/.lock`, held for the whole run and released by the
kernel when the process exits, however it exits; the file names the holder (pid and host).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used; the message names the path and what to do."""


def run_folder_problem(run_dir: str | Path) -> str | None:
    """Why this process cannot write `run_dir` and its `checkpoints/` (None when it can).

    Creates both folders (a save would anyway) and writes and removes a probe file in each, which also
    catches read-only mounts that permission bits do not show.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.exists() and not folder.is_dir():
            return f"log.run_dir: {folder} is a file, not a folder; move it away or pick another --log.run-dir"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"log.run_dir: cannot create {folder} ({error.strerror}); pick another --log.run-dir"
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as error:
            return (f"log.run_dir: cannot write into {folder} ({error.strerror}); fix its permissions or pick "
                    f"another --log.run-dir")
    return None


class RunLock:
    """An exclusive lock on one run folder, so two process groups never write into it at once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns None, or why not (naming the holder)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            return f"log.run_dir: cannot open the lock file {self.path} ({error.strerror})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held elsewhere (EWOULDBLOCK), or the filesystem cannot lock
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that has not written its pid yet"
            os.close(fd)
            return (f"log.run_dir: {self.run_dir} is in use by another run ({holder}); wait for it to end, stop "
                    f"it, or pick another --log.run-dir")
        os.ftruncate(fd, 0)  # the content only names the holder; the flock is what excludes
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the file stays: deleting it would let a third run lock a fresh inode
            self._fd = None
