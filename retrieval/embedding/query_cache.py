"""A persistent cache of text-query embeddings, one small SQLite file in the index folder.

Kept apart from the catalog on purpose: searches write it, and a search must never contend with
an indexer's write transactions. It is a cache: if it cannot be read or written (read-only
index folder, disk full), queries simply compute the embedding.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

CACHE_NAME = "query-cache.sqlite"
ENV_SWITCH = "CLIPDEX_QUERY_CACHE"  # "0" turns the cache off (benchmarks of the uncached path)


class QueryCache:
    def __init__(self, index_dir: Path, model_key: str):
        self.path = index_dir / CACHE_NAME
        self.model_key = model_key
        self.enabled = os.environ.get(ENV_SWITCH, "1") != "0"
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if not self.enabled:
            return None
        if self._conn is None:
            try:
                # stdlib sqlite3, not SQLAlchemy: a two-column key/value cache needs no ORM.
                conn = sqlite3.connect(self.path, timeout=2.0)
                conn.execute("CREATE TABLE IF NOT EXISTS texts (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")
                self._conn = conn
            except sqlite3.Error:
                self.enabled = False
                return None
        return self._conn

    def _key(self, text: str) -> str:
        return f"{self.model_key}\x00{text}"

    def get(self, text: str) -> np.ndarray | None:
        conn = self._connect()
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT vector FROM texts WHERE key = ?", (self._key(text),)).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def put(self, text: str, vector: np.ndarray) -> None:
        conn = self._connect()
        if conn is None:
            return
        try:
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO texts (key, vector) VALUES (?, ?)",
                    (self._key(text), np.ascontiguousarray(vector, dtype=np.float32).tobytes()),
                )
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
