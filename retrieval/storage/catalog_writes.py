"""The catalog's writes, through SQLAlchemy Core and the models of schema.py, in SQLite or
PostgreSQL alike; Catalog (catalog.py) imports this module at its first write, so that readers
never load SQLAlchemy. Each function runs inside the caller's one write transaction.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

from sqlalchemy import Integer, create_engine, delete, event, func, insert, literal, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from retrieval.core.errors import IndexWriteError

from .catalog_location import CatalogLocation
from .records import FailureRecord, Move, NewImage
from .schema import (
    ACTIVE,
    CHANGES_FROM,
    PENDING,
    CommitRow,
    FailureRow,
    ImageRow,
    ModelRow,
    RemovalRow,
    TagRow,
    VectorRow,
    changes_from,
    create_or_upgrade,
    insert_model,
    record_commit,
    set_meta,
)
from .sql_dialects import DIALECTS, SQLITE_CACHE_SIZE, chunks

__all__ = ["create_or_upgrade", "set_meta"]

# New SQLite catalogs' page size (bench/storage_pages.py): a 2 KB vector row in a 4 KB page fills
# the page alone (4.1 KB a vector); 32 KB pages hold 15 of them (2.2 KB a vector) and fetch 100
# random vectors by id as fast as 4 KB pages do (64 KB pages were 5x slower). An existing catalog
# keeps its page size: SQLite changes it only by a VACUUM outside WAL mode (`PRAGMA
# journal_mode=DELETE; PRAGMA page_size=32768; VACUUM; PRAGMA journal_mode=WAL`, with no other
# process using the index: minutes and twice the file's size on disk at a million images).
PAGE_SIZE = 32768


def make_engine(location: CatalogLocation) -> Engine:
    if location.is_postgres:
        assert location.url is not None
        # pre_ping: a pooled connection the server dropped (restart, idle timeout) is replaced.
        return create_engine(location.url, pool_pre_ping=True)
    engine = create_engine(f"sqlite:///{location.sqlite_path}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (the recipe in
        # SQLAlchemy's pysqlite notes).
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
        cur.execute(SQLITE_CACHE_SIZE)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")

    return engine


class WriteTxn:
    """`engine.begin()` that turns the database's disk, permission or connection failures into
    IndexWriteError."""

    def __init__(
        self, engine: Engine, location: CatalogLocation, guard: Callable[[Connection], None] | None = None
    ):
        self.location = location
        self._cm = engine.begin()
        self._guard = guard  # run first in the transaction; raising refuses it (lock.PostgresWriterLock)

    def __enter__(self) -> Connection:
        try:
            conn = self._cm.__enter__()
        except OperationalError as exc:
            raise self._error(exc) from None
        if self._guard is not None:
            try:
                self._guard(conn)
            except BaseException:
                self._cm.__exit__(*sys.exc_info())  # rolled back: nothing was written
                raise
        return conn

    def __exit__(self, exc_type, exc, tb):  # type: ignore[no-untyped-def]
        # Rolls back on any exception; a failed statement (read-only file, disk full) or a failed
        # COMMIT both become IndexWriteError.
        try:
            result = self._cm.__exit__(exc_type, exc, tb)
        except OperationalError as err:
            raise self._error(err) from None
        if isinstance(exc, OperationalError):
            raise self._error(exc) from None
        return result

    def _error(self, exc: OperationalError) -> IndexWriteError:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        return IndexWriteError(
            f"cannot write the catalog {self.location.describe()}: {reason}; nothing was changed"
        )


def trim_changes(conn: Connection, generation: int) -> None:
    if generation <= changes_from(conn):
        return
    conn.execute(
        delete(RemovalRow).where(
            or_(RemovalRow.generation <= generation, RemovalRow.model_id.not_in(select(ModelRow.id)))
        )
    )
    set_meta(conn, CHANGES_FROM, str(generation))


def set_active_model(conn: Connection, signature: dict) -> int:
    record_commit(conn)
    conn.execute(delete(ModelRow).where(ModelRow.state == ACTIVE))
    return insert_model(conn, signature, ACTIVE)


def clear_active_model(conn: Connection) -> None:
    record_commit(conn)
    conn.execute(delete(ModelRow).where(ModelRow.state == ACTIVE))


def begin_pending(conn: Connection, signature: dict) -> int:
    conn.execute(delete(ModelRow).where(ModelRow.state == PENDING))
    return insert_model(conn, signature, PENDING)


def drop_pending(conn: Connection) -> None:
    conn.execute(delete(ModelRow).where(ModelRow.state == PENDING))


def copy_embeddings(conn: Connection, source: int, target: int, image_ids: Sequence[int]) -> None:
    for chunk in chunks([int(i) for i in image_ids]):
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


def promote_pending(conn: Connection) -> int:
    record_commit(conn)  # first: the deletions below are logged under it
    pending = conn.execute(select(ModelRow.id).where(ModelRow.state == PENDING)).scalar_one()
    has_vector = select(VectorRow.image_id).where(VectorRow.model_id == pending)
    conn.execute(delete(ImageRow).where(ImageRow.id.not_in(has_vector)))
    conn.execute(delete(ModelRow).where(ModelRow.state == ACTIVE))
    conn.execute(update(ModelRow).where(ModelRow.id == pending).values(state=ACTIVE))
    return pending


def resolve_model(conn: Connection, model_id: int | None) -> int | None:
    if model_id is not None:
        return model_id
    return conn.execute(select(ModelRow.id).where(ModelRow.state == ACTIVE)).scalar_one_or_none()


def commit_changes(
    conn: Connection,
    target: int | None,
    *,
    added: Sequence[tuple[NewImage, bytes]],
    moved: Sequence[Move],
    removed: Sequence[int],
    touched: Sequence[Move],
    failed: Sequence[FailureRecord],
    forget_failures: Sequence[str],
    revectored: Sequence[tuple[int, bytes]],
) -> list[int]:
    """See Catalog.commit_changes; the vectors come checked, as the bytes to store."""
    now = time.time()
    # The commit first: vectors written below carry its generation, and deletions (the cascade
    # of `removed` included) are logged under it, in this same transaction.
    generation = record_commit(conn) if added or removed or revectored or moved or touched else None
    for chunk in chunks([int(i) for i in removed]):
        conn.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
    for m in list(moved) + list(touched):
        conn.execute(
            update(ImageRow).where(ImageRow.id == m.id).values(path=m.path, size=m.size, mtime_ns=m.mtime_ns)
        )
    new_ids = _insert_images(conn, [img for img, _ in added], now)
    vector_rows = [_vector_row(i, target, blob, generation) for i, (_, blob) in zip(new_ids, added)]
    for image_id, blob in revectored:
        conn.execute(delete(VectorRow).where(VectorRow.image_id == image_id, VectorRow.model_id == target))
        vector_rows.append(_vector_row(image_id, target, blob, generation))
    if vector_rows:
        conn.execute(insert(VectorRow), vector_rows)
    settled = [
        *forget_failures,
        *(img.path for img, _ in added),
        *(m.path for m in moved),
        *(f.path for f in failed),
    ]
    for chunk in chunks(settled):
        conn.execute(delete(FailureRow).where(FailureRow.path.in_(chunk)))
    for f in failed:
        conn.execute(
            insert(FailureRow).values(path=f.path, size=f.size, mtime_ns=f.mtime_ns, reason=f.reason)
        )
    set_meta(conn, "updated_at", str(now))
    return new_ids


def replace_tags(
    conn: Connection, image_ids: Sequence[int], labels: Sequence[str], rows: Sequence[dict]
) -> int:
    for chunk in chunks([int(i) for i in image_ids], 500):
        conn.execute(delete(TagRow).where(TagRow.image_id.in_(chunk), TagRow.label.in_(list(labels))))
    live: set[int] = set()
    for chunk in chunks(sorted({int(r["image_id"]) for r in rows})):
        live.update(conn.execute(select(ImageRow.id).where(ImageRow.id.in_(chunk))).scalars())
    kept = [r for r in rows if r["image_id"] in live]
    if kept:
        conn.execute(insert(TagRow), kept)
    return len(kept)


def _insert_images(conn: Connection, added: Sequence[NewImage], now: float) -> list[int]:
    """Insert the rows of `added` with one executemany; returns their ids, in order.

    The ids are taken first (_next_ids), then given explicitly: a row at a time with RETURNING
    cost ~0.5 ms a row in SQLite, minutes for a million imported images. Straight to the driver:
    SQLAlchemy's per-row parameter processing cost as much as SQLite's insert. Paths are encoded
    as FsPath does."""
    if not added:
        return []
    ids = _next_ids(conn, len(added))
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
        DIALECTS[conn.dialect.name].sql(
            "INSERT INTO images (id, path, size, mtime_ns, content_hash, width, height, format, "
            "taken_at, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ),
        rows,
    )
    return ids


def _next_ids(conn: Connection, count: int) -> list[int]:
    """`count` ids never given before in this catalog, ascending."""
    if conn.dialect.name == "sqlite":
        # After the largest id ever given (sqlite_sequence, which AUTOINCREMENT itself keeps;
        # max(id) for a table without it): ids are never reused.
        last = conn.exec_driver_sql(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'images'), 0), "
            "coalesce((SELECT max(id) FROM images), 0))"
        ).scalar_one()
        return list(range(int(last) + 1, int(last) + 1 + count))
    # The table's own sequence, advanced once for the whole batch (it never goes back; the one
    # writer holds the advisory lock, so the range is contiguous).
    sequence = "pg_get_serial_sequence('images', 'id')"
    last = conn.exec_driver_sql(
        f"SELECT setval({sequence}, nextval({sequence}) + %(extra)s)", {"extra": count - 1}
    ).scalar_one()
    return list(range(int(last) - count + 1, int(last) + 1))


def _last_generation():  # type: ignore[no-untyped-def]
    return select(func.max(CommitRow.generation)).scalar_subquery()


def _vector_row(image_id: int, model_id: int | None, blob: bytes, generation: int | None) -> dict:
    return {"image_id": image_id, "model_id": model_id, "vector": blob, "generation": generation}
