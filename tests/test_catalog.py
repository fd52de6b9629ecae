"""The SQLite catalog: exact path bytes, atomic batches, ids never reused."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import changes_since, sqlite_plans
from sqlalchemy import insert, update

from retrieval.core.errors import ClipdexError
from retrieval.storage.catalog import CATALOG_NAME, SCHEMA_VERSION, Catalog
from retrieval.storage.records import Move, NewImage
from retrieval.storage.schema import ImageRow


def unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def new(path: str, seed: int = 0, size: int = 100, dim: int = 8) -> NewImage:
    return NewImage(path, size, 1_000 + seed, f"hash{seed}", 10, 20, "PNG", None, unit(seed, dim))


@pytest.fixture
def catalog(index_dir, catalog_backend):
    """A catalog in SQLite, then in PostgreSQL (a fresh schema; skipped without a server)."""
    index_dir.mkdir()
    cat = Catalog.open(index_dir, create=True)
    cat.set_model_signature({"arch": "test", "dim": 8})
    yield cat
    cat.close()


def test_open_requires_create_for_a_new_catalog(index_dir):
    index_dir.mkdir()
    with pytest.raises(ClipdexError):
        Catalog.open(index_dir)
    assert not (index_dir / CATALOG_NAME).exists()
    cat = Catalog.open(index_dir, create=True)
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert cat.count() == 0 and cat.model_signature() is None
    cat.close()
    Catalog.open(index_dir).close()  # now it exists


def test_newer_schema_is_refused(catalog, index_dir):
    catalog.set_meta("schema_version", "999")
    with pytest.raises(ClipdexError, match="schema version 999"):
        Catalog.open(index_dir)


def test_non_utf8_paths_round_trip(catalog):
    raw = [b"/photos/caf\xe9.jpg", b"/photos/\xff\xfe/x.png", "/photos/東京.jpg".encode()]
    paths = [os.fsdecode(b) for b in raw]
    ids = catalog.commit_changes(added=[new(p, i) for i, p in enumerate(paths)])
    records = catalog.records()
    assert sorted(os.fsencode(r.path) for r in records.values()) == sorted(raw)
    for row_id, path, b in zip(ids, paths, raw):
        rec = catalog.record_by_path(path)
        assert rec is not None and rec.id == row_id and os.fsencode(rec.path) == b
    # stored as the exact bytes, not as text with replacement characters
    with catalog.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT path FROM images ORDER BY id").scalars().all()
    assert stored == raw
    # a move to another undecodable name keeps the bytes too
    target = os.fsdecode(b"/photos/moved-\xe9.jpg")
    catalog.commit_changes(moved=[Move(ids[0], target, 100, 5)])
    assert os.fsencode(catalog.record_by_path(target).path) == b"/photos/moved-\xe9.jpg"


def test_commit_returns_increasing_ids_that_are_never_reused(catalog):
    ids = catalog.commit_changes(added=[new("/a.jpg", 0), new("/b.jpg", 1)])
    assert ids == sorted(ids) and len(set(ids)) == 2
    catalog.commit_changes(removed=[ids[1]])
    (again,) = catalog.commit_changes(added=[new("/b.jpg", 1)])
    assert again > max(ids)
    assert catalog.ids().tolist() == [ids[0], again]


def test_remove_and_add_same_path_in_one_batch(catalog):
    (old,) = catalog.commit_changes(added=[new("/a.jpg", 0)])
    (fresh,) = catalog.commit_changes(added=[new("/a.jpg", 5)], removed=[old])
    assert catalog.count() == 1
    rec = catalog.record_by_path("/a.jpg")
    assert rec.id == fresh != old and rec.content_hash == "hash5"


def test_failed_batch_leaves_nothing(catalog):
    keep = catalog.commit_changes(added=[new("/keep.jpg", 0), new("/gone.jpg", 1)])
    updated_at = catalog.get_meta("updated_at")
    with pytest.raises(Exception):  # noqa: B017 - the duplicate path makes the 3rd insert fail
        catalog.commit_changes(
            added=[new("/x.jpg", 2), new("/y.jpg", 3), new("/x.jpg", 4)],
            removed=[keep[1]],
            moved=[Move(keep[0], "/renamed.jpg", 1, 1)],
        )
    assert catalog.count() == 2
    assert catalog.ids().tolist() == keep
    assert catalog.record_by_path("/x.jpg") is None and catalog.record_by_path("/renamed.jpg") is None
    assert catalog.record_by_path("/keep.jpg").id == keep[0]
    assert catalog.get_meta("updated_at") == updated_at
    # the failure did not leave the catalog unusable
    assert len(catalog.commit_changes(added=[new("/x.jpg", 2)])) == 1


def test_exception_inside_a_write_rolls_back(catalog):
    with pytest.raises(RuntimeError), catalog._write() as conn:
        conn.execute(
            insert(ImageRow).values(
                path="/p.jpg",
                size=1,
                mtime_ns=1,
                content_hash="h",
                width=1,
                height=1,
                format=None,
                taken_at=None,
                indexed_at=0.0,
            )
        )
        raise RuntimeError("boom")
    assert catalog.count() == 0
    (row_id,) = catalog.commit_changes(added=[new("/p.jpg", 0)])
    with pytest.raises(RuntimeError), catalog._write() as conn:
        conn.execute(update(ImageRow).where(ImageRow.id == row_id).values(path="/q.jpg"))
        raise RuntimeError("boom")
    assert catalog.record_by_path("/p.jpg").id == row_id


def test_moved_and_touched_rows_keep_id_and_vector(catalog):
    a, b = catalog.commit_changes(added=[new("/a.jpg", 0), new("/b.jpg", 1)])
    before = catalog.embeddings([a, b], 8)
    catalog.commit_changes(moved=[Move(a, "/sub/a2.jpg", 100, 77)], touched=[Move(b, "/b.jpg", 101, 88)])
    assert catalog.record_by_path("/a.jpg") is None
    ra, rb = catalog.record_by_path("/sub/a2.jpg"), catalog.record_by_path("/b.jpg")
    assert (ra.id, ra.mtime_ns) == (a, 77)
    assert (rb.id, rb.size, rb.mtime_ns, rb.content_hash) == (b, 101, 88, "hash1")
    np.testing.assert_array_equal(catalog.embeddings([a, b], 8), before)


def test_vectors_in_requested_order_and_unknown_id_raises(catalog):
    ids = catalog.commit_changes(added=[new(f"/{i}.jpg", i) for i in range(4)])
    got = catalog.embeddings([ids[3], ids[0], ids[2]], 8)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.stack([unit(3), unit(0), unit(2)]))
    with pytest.raises(KeyError):
        catalog.embeddings([ids[0], 12345], 8)


def test_large_batches_are_chunked(catalog):
    catalog.set_model_signature({"arch": "test", "dim": 4})
    ids = catalog.commit_changes(added=[new(f"/many/{i}.jpg", i, dim=4) for i in range(1000)])
    assert len(ids) == 1000 and catalog.count() == 1000  # over the 900-id chunks used in queries
    assert len(catalog.records(ids)) == 1000
    vecs = catalog.embeddings(ids, 4)
    np.testing.assert_array_equal(vecs[934], unit(934, 4))
    seen = np.concatenate([i for i, _ in catalog.iter_embedding_blobs(batch=300)])
    assert seen.tolist() == ids
    catalog.commit_changes(removed=ids[::2])
    assert catalog.ids().tolist() == ids[1::2]


def test_records_of_some_ids(catalog):
    ids = catalog.commit_changes(added=[new(f"/{i}.jpg", i) for i in range(3)])
    recs = catalog.records([ids[1], 999])
    assert list(recs) == [ids[1]]
    rec = recs[ids[1]]
    assert (rec.path, rec.size, rec.width, rec.height, rec.format) == ("/1.jpg", 100, 10, 20, "PNG")


def test_model_signature_set_replace_clear(catalog):
    catalog.set_model_signature({"arch": "a", "dim": 8})
    catalog.set_model_signature({"arch": "b", "dim": 16})
    assert catalog.model_signature() == {"arch": "b", "dim": 16}
    catalog.clear_model_signature()
    assert catalog.model_signature() is None


def test_readers_see_commits_of_another_connection(catalog, index_dir):
    reader = Catalog.open(index_dir)
    try:
        assert reader.count() == 0
        catalog.commit_changes(added=[new("/a.jpg")])
        assert reader.count() == 1
    finally:
        reader.close()


def test_reads_of_a_models_vectors_by_id_go_through_the_primary_key(catalog):
    """Reading vectors in id order walks the (image_id, model_id) key, and catching up reads
    the (model_id, generation) index, neither sorting rows in a temporary B-tree: SQLite, with no
    statistics, preferred the generation index for the model's equality, then read every vector
    through it and sorted them (paging through a million vectors took 107 s, now 3 s)."""
    if catalog.location.is_postgres:
        pytest.skip("SQLite's query plans")
    ids = catalog.commit_changes(added=[new(f"/p/{i}.jpg", i) for i in range(40)])
    state = catalog.state()
    later = catalog.commit_changes(added=[new(f"/q/{i}.jpg", 100 + i) for i in range(5)])
    catalog.commit_changes(removed=ids[:3])
    model = state.model_id
    reads = {
        "pages": lambda: [chunk for chunk, _ in catalog.iter_embedding_blobs(batch=7)],
        "ids": lambda: catalog.ids(),
        "without": lambda: catalog.ids_without_vector(model),
        "changes": lambda: changes_since(catalog, state.generation, model, 8),
    }
    for name, read in reads.items():
        plans = sqlite_plans(catalog, read, "vectors")
        assert plans, name
        for plan in plans:
            assert "TEMP B-TREE" not in plan, (name, plan)
            if name == "changes":
                assert "ix_vectors_by_generation" in plan, plan
            else:
                assert "ix_vectors_by_generation" not in plan, (name, plan)
    kept = ids[3:] + later
    assert np.concatenate(reads["pages"]()).tolist() == kept
    assert catalog.ids().tolist() == kept
    assert catalog.ids_without_vector(model).tolist() == []
    changes = changes_since(catalog, state.generation, model, 8)
    assert changes.added.tolist() == later and changes.removed.tolist() == ids[:3]
    assert np.array_equal(changes.vectors, np.stack([unit(100 + i) for i in range(5)]))
