"""Stored tags belong to their image rows: they go with the image, and are written by the writer."""

from __future__ import annotations

import os
import sqlite3

import pytest
from conftest import make_scene, write_scenes

from indexer import index_folders
from retrieval.core.errors import IndexLockedError
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME
from retrieval.storage.lock import WriterLock

LABELS = ["a red square", "a blue circle", "a green field"]


def tag_rows(index_dir) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    """Every row of the tags table, read with plain sqlite3 (orphans included)."""
    conn = sqlite3.connect(index_dir / CATALOG_NAME)
    try:
        return sorted(conn.execute("SELECT image_id, label FROM tags").fetchall())
    finally:
        conn.close()


@pytest.fixture
def tagged(tmp_path, tiny_clip_model):  # type: ignore[no-untyped-def]
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = write_scenes(photos, 5)
    index_folders([photos], index_dir, tiny_clip_model)
    with ImageIndex.open(index_dir, device="cpu") as index:
        results = index.classify(LABELS, top=2)
        assert index.store_tags(results, LABELS) == 10
        ids = {r.path: r.id for r in results}
    return paths, index_dir, ids


def test_deleting_an_image_deletes_its_tags(tagged, tiny_clip_model):
    paths, index_dir, ids = tagged
    paths[0].unlink()
    assert index_folders([paths[0].parent], index_dir, tiny_clip_model).removed == 1
    gone = ids[str(paths[0])]
    rows = tag_rows(index_dir)
    assert len(rows) == 8 and gone not in {image_id for image_id, _ in rows}


def test_re_embedding_a_changed_image_drops_its_old_tags(tagged, tiny_clip_model):
    paths, index_dir, ids = tagged
    make_scene(99, (96, 72)).save(paths[1])  # new content: a new row, the old tags no longer apply
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert index_folders([paths[1].parent], index_dir, tiny_clip_model).updated == 1
    assert ids[str(paths[1])] not in {image_id for image_id, _ in tag_rows(index_dir)}
    with ImageIndex.open(index_dir) as index:
        assert set(index.catalog.tags_of()) == {ids[str(p)] for p in paths if p != paths[1]}


def test_storing_tags_takes_the_writer_lock(tagged):
    _, index_dir, _ = tagged
    before = tag_rows(index_dir)
    with ImageIndex.open(index_dir, device="cpu") as index:
        results = index.classify(["a yellow sun"], top=1)
        with WriterLock(index_dir), pytest.raises(IndexLockedError):
            index.store_tags(results, ["a yellow sun"])
        assert tag_rows(index_dir) == before  # nothing written while another writer held the index
        assert index.store_tags(results, ["a yellow sun"]) == 5
