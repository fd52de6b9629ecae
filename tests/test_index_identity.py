"""The FAISS file is tied to its catalog: identity, model and commit; older catalogs are upgraded.

A catalog that is copied from another index, restored from a backup, or deleted and made again
hands out the same row ids as before: a FAISS file matched by id set alone would then answer
with the vectors of other images.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import write_scenes

from indexer import index_folders
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME, SCHEMA_VERSION, Catalog
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex
from retrieval.storage.verify import verify_index


def catalog_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    """path -> the vector the catalog holds for it."""
    catalog = Catalog.open(index_dir)
    try:
        records = catalog.records()
        ids = sorted(records)
        vectors = catalog.embeddings(ids, catalog.model_signature()["dim"])
        return {records[i].path: v for i, v in zip(ids, vectors)}
    finally:
        catalog.close()


def assert_answers_with_own_vectors(index_dir: Path) -> None:
    """Each image, searched by its own catalog vector, comes first with cosine 1."""
    with ImageIndex.open(index_dir) as index:
        for path, vec in catalog_vectors(index_dir).items():
            (top,) = index.search_vector(vec, k=1)
            assert top.path == path and top.score == pytest.approx(1.0, abs=1e-5), (top, path)


def move_catalog(src: Path, dst: Path) -> None:
    for old in dst.glob(CATALOG_NAME + "*"):
        old.unlink()
    for f in src.glob(CATALOG_NAME + "*"):
        shutil.copy2(f, dst / f.name)


def test_a_catalog_copied_from_another_index_never_uses_this_faiss_file(tmp_path, tiny_clip_model):
    a, b = tmp_path / "a", tmp_path / "b"
    index_folders([write_scenes(tmp_path / "pa", 5)[0].parent], a, tiny_clip_model)
    index_folders([write_scenes(tmp_path / "pb", 5, seed0=50)[0].parent], b, tiny_clip_model)
    # Same ids 1..5 in both, other images behind them.
    assert sorted(Catalog.open(a).ids().tolist()) == sorted(Catalog.open(b).ids().tolist())
    stale = FaissIndex.load(a / FAISS_FILE, 64)
    move_catalog(b, a)  # a's vectors.faiss stays, with the same id set
    assert_answers_with_own_vectors(a)  # a reader rebuilt from the catalog in memory
    with ImageIndex.open(a) as index:
        report = verify_index(index.store, check_files=False)
    assert report.problems == [f"{FAISS_FILE} does not belong to this catalog or its model (never used)"]
    # The next writer replaces the file, stamped with this catalog's identity.
    index_folders([tmp_path / "pb"], a, tiny_clip_model)
    fresh = FaissIndex.load(a / FAISS_FILE, 64)
    assert fresh.stamp is not None and fresh.stamp.index_id == Catalog.open(a).get_meta("index_id")
    fresh_vecs, stale_vecs = fresh.reconstruct_all(), stale.reconstruct_all()
    assert not np.array_equal(np.sort(fresh_vecs, axis=0), np.sort(stale_vecs, axis=0))
    with ImageIndex.open(a) as index:
        assert verify_index(index.store, check_files=False).ok


def test_a_faiss_file_from_a_later_history_is_not_trusted(tmp_path, tiny_clip_model):
    """A catalog restored from a backup: the FAISS file saw commits that this catalog never had,
    and ids that the restored catalog hands out again name other images there."""
    photos, index_dir, backup = tmp_path / "photos", tmp_path / "index", tmp_path / "backup"
    write_scenes(photos, 4)
    index_folders([photos], index_dir, tiny_clip_model)
    backup.mkdir()
    move_catalog(index_dir, backup)
    write_scenes(photos, 3, seed0=20, prefix="later")  # ids 5..7 in this history
    index_folders([photos], index_dir, tiny_clip_model)
    later = FaissIndex.load(index_dir / FAISS_FILE, 64)
    assert later.ntotal == 7
    move_catalog(backup, index_dir)  # restore: 4 rows, the file has 7
    # In the restored history, ids 5..7 are handed out again, to other pictures.
    other = tmp_path / "other"
    write_scenes(other, 3, seed0=40)
    catalog = Catalog.open(index_dir)
    try:
        from retrieval.storage.records import NewImage

        vecs = catalog_vectors_of_files(tiny_clip_model, sorted(other.iterdir()))
        ids = catalog.commit_changes(
            added=[NewImage(str(p), 1, 1, f"h{i}", 1, 1, "PNG", None, v) for i, (p, v) in enumerate(vecs)]
        )
    finally:
        catalog.close()
    assert ids == [5, 6, 7]
    assert_answers_with_own_vectors(index_dir)


def catalog_vectors_of_files(model, paths):  # type: ignore[no-untyped-def]
    from PIL import Image

    return [(p, model.encode_pil([Image.open(p).convert("RGB")])[0]) for p in paths]


def test_an_up_to_date_file_is_used_without_reading_the_catalog_ids(tmp_path, tiny_clip_model, monkeypatch):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 6)
    index_folders([photos], index_dir, tiny_clip_model)

    def no_full_scan(self, model_id=None):  # type: ignore[no-untyped-def]
        raise AssertionError("opening an up-to-date index read every id")

    monkeypatch.setattr(Catalog, "ids", no_full_scan)
    assert_answers_with_own_vectors(index_dir)


def test_a_file_one_commit_behind_is_brought_up_to_date(tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 4)
    index_folders([photos], index_dir, tiny_clip_model)
    saved = (index_dir / FAISS_FILE).read_bytes()
    write_scenes(photos, 2, seed0=30, prefix="more")
    index_folders([photos], index_dir, tiny_clip_model)
    (index_dir / FAISS_FILE).write_bytes(saved)  # as if killed before the last save
    with ImageIndex.open(index_dir) as index:
        assert index.store.faiss.ntotal == 6
    assert_answers_with_own_vectors(index_dir)


# -- schema 1 (clipdex 0.1) catalogs are upgraded in place --------------------------------------
SCHEMA_1 = [
    """CREATE TABLE images (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, path BLOB NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, content_hash VARCHAR(64) NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, format VARCHAR(16), taken_at FLOAT,
    indexed_at FLOAT NOT NULL, vector BLOB NOT NULL, UNIQUE (path))""",
    "CREATE INDEX ix_images_content_hash ON images (content_hash)",
    """CREATE TABLE failures (path BLOB NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL, PRIMARY KEY (path))""",
    "CREATE TABLE model (id INTEGER NOT NULL, signature TEXT NOT NULL, PRIMARY KEY (id))",
    'CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"))',
    """CREATE TABLE tags (image_id INTEGER NOT NULL, label TEXT NOT NULL, probability FLOAT NOT NULL,
    PRIMARY KEY (image_id, label))""",
    "CREATE INDEX ix_tags_label ON tags (label)",
]


def write_schema_1_index(source: Path, target: Path) -> dict[str, np.ndarray]:
    """The index at `source` rewritten as clipdex 0.1 stored it (vectors inline, no identity),
    with its old FAISS file, and one orphaned tag as 0.1 could leave behind."""
    vectors = catalog_vectors(source)
    signature = Catalog.open(source).model_signature()
    target.mkdir()
    conn = sqlite3.connect(target / CATALOG_NAME)
    with conn:
        for ddl in SCHEMA_1:
            conn.execute(ddl)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('created_at', '0')")
        conn.execute("INSERT INTO model VALUES (1, ?)", (json.dumps(signature),))
        for i, (path, vec) in enumerate(sorted(vectors.items()), start=1):
            conn.execute(
                "INSERT INTO images VALUES (?, ?, 1, 1, ?, 8, 8, 'PNG', NULL, 0, ?)",
                (i, path.encode(), f"h{i}", vec.tobytes()),
            )
        conn.execute("INSERT INTO tags VALUES (1, 'cat', 0.9), (999, 'orphan', 0.5)")
    conn.close()
    old = FaissIndex.empty(64)
    paths = sorted(vectors)
    old.add(np.arange(1, len(paths) + 1), np.stack([vectors[p] for p in paths]))
    old.save(target / FAISS_FILE)  # no stamp, as 0.1 wrote it
    return vectors


def test_a_schema_1_index_is_upgraded_when_first_opened(tmp_path, tiny_clip_model):
    photos = tmp_path / "photos"
    write_scenes(photos, 5)
    index_folders([photos], tmp_path / "new", tiny_clip_model)
    old_dir = tmp_path / "old"
    vectors = write_schema_1_index(tmp_path / "new", old_dir)

    with ImageIndex.open(old_dir) as index:  # a reader upgrades it, under the writer lock
        assert index.catalog.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert index.catalog.get_meta("index_id")
        assert index.catalog.tags_of() == {1: [("cat", 0.9)]}  # the orphan is gone
        assert verify_index(index.store, check_files=False).problems == [
            f"{FAISS_FILE} does not belong to this catalog or its model (never used)"
        ]
    assert_answers_with_own_vectors(old_dir)
    upgraded = catalog_vectors(old_dir)
    assert upgraded.keys() == vectors.keys()
    assert all(np.array_equal(upgraded[p], v) for p, v in vectors.items())
    columns = [r[1] for r in sqlite3.connect(old_dir / CATALOG_NAME).execute("PRAGMA table_info(images)")]
    assert "vector" not in columns  # one durable copy of each vector, in the narrow table
