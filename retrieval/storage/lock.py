"""One writer per index: an flock on `writer.lock` that names its holder.

flock is released by the kernel when the holder dies, SIGKILL included, so a crashed indexer
never leaves the index stuck; the pid and host written into the file only serve the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from retrieval.core.errors import IndexLockedError

LOCK_NAME = "writer.lock"


class WriterLock:
    def __init__(self, index_dir: Path):
        self.path = index_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise IndexLockedError(
                f"index {self.path.parent} is being written by {holder}; wait for it to finish"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"another clipdex process (pid {info['pid']} on {info['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "another clipdex process"
