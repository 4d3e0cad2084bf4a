"""One service per database: an exclusive lock next to it, held for the life of `serve`.

A second `serve` on the same database would release the first one's in-flight recipients as
"interrupted" and deliver them again. The lock is a `flock` on `<database>.lock`, so the kernel
drops it however the holder dies (kill -9 included) and a stale file never blocks a start; the
file holds the holder's PID, for the message the second one prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    """Another process holds the database's lock; the message names it."""


class InstanceLock:
    def __init__(self, database: str) -> None:
        self.path = Path(f"{database}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            database = str(self.path)[: -len(".lock")]
            raise AlreadyRunning(
                f"another mailrelay (pid {holder}) is serving {database}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
