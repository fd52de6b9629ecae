"""The catalog's tables (SQLAlchemy 2.x models) and how a catalog file is made or upgraded.

`images` holds one row per image; `vectors` one float32 unit vector per (image, model), narrow
rows apart from the metadata, each with the commit generation that wrote it; `removals` the
vectors deleted since, logged by a trigger in the deleting transaction (cascades included), so
that a FAISS cache stamped at generation g catches up by reading only what changed after g;
`models` the active model and at most one pending (a reindex being built); `tags` zero-shot
labels; `commits` the history (a generation and a random nonce per write that changes what a
search sees); `failures` files that could not be indexed; `meta` the schema version, the index
identity and `changes_from` (the oldest generation the change log covers). Vectors and tags
cascade with their image row.

Schema 3 added `vectors.generation`, `removals` and the filter indexes on `images`; a schema-2
catalog is upgraded in place (its rows keep a NULL generation, and `changes_from` is the upgrade's
generation: a cache stamped before it falls back to a full id diff once), a schema-1 catalog
(clipdex 0.1) through the same steps. RETIRED_INDEXES are dropped by the next writer that may
create an index (open_catalog) without a change of schema version: only writes depended on
them, so a catalog with or without them opens in any clipdex of schema 3.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .schema_names import (
    ACTIVE,
    CHANGES_FROM,
    PENDING,
    RETIRED_INDEXES,
    SCHEMA_VERSION,
    TAKEN_OR_CHANGED,
    parse_changes_from,
)
from .sql_dialects import DIALECTS

__all__ = ["ACTIVE", "CHANGES_FROM", "PENDING", "SCHEMA_VERSION", "TAKEN_OR_CHANGED"]

# 64-bit integers: nanosecond mtimes, sizes over 2 GB and ids past 2^31 need them in PostgreSQL.
# SQLite keeps its INTEGER (already 64-bit), which AUTOINCREMENT and rowid aliasing require.
Int64 = BigInteger().with_variant(Integer, "sqlite")


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
    __table_args__ = (
        Index("ix_images_by_date", text(TAKEN_OR_CHANGED)),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Int64, primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    content_hash: Mapped[str] = mapped_column(String(64))  # not indexed: see RETIRED_INDEXES
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16), index=True)  # filters
    taken_at: Mapped[float | None] = mapped_column(Float)  # EXIF DateTimeOriginal as unix time
    indexed_at: Mapped[float] = mapped_column(Float)


class ModelRow(Base):
    """A model whose vectors the catalog holds: the active one, and at most one pending
    (being built by a reindex)."""

    __tablename__ = "models"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    signature: Mapped[str] = mapped_column(Text)  # JSON of retrieval.embedding.clip_model.ModelSignature
    state: Mapped[str] = mapped_column(String(8), index=True)  # ACTIVE or PENDING


class VectorRow(Base):
    """One float32 unit vector per (image, model): narrow rows, apart from the metadata.
    `generation`: the commit that wrote it (NULL: written before schema 3), never changed after."""

    __tablename__ = "vectors"
    __table_args__ = (Index("ix_vectors_by_generation", "model_id", "generation"),)

    image_id: Mapped[int] = mapped_column(
        Int64, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    generation: Mapped[int | None] = mapped_column(Int64, nullable=True)


class RemovalRow(Base):
    """A vector deleted by commit `generation`, written by the trigger below (never by hand).
    No foreign keys: it outlives its rows; trimmed when the cache file is rewritten."""

    __tablename__ = "removals"

    model_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(Int64, primary_key=True, autoincrement=False)
    image_id: Mapped[int] = mapped_column(Int64, primary_key=True, autoincrement=False)


# A vector inserted without its generation (by any statement that forgets it) gets the latest
# one: a row without it would look older than every cache and never be caught up.
#
# Every deleted vector is logged by the transaction that deletes it, whichever statement did
# (`DELETE FROM images` cascades here too), under that transaction's generation: writers record
# their commit before they delete. Vectors deleted with their model are not logged (the model's
# row is gone first): a cache of a deleted model is never caught up, it is rebuilt.
_TRIGGERS = {
    "sqlite": [
        """
        CREATE TRIGGER IF NOT EXISTS stamp_vector_generation AFTER INSERT ON vectors
        WHEN new.generation IS NULL
        BEGIN
            UPDATE vectors SET generation = (SELECT max(generation) FROM commits)
            WHERE image_id = new.image_id AND model_id = new.model_id;
        END
        """,
        """
        CREATE TRIGGER IF NOT EXISTS log_vector_removal AFTER DELETE ON vectors
        WHEN EXISTS (SELECT 1 FROM models WHERE id = old.model_id)
        BEGIN
            INSERT OR IGNORE INTO removals (model_id, generation, image_id)
            VALUES (old.model_id, (SELECT max(generation) FROM commits), old.image_id);
        END
        """,
    ],
    # The same two in PL/pgSQL (a cascade's deletions run after its parent row is gone there too).
    "postgresql": [
        """
        CREATE OR REPLACE FUNCTION clipdex_stamp_vector_generation() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.generation IS NULL THEN
                NEW.generation := (SELECT max(generation) FROM commits);
            END IF;
            RETURN NEW;
        END $$
        """,
        "DROP TRIGGER IF EXISTS stamp_vector_generation ON vectors",
        """
        CREATE TRIGGER stamp_vector_generation BEFORE INSERT ON vectors
        FOR EACH ROW EXECUTE FUNCTION clipdex_stamp_vector_generation()
        """,
        """
        CREATE OR REPLACE FUNCTION clipdex_log_vector_removal() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM models WHERE id = OLD.model_id) THEN
                INSERT INTO removals (model_id, generation, image_id)
                VALUES (OLD.model_id, (SELECT max(generation) FROM commits), OLD.image_id)
                ON CONFLICT DO NOTHING;
            END IF;
            RETURN OLD;
        END $$
        """,
        "DROP TRIGGER IF EXISTS log_vector_removal ON vectors",
        """
        CREATE TRIGGER log_vector_removal AFTER DELETE ON vectors
        FOR EACH ROW EXECUTE FUNCTION clipdex_log_vector_removal()
        """,
    ],
}


class TagRow(Base):
    """Zero-shot labels stored by `classify --store`; they go with their image."""

    __tablename__ = "tags"
    __table_args__ = (Index("ix_tags_by_label", "label"),)

    image_id: Mapped[int] = mapped_column(
        Int64, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    probability: Mapped[float] = mapped_column(Float)


class CommitRow(Base):
    """The catalog's history: one row per write that changes what a search sees."""

    __tablename__ = "commits"
    __table_args__ = {"sqlite_autoincrement": True}

    generation: Mapped[int] = mapped_column(Int64, primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32))
    at: Mapped[float] = mapped_column(Float)


class FailureRow(Base):
    """A file that could not be indexed, as it was then: an unchanged file is not tried again
    on every run (a library with broken files would otherwise pay for them each time)."""

    __tablename__ = "failures"

    path: Mapped[str] = mapped_column(FsPath, primary_key=True)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    reason: Mapped[str] = mapped_column(Text)


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def insert_model(conn: Connection, signature: dict, state: str) -> int:
    return conn.execute(
        insert(ModelRow)
        .values(signature=json.dumps(signature, sort_keys=True), state=state)
        .returning(ModelRow.id)
    ).scalar_one()


def record_commit(conn: Connection) -> int:
    """A new generation; call it before the transaction writes or deletes vectors, which are
    logged under the latest generation."""
    return conn.execute(
        insert(CommitRow).values(nonce=secrets.token_hex(8), at=time.time()).returning(CommitRow.generation)
    ).scalar_one()


def set_meta(conn: Connection, key: str, value: str) -> None:
    conn.execute(delete(MetaRow).where(MetaRow.key == key))
    conn.execute(insert(MetaRow).values(key=key, value=value))


def changes_from(conn: Connection) -> int:
    raw = conn.execute(select(MetaRow.value).where(MetaRow.key == CHANGES_FROM)).scalar_one_or_none()
    return parse_changes_from(raw)


def read_schema_version(conn: Connection) -> str | None:
    if not _table_exists(conn, "meta"):
        return None
    return conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar_one_or_none()


def _table_exists(conn: Connection, name: str) -> bool:
    dialect = DIALECTS[conn.dialect.name]
    return conn.exec_driver_sql(dialect.sql(dialect.table_exists), (name,)).first() is not None


def _index_names(conn: Connection) -> set[str]:
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'index'"
    else:
        sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    return {name for (name,) in conn.exec_driver_sql(sql)}


def create_or_upgrade(conn: Connection) -> None:
    """Inside one write transaction: make a new catalog, add tables a later clipdex introduced,
    drop RETIRED_INDEXES, or upgrade a schema-2 catalog, or a schema-1 one (clipdex 0.1), to this
    schema (SQLite only: PostgreSQL catalogs began at schema 3)."""
    version = read_schema_version(conn)
    old = int(version) if version is not None else None
    if old == 1 and _table_exists(conn, "tags"):
        # 0.1's tags had no foreign key: set them aside and copy the live ones below.
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_tags_label")
        conn.exec_driver_sql("ALTER TABLE tags RENAME TO tags_v1")
    Base.metadata.create_all(conn)  # new tables only: existing ones are altered below
    for name in RETIRED_INDEXES:
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    if old == 2:  # a column of NULLs: no row is rewritten
        conn.exec_driver_sql("ALTER TABLE vectors ADD COLUMN generation INTEGER")
    elif old == 1:
        _upgrade_from_1(conn)  # its vectors keep a NULL generation too (no trigger yet)
    present = _index_names(conn)
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            # By name: SQLAlchemy's own check cannot see an index on an expression.
            if index.name not in present:
                index.create(conn)
    for statement in _TRIGGERS[conn.dialect.name]:
        conn.exec_driver_sql(statement)
    if old is None:
        set_meta(conn, "schema_version", str(SCHEMA_VERSION))
        set_meta(conn, "created_at", str(time.time()))
        set_meta(conn, "index_id", uuid.uuid4().hex)
        set_meta(conn, CHANGES_FROM, str(record_commit(conn)))
    elif old < SCHEMA_VERSION:
        set_meta(conn, "schema_version", str(SCHEMA_VERSION))
        # Rows written before now carry no generation and no removal was logged: only a cache
        # stamped at this generation or later can catch up from the log. (Building the new
        # indexes reads the tables once: the upgrade's one cost proportional to the index.)
        set_meta(conn, CHANGES_FROM, str(record_commit(conn)))


def _upgrade_from_1(conn: Connection) -> None:
    sql = conn.exec_driver_sql
    signature = sql("SELECT signature FROM model WHERE id = 1").scalar_one_or_none()
    if signature is not None:
        model_id = insert_model(conn, json.loads(signature), ACTIVE)
        sql(
            "INSERT INTO vectors (image_id, model_id, vector) SELECT id, ?, vector FROM images",
            (model_id,),
        )
    sql("ALTER TABLE images DROP COLUMN vector")
    if _table_exists(conn, "tags_v1"):
        sql(
            "INSERT INTO tags (image_id, label, probability) SELECT t.image_id, t.label, t.probability "
            "FROM tags_v1 t JOIN images i ON i.id = t.image_id"
        )
        sql("DROP TABLE tags_v1")
    sql("DROP TABLE model")
    set_meta(conn, "index_id", uuid.uuid4().hex)
