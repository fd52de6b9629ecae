"""The SQLite catalog (SQLAlchemy 2.x): images, their vectors, the models, tags and history.

Each image is one row of `images`; its vector lives in the narrow table `vectors`, keyed by
(image, model), and commits in the same transaction as the row: the FAISS file is only a cache
that can always be rebuilt. Two models exist only while `clipdex index --reindex` builds the
new model's vectors beside the old ones; one transaction then makes the new model the active
one. Row ids come from AUTOINCREMENT and are never reused within one catalog.

Every write that changes what a search sees adds a row to `commits` (a generation and a random
nonce). A FAISS file records the catalog identity, model and commit it reflects; a file whose
commit is not in this catalog's history (another catalog, a restored backup) is never trusted.
Each vector row carries the generation that wrote it and each deletion is logged in `removals`
(schema.py), so `changes_since` reads only what changed after a cache's commit.

New catalogs use PAGE_SIZE pages (bench/storage_pages.py): a 2 KB vector row in a 4 KB page
fills the page alone (4.1 KB a vector); 32 KB pages hold 15 of them (2.2 KB a vector) and fetch
100 random vectors by id as fast as 4 KB pages do (64 KB pages were 5x slower). An existing
catalog keeps its page size: SQLite changes it only by a VACUUM outside WAL mode
(`PRAGMA journal_mode=DELETE; PRAGMA page_size=32768; VACUUM; PRAGMA journal_mode=WAL`, with no
other process using the index: minutes and twice the file's size on disk at a million images).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Integer,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from retrieval.core.errors import ClipdexError, IndexNotFoundError, IndexWriteError
from retrieval.core.filters import Filters, folder_prefixes, glob_matches

from .lock import WriterLock
from .records import FailureRecord, ImageRecord, Move, NewImage
from .schema import (
    ACTIVE,
    CHANGES_FROM,
    PENDING,
    SCHEMA_VERSION,
    TAKEN_OR_CHANGED,
    CommitRow,
    FailureRow,
    ImageRow,
    MetaRow,
    ModelRow,
    RemovalRow,
    TagRow,
    VectorRow,
    create_or_upgrade,
    insert_model,
    read_schema_version,
    record_commit,
    set_meta,
)

CATALOG_NAME = "catalog.sqlite"
_IMAGES, _TAGS = ImageRow.__tablename__, TagRow.__tablename__
PAGE_SIZE = 32768  # for new catalogs; see the module's docstring
NORM_TOLERANCE = 1e-3  # stored vectors are unit-norm float32, within float32 rounding of the encoders


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


@dataclass(frozen=True)
class Changes:
    """What changed in one model's vectors after a generation, up to `state` (one snapshot).
    Apply `removed` first, then `added`: an id in both was deleted and written again."""

    state: CatalogState
    removed: np.ndarray  # ids (some may have been added after that generation too)
    added: np.ndarray  # ids, sorted
    vectors: np.ndarray  # float32 (len(added), dim)

    @property
    def count(self) -> int:
        return len(self.removed) + len(self.added)


class MalformedVectorError(ClipdexError):
    """A stored vector of the wrong size: only `clipdex verify --repair` fixes that."""


_RECORD_COLUMNS = (
    ImageRow.id,
    ImageRow.path,
    ImageRow.size,
    ImageRow.mtime_ns,
    ImageRow.content_hash,
    ImageRow.width,
    ImageRow.height,
    ImageRow.format,
    ImageRow.taken_at,
    ImageRow.indexed_at,
)


def _make_engine(db_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{db_path}", future=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not pysqlite, decide when transactions begin, so that reads get a
        # consistent snapshot too (the recipe in SQLAlchemy's pysqlite notes).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        # Only takes effect in a file with no table yet, so before WAL mode (which fixes the page
        # size) and before the first table: a no-op for every existing catalog.
        cur.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        # WAL: searches read the last committed state while an indexer writes. NORMAL is
        # durable against process crashes (SIGKILL); a power cut can lose the last commits
        # but never corrupts the file.
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        # Vectors and tags go with their image row (and vectors with their model).
        cur.execute("PRAGMA foreign_keys = ON")
        # Statement journals in memory: on disk, with 32 KB pages, each inserted row wrote about
        # 128 KB of them (a 100k import: 13.5 GB of writes, 0.52 GB with this and the cache).
        cur.execute("PRAGMA temp_store = MEMORY")
        cur.execute("PRAGMA cache_size = -65536")  # KiB: 2,048 pages of 32 KB, not the default 62
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")

    return engine


class Catalog:
    def __init__(self, engine: Engine, path: Path):
        self.engine = engine
        self.path = path
        self._dims: dict[int, int] = {}  # model id -> dimension (model rows never change)

    @classmethod
    def open(cls, index_dir: Path, *, create: bool = False) -> Catalog:
        """Open the catalog; with `create`, make it (or finish making it, or upgrade it) first.

        An index exists once its schema version is committed, not once the file exists: SQLite
        creates the file at the first connection, and a process killed before the tables were
        committed must not leave a catalog that no later run can open. Without `create`, an
        older schema raises IndexUpgradeNeeded: only a writer may upgrade it.
        """
        db_path = index_dir / CATALOG_NAME
        if not db_path.exists() and not create:
            raise IndexNotFoundError(f"no index at {index_dir}: build one with 'clipdex index FOLDER'")
        engine = _make_engine(db_path)
        catalog = cls(engine, db_path)
        try:
            if create:
                # Tables, identity and schema version in one transaction (SQLite DDL is transactional).
                with catalog._write() as conn:
                    create_or_upgrade(conn)
            version = int(catalog._schema_version() or 0)
        except OperationalError as exc:
            engine.dispose()
            raise _write_error(db_path, exc) from None
        except BaseException:
            engine.dispose()
            raise
        if version == 0:
            engine.dispose()
            raise IndexNotFoundError(
                f"no index at {index_dir} (its creation was interrupted): run 'clipdex index FOLDER'"
            )
        if version > SCHEMA_VERSION:
            engine.dispose()
            raise ClipdexError(
                f"index {index_dir} has schema version {version}; this clipdex reads up to "
                f"{SCHEMA_VERSION}: upgrade clipdex"
            )
        if version < SCHEMA_VERSION:
            engine.dispose()
            raise IndexUpgradeNeeded(
                f"index {index_dir} has schema version {version}: open it for writing once to upgrade it"
            )
        return catalog

    def close(self) -> None:
        self.engine.dispose()

    def _schema_version(self) -> str | None:
        with self.engine.connect() as conn:
            return read_schema_version(conn)

    # -- identity and history ---------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[CatalogSnapshot]:
        """Reads that all see one committed state (one read transaction, WAL keeps it stable
        while a writer commits)."""
        with self.engine.connect() as conn:
            yield CatalogSnapshot(conn)

    def state(self) -> CatalogState:
        """One statement (readers ask before every search): identity, active model, last commit."""
        with self.snapshot() as snap:
            return snap.state()

    def changes_since(self, generation: int, model_id: int, dim: int) -> Changes | None:
        """The vectors of `model_id` removed and added after `generation`, reading only those
        rows; None when the log does not reach back that far (then diff all ids)."""
        with self.snapshot() as snap:
            return snap.changes_since(generation, model_id, dim)

    def trim_changes(self, generation: int) -> None:
        """Forget removals up to `generation`: called once no cache file older than it is left.
        A reader still holding an older state then diffs all ids once (changes_since: None)."""
        with self._write() as conn:
            if generation <= _changes_from(conn):
                return
            conn.execute(
                delete(RemovalRow).where(
                    or_(RemovalRow.generation <= generation, RemovalRow.model_id.not_in(select(ModelRow.id)))
                )
            )
            set_meta(conn, CHANGES_FROM, str(generation))

    def has_commit(self, generation: int, nonce: str) -> bool:
        """Whether (generation, nonce) is part of this catalog's history."""
        with self.snapshot() as snap:
            return snap.has_commit(generation, nonce)

    # -- metadata -------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(MetaRow.value).where(MetaRow.key == key)).scalar_one_or_none()

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            set_meta(conn, key, value)

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
        with self.engine.connect() as conn:
            row = conn.execute(select(ModelRow.id, ModelRow.signature).where(ModelRow.state == state)).first()
        return None if row is None else ModelEntry(row[0], json.loads(row[1]), state)

    def set_model_signature(self, signature: dict) -> int:
        """Make `signature` the active model (an existing one goes, with its vectors)."""
        with self._write() as conn:
            record_commit(conn)
            conn.execute(delete(ModelRow).where(ModelRow.state == ACTIVE))
            new_id = insert_model(conn, signature, ACTIVE)
        return new_id

    def clear_model_signature(self) -> None:
        with self._write() as conn:
            record_commit(conn)
            conn.execute(delete(ModelRow).where(ModelRow.state == ACTIVE))

    def begin_pending(self, signature: dict) -> int:
        """A new pending model (replacing an unfinished one of another signature)."""
        with self._write() as conn:
            conn.execute(delete(ModelRow).where(ModelRow.state == PENDING))
            return insert_model(conn, signature, PENDING)

    def drop_pending(self) -> None:
        with self._write() as conn:
            conn.execute(delete(ModelRow).where(ModelRow.state == PENDING))

    def copy_embeddings(self, source: int, target: int, image_ids: Sequence[int]) -> None:
        """Give `target` the vectors `source` has for `image_ids` (same model, kept as they are)."""
        with self._write() as conn:
            for chunk in _chunks(list(image_ids), 900):
                conn.execute(
                    insert(VectorRow).from_select(
                        ["image_id", "model_id", "vector", "generation"],
                        # No commit of its own (the pending model is not searched): the latest
                        # generation; promote_pending's commit makes any cache of it stale anyway.
                        select(
                            VectorRow.image_id, literal(target, Integer), VectorRow.vector, _last_generation()
                        ).where(VectorRow.model_id == source, VectorRow.image_id.in_(chunk)),
                    )
                )

    def promote_pending(self) -> int:
        """One transaction: the pending model becomes the active one; the old model, its vectors
        and any image the new model has no vector for go. Returns the new active model's id."""
        with self._write() as conn:
            record_commit(conn)  # first: the deletions below are logged under it
            pending = conn.execute(select(ModelRow.id).where(ModelRow.state == PENDING)).scalar_one()
            has_vector = select(VectorRow.image_id).where(VectorRow.model_id == pending)
            conn.execute(delete(ImageRow).where(ImageRow.id.not_in(has_vector)))
            conn.execute(delete(ModelRow).where(ModelRow.state == ACTIVE))
            conn.execute(update(ModelRow).where(ModelRow.id == pending).values(state=ACTIVE))
        return pending

    def dim_of(self, model_id: int) -> int:
        if model_id not in self._dims:
            with self.engine.connect() as conn:
                raw = conn.execute(select(ModelRow.signature).where(ModelRow.id == model_id)).scalar_one()
            self._dims[model_id] = int(json.loads(raw)["dim"])
        return self._dims[model_id]

    def failures(self) -> dict[str, FailureRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(FailureRow.path, FailureRow.size, FailureRow.mtime_ns, FailureRow.reason)
            )
            return {r[0]: FailureRecord(*r) for r in rows}

    # -- reads ----------------------------------------------------------------------------
    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(ImageRow)).scalar_one()

    def ids(self, model_id: int | None = None) -> np.ndarray:
        """Sorted ids of the images that have a vector of `model_id` (default: the active model)."""
        with self.snapshot() as snap:
            return snap.ids(model_id)

    def ids_without_vector(self, model_id: int) -> np.ndarray:
        """Sorted ids of the images that have no vector of `model_id`."""
        has_vector = select(VectorRow.image_id).where(VectorRow.model_id == model_id)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ImageRow.id).where(ImageRow.id.not_in(has_vector)).order_by(ImageRow.id)
            ).scalars()
            return np.fromiter(rows, dtype=np.int64)

    def records(self, ids: Iterable[int] | None = None) -> dict[int, ImageRecord]:
        """Records by id: all of them, or those of `ids` that exist."""
        out: dict[int, ImageRecord] = {}
        if ids is None:
            with self.engine.connect() as conn:
                for row in conn.execute(select(*_RECORD_COLUMNS)):
                    out[row[0]] = ImageRecord(*row)
            return out
        # By id (the hits of every search): straight to the driver, as stored_vectors.
        columns = ", ".join(c.name for c in _RECORD_COLUMNS)
        sql = f"SELECT {columns} FROM {ImageRow.__tablename__} WHERE id IN "
        for row in self._rows_by_ids(sql, [int(i) for i in ids]):
            out[row[0]] = ImageRecord(row[0], os.fsdecode(row[1]), *row[2:])
        return out

    def ids_with_content_hash(self, digest: str) -> list[int]:
        """Ids of the images whose file bytes hash to `digest` (sha256 hex); an indexed column."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ImageRow.id).where(ImageRow.content_hash == digest).order_by(ImageRow.id)
            )
            return [int(r[0]) for r in rows]

    def record_by_path(self, path: str) -> ImageRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_RECORD_COLUMNS).where(ImageRow.path == path)).first()
        return None if row is None else ImageRecord(*row)

    def embeddings(self, ids: Sequence[int], dim: int, model_id: int | None = None) -> np.ndarray:
        """The stored embeddings of `ids`, in that order (KeyError for an id without one)."""
        with self.snapshot() as snap:
            return snap.embeddings(ids, dim, model_id)

    def stored_vectors(self, ids: Sequence[int], dim: int, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of `ids` that have a vector of model `model_id`, in the order
        given (the exact re-ranking of an approximate search: ~100 ids a query). The model is the
        caller's (the one its index and query belong to), not whichever is active by now: a
        reindex may have swapped in another one since. Straight to the driver (_rows_by_ids)."""
        wanted = [int(i) for i in ids]
        sql = f"SELECT image_id, vector FROM {VectorRow.__tablename__} WHERE model_id = ? AND image_id IN "
        found: dict[int, bytes] = dict(self._rows_by_ids(sql, wanted, int(model_id)))
        present = [i for i in wanted if i in found]
        return np.asarray(present, dtype=np.int64), decode_vectors([found[i] for i in present], dim)

    def _rows_by_ids(self, sql: str, ids: list[int], *params: object) -> Iterator[tuple]:
        """Rows of `sql` (ending in "IN ") for `ids`, in chunks SQLite's parameter limit allows,
        on the raw driver: SQLAlchemy's statement compiling and per-row processing cost about
        10x SQLite's own lookups on the per-search paths (hits, exact re-ranking)."""
        raw = self.engine.raw_connection()  # pooled; autocommit: each statement sees a commit
        try:
            cursor = raw.cursor()
            for chunk in _chunks(ids, 900):
                marks = ",".join("?" * len(chunk))
                yield from cursor.execute(sql + f"({marks})", (*params, *chunk)).fetchall()
            cursor.close()
        finally:
            raw.close()

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
        sql = f"SELECT count(*) FROM (SELECT id FROM {_IMAGES} WHERE {where} LIMIT ?)"
        with self._driver_rows(sql, [*params, -1 if limit is None else int(limit)]) as rows:
            return int(rows.fetchone()[0])

    def filter_ids(self, ids: Sequence[int] | np.ndarray, filters: Filters) -> np.ndarray:
        """Sorted ids of those of `ids` (candidates, e.g. from an approximate search) that exist
        and meet `filters`: by primary key, whatever the filter's selectivity."""
        candidates = np.unique(np.asarray(ids, dtype=np.int64)).tolist()
        if not candidates:
            return np.empty(0, np.int64)
        # All candidates as one JSON parameter (json_each): one statement, and half the time of
        # chunks of 900 bound parameters.
        listed = ("id IN (SELECT value FROM json_each(?))", [json.dumps(candidates)])
        return np.sort(self._matching_ids(filters, listed))

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        """Those of `paths` that the catalog holds (through the unique index on path)."""
        out: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(list(dict.fromkeys(paths)), 900):
                out.update(conn.execute(select(ImageRow.path).where(ImageRow.path.in_(chunk))).scalars())
        return out

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
            sql = f"SELECT group_concat(id, ' ') FROM (SELECT id FROM {_IMAGES} WHERE {where} LIMIT ?)"
            with self._driver_rows(sql, [*params, -1 if limit is None else int(limit)]) as rows:
                text = rows.fetchone()[0]
            return np.empty(0, np.int64) if text is None else np.fromstring(text, dtype=np.int64, sep=" ")
        globs, ids = filters.globs, []
        with self._driver_rows(f"SELECT id, path FROM {_IMAGES} WHERE {where}", params) as rows:
            for row_id, raw_path in rows:
                # The path as FsPath reads it: the stored bytes, decoded as the filesystem does.
                if any(glob_matches(g, os.fsdecode(raw_path)) for g in globs):
                    ids.append(row_id)
                    if limit is not None and len(ids) >= limit:
                        break
        return np.asarray(ids, dtype=np.int64)

    @contextmanager
    def _driver_rows(self, sql: str, params: Sequence) -> Iterator[sqlite3.Cursor]:
        """The DBAPI cursor of one SELECT: no result processing (paths come back as their
        stored bytes). Autocommit, as every read outside a snapshot: it sees the last commit."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                yield cursor.execute(sql, tuple(params))
            finally:
                cursor.close()
        finally:
            raw.close()

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
                parts.append(f"EXISTS (SELECT 1 FROM {_TAGS} WHERE image_id = {_IMAGES}.id AND label = ?)")
                params.append(label)
        return (" AND ".join(parts) if parts else "1"), params

    # -- tags -------------------------------------------------------------------------------
    def replace_tags(self, image_ids: Sequence[int], labels: Sequence[str], rows: Sequence[dict]) -> int:
        """Replace the tags of `labels` on `image_ids` by `rows` ({image_id, label, probability});
        rows of images deleted meanwhile are dropped. Returns the number of rows written."""
        with self._write() as conn:
            for chunk in _chunks(list(image_ids), 500):
                conn.execute(delete(TagRow).where(TagRow.image_id.in_(chunk), TagRow.label.in_(list(labels))))
            live: set[int] = set()
            for chunk in _chunks(sorted({r["image_id"] for r in rows}), 900):
                live.update(conn.execute(select(ImageRow.id).where(ImageRow.id.in_(chunk))).scalars())
            kept = [r for r in rows if r["image_id"] in live]
            if kept:
                conn.execute(insert(TagRow), kept)
        return len(kept)

    def has_tags(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(TagRow.image_id).limit(1)).first() is not None

    def tagged_ids(self, labels: Sequence[str]) -> np.ndarray:
        """Sorted ids of the images tagged with every one of `labels`."""
        if not self.has_tags():
            raise ClipdexError(
                "no tags stored in this index: run 'clipdex classify --labels ... --store' first"
            )
        result: np.ndarray | None = None
        with self.engine.connect() as conn:
            for label in dict.fromkeys(labels):
                found = conn.execute(select(TagRow.image_id).where(TagRow.label == label)).scalars()
                ids = np.unique(np.fromiter(found, dtype=np.int64))
                result = ids if result is None else np.intersect1d(result, ids, assume_unique=True)
        return np.empty(0, np.int64) if result is None else result

    def tags_of(self, ids: Sequence[int] | None = None) -> dict[int, list[tuple[str, float]]]:
        """Stored tags by image id, most probable first."""
        stmt = select(TagRow.image_id, TagRow.label, TagRow.probability)
        with self.engine.connect() as conn:
            if ids is None:
                rows = list(conn.execute(stmt))
            else:
                rows = []
                for chunk in _chunks(list(ids), 500):
                    rows.extend(conn.execute(stmt.where(TagRow.image_id.in_(chunk))))
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
        now = time.time()
        new_ids: list[int] = []
        with self._write() as conn:
            target = _resolve_model(conn, model_id)
            if (added or revectored) and target is None:
                raise ClipdexError("the index has no model record: bind a model before adding images")
            dim = self.dim_of(target) if target is not None else 0
            # The commit first: vectors written below carry its generation, and deletions (the
            # cascade of `removed` included) are logged under it, in this same transaction.
            generation = record_commit(conn) if added or removed or revectored or moved or touched else None
            for chunk in _chunks(list(removed), 900):
                conn.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            for m in list(moved) + list(touched):
                conn.execute(
                    update(ImageRow)
                    .where(ImageRow.id == m.id)
                    .values(path=m.path, size=m.size, mtime_ns=m.mtime_ns)
                )
            vector_rows = []
            blobs = [_vector_blob(img.vector, dim, img.path) for img in added]
            new_ids = _insert_images(conn, added, now)
            vector_rows.extend(_vector_row(i, target, b, generation) for i, b in zip(new_ids, blobs))
            for image_id, vec in revectored:
                blob = _vector_blob(vec, dim, f"image {image_id}")
                conn.execute(
                    delete(VectorRow).where(VectorRow.image_id == image_id, VectorRow.model_id == target)
                )
                vector_rows.append(_vector_row(image_id, target, blob, generation))
            if vector_rows:
                conn.execute(insert(VectorRow), vector_rows)
            settled = [
                *forget_failures,
                *(a.path for a in added),
                *(m.path for m in moved),
                *(f.path for f in failed),
            ]
            for chunk in _chunks(settled, 900):
                conn.execute(delete(FailureRow).where(FailureRow.path.in_(chunk)))
            for f in failed:
                conn.execute(
                    insert(FailureRow).values(path=f.path, size=f.size, mtime_ns=f.mtime_ns, reason=f.reason)
                )
            set_meta(conn, "updated_at", str(now))
        return new_ids

    def _write(self):  # type: ignore[no-untyped-def]
        return _WriteTxn(self)


def open_catalog(directory: Path, *, create: bool) -> Catalog:
    """Open (with `create`: or make) the catalog; a catalog of an older clipdex is upgraded
    first, under the writer lock, whoever opens it."""
    if (directory / CATALOG_NAME).exists():
        try:
            return Catalog.open(directory)
        except IndexUpgradeNeeded:
            pass
        except IndexNotFoundError:  # its creation was interrupted: finish it, if allowed to
            if not create:
                raise
    elif not create:
        raise IndexNotFoundError(f"no index at {directory}: build one with 'clipdex index FOLDER'")
    with WriterLock(directory):
        return Catalog.open(directory, create=True)


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


def _insert_images(conn: Connection, added: Sequence[NewImage], now: float) -> list[int]:
    """Insert the rows of `added` with one executemany; returns their ids, in order.

    The ids are given explicitly, following the largest id ever given (sqlite_sequence, which
    AUTOINCREMENT itself keeps; max(id) for a table without it), so ids are still never reused.
    A row at a time with RETURNING cost ~0.5 ms a row: minutes for a million imported images."""
    if not added:
        return []
    last = conn.exec_driver_sql(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'images'), 0), "
        "coalesce((SELECT max(id) FROM images), 0))"
    ).scalar_one()
    ids = list(range(int(last) + 1, int(last) + 1 + len(added)))
    # Straight to the driver: SQLAlchemy's per-row parameter processing cost as much as SQLite's
    # insert. Paths are encoded as FsPath does.
    rows = [
        (
            new_id,
            os.fsencode(img.path),
            img.size,
            img.mtime_ns,
            img.content_hash,
            img.width,
            img.height,
            img.format,
            img.taken_at,
            now,
        )
        for new_id, img in zip(ids, added)
    ]
    conn.exec_driver_sql(
        "INSERT INTO images (id, path, size, mtime_ns, content_hash, width, height, format, taken_at, "
        "indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    return ids


def _vector_blob(vector: np.ndarray, dim: int, what: str) -> bytes:
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
    """Reads inside one read transaction: every answer reflects the same committed state, so a
    cache built from them can be stamped with exactly that state."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def state(self) -> CatalogState:
        index_id = select(MetaRow.value).where(MetaRow.key == "index_id").scalar_subquery()
        model_id = select(ModelRow.id).where(ModelRow.state == ACTIVE).scalar_subquery()
        last = select(index_id, model_id, CommitRow.generation, CommitRow.nonce)
        return CatalogState(*self.conn.execute(last.order_by(CommitRow.generation.desc()).limit(1)).one())

    def has_commit(self, generation: int, nonce: str) -> bool:
        found = self.conn.execute(
            select(CommitRow.nonce).where(CommitRow.generation == generation)
        ).scalar_one_or_none()
        return found == nonce

    def count_vectors(self, model_id: int | None = None) -> int:
        model_id = _resolve_model(self.conn, model_id)
        return self.conn.execute(
            select(func.count()).select_from(VectorRow).where(VectorRow.model_id == model_id)
        ).scalar_one()

    def ids(self, model_id: int | None = None) -> np.ndarray:
        model_id = _resolve_model(self.conn, model_id)
        if model_id is None:
            return np.empty(0, np.int64)
        rows = self.conn.execute(
            select(VectorRow.image_id).where(VectorRow.model_id == model_id).order_by(VectorRow.image_id)
        ).scalars()
        return np.fromiter(rows, dtype=np.int64)

    def embeddings(self, ids: Sequence[int], dim: int, model_id: int | None = None) -> np.ndarray:
        """The stored embeddings of `ids`, in that order (KeyError for an id without one)."""
        model_id = _resolve_model(self.conn, model_id)
        found: dict[int, bytes] = {}
        for chunk in _chunks(list(ids), 900):
            for row_id, blob in self.conn.execute(
                select(VectorRow.image_id, VectorRow.vector).where(
                    VectorRow.model_id == model_id, VectorRow.image_id.in_(chunk)
                )
            ):
                found[row_id] = blob
        return decode_vectors([found[i] for i in ids], dim)

    def changes_since(self, generation: int, model_id: int, dim: int) -> Changes | None:
        """See Catalog.changes_since. Both reads go through an index on (model, generation)."""
        if generation < _changes_from(self.conn):
            return None
        state = self.state()
        removed = self.conn.execute(
            select(RemovalRow.image_id).where(
                RemovalRow.model_id == model_id, RemovalRow.generation > generation
            )
        ).scalars()
        rows = self.conn.execute(
            select(VectorRow.image_id, VectorRow.vector)
            .where(VectorRow.model_id == model_id, VectorRow.generation > generation)
            .order_by(VectorRow.image_id)
        ).all()
        return Changes(
            state=state,
            removed=np.unique(np.fromiter(removed, dtype=np.int64)),
            added=np.asarray([r[0] for r in rows], dtype=np.int64),
            vectors=decode_vectors([r[1] for r in rows], dim),
        )

    def iter_embedding_blobs(
        self, batch: int = 4096, model_id: int | None = None
    ) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """(ids, vectors) in chunks by id (keyset paging: each chunk a range of the key)."""
        model = _resolve_model(self.conn, model_id)
        if model is None:
            return
        last = 0
        while True:
            rows = self.conn.execute(
                select(VectorRow.image_id, VectorRow.vector)
                .where(VectorRow.model_id == model, VectorRow.image_id > last)
                .order_by(VectorRow.image_id)
                .limit(batch)
            ).all()
            if not rows:
                return
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            yield ids, [r[1] for r in rows]
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


def _changes_from(conn: Connection) -> int:
    raw = conn.execute(select(MetaRow.value).where(MetaRow.key == CHANGES_FROM)).scalar_one_or_none()
    return int(raw) if raw is not None else 1 << 62  # no log at all: never catch up from it


def _last_generation():  # type: ignore[no-untyped-def]
    return select(func.max(CommitRow.generation)).scalar_subquery()


def _vector_row(image_id: int, model_id: int | None, blob: bytes, generation: int | None) -> dict:
    return {"image_id": image_id, "model_id": model_id, "vector": blob, "generation": generation}


def _resolve_model(conn: Connection, model_id: int | None) -> int | None:
    if model_id is not None:
        return model_id
    return conn.execute(select(ModelRow.id).where(ModelRow.state == ACTIVE)).scalar_one_or_none()


class _WriteTxn:
    """`engine.begin()` that turns SQLite's disk/permission failures into IndexWriteError."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._cm = catalog.engine.begin()

    def __enter__(self):  # type: ignore[no-untyped-def]
        try:
            return self._cm.__enter__()
        except OperationalError as exc:
            raise _write_error(self.catalog.path, exc) from None

    def __exit__(self, exc_type, exc, tb):  # type: ignore[no-untyped-def]
        # Rolls back on any exception; a failed statement (read-only file, disk full) or a failed
        # COMMIT both become IndexWriteError.
        try:
            result = self._cm.__exit__(exc_type, exc, tb)
        except OperationalError as err:
            raise _write_error(self.catalog.path, err) from None
        if isinstance(exc, OperationalError):
            raise _write_error(self.catalog.path, exc) from None
        return result


def _write_error(db_path: Path, exc: OperationalError) -> IndexWriteError:
    reason = str(exc.orig) if exc.orig is not None else str(exc)
    return IndexWriteError(f"cannot write the catalog {db_path}: {reason}; nothing was changed")


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
