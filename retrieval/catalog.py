"""The SQLite catalog (SQLAlchemy 2.x): one row per indexed image, the model record, metadata.

Vectors are stored here too, as float32 BLOBs in the same row, so that a catalog row and its
vector commit in one transaction: the FAISS file is only a cache that can always be rebuilt.
Row ids come from AUTOINCREMENT and are never reused; a re-embedded file gets a new id, so a
FAISS id set equal to the catalog's id set means the FAISS vectors are the catalog's vectors.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .errors import ClipdexError, IndexNotFoundError, IndexWriteError

SCHEMA_VERSION = 1
CATALOG_NAME = "catalog.sqlite"


class FsPath(TypeDecorator[str]):
    """A filesystem path stored as its exact bytes, so names that are not valid UTF-8 survive."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> bytes | None:
        return None if value is None else os.fsencode(value)

    def process_result_value(self, value: bytes | None, dialect: object) -> str | None:
        return None if value is None else os.fsdecode(value)


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    taken_at: Mapped[float | None] = mapped_column(Float)  # EXIF DateTimeOriginal as unix time
    indexed_at: Mapped[float] = mapped_column(Float)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class FailureRow(Base):
    """A file that could not be indexed, as it was then: an unchanged file is not tried again
    on every run (a library with broken files would otherwise pay for them each time)."""

    __tablename__ = "failures"

    path: Mapped[str] = mapped_column(FsPath, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class Failure:
    path: str
    size: int
    mtime_ns: int
    reason: str


class ModelRow(Base):
    __tablename__ = "model"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    signature: Mapped[str] = mapped_column(Text)  # JSON of retrieval.model.ModelSignature


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class ImageRecord:
    """What the catalog knows of one indexed image (without its vector)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    format: str | None
    taken_at: float | None
    indexed_at: float


@dataclass(frozen=True)
class NewImage:
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    format: str | None
    taken_at: float | None
    vector: np.ndarray


@dataclass(frozen=True)
class Move:
    id: int
    path: str
    size: int
    mtime_ns: int


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
        # WAL: searches read the last committed state while an indexer writes. NORMAL is
        # durable against process crashes (SIGKILL); a power cut can lose the last commits
        # but never corrupts the file.
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")

    return engine


class Catalog:
    def __init__(self, engine: Engine, path: Path):
        self.engine = engine
        self.path = path

    @classmethod
    def open(cls, index_dir: Path, *, create: bool = False) -> Catalog:
        """Open the catalog; with `create`, make it (or finish making it) first.

        An index exists once its schema version is committed, not once the file exists: SQLite
        creates the file at the first connection, and a process killed before the tables were
        committed must not leave a catalog that no later run can open.
        """
        db_path = index_dir / CATALOG_NAME
        if not db_path.exists() and not create:
            raise IndexNotFoundError(f"no index at {index_dir}: build one with 'clipdex index FOLDER'")
        engine = _make_engine(db_path)
        catalog = cls(engine, db_path)
        try:
            if create:
                # Tables and schema version in one transaction (SQLite DDL is transactional).
                with catalog._write() as conn:
                    Base.metadata.create_all(conn)
                    if (
                        conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).first()
                        is None
                    ):
                        conn.execute(insert(MetaRow).values(key="schema_version", value=str(SCHEMA_VERSION)))
                        conn.execute(insert(MetaRow).values(key="created_at", value=str(time.time())))
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
        return catalog

    def close(self) -> None:
        self.engine.dispose()

    def _schema_version(self) -> str | None:
        with self.engine.connect() as conn:
            has_meta = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).first()
            if has_meta is None:
                return None
            return conn.execute(
                select(MetaRow.value).where(MetaRow.key == "schema_version")
            ).scalar_one_or_none()

    # -- metadata -------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(MetaRow.value).where(MetaRow.key == key)).scalar_one_or_none()

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute(delete(MetaRow).where(MetaRow.key == key))
            conn.execute(insert(MetaRow).values(key=key, value=value))

    def model_signature(self) -> dict | None:
        with self.engine.connect() as conn:
            raw = conn.execute(select(ModelRow.signature).where(ModelRow.id == 1)).scalar_one_or_none()
        return None if raw is None else json.loads(raw)

    def set_model_signature(self, signature: dict) -> None:
        with self._write() as conn:
            conn.execute(delete(ModelRow))
            conn.execute(insert(ModelRow).values(id=1, signature=json.dumps(signature, sort_keys=True)))

    def failures(self) -> dict[str, Failure]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(FailureRow.path, FailureRow.size, FailureRow.mtime_ns, FailureRow.reason)
            )
            return {r[0]: Failure(*r) for r in rows}

    def clear_model_signature(self) -> None:
        with self._write() as conn:
            conn.execute(delete(ModelRow))

    # -- reads ----------------------------------------------------------------------------
    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(ImageRow)).scalar_one()

    def ids(self) -> np.ndarray:
        with self.engine.connect() as conn:
            rows = conn.execute(select(ImageRow.id).order_by(ImageRow.id)).scalars().all()
        return np.asarray(rows, dtype=np.int64)

    def records(self, ids: Iterable[int] | None = None) -> dict[int, ImageRecord]:
        """Records by id: all of them, or those of `ids` that exist."""
        out: dict[int, ImageRecord] = {}
        with self.engine.connect() as conn:
            if ids is None:
                for row in conn.execute(select(*_RECORD_COLUMNS)):
                    out[row[0]] = ImageRecord(*row)
                return out
            for chunk in _chunks(list(ids), 900):
                for row in conn.execute(select(*_RECORD_COLUMNS).where(ImageRow.id.in_(chunk))):
                    out[row[0]] = ImageRecord(*row)
        return out

    def record_by_path(self, path: str) -> ImageRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_RECORD_COLUMNS).where(ImageRow.path == path)).first()
        return None if row is None else ImageRecord(*row)

    def vectors(self, ids: Sequence[int], dim: int) -> np.ndarray:
        """The stored vectors of `ids`, in that order (KeyError for an unknown id)."""
        found: dict[int, bytes] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(ids), 900):
                for row_id, blob in conn.execute(
                    select(ImageRow.id, ImageRow.vector).where(ImageRow.id.in_(chunk))
                ):
                    found[row_id] = blob
        out = np.empty((len(ids), dim), dtype=np.float32)
        for i, row_id in enumerate(ids):
            out[i] = np.frombuffer(found[row_id], dtype=np.float32)
        return out

    def iter_vectors(self, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) in chunks, by id; each vector exactly as stored (may be malformed)."""
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(ImageRow.id, ImageRow.vector)
                    .where(ImageRow.id > last)
                    .order_by(ImageRow.id)
                    .limit(batch)
                ).all()
            if not rows:
                return
            ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            yield ids, [r[1] for r in rows]  # type: ignore[misc]
            last = int(ids[-1])

    # -- writes ---------------------------------------------------------------------------
    def commit_changes(
        self,
        added: Sequence[NewImage] = (),
        moved: Sequence[Move] = (),
        removed: Sequence[int] = (),
        touched: Sequence[Move] = (),
        failed: Sequence[Failure] = (),
        forget_failures: Sequence[str] = (),
    ) -> list[int]:
        """Apply one batch of changes in one transaction; returns the ids given to `added`.

        `removed` rows are deleted before `added` rows are inserted, so a changed file can be
        removed and re-added under its path in the same batch. `touched` updates size and
        mtime of files whose content did not change. `failed` records files that could not be
        indexed; a path that is indexed now, or gone, leaves that record.
        """
        now = time.time()
        new_ids: list[int] = []
        with self._write() as conn:
            for chunk in _chunks(list(removed), 900):
                conn.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            for m in list(moved) + list(touched):
                conn.execute(
                    update(ImageRow)
                    .where(ImageRow.id == m.id)
                    .values(path=m.path, size=m.size, mtime_ns=m.mtime_ns)
                )
            for img in added:
                vec = np.ascontiguousarray(img.vector, dtype=np.float32)
                result = conn.execute(
                    insert(ImageRow)
                    .values(
                        path=img.path,
                        size=img.size,
                        mtime_ns=img.mtime_ns,
                        content_hash=img.content_hash,
                        width=img.width,
                        height=img.height,
                        format=img.format,
                        taken_at=img.taken_at,
                        indexed_at=now,
                        vector=vec.tobytes(),
                    )
                    .returning(ImageRow.id)
                )
                new_ids.append(result.scalar_one())
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
            conn.execute(delete(MetaRow).where(MetaRow.key == "updated_at"))
            conn.execute(insert(MetaRow).values(key="updated_at", value=str(now)))
        return new_ids

    def _write(self):  # type: ignore[no-untyped-def]
        return _WriteTxn(self)


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
