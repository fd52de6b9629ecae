"""One writer per index: an flock on `writer.lock` that names its holder (SQLite catalogs), or
a PostgreSQL advisory lock (PostgreSQL catalogs, written from several machines).

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
from typing import Any

from retrieval.core.errors import IndexLockedError

from .catalog_location import CatalogLocation, connect_postgres

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


class PostgresWriterLock:
    """One writer per PostgreSQL catalog, whichever machine it runs on: a session advisory lock,
    keyed by the catalog's schema (several catalogs may share a database), held on a connection
    of its own for as long as the writer runs. The server releases it when that session ends, a
    killed writer's included (its connection closes with the process).

    A session can also end under a live writer (the network drops, an administrator terminates
    it), and another writer may then take the lock: so each write transaction first checks, in
    itself, that this session still holds it (`check`, run by the catalog for the locks in
    `held`: the list the owner passes, this lock in it while held)."""

    _KEY = "hashtextextended('clipdex writer ' || current_schema(), 0)"

    def __init__(self, location: CatalogLocation, held: list[PostgresWriterLock] | None = None):
        self.location = location
        self._conn: Any = None
        self._backend_pid: int | None = None
        self._held = held if held is not None else []

    def acquire(self) -> PostgresWriterLock:
        name = f"clipdex writer (pid {os.getpid()} on {socket.gethostname()})"
        conn = connect_postgres(self.location, application_name=name[:63])
        taken = conn.execute(f"SELECT pg_try_advisory_lock({self._KEY})").fetchone()[0]
        if not taken:
            holder = self._describe_holder(conn)
            conn.close()
            raise IndexLockedError(
                f"the catalog {self.location.describe()} is being written by {holder}; wait for it to finish"
            )
        self._conn, self._backend_pid = conn, conn.info.backend_pid
        self._held.append(self)
        return self

    def check(self, conn: Any) -> None:
        """Inside a write transaction (a SQLAlchemy connection to the same database): refuse it
        unless this lock's session still holds the lock."""
        held = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %(pid)s",
            {"pid": self._backend_pid},
        ).scalar_one()
        if not held:
            raise IndexLockedError(
                f"this writer lost its lock on the catalog {self.location.describe()} (its session with the "
                "server ended); nothing more was written: run the command again"
            )

    def _describe_holder(self, conn: Any) -> str:
        # An advisory lock on a bigint key shows in pg_locks as its high and low 32 bits.
        row = conn.execute(
            f"SELECT a.application_name FROM pg_locks l "
            f"JOIN pg_stat_activity a ON a.pid = l.pid, (SELECT {self._KEY} AS k) key "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid::bigint = (key.k >> 32) & 4294967295 AND l.objid::bigint = key.k & 4294967295"
        ).fetchone()
        if row is None or not row[0].startswith("clipdex writer ("):
            return "another clipdex process"
        return f"another clipdex process ({row[0].removeprefix('clipdex writer (').rstrip(')')})"

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self in self._held:
                self._held.remove(self)
            with contextlib.suppress(Exception):  # closing the session releases it anyway
                conn.execute(f"SELECT pg_advisory_unlock({self._KEY})")
            conn.close()

    def __enter__(self) -> PostgresWriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
