"""The few SQL differences between SQLite and PostgreSQL on the catalog's raw read paths.

The per-search reads run straight on the database driver (sqlite3, psycopg), not through
SQLAlchemy: its import alone is 0.28 s of a cold search, and its statement compiling and row
processing cost ~10x the lookups themselves (catalog.py). They are written once, in SQLite's
spelling with `?` marks, and a Dialect adapts the handful of spots that differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Lists of values go as marks in chunks of at most this many: SQLite before 3.32 took 999.
MAX_MARKS = 900
# Every SQLite connection to a catalog, reads and writes (KiB: 2,048 pages of 32 KB, not the
# default 62).
SQLITE_CACHE_SIZE = "PRAGMA cache_size = -65536"


def chunks(items: Sequence[T], size: int = MAX_MARKS) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True)
class Dialect:
    name: str
    # What a snapshot's transaction begins with: every read in it sees one committed state.
    begin_snapshot: str
    # `LIMIT ?` meaning "no limit".
    no_limit: int | None
    # A subquery of the ids listed in one JSON text parameter.
    json_ids: str
    # The ids of a subquery `q` as one space-separated text (parsed by numpy: no tuple a row).
    joined_ids: str
    # One row when the table named by the parameter exists (in the schema searched first).
    table_exists: str
    # The same for an index.
    index_exists: str
    # A column followed by this matches a whole list of ids given as one array parameter; None:
    # the ids go as marks, in chunks within SQLite's parameter limit.
    id_array: str | None

    def sql(self, text: str) -> str:
        """`text` with this driver's parameter marks (the catalog's SQL has no other '?')."""
        return text if self.name == "sqlite" else text.replace("?", "%s")


SQLITE = Dialect(
    name="sqlite",
    # Deferred: the snapshot starts at the first read, and WAL keeps it while a writer commits.
    begin_snapshot="BEGIN",
    no_limit=-1,
    json_ids="SELECT value FROM json_each(?)",
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    index_exists="SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?",
    joined_ids="SELECT group_concat(id, ' ') FROM ({q})",
    id_array=None,
)

POSTGRESQL = Dialect(
    name="postgresql",
    # READ COMMITTED (the default) takes a new snapshot per statement; a snapshot needs one.
    begin_snapshot="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    no_limit=None,
    json_ids="SELECT value::bigint FROM json_array_elements_text(?::json)",
    table_exists="SELECT 1 WHERE to_regclass(?) IS NOT NULL",
    index_exists="SELECT 1 WHERE to_regclass(?) IS NOT NULL",  # an index is a relation too
    joined_ids="SELECT string_agg(id::text, ' ') FROM ({q}) AS listed",
    # psycopg parses a statement of 100 marks for ~1 ms: 3x the lookup (bench/catalog_ops.py).
    id_array="= ANY(?::bigint[])",
)

DIALECTS = {d.name: d for d in (SQLITE, POSTGRESQL)}  # by SQLAlchemy's dialect name
