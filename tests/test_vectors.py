"""The FAISS side: exact search, ID selectors, atomic saves, reconciliation with the catalog."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import write_scenes

from indexer import index_folders
from retrieval.core.errors import IndexWriteError
from retrieval.index import ImageIndex
from retrieval.storage.catalog import Catalog
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex, ReconcileReport, reconcile
from retrieval.storage.records import NewImage

DIM = 16


def unit_rows(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def filled(n: int = 50, seed: int = 0, first_id: int = 100) -> tuple[FaissIndex, np.ndarray, np.ndarray]:
    ids = np.arange(first_id, first_id + 3 * n, 3, dtype=np.int64)  # sparse ids, not positions
    vecs = unit_rows(n, seed)
    vi = FaissIndex.empty(DIM)
    vi.add(ids, vecs)
    return vi, ids, vecs


def brute_top(ids: np.ndarray, vecs: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    scores = vecs @ q
    order = sorted(range(len(ids)), key=lambda j: (-scores[j], ids[j]))
    return [int(ids[j]) for j in order[:k]]


def test_search_equals_brute_force():
    vi, ids, vecs = filled()
    q = unit_rows(3, seed=9)
    scores, got = vi.search(q, 5)
    assert got.shape == (3, 5)
    for row in range(3):
        assert got[row].tolist() == brute_top(ids, vecs, q[row], 5)
        np.testing.assert_allclose(scores[row], np.sort(vecs @ q[row])[::-1][:5], atol=1e-6)


def test_search_of_empty_index_and_k_over_ntotal():
    empty = FaissIndex.empty(DIM)
    scores, ids = empty.search(unit_rows(1), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    vi, all_ids, _ = filled(4)
    _, got = vi.search(unit_rows(1, 3), 10)
    assert sorted(got[0].tolist()) == sorted(all_ids.tolist())


def test_allowed_ids_give_only_allowed_and_k_of_them():
    vi, ids, vecs = filled(60)
    allowed = ids[[1, 4, 9, 16, 25, 36, 49, 50]]
    q = unit_rows(2, seed=5)
    _, got = vi.search(q, 5, allowed_ids=allowed)
    mask = np.isin(ids, allowed)
    for row in range(2):
        assert len(got[row]) == 5 and (got[row] >= 0).all()
        assert set(got[row].tolist()) <= set(allowed.tolist())
        assert got[row].tolist() == brute_top(ids[mask], vecs[mask], q[row], 5)


def test_allowed_ids_fewer_than_k_and_unknown_ones():
    vi, ids, _ = filled(20)
    allowed = np.array([ids[3], ids[7], 999_999], dtype=np.int64)  # one id FAISS does not hold
    _, got = vi.search(unit_rows(1, 2), 6, allowed_ids=allowed)
    valid = got[0][got[0] >= 0].tolist()
    assert sorted(valid) == sorted([int(ids[3]), int(ids[7])])
    assert (got[0][2:] == -1).all()
    _, none = vi.search(unit_rows(1, 2), 4, allowed_ids=np.array([], dtype=np.int64))
    assert (none == -1).all()


def test_remove_and_ids():
    vi, ids, vecs = filled(10)
    assert vi.remove(ids[[0, 5]]) == 2
    assert vi.remove(np.array([], dtype=np.int64)) == 0
    assert vi.ntotal == 8
    keep = np.delete(np.arange(10), [0, 5])
    assert sorted(vi.ids().tolist()) == sorted(ids[keep].tolist())
    by_id = dict(zip(vi.ids().tolist(), vi.reconstruct_all()))
    for j in keep:
        np.testing.assert_array_equal(by_id[int(ids[j])], vecs[j])


def test_save_and_load_round_trip(tmp_path):
    vi, ids, vecs = filled(12)
    path = tmp_path / FAISS_FILE
    vi.save(path)
    back = FaissIndex.load(path, DIM)
    assert back is not None and back.ntotal == 12
    assert back.ids().tolist() == ids.tolist()
    np.testing.assert_array_equal(back.reconstruct_all(), vecs)
    assert [p.name for p in tmp_path.iterdir()] == [FAISS_FILE]  # no temporary left behind


def test_save_writes_a_temporary_then_renames(tmp_path, monkeypatch):
    path = tmp_path / FAISS_FILE
    old, _, _ = filled(3)
    old.save(path)
    old_bytes = path.read_bytes()
    new_index, _, _ = filled(7, seed=1)
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        # at the rename, the destination still holds the old file and the new one is complete
        old_intact = Path(dst).read_bytes() == old_bytes
        calls.append((src, dst, old_intact, FaissIndex.load(Path(src), DIM).ntotal))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    new_index.save(path)
    assert len(calls) == 1
    src, dst, old_intact, src_ntotal = calls[0]
    assert os.path.dirname(src) == str(tmp_path) and src != dst and dst == str(path)
    assert os.path.basename(src).startswith(".") and src.endswith(".tmp")
    assert old_intact and src_ntotal == 7
    assert FaissIndex.load(path, DIM).ntotal == 7


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / FAISS_FILE
    old, _, _ = filled(3)
    old.save(path)
    old_bytes = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    new_index, _, _ = filled(9, seed=2)
    with pytest.raises(IndexWriteError, match="intact"):
        new_index.save(path)
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == [FAISS_FILE]


def test_save_into_missing_folder_is_an_index_write_error(tmp_path):
    vi, _, _ = filled(2)
    with pytest.raises(IndexWriteError):
        vi.save(tmp_path / "nope" / FAISS_FILE)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing", "other-dim", "not-idmap"])
def test_loading_a_bad_file_returns_none(tmp_path, damage):
    path = tmp_path / FAISS_FILE
    vi, _, _ = filled(8)
    vi.save(path)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 definitely not faiss " * 20)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    elif damage == "not-idmap":
        flat = faiss.IndexFlatIP(DIM)
        flat.add(unit_rows(3))
        faiss.write_index(flat, str(path))
    if damage == "other-dim":
        assert FaissIndex.load(path, DIM * 2) is None
        assert FaissIndex.load(path, DIM) is not None
    else:
        assert FaissIndex.load(path, DIM) is None


def test_reconcile_fixes_missing_and_extra_ids():
    vi, ids, vecs = filled(6)  # holds ids[0..5]
    catalog_vecs = {int(i): v for i, v in zip(ids, vecs)}
    extra_new = {700: unit_rows(1, 77)[0], 701: unit_rows(1, 78)[0]}
    catalog_vecs.update(extra_new)
    del catalog_vecs[int(ids[0])], catalog_vecs[int(ids[4])]
    catalog_ids = np.array(sorted(catalog_vecs), dtype=np.int64)
    fetched = []

    def fetch(wanted):
        fetched.append(list(wanted))
        return np.stack([catalog_vecs[i] for i in wanted])

    report = reconcile(vi, catalog_ids, fetch)
    assert report == ReconcileReport(added=2, removed=2) and report.changed
    assert fetched == [[700, 701]]  # only the missing vectors are read
    assert sorted(vi.ids().tolist()) == catalog_ids.tolist()
    by_id = dict(zip(vi.ids().tolist(), vi.reconstruct_all()))
    for i, v in catalog_vecs.items():
        np.testing.assert_array_equal(by_id[i], v)

    fetched.clear()
    again = reconcile(vi, catalog_ids, fetch)
    assert not again.changed and fetched == []


# -- the FAISS file as a cache of the catalog (through ImageIndex) -----------------------------
@pytest.fixture
def small_index(tmp_path, index_dir, tiny_clip_model):
    write_scenes(tmp_path / "photos", 5)
    index_folders([tmp_path / "photos"], index_dir, model=tiny_clip_model)
    return index_dir


def test_reader_ignores_rows_deleted_behind_a_stale_faiss_file(small_index):
    cat = Catalog.open(small_index)
    victim = int(cat.ids()[0])
    cat.commit_changes(removed=[victim])  # the FAISS file is not told
    cat.close()
    assert victim in FaissIndex.load(small_index / FAISS_FILE, 64).ids().tolist()
    with ImageIndex.open(small_index) as idx:
        q = idx.catalog.embeddings([victim + 1], 64)[0]
        hits = idx.search_vector(q, k=10)
        assert victim not in [h.id for h in hits] and len(hits) == 4
        assert idx.store.faiss.ntotal == 4


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_reader_and_writer_rebuild_a_lost_faiss_file(small_index, tiny_clip_model, tmp_path, damage):
    path = small_index / FAISS_FILE
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"corrupt")
    with ImageIndex.open(small_index) as idx:
        assert idx.store.faiss.ntotal == 5
        assert len(idx.search_vector(np.ones(64, np.float32), k=3)) == 3
    s = index_folders([tmp_path / "photos"], small_index, model=tiny_clip_model)
    assert s.unchanged == 5
    rebuilt = FaissIndex.load(path, 64)
    assert rebuilt is not None and rebuilt.ntotal == 5


def test_writer_commit_without_reconcile_keeps_faiss_equal_to_catalog(index_dir, tiny_clip_model):
    from retrieval.search.ranking import top_hits
    from retrieval.storage.catalog import open_catalog
    from retrieval.storage.vector_store import VectorStore
    from retrieval.storage.writer import IndexWriter

    index_dir.mkdir()
    catalog = open_catalog(index_dir, create=True)
    store = VectorStore(index_dir, catalog)
    vecs = unit_rows(3, dim=64)
    with IndexWriter(store) as writer:
        writer.bind_signature(tiny_clip_model.signature.to_dict())
        ids = writer.commit(
            added=[NewImage(f"/x/{i}.jpg", 1, 1, f"h{i}", 1, 1, None, None, vecs[i]) for i in range(3)]
        )
    assert store.faiss.ntotal == catalog.count() == 3
    hits = top_hits(store, vecs[0], k=3)
    assert [h.id for h in hits][0] == ids[0] and len({h.id for h in hits}) == 3
    catalog.close()


def test_one_query_scans_with_one_faiss_thread_and_leaves_the_callers_setting(tmp_path):
    import faiss

    vi = FaissIndex.empty(16)
    vi.add(np.arange(50), unit_rows(50, dim=16))
    seen: list[int] = []

    class Spy:  # stands in for the FAISS index: records OpenMP's setting during the scan
        def __init__(self, inner):  # type: ignore[no-untyped-def]
            self.inner = inner

        def search(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(faiss.omp_get_max_threads())
            return self.inner.search(*args, **kwargs)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.inner, name)

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        vi.index = Spy(vi.index)
        vi.search(unit_rows(1, dim=16), 5)
        vi.search(unit_rows(1, dim=16), 5, allowed_ids=np.arange(10))
        vi.search(unit_rows(32, dim=16), 5)  # a batch keeps every thread
        assert seen == [1, 1, 3]
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)
