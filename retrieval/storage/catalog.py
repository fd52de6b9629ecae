"""The catalog: images, their vectors, the models, tags and history, in SQLite or PostgreSQL.

Each image is one row of `images`; its vector lives in the narrow table `vectors`, keyed by
(image, model), and commits in the same transaction as the row: the FAISS file is only a cache
that can always be rebuilt. Two models exist only while `clipdex index --reindex` builds the
new model's vectors beside the old ones; one transaction then makes the new model the active
one. Row ids are never reused within one catalog.

Every write that changes what a search sees adds a row to `commits` (a generation and a random
nonce). A FAISS file records the catalog identity, model and commit it reflects; a file whose
commit is not in this catalog's history (another catalog, a restored backup) is never trusted.
Each vector row carries the generation that wrote it and each deletion is logged in `removals`
(schema.py), so a change stream (`CatalogSnapshot.change_stream`) reads only what changed
after a cache's commit.

Reads and writes take different roads. Reads run straight on the database driver (sqlite3, or
psycopg for PostgreSQL) through a small pool of connections, in SQL written once (sql_dialects):
a cold search never imports SQLAlchemy (0.28 s of it), and the per-search reads (hits, exact
re-ranking, filters) skip its statement compiling and row processing, ~10x SQLite's own
lookups. Writes go through SQLAlchemy Core and the models in schema.py (catalog_writes.py),
imported by the first write.

New SQLite catalogs use 32 KB pages (catalog_writes.PAGE_SIZE, bench/storage_pages.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.core.errors import ClipdexError, IndexNotFoundError
from retrieval.core.filters import Filters, folder_prefixes, glob_matches

from .catalog_location import (
    CATALOG_NAME,
    CatalogLocation,
    catalog_exists,
    connect_postgres,
    record_url,
    require_catalog,
    resolve_catalog,
)
from .lock import PostgresWriterLock, WriterLock
from .records import FailureRecord, ImageRecord, Move, NewImage
from .schema_names import (
    ACTIVE,
    CHANGES_FROM,
    PENDING,
    RETIRED_INDEXES,
    SCHEMA_VERSION,
    TAKEN_OR_CHANGED,
    parse_changes_from,
)
from .sql_dialects import POSTGRESQL, SQLITE, SQLITE_CACHE_SIZE, Dialect, chunks

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["CATALOG_NAME", "SCHEMA_VERSION", "Catalog", "open_catalog"]

NORM_TOLERANCE = 1e-3  # stored vectors are unit-norm float32, within float32 rounding of the encoders
_RECORD_COLUMNS = "id, path, size, mtime_ns, content_hash, width, height, format, taken_at, indexed_at"

# A model's vectors in id order, through the primary key (image_id, model_id). The unary plus
# keeps the planner off the (model_id, generation) index, which SQLite, with no statistics,
# prefers for the equality on its first column: then every vector row was read through it and
# sorted by id in a temporary B-tree (1.4 s for a million ids; paging through the vectors sorted
# all that remained at each page: 1 s a page of 8,192 at 1M, against 1.8 s for all of them). The
# plus is plain arithmetic in PostgreSQL too, whose planner has statistics.
_BY_IMAGE_ID = "+model_id = ?"


class IndexUpgradeNeeded(ClipdexError):
    """The catalog has an older schema; a writer upgrades it (see open_catalog)."""


@dataclass(frozen=True)
class ModelEntry:
    id: int
    signature: dict
    state: str


@dataclass(frozen=True)
class CatalogState:
    """Who this catalog is and where its history stands, read in one snapshot."""

    index_id: str
    model_id: int | None  # the active model
    generation: int
    nonce: str


# Added vectors read per step of a change stream (16 MB of 512-d vectors).
CHANGE_BATCH = 8192


@dataclass(frozen=True)
class ChangeStream:
    """Changes as they are applied: the removed ids, then the added vectors in batches of
    (ids, vectors) read from the snapshot's cursor, `added_count` in all, in no particular order.
    Consumed inside the snapshot it came from. An opener far behind (a search during a large
    import) holds one batch of them at a time, not all: catching up a million changes took
    6.1 GB as one array."""

    state: CatalogState
    removed: np.ndarray
    added_count: int
    batches: Generator[tuple[np.ndarray, np.ndarray], None, None]  # closed by whoever applies it

    @property
    def count(self) -> int:
        return len(self.removed) + self.added_count


class MalformedVectorError(ClipdexError):
    """A stored vector of the wrong size: only `clipdex verify --repair` fixes that."""


class _DriverPool:
    """Reused DBAPI connections for reads, one per reader at a time (server threads included).
    Autocommit: each statement outside a snapshot sees the last commit."""

    def __init__(self, connect: Callable[[], Any]):
        self._connect = connect
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Any]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            conn.close()  # its state is unknown (a statement failed mid-transaction): not reused
            raise
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _sqlite_reader(path: Path) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; snapshots BEGIN themselves.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute(SQLITE_CACHE_SIZE)
        return conn

    return connect


def _postgres_reader(location: CatalogLocation) -> Callable[[], Any]:
    return lambda: connect_postgres(location)


class Catalog:
    def __init__(self, location: CatalogLocation):
        self.location = location
        self.dialect: Dialect = POSTGRESQL if location.is_postgres else SQLITE
        self._reads = _DriverPool(
            _postgres_reader(location) if location.is_postgres else _sqlite_reader(location.sqlite_path)
        )
        self._engine: Engine | None = None
        self._dims: dict[int, int] = {}  # model id -> dimension (model rows never change)
        self._locks_held: list[PostgresWriterLock] = []  # checked by each write (PostgresWriterLock)

    @property
    def path(self) -> Path | None:
        """The SQLite file (None for a PostgreSQL catalog)."""
        return None if self.location.is_postgres else self.location.sqlite_path

    @classmethod
    def open(cls, index_dir: Path, *, create: bool = False, url: str | None = None) -> Catalog:
        """Open the catalog; with `create`, make it (or finish making it, or upgrade it) first.
        `url`: a PostgreSQL catalog (catalog_location.resolve_catalog; default $CLIPDEX_CATALOG).

        An index exists once its schema version is committed, not once the file exists: SQLite
        creates the file at the first connection, and a process killed before the tables were
        committed must not leave a catalog that no later run can open. Without `create`, an
        older schema raises IndexUpgradeNeeded: only a writer may upgrade it.
        """
        location = resolve_catalog(index_dir, url)
        if not create:
            require_catalog(location)
        catalog = cls(location)
        try:
            if create:
                catalog._create()
            version = int(catalog._schema_version() or 0)
        except BaseException:
            catalog.close()
            raise
        if version == 0:
            catalog.close()
            raise IndexNotFoundError(
                f"no index at {index_dir} (its creation was interrupted): run 'clipdex index FOLDER'"
            )
        if version > SCHEMA_VERSION:
            catalog.close()
            raise ClipdexError(
                f"index {index_dir} has schema version {version}; this clipdex reads up to "
                f"{SCHEMA_VERSION}: upgrade clipdex"
            )
        if version < SCHEMA_VERSION:
            catalog.close()
            raise IndexUpgradeNeeded(
                f"index {index_dir} has schema version {version}: open it for writing once to upgrade it"
            )
        return catalog

    def _create(self) -> None:
        from . import catalog_writes  # SQLAlchemy: writers only (see the module docstring)

        # Tables, identity and schema version in one transaction (DDL is transactional in both).
        with self._write() as conn:
            catalog_writes.create_or_upgrade(conn)
        if self.location.is_postgres:
            record_url(self.location)  # after the tables: the folder names a catalog that exists

    def close(self) -> None:
        self._reads.close()
        if self._engine is not None:
            self._engine.dispose()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine of the writes, made on first use."""
        if self._engine is None:
            from .catalog_writes import make_engine

            self._engine = make_engine(self.location)
        return self._engine

    def refresh_statistics(self) -> None:
        """After a writer's run: PostgreSQL plans by table statistics, and a table just filled
        has none until autovacuum comes by (fetching 100 vectors by id then read all of a model's
        rows through the wrong index: 4.9 ms against 3.2 ms). SQLite needs nothing."""
        if self.location.is_postgres:
            with self._reads.connection() as conn:
                conn.execute("ANALYZE images, vectors")

    def writer_lock(self) -> WriterLock | PostgresWriterLock:
        """The one-writer lock: an flock in the index folder for SQLite; for PostgreSQL an
        advisory lock in the database, which every machine writing to it sees."""
        if self.location.is_postgres:
            return PostgresWriterLock(self.location, held=self._locks_held)
        return WriterLock(self.location.directory)

    def has_index(self, name: str) -> bool:
        return self._one(self.dialect.index_exists, (name,)) is not None

    def _schema_version(self) -> str | None:
        has_meta = self._one(self.dialect.table_exists, ("meta",))
        if has_meta is None:
            return None
        row = self._one("SELECT value FROM meta WHERE key = 'schema_version'")
        return None if row is None else row[0]

    # -- the driver -------------------------------------------------------------------------
    def _rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """All rows of one statement, autocommit: it sees the last commit."""
        with self._reads.connection() as conn:
            return conn.execute(self.dialect.sql(sql), tuple(params)).fetchall()

    def _one(self, sql: str, params: Sequence = ()) -> tuple | None:
        with self._reads.connection() as conn:
            return conn.execute(self.dialect.sql(sql), tuple(params)).fetchone()

    @contextmanager
    def _driver_rows(self, sql: str, params: Sequence) -> Iterator[Any]:
        """The cursor of one SELECT, rows as the driver gives them (paths as their stored bytes)."""
        with self._reads.connection() as conn:
            cursor = conn.execute(self.dialect.sql(sql), tuple(params))
            try:
                yield cursor
            finally:
                cursor.close()

    def _rows_by_ids(self, sql: str, ids: list[int], *params: object) -> Iterator[tuple]:
        """See `_rows_by_ids_on`, on a pooled connection."""
        with self._reads.connection() as conn:
            yield from _rows_by_ids_on(conn, self.dialect, sql, ids, *params)

    # -- identity and history ---------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[CatalogSnapshot]:
        """Reads that all see one committed state (one read transaction: WAL in SQLite,
        REPEATABLE READ in PostgreSQL keep it stable while a writer commits)."""
        with self._reads.connection() as conn:
            conn.execute(self.dialect.begin_snapshot)
            snap = CatalogSnapshot(conn, self.dialect)
            try:
                yield snap
            finally:
                snap.closed = True
                conn.execute("ROLLBACK")

    def state(self) -> CatalogState:
        """One statement (readers ask before every search): identity, active model, last commit."""
        with self._reads.connection() as conn:
            return CatalogSnapshot(conn, self.dialect).state()

    def trim_changes(self, generation: int) -> None:
        """Forget removals up to `generation`: called once no cache file older than it is left.
        A reader still holding an older state then diffs all ids once (change_stream: None)."""
        from . import catalog_writes

        with self._write() as conn:
            catalog_writes.trim_changes(conn, generation)

    def has_commit(self, generation: int, nonce: str) -> bool:
        """Whether (generation, nonce) is part of this catalog's history."""
        with self._reads.connection() as conn:
            return CatalogSnapshot(conn, self.dialect).has_commit(generation, nonce)

    # -- metadata -------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        from . import catalog_writes

        with self._write() as conn:
            catalog_writes.set_meta(conn, key, value)

    # -- models ---------------------------------------------------------------------------
    def model_signature(self) -> dict | None:
        """The active model's signature."""
        entry = self.active_model()
        return None if entry is None else entry.signature

    def active_model(self) -> ModelEntry | None:
        return self._model_in(ACTIVE)

    def pending_model(self) -> ModelEntry | None:
        return self._model_in(PENDING)

    def _model_in(self, state: str) -> ModelEntry | None:
        row = self._one("SELECT id, signature FROM models WHERE state = ?", (state,))
        return None if row is None else ModelEntry(row[0], json.loads(row[1]), state)

    def set_model_signature(self, signature: dict) -> int:
        """Make `signature` the active model (an existing one goes, with its vectors)."""
        from . import catalog_writes

        with self._write() as conn:
            return catalog_writes.set_active_model(conn, signature)

    def clear_model_signature(self) -> None:
        from . import catalog_writes

        with self._write() as conn:
            catalog_writes.clear_active_model(conn)

    def begin_pending(self, signature: dict) -> int:
        """A new pending model (replacing an unfinished one of another signature)."""
        from . import catalog_writes

        with self._write() as conn:
            return catalog_writes.begin_pending(conn, signature)

    def drop_pending(self) -> None:
        from . import catalog_writes

        with self._write() as conn:
            catalog_writes.drop_pending(conn)

    def copy_embeddings(self, source: int, target: int, image_ids: Sequence[int]) -> None:
        """Give `target` the vectors `source` has for `image_ids` (same model, kept as they are)."""
        from . import catalog_writes

        with self._write() as conn:
            catalog_writes.copy_embeddings(conn, source, target, image_ids)

    def promote_pending(self) -> int:
        """One transaction: the pending model becomes the active one; the old model, its vectors
        and any image the new model has no vector for go. Returns the new active model's id."""
        from . import catalog_writes

        with self._write() as conn:
            return catalog_writes.promote_pending(conn)

    def dim_of(self, model_id: int) -> int:
        if model_id not in self._dims:
            row = self._one("SELECT signature FROM models WHERE id = ?", (int(model_id),))
            if row is None:
                raise ClipdexError(f"the catalog has no model {model_id}")
            self._dims[model_id] = int(json.loads(row[0])["dim"])
        return self._dims[model_id]

    def failures(self) -> dict[str, FailureRecord]:
        rows = self._rows("SELECT path, size, mtime_ns, reason FROM failures")
        return {os.fsdecode(r[0]): FailureRecord(os.fsdecode(r[0]), *r[1:]) for r in rows}

    # -- reads ----------------------------------------------------------------------------
    def count(self) -> int:
        row = self._one("SELECT count(*) FROM images")
        return int(row[0]) if row else 0

    def ids(self, model_id: int | None = None) -> np.ndarray:
        """Sorted ids of the images that have a vector of `model_id` (default: the active model)."""
        with self.snapshot() as snap:
            return snap.ids(model_id)

    def ids_without_vector(self, model_id: int) -> np.ndarray:
        """Sorted ids of the images that have no vector of `model_id`."""
        rows = self._rows(
            f"SELECT id FROM images WHERE id NOT IN (SELECT image_id FROM vectors WHERE {_BY_IMAGE_ID}) "
            "ORDER BY id",
            (int(model_id),),
        )
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def records(self, ids: Iterable[int] | None = None) -> dict[int, ImageRecord]:
        """Records by id: all of them, or those of `ids` that exist."""
        if ids is None:
            rows: Iterable[tuple] = self._rows(f"SELECT {_RECORD_COLUMNS} FROM images")
        else:
            rows = self._rows_by_ids(f"SELECT {_RECORD_COLUMNS} FROM images WHERE id", [int(i) for i in ids])
        return {row[0]: _record(row) for row in rows}

    def record_by_path(self, path: str) -> ImageRecord | None:
        row = self._one(f"SELECT {_RECORD_COLUMNS} FROM images WHERE path = ?", (os.fsencode(path),))
        return None if row is None else _record(row)

    def embeddings(self, ids: Sequence[int], dim: int, model_id: int | None = None) -> np.ndarray:
        """The stored embeddings of `ids`, in that order (KeyError for an id without one)."""
        with self.snapshot() as snap:
            return snap.embeddings(ids, dim, model_id)

    def stored_vectors(self, ids: Sequence[int], dim: int, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of `ids` that have a vector of model `model_id`, in the order
        given (the exact re-ranking of an approximate search: ~100 ids a query). The model is the
        caller's (the one its index and query belong to), not whichever is active by now: a
        reindex may have swapped in another one since."""
        wanted = [int(i) for i in ids]
        sql = "SELECT image_id, vector FROM vectors WHERE model_id = ? AND image_id"
        found: dict[int, bytes] = dict(self._rows_by_ids(sql, wanted, int(model_id)))
        present = [i for i in wanted if i in found]
        return np.asarray(present, dtype=np.int64), decode_vectors([found[i] for i in present], dim)

    def iter_embedding_blobs(
        self, batch: int = 4096, model_id: int | None = None
    ) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """(ids, vectors) in chunks, by id, all of one snapshot; each vector exactly as stored
        (may be malformed)."""
        with self.snapshot() as snap:
            yield from snap.iter_embedding_blobs(batch, model_id)

    # -- filters --------------------------------------------------------------------------
    # Filters are compiled to SQL text here (`_filter_sql`) and run straight on the driver: at
    # 100k images SQLAlchemy's compiling of a filtered statement cost 1.3 ms and its per-row
    # processing ~2 us a row (select_ids of 50k ids: 140 ms; on the driver 45 ms), against
    # 0.2 ms for SQLite to count a 1% folder.
    def select_ids(self, filters: Filters) -> np.ndarray:
        """Sorted ids of the images that meet `filters` (compiled by _filter_sql)."""
        return np.sort(self._matching_ids(filters))

    def count_matches(self, filters: Filters, limit: int | None = None) -> int:
        """How many images meet `filters`, counting no further than `limit`: cheap enough to pick
        a search plan by selectivity before any id is fetched."""
        if limit is not None and limit <= 0:
            return 0
        if filters.globs:
            return len(self._matching_ids(filters, limit=limit))
        where, params = self._filter_sql(filters)
        sql = f"SELECT count(*) FROM (SELECT id FROM images WHERE {where} LIMIT ?) AS matching"
        with self._driver_rows(sql, [*params, self._limit(limit)]) as rows:
            return int(rows.fetchone()[0])

    def filter_ids(self, ids: Sequence[int] | np.ndarray, filters: Filters) -> np.ndarray:
        """Sorted ids of those of `ids` (candidates, e.g. from an approximate search) that exist
        and meet `filters`: by primary key, whatever the filter's selectivity."""
        candidates = np.unique(np.asarray(ids, dtype=np.int64)).tolist()
        if not candidates:
            return np.empty(0, np.int64)
        # All candidates as one JSON parameter: one statement, and half the time of chunks of
        # 900 bound parameters (SQLite).
        listed = (f"id IN ({self.dialect.json_ids})", [json.dumps(candidates)])
        return np.sort(self._matching_ids(filters, listed))

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        """Those of `paths` that the catalog holds (through the unique index on path)."""
        wanted = [os.fsencode(p) for p in dict.fromkeys(paths)]
        found: set[str] = set()
        for chunk in chunks(wanted):
            sql = f"SELECT path FROM images WHERE path IN ({','.join('?' * len(chunk))})"
            found.update(os.fsdecode(r[0]) for r in self._rows(sql, chunk))
        return found

    def _limit(self, limit: int | None) -> int | None:
        return self.dialect.no_limit if limit is None else int(limit)

    def _matching_ids(
        self, filters: Filters, extra: tuple[str, list] | None = None, limit: int | None = None
    ) -> np.ndarray:
        """Ids meeting `filters` and an `extra` (SQL, parameters) condition, unsorted, the first
        `limit` found; globs are checked here, on the paths of the rows the SQL lets through."""
        where, params = self._filter_sql(filters)
        if extra is not None:
            where, params = f"{where} AND {extra[0]}", [*params, *extra[1]]
        if not filters.globs:
            # The ids as one text, parsed by numpy: Python's sqlite3 builds a tuple a row (~0.6 us;
            # 10k ids at 1M images: 6.6 ms, this 1.8 ms).
            sql = self.dialect.joined_ids.format(q=f"SELECT id FROM images WHERE {where} LIMIT ?")
            with self._driver_rows(sql, [*params, self._limit(limit)]) as rows:
                text = rows.fetchone()[0]
            return np.empty(0, np.int64) if not text else np.fromstring(text, dtype=np.int64, sep=" ")
        globs, ids = filters.globs, []
        with self._driver_rows(f"SELECT id, path FROM images WHERE {where}", params) as rows:
            for row_id, raw_path in rows:
                # The path as FsPath reads it: the stored bytes, decoded as the filesystem does.
                if any(glob_matches(g, os.fsdecode(raw_path)) for g in globs):
                    ids.append(row_id)
                    if limit is not None and len(ids) >= limit:
                        break
        return np.asarray(ids, dtype=np.int64)

    def _filter_sql(self, filters: Filters) -> tuple[str, list]:
        """`filters` as one SQL condition on `images` and its parameters, each part answerable
        through an index where one exists.

        Folders are ranges of the path index: stored paths are bytes (FsPath), compared as
        memcmp, so the paths under prefix P (which ends in '/') are exactly P <= path < P' with
        P' = P with its last byte raised by one; no LIKE or GLOB, whose metacharacters and
        case rules a folder name could trip. A glob whose pattern starts with a literal absolute
        path gets the same range as a pre-filter; every glob is then checked in Python (fnmatch)
        on the rows left. Dates compare the indexed expression, verbatim. Types compare the
        stored names (Pillow's, upper case) as they are, so that the index on `format` serves
        them. Tags: one indexed lookup per label.
        """
        parts: list[str] = []
        params: list = []

        def ranges(prefixes: Sequence[bytes]) -> None:
            alternatives = []
            for prefix in prefixes:
                upper = _prefix_end(prefix)
                alternatives.append("path >= ?" if upper is None else "(path >= ? AND path < ?)")
                params.extend([prefix] if upper is None else [prefix, upper])
            parts.append("(" + " OR ".join(alternatives) + ")")

        if filters.folders:
            ranges(folder_prefixes(filters.folders))
        if filters.globs:
            prefixes = [_glob_prefix(g) for g in filters.globs]
            if all(p is not None for p in prefixes):
                ranges(prefixes)  # type: ignore[arg-type]
        if filters.after is not None:
            parts.append(f"{TAKEN_OR_CHANGED} >= ?")
            params.append(float(filters.after))
        if filters.before is not None:
            parts.append(f"{TAKEN_OR_CHANGED} < ?")
            params.append(float(filters.before))
        if filters.formats:
            names = sorted({f.upper() for f in filters.formats})
            parts.append(f"format IN ({','.join('?' * len(names))})")
            params.extend(names)
        if filters.min_width is not None:
            parts.append("width >= ?")
            params.append(int(filters.min_width))
        if filters.min_height is not None:
            parts.append("height >= ?")
            params.append(int(filters.min_height))
        if filters.tags:
            if not self.has_tags():
                raise ClipdexError(
                    "no tags stored in this index: run 'clipdex classify --labels ... --store' first"
                )
            for label in dict.fromkeys(filters.tags):
                parts.append("EXISTS (SELECT 1 FROM tags WHERE image_id = images.id AND label = ?)")
                params.append(label)
        return (" AND ".join(parts) if parts else "1 = 1"), params

    # -- tags -------------------------------------------------------------------------------
    def replace_tags(self, image_ids: Sequence[int], labels: Sequence[str], rows: Sequence[dict]) -> int:
        """Replace the tags of `labels` on `image_ids` by `rows` ({image_id, label, probability});
        rows of images deleted meanwhile are dropped. Returns the number of rows written."""
        from . import catalog_writes

        with self._write() as conn:
            return catalog_writes.replace_tags(conn, image_ids, labels, rows)

    def has_tags(self) -> bool:
        return self._one("SELECT 1 FROM tags LIMIT 1") is not None

    def tagged_ids(self, labels: Sequence[str]) -> np.ndarray:
        """Sorted ids of the images tagged with every one of `labels`."""
        if not self.has_tags():
            raise ClipdexError(
                "no tags stored in this index: run 'clipdex classify --labels ... --store' first"
            )
        result: np.ndarray | None = None
        for label in dict.fromkeys(labels):
            found = self._rows("SELECT image_id FROM tags WHERE label = ?", (label,))
            ids = np.unique(np.asarray([r[0] for r in found], dtype=np.int64))
            result = ids if result is None else np.intersect1d(result, ids, assume_unique=True)
        return np.empty(0, np.int64) if result is None else result

    def tags_of(self, ids: Sequence[int] | None = None) -> dict[int, list[tuple[str, float]]]:
        """Stored tags by image id, most probable first."""
        sql = "SELECT image_id, label, probability FROM tags"
        if ids is None:
            rows: Iterable[tuple] = self._rows(sql)
        else:
            rows = self._rows_by_ids(sql + " WHERE image_id", [int(i) for i in ids])
        out: dict[int, list[tuple[str, float]]] = {}
        for image_id, label, prob in rows:
            out.setdefault(image_id, []).append((label, prob))
        for tags in out.values():
            tags.sort(key=lambda t: (-t[1], t[0]))
        return out

    # -- writes ---------------------------------------------------------------------------
    def commit_changes(
        self,
        added: Sequence[NewImage] = (),
        moved: Sequence[Move] = (),
        removed: Sequence[int] = (),
        touched: Sequence[Move] = (),
        failed: Sequence[FailureRecord] = (),
        forget_failures: Sequence[str] = (),
        revectored: Sequence[tuple[int, np.ndarray]] = (),
        model_id: int | None = None,
    ) -> list[int]:
        """Apply one batch of changes in one transaction; returns the ids given to `added`.

        The vectors of `added` and `revectored` ((image id, vector): a known image embedded
        again) belong to `model_id` (default: the active model). `removed` rows are deleted
        before `added` rows are inserted, so a changed file can be removed and re-added under
        its path in the same batch. `touched` updates size and mtime of files whose content did
        not change. `failed` records files that could not be indexed; a path that is indexed
        now, or gone, leaves that record.
        """
        from . import catalog_writes

        with self._write() as conn:
            target = catalog_writes.resolve_model(conn, model_id)
            if (added or revectored) and target is None:
                raise ClipdexError("the index has no model record: bind a model before adding images")
            dim = self.dim_of(target) if target is not None else 0
            return catalog_writes.commit_changes(
                conn,
                target,
                added=[(img, vector_blob(img.vector, dim, img.path)) for img in added],
                moved=moved,
                removed=removed,
                touched=touched,
                failed=failed,
                forget_failures=forget_failures,
                revectored=[(i, vector_blob(v, dim, f"image {i}")) for i, v in revectored],
            )

    def _write(self):  # type: ignore[no-untyped-def]
        """One write transaction (SQLAlchemy Connection); failures become IndexWriteError."""
        from .catalog_writes import WriteTxn

        guard = self._locks_held[-1].check if self._locks_held else None
        return WriteTxn(self.engine, self.location, guard)


def open_catalog(directory: Path, *, create: bool, url: str | None = None) -> Catalog:
    """Open (with `create`: or make) the catalog; a catalog of an older clipdex is upgraded
    first, under the writer lock, whoever opens it, and with `create` (a writer that may make
    the index) its RETIRED_INDEXES are dropped. `url`: see Catalog.open."""
    location = resolve_catalog(directory, url)
    if catalog_exists(location):
        try:
            catalog = Catalog.open(directory, url=url)
        except IndexUpgradeNeeded:
            pass
        except IndexNotFoundError:  # its creation was interrupted: finish it, if allowed to
            if not create:
                raise
        else:
            if not create or not any(catalog.has_index(name) for name in RETIRED_INDEXES):
                return catalog
            catalog.close()
    elif not create:
        raise IndexNotFoundError(f"no index at {directory}: build one with 'clipdex index FOLDER'")
    lock_owner = Catalog(location)  # only for its lock: the lock of the catalog to be made
    try:
        with lock_owner.writer_lock():
            return Catalog.open(directory, create=True, url=url)
    finally:
        lock_owner.close()


def _record(row: tuple) -> ImageRecord:
    return ImageRecord(row[0], os.fsdecode(row[1]), *row[2:])


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with `prefix` (None: no
    such bound, as for a prefix of 0xff bytes only)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _glob_prefix(pattern: str) -> bytes | None:
    """The literal absolute path a glob on whole paths starts with ('/a/b/*.jpg' -> '/a/b/'),
    as bytes; None for a pattern on file names or one that starts with a wildcard."""
    if "/" not in pattern:
        return None
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    literal_part = pattern[:cut]
    return os.fsencode(literal_part) if literal_part.startswith("/") else None


def vector_blob(vector: np.ndarray, dim: int, what: str) -> bytes:
    """The bytes to store, after checking the invariant: a finite unit-norm float32 vector."""
    vec = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vec)) if vec.size else 0.0
    if vec.size != dim or not np.isfinite(norm) or abs(norm - 1.0) > NORM_TOLERANCE:
        raise ClipdexError(
            f"refusing to store the vector of {what}: expected a finite unit-norm vector of dimension "
            f"{dim}, got dimension {vec.size} with norm {norm:.4g}"
        )
    return vec.tobytes()


class CatalogSnapshot:
    """Reads on one driver connection; inside Catalog.snapshot() every answer reflects the same
    committed state, so a cache built from them can be stamped with exactly that state."""

    def __init__(self, conn: Any, dialect: Dialect):
        self.conn = conn
        self.dialect = dialect
        self.closed = False  # its transaction ended: a change stream may not be read any more

    def _rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return self.conn.execute(self.dialect.sql(sql), tuple(params)).fetchall()

    def _one(self, sql: str, params: Sequence = ()) -> tuple | None:
        return self.conn.execute(self.dialect.sql(sql), tuple(params)).fetchone()

    def state(self) -> CatalogState:
        row = self._one(
            "SELECT (SELECT value FROM meta WHERE key = 'index_id'), "
            "(SELECT id FROM models WHERE state = 'active'), generation, nonce "
            "FROM commits ORDER BY generation DESC LIMIT 1"
        )
        if row is None:
            raise ClipdexError("the catalog has no history: it was not made by clipdex")
        return CatalogState(*row)

    def has_commit(self, generation: int, nonce: str) -> bool:
        row = self._one("SELECT nonce FROM commits WHERE generation = ?", (int(generation),))
        return row is not None and row[0] == nonce

    def _model(self, model_id: int | None) -> int | None:
        if model_id is not None:
            return int(model_id)
        row = self._one("SELECT id FROM models WHERE state = 'active'")
        return None if row is None else int(row[0])

    def count_vectors(self, model_id: int | None = None) -> int:
        row = self._one("SELECT count(*) FROM vectors WHERE model_id = ?", (self._model(model_id),))
        return int(row[0])

    def ids(self, model_id: int | None = None) -> np.ndarray:
        model = self._model(model_id)
        if model is None:
            return np.empty(0, np.int64)
        rows = self.conn.execute(
            self.dialect.sql(f"SELECT image_id FROM vectors WHERE {_BY_IMAGE_ID} ORDER BY image_id"), (model,)
        )
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def embeddings(self, ids: Sequence[int], dim: int, model_id: int | None = None) -> np.ndarray:
        """The stored embeddings of `ids`, in that order (KeyError for an id without one)."""
        sql = "SELECT image_id, vector FROM vectors WHERE model_id = ? AND image_id"
        wanted = [int(i) for i in ids]
        found = dict(_rows_by_ids_on(self.conn, self.dialect, sql, wanted, self._model(model_id)))
        return decode_vectors([found[i] for i in wanted], dim)

    def change_stream(self, generation: int, model_id: int, dim: int) -> ChangeStream | None:
        """The vectors of `model_id` removed and added after `generation`, the added ones read
        CHANGE_BATCH rows at a time as the stream is consumed; None when the log does not reach back
        that far. Every read goes through an index on (model, generation)."""
        if generation < _changes_from(self):
            return None
        params = (int(model_id), int(generation))
        removed = self._rows("SELECT image_id FROM removals WHERE model_id = ? AND generation > ?", params)
        added = self._one("SELECT count(*) FROM vectors WHERE model_id = ? AND generation > ?", params)
        return ChangeStream(
            state=self.state(),
            removed=np.unique(np.asarray([r[0] for r in removed], dtype=np.int64)),
            added_count=int(added[0]) if added else 0,
            batches=self._added_after(params, dim, CHANGE_BATCH),
        )

    def _added_after(
        self, params: tuple[int, int], dim: int, batch: int
    ) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        if self.closed:
            raise RuntimeError("a change stream read after its snapshot ended")
        if self.dialect.name == "postgresql":
            # Server-side, binary: psycopg's default cursor pulls the whole result into memory
            # at execute, each vector as hex text twice its size.
            cursor = self.conn.cursor(name="clipdex_change_stream", binary=True)
        else:
            cursor = self.conn.cursor()
        try:
            cursor.execute(
                self.dialect.sql(
                    "SELECT image_id, vector FROM vectors WHERE model_id = ? AND generation > ?"
                ),
                params,
            )
            while True:
                if self.closed:  # resumed after the snapshot: its connection may serve another now
                    raise RuntimeError("a change stream read after its snapshot ended")
                rows = cursor.fetchmany(batch)
                if not rows:
                    break
                yield (
                    np.asarray([r[0] for r in rows], dtype=np.int64),
                    decode_vectors([r[1] for r in rows], dim),
                )
        finally:
            # Closed before the snapshot's ROLLBACK when consumed (or closed) inside it: an open
            # statement would keep SQLite's read transaction, and the log unshrinkable, alive.
            # After it, the ROLLBACK ended a server-side cursor already (no CLOSE sent into a
            # transaction that may be another reader's).
            if not (self.closed and self.dialect.name == "postgresql"):
                cursor.close()

    def iter_embedding_blobs(
        self, batch: int = 4096, model_id: int | None = None
    ) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """(ids, vectors) in chunks by id (keyset paging: each chunk a range of the key)."""
        model = self._model(model_id)
        if model is None:
            return
        last = 0
        while True:
            rows = self._rows(
                f"SELECT image_id, vector FROM vectors WHERE {_BY_IMAGE_ID} AND image_id > ? "
                "ORDER BY image_id LIMIT ?",
                (model, last, int(batch)),
            )
            if not rows:
                return
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            yield ids, [bytes(r[1]) for r in rows]
            last = int(ids[-1])


def decode_vectors(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Stored blobs as one float32 (n, dim) array."""
    if any(len(b) != dim * 4 for b in blobs):
        raise MalformedVectorError(
            f"the catalog holds a vector that is not {dim} float32 values: run 'clipdex verify --repair'"
        )
    if not blobs:
        return np.empty((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


def _changes_from(snap: CatalogSnapshot) -> int:
    row = snap._one("SELECT value FROM meta WHERE key = ?", (CHANGES_FROM,))
    return parse_changes_from(None if row is None else row[0])


def _rows_by_ids_on(
    conn: Any, dialect: Dialect, sql: str, ids: list[int], *params: object
) -> Iterator[tuple]:
    """Rows of `sql` (ending in the id column) for `ids`: in chunks of marks within SQLite's
    parameter limit, or as one array parameter where the dialect takes one."""
    if dialect.id_array is not None:
        # Binary results too: a vector comes as its bytes, not as hex text to decode.
        listed = dialect.sql(f"{sql} {dialect.id_array}")
        yield from conn.execute(listed, (*params, ids), binary=True).fetchall()
        return
    for chunk in chunks(ids):
        marks = ",".join("?" * len(chunk))
        yield from conn.execute(f"{sql} IN ({marks})", (*params, *chunk)).fetchall()
