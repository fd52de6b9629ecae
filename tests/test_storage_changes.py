"""Schema 3: the catalog is the one durable copy; the FAISS file is a cache an opener catches up
from by reading only what changed since its stamp, and the writer rewrites it only when that pays.

Synthetic rows (random unit vectors, files that do not exist) committed through the library's
own writer: no model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import changes_since
from sqlalchemy import inspect, text

import retrieval.storage.catalog as catalog_mod
import retrieval.storage.faiss_index as faiss_index_mod
import retrieval.storage.vector_store as vector_store_mod
import retrieval.storage.writer as writer_mod
from retrieval.storage.catalog import CATALOG_NAME, Catalog, open_catalog
from retrieval.storage.catalog_writes import PAGE_SIZE
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex
from retrieval.storage.records import Move, NewImage
from retrieval.storage.schema import CHANGES_FROM, SCHEMA_VERSION
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.verify import verify_index
from retrieval.storage.writer import IndexWriter

DIM = 32
SIGNATURE = {"arch": "synthetic", "pretrained": "none", "dim": DIM}


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_images(n: int, seed: int, tag: str) -> list[NewImage]:
    return [
        NewImage(
            f"/synthetic/{tag}-{i:05d}.jpg", 1000 + i, 10**18, f"{tag}{i:060x}"[:64], 64, 48, "JPEG", None, v
        )
        for i, v in enumerate(unit_rows(n, seed))
    ]


def write(
    index_dir: Path, *, added: int = 0, removed: list[int] | None = None, seed: int = 0, **kw
) -> list[int]:  # type: ignore[no-untyped-def]
    """One writer session (a process of its own, as far as the index can tell): returns new ids."""
    catalog = open_catalog(index_dir, create=True)
    try:
        with IndexWriter(VectorStore(index_dir, catalog), **kw) as writer:
            writer.bind_signature(SIGNATURE)
            writer.reconcile()
            return writer.commit(added=new_images(added, seed, f"s{seed}"), removed=removed or [])
    finally:
        catalog.close()


def file_identity(path: Path) -> tuple[int, int, str]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_view(index_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    catalog = Catalog.open(index_dir)
    try:
        ids = catalog.ids()
        return ids, catalog.embeddings(ids.tolist(), DIM)
    finally:
        catalog.close()


def assert_store_equals_catalog(store: VectorStore) -> None:
    ids = store.faiss.ids()
    order = np.argsort(ids)
    want_ids, want_vecs = catalog_view(store.directory)
    assert np.array_equal(ids[order], want_ids)
    np.testing.assert_array_equal(store.faiss.reconstruct_all()[order], want_vecs)


@pytest.fixture
def base(tmp_path, catalog_backend) -> Path:  # type: ignore[no-untyped-def]
    """An index of 200 rows whose FAISS file holds all of them (a writer past the threshold), its
    catalog in SQLite, then in PostgreSQL."""
    return make_base(tmp_path)


@pytest.fixture
def sqlite_base(tmp_path) -> Path:  # type: ignore[no-untyped-def]
    """`base` with its catalog in SQLite: for the tests that reach into the file itself."""
    return make_base(tmp_path)


def make_base(tmp_path: Path) -> Path:
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    write(index_dir, added=200, seed=1)
    saved = FaissIndex.load(index_dir / FAISS_FILE, DIM)
    assert saved is not None and saved.ntotal == 200, "precondition: the file holds the 200 rows"
    return index_dir


def forbid_full_diff(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Reading every id (the O(n) reconcile) fails the test."""

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("read every id: work proportional to the index, not to the change")

    monkeypatch.setattr(Catalog, "ids", refuse)
    monkeypatch.setattr("retrieval.storage.catalog.CatalogSnapshot.ids", refuse)
    monkeypatch.setattr(vector_store_mod, "reconcile", refuse)
    monkeypatch.setattr(faiss_index_mod, "reconcile", refuse)


# -- change tracking ----------------------------------------------------------------------------
def test_changes_since_returns_exactly_what_changed(base):
    catalog = Catalog.open(base)
    try:
        state = catalog.state()
        model = state.model_id
        victims = catalog.ids()[[3, 50, 120]].tolist()
    finally:
        catalog.close()
    new_ids = write(base, added=4, removed=victims, seed=2)
    catalog = Catalog.open(base)
    try:
        changes = changes_since(catalog, state.generation, model, DIM)
        assert changes is not None
        assert sorted(changes.removed.tolist()) == sorted(victims)  # logged through the cascade
        assert changes.added.tolist() == new_ids
        np.testing.assert_array_equal(changes.vectors, catalog.embeddings(new_ids, DIM))
        assert changes.state == catalog.state()
        nothing = changes_since(catalog, changes.state.generation, model, DIM)
        assert nothing is not None and nothing.count == 0
    finally:
        catalog.close()


def test_a_reader_catches_up_without_reading_every_id(base, monkeypatch):
    long_lived = VectorStore(base, Catalog.open(base))
    try:
        long_lived.load()
        victims = catalog_view(base)[0][[0, 7]].tolist()
        write(base, added=3, removed=victims, seed=3)  # the file stays behind (3 + 2 changes)
        forbid_full_diff(monkeypatch)
        fresh = VectorStore(base, Catalog.open(base))
        try:
            report = fresh.load()
            assert (report.added, report.removed) == (3, 2)
            monkeypatch.undo()
            assert_store_equals_catalog(fresh)
        finally:
            fresh.catalog.close()
        forbid_full_diff(monkeypatch)
        assert long_lived.refresh() is False
        monkeypatch.undo()
        assert_store_equals_catalog(long_lived)
    finally:
        long_lived.catalog.close()


def test_a_reader_far_behind_catches_up_batch_by_batch(base, monkeypatch):
    """A search opened during a large import catches up on every change since the file, holding
    CHANGE_BATCH of the added vectors at a time (catalog.ChangeStream), not all of them."""
    victims = catalog_view(base)[0][[1, 2, 3]].tolist()
    write(base, added=40, removed=victims, seed=16, save_after_changes=10**9)  # the file left behind
    monkeypatch.setattr(catalog_mod, "CHANGE_BATCH", 6)
    held = []
    real_from_batches = FaissIndex.from_batches.__func__

    def counting(cls, dim, count, batches):  # type: ignore[no-untyped-def]
        def watched():  # type: ignore[no-untyped-def]
            for ids, vectors in batches:
                held.append(len(ids))
                yield ids, vectors

        return real_from_batches(cls, dim, count, watched())

    monkeypatch.setattr(FaissIndex, "from_batches", classmethod(counting))
    fresh = VectorStore(base, Catalog.open(base))
    try:
        report = fresh.load()
        assert (report.added, report.removed) == (40, 3)
        # The file's 197 kept rows (in copies of _COPY_ROWS), then the 40 added, 6 at a time.
        assert held[-7:] == [6, 6, 6, 6, 6, 6, 4] and sum(held) == 237
        monkeypatch.undo()
        assert_store_equals_catalog(fresh)
    finally:
        fresh.catalog.close()


def test_a_refresh_that_fails_mid_stream_adds_nothing_twice(base, monkeypatch):
    """Batches go into the index in use as they are read: one failing after others went in must
    not leave them there for the retry to add again (a server refreshes before every job)."""
    store = VectorStore(base, Catalog.open(base))
    try:
        store.load()
        write(base, added=1, seed=17)
        store.refresh()  # the mapped file copied into memory: batches now go into it in place
        write(base, added=20, seed=18, save_after_changes=10**9)
        monkeypatch.setattr(catalog_mod, "CHANGE_BATCH", 6)
        real_decode, decoded = catalog_mod.decode_vectors, []

        def second_fails(blobs, dim):  # type: ignore[no-untyped-def]
            decoded.append(1)
            if len(decoded) == 2:
                raise OSError("disk I/O error")
            return real_decode(blobs, dim)

        monkeypatch.setattr(catalog_mod, "decode_vectors", second_fails)
        with pytest.raises(OSError):
            store.refresh()
        monkeypatch.undo()
        store.refresh()
        assert store.faiss.ntotal == 221
        assert_store_equals_catalog(store)
    finally:
        store.catalog.close()


def test_a_change_stream_is_read_inside_its_snapshot_only(base):
    catalog = Catalog.open(base)
    try:
        state = catalog.state()
        write(base, added=3, seed=19, save_after_changes=10**9)
        with catalog.snapshot() as snap:
            stream = snap.change_stream(state.generation, state.model_id, DIM)
        assert stream is not None and stream.added_count == 3
        with pytest.raises(RuntimeError, match="after its snapshot ended"):
            next(stream.batches)  # the catalog's latest state, not the stream's: refused
    finally:
        catalog.close()


def test_a_commit_of_moves_only_leaves_a_mapped_index_mapped(base):
    store = VectorStore(base, Catalog.open(base))
    try:
        assert store.faiss.mapped
        image_id = int(store.faiss.ids()[0])
        catalog = open_catalog(base, create=False)
        try:
            catalog.commit_changes(moved=[Move(image_id, "/synthetic/moved.jpg", 1, 1)])
        finally:
            catalog.close()
        store.refresh()
        assert store.faiss.mapped  # nothing to add or remove: no copy of the file into memory
        assert_store_equals_catalog(store)
    finally:
        store.catalog.close()


def test_a_writer_adding_a_few_images_leaves_the_file_untouched(base):
    before = file_identity(base / FAISS_FILE)
    new_ids = write(base, added=3, seed=4)
    assert file_identity(base / FAISS_FILE) == before  # same inode, same bytes: not rewritten
    store = VectorStore(base, Catalog.open(base))
    try:
        hits = store.faiss.search(unit_rows(3, 4), 1)[1][:, 0].tolist()
        assert hits == new_ids  # a fresh reader finds each new image by its own vector
        assert store.faiss.ntotal == 203
        assert verify_index(store, check_files=False).ok  # the lagging file is no problem
    finally:
        store.catalog.close()


def test_an_index_that_missed_a_commit_is_never_stamped_as_holding_it(base, monkeypatch):
    """The catalog commits, then applying the change in memory fails (no memory left for the copy
    of a mapped index): the writer must not leave a file stamped with that commit without it."""
    real_apply = writer_mod.apply_to
    calls = []

    def second_fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("no room to apply the commit")
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "apply_to", second_fails)
    catalog = open_catalog(base, create=False)
    try:
        with pytest.raises(MemoryError), IndexWriter(VectorStore(base, catalog)) as writer:
            writer.reconcile()
            writer.commit(added=new_images(30, 7, "a"))  # 30 unsaved > 10%: saved when the writer ends
            writer.commit(added=new_images(3, 8, "b"))
    finally:
        catalog.close()
    monkeypatch.undo()
    store = VectorStore(base, Catalog.open(base))
    try:
        assert store.faiss.ntotal == 233  # every committed image is searchable
        assert_store_equals_catalog(store)
    finally:
        store.catalog.close()


def test_the_writer_rewrites_the_file_once_it_is_far_behind(base):
    before = file_identity(base / FAISS_FILE)
    write(base, added=25, seed=5)  # 25 > 10% of 225: catching up would cost too much
    assert file_identity(base / FAISS_FILE) != before
    saved = FaissIndex.load(base / FAISS_FILE, DIM)
    catalog = Catalog.open(base)
    try:
        assert saved is not None and saved.stamp is not None
        assert saved.stamp.generation == catalog.state().generation and saved.ntotal == 225
    finally:
        catalog.close()


def test_save_after_every_commit_when_asked(base):
    before = file_identity(base / FAISS_FILE)
    write(base, added=1, seed=6, save_after_changes=0)
    assert file_identity(base / FAISS_FILE) != before


def commits_rewriting_the_file(index_dir: Path, seeds: tuple[int, ...], **kw) -> list[bool]:  # type: ignore[no-untyped-def]
    """One writer committing 30 images per seed: whether each commit rewrote the file."""
    catalog = open_catalog(index_dir, create=True)
    rewrote = []
    try:
        with IndexWriter(VectorStore(index_dir, catalog), **kw) as writer:
            writer.reconcile()
            for seed in seeds:
                before = file_identity(index_dir / FAISS_FILE)
                writer.commit(added=new_images(30, seed, f"d{seed}"))
                rewrote.append(file_identity(index_dir / FAISS_FILE) != before)
            opener = VectorStore(index_dir, Catalog.open(index_dir))
            try:  # a search opened mid-run catches up from the change log
                assert_store_equals_catalog(opener)
            finally:
                opener.catalog.close()
    finally:
        catalog.close()
    return rewrote


@pytest.fixture
def save_at_every_commit(monkeypatch):  # type: ignore[no-untyped-def]
    """The store's own rule rewrites the file after every commit."""
    monkeypatch.setattr(vector_store_mod, "SAVE_MIN_CHANGES", 0)
    monkeypatch.setattr(vector_store_mod, "SAVE_FRACTION", 0.0)


def test_a_deferring_writer_rewrites_the_file_only_when_it_finishes(base, save_at_every_commit):
    """A bulk load (clipdex import) leaves the file alone mid-run however far behind it falls,
    and rewrites it when it finishes."""
    assert commits_rewriting_the_file(base, (11, 12)) == [True, True]
    assert commits_rewriting_the_file(base, (13, 14, 15), defer_saves=True) == [False, False, False]
    saved = FaissIndex.load(base / FAISS_FILE, DIM)
    catalog = Catalog.open(base)
    try:
        assert saved is not None and saved.stamp is not None
        assert saved.ntotal == 350 and saved.stamp.generation == catalog.state().generation
    finally:
        catalog.close()


def test_a_writer_interrupted_at_once_leaves_the_file_as_it_is(base, save_at_every_commit):
    """A second Ctrl-C stops at once: the writer's way out rewrites nothing (an error does)."""
    for stop, rewritten in ((KeyboardInterrupt, False), (ValueError, True)):
        before = file_identity(base / FAISS_FILE)
        catalog = open_catalog(base, create=True)
        try:
            with pytest.raises(stop), IndexWriter(VectorStore(base, catalog), defer_saves=True) as writer:
                writer.reconcile()
                writer.commit(added=new_images(5, 20 + rewritten, f"stop{rewritten}"))
                raise stop()
        finally:
            catalog.close()
        assert (file_identity(base / FAISS_FILE) != before) is rewritten
    store = VectorStore(base, Catalog.open(base))
    try:
        assert_store_equals_catalog(store)  # every commit searchable either way
    finally:
        store.catalog.close()


def test_the_removal_log_is_trimmed_when_the_file_is_rewritten(base):
    catalog = Catalog.open(base)
    old_state = catalog.state()
    catalog.close()
    victims = catalog_view(base)[0][:30].tolist()
    write(base, removed=victims[:10], seed=7, save_after_changes=0)  # file rewritten: stamp g1
    write(base, removed=victims[10:], seed=8, save_after_changes=0)  # rewritten again: log up to g1 goes
    catalog = Catalog.open(base)
    try:
        logged = catalog._rows("SELECT image_id FROM removals")  # what the triggers wrote
        assert sorted(i for (i,) in logged) == sorted(victims[10:])
        assert int(catalog.get_meta(CHANGES_FROM)) > old_state.generation
        assert changes_since(catalog, old_state.generation, old_state.model_id, DIM) is None  # too old
    finally:
        catalog.close()


def test_a_reader_older_than_the_log_falls_back_to_the_full_diff(base):
    reader = VectorStore(base, Catalog.open(base))
    try:
        reader.load()
        victims = catalog_view(base)[0][:20].tolist()
        write(base, removed=victims[:10], seed=9, save_after_changes=0)
        write(base, removed=victims[10:], added=2, seed=10, save_after_changes=0)
        assert reader.refresh() is False
        assert_store_equals_catalog(reader)
    finally:
        reader.catalog.close()


# -- rebuild ------------------------------------------------------------------------------------
def test_rebuild_streams_the_catalog_into_an_index_of_its_final_size(base, monkeypatch):
    (base / FAISS_FILE).unlink()
    store = VectorStore(base, Catalog.open(base))
    try:
        # never every vector as one array copied into FAISS (two copies at once), nor every id
        for name in ("embeddings", "ids"):
            monkeypatch.setattr(Catalog, name, lambda *a, **k: pytest.fail("read everything at once"))
        monkeypatch.setattr(FaissIndex, "add", lambda *a, **k: pytest.fail("copied into FAISS"))
        report = store.load()
        monkeypatch.undo()
        assert (report.added, report.removed) == (200, 0) and store.needs_saving()
        assert_store_equals_catalog(store)
        # an index built in place behaves as one built by add(): search, remove, add, save
        q = unit_rows(1, 1)[0]
        assert store.faiss.search(q, 1)[1][0, 0] == catalog_view(base)[0][0]
        store.faiss.remove(np.asarray([int(store.faiss.ids()[0])]))
        store.faiss.add(np.asarray([10_000]), unit_rows(1, 99))
        assert store.faiss.ntotal == 200
    finally:
        store.catalog.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps the file through /proc/self/fd")
def test_an_opened_file_is_mapped_and_copied_once_when_it_changes(base):
    store = VectorStore(base, Catalog.open(base))
    try:
        store.load()
        assert store.faiss.mapped  # nothing read: the pages are the file's
        q = unit_rows(1, 1)[0]
        assert store.faiss.search(q, 1)[1][0, 0] == catalog_view(base)[0][0]
        victim = int(store.faiss.ids()[5])
        store.faiss.apply(np.asarray([victim]), np.asarray([50_000]), unit_rows(1, 77))
        assert not store.faiss.mapped and store.faiss.ntotal == 200
        assert victim not in store.faiss.ids().tolist()
        assert store.faiss.search(unit_rows(1, 77), 1)[1][0, 0] == 50_000
    finally:
        store.catalog.close()


def test_from_batches_refuses_a_count_that_does_not_match():
    batches = [(np.arange(3), unit_rows(3, 0))]
    with pytest.raises(ValueError, match="announced"):
        FaissIndex.from_batches(DIM, 4, batches)
    with pytest.raises(ValueError, match="announced"):
        FaissIndex.from_batches(DIM, 2, batches)


# -- the schema ---------------------------------------------------------------------------------
def test_a_new_catalog_has_large_pages_and_the_filter_indexes(sqlite_base):
    base = sqlite_base
    with sqlite3.connect(base / CATALOG_NAME) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 32768
        indexed = {
            row[0]
            for name in ("images", "vectors")
            for (index,) in conn.execute(f"SELECT name FROM pragma_index_list('{name}')")
            for row in conn.execute(f"SELECT name FROM pragma_index_info('{index}')")
        }
        assert {"format", "path", "generation"} <= indexed
        assert conn.execute(
            "SELECT 1 FROM pragma_index_list('images') WHERE name = 'ix_images_by_date'"
        ).fetchone()


def downgrade_to_schema_2(index_dir: Path) -> None:
    """The catalog as clipdex with schema 2 left it: no generation column, no log, no filter indexes."""
    with sqlite3.connect(index_dir / CATALOG_NAME) as conn:
        conn.executescript(
            """
            DROP TRIGGER log_vector_removal;
            DROP TRIGGER stamp_vector_generation;
            DROP TABLE removals;
            DROP INDEX ix_vectors_by_generation;
            DROP INDEX ix_images_by_date;
            DROP INDEX ix_images_format;
            ALTER TABLE vectors DROP COLUMN generation;
            DELETE FROM meta WHERE key = 'changes_from';
            UPDATE meta SET value = '2' WHERE key = 'schema_version';
            """
        )


def test_a_schema_2_catalog_is_upgraded_in_place(sqlite_base, monkeypatch):
    base = sqlite_base
    victim = int(catalog_view(base)[0][0])
    downgrade_to_schema_2(base)
    # the upgrade happens on the first open, whoever opens it; the old file is stamped before it
    catalog = open_catalog(base, create=False)
    try:
        state = catalog.state()
        assert catalog.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert int(catalog.get_meta(CHANGES_FROM)) == state.generation  # the upgrade's own commit
        saved = FaissIndex.load(base / FAISS_FILE, DIM)
        assert saved is not None and saved.stamp is not None and saved.stamp.generation < state.generation
        assert changes_since(catalog, saved.stamp.generation, state.model_id, DIM) is None
    finally:
        catalog.close()
    with sqlite3.connect(base / CATALOG_NAME) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(vectors)")]
        assert "generation" in columns
        assert conn.execute("SELECT count(*) FROM vectors WHERE generation IS NULL").fetchone()[0] == 200
    # A writer after the upgrade: the old file is caught up by the full diff once and saved
    # (stamped at or after the upgrade), so that later opens catch up from the log.
    write(base, added=2, removed=[victim], seed=11)
    saved = FaissIndex.load(base / FAISS_FILE, DIM)
    assert saved is not None and saved.stamp is not None and saved.stamp.generation >= state.generation
    forbid_full_diff(monkeypatch)
    store = VectorStore(base, Catalog.open(base))
    try:
        store.load()
        monkeypatch.undo()
        assert store.faiss.ntotal == 201
        assert_store_equals_catalog(store)
        assert verify_index(store, check_files=False).ok
    finally:
        store.catalog.close()


def image_indexes(index_dir: Path) -> set[str]:
    catalog = Catalog.open(index_dir)
    try:
        with catalog._write() as conn:
            return {i["name"] for i in inspect(conn).get_indexes("images")}
    finally:
        catalog.close()


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection")  # the date index: an expression
def test_the_retired_digest_index_is_read_past_and_dropped_by_the_next_writer(base):
    catalog = Catalog.open(base)
    try:
        with catalog._write() as conn:  # as clipdex before it was retired left every catalog
            conn.execute(text("CREATE INDEX ix_images_content_hash ON images (content_hash)"))
        generation = catalog.state().generation
    finally:
        catalog.close()
    ids, vectors = catalog_view(base)
    catalog = open_catalog(base, create=False)  # a search: reads past it, changes nothing
    try:
        assert catalog.has_index("ix_images_content_hash")
        assert catalog.state().generation == generation
        changes_from = catalog.get_meta(CHANGES_FROM)
    finally:
        catalog.close()
    assert "ix_images_content_hash" in image_indexes(base)
    write(base, added=2, seed=12)  # an indexing run (open_catalog with create)
    assert "ix_images_content_hash" not in image_indexes(base)
    assert "ix_images_format" in image_indexes(base)  # the others stay
    catalog = Catalog.open(base)
    try:
        assert not catalog.has_index("ix_images_content_hash")
        assert catalog.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"  # older clipdex opens it
        assert catalog.get_meta(CHANGES_FROM) == changes_from  # the log still covers every cache
    finally:
        catalog.close()
    after_ids, after_vectors = catalog_view(base)
    assert np.array_equal(after_ids[: len(ids)], ids) and np.array_equal(after_vectors[: len(ids)], vectors)


def test_verify_reports_a_file_that_contradicts_the_log(base):
    """The lagging file is checked caught up: an id the log says was added, already in the file,
    is a real inconsistency."""
    catalog = Catalog.open(base)
    state = catalog.state()
    catalog.close()
    new_ids = write(base, added=2, seed=12)
    saved = FaissIndex.load(base / FAISS_FILE, DIM)
    assert saved is not None and saved.stamp is not None and saved.stamp.generation == state.generation
    saved.add(np.asarray(new_ids[:1]), unit_rows(1, 12))  # as if the file knew of the later commit
    saved.save(base / FAISS_FILE, saved.stamp)
    store = VectorStore(base, Catalog.open(base))
    try:
        report = verify_index(store, check_files=False)
        assert report.problems == ["the FAISS index holds an id twice"], report.problems
    finally:
        store.catalog.close()


def test_verify_accepts_a_file_older_than_the_log_as_openers_do(sqlite_base):
    """A file from before the change log starts (an upgraded catalog, a trimmed log) is caught up
    by the id diff when opened: verify checks it the same way instead of reporting it."""
    base = sqlite_base
    write(base, added=2, seed=14)  # the file lags by one commit
    with sqlite3.connect(base / CATALOG_NAME) as conn:  # the log now starts after the file's stamp
        (latest,) = conn.execute("SELECT max(generation) FROM commits").fetchone()
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(latest), CHANGES_FROM))
    store = VectorStore(base, Catalog.open(base))
    try:
        report = verify_index(store, check_files=False)
        assert report.ok, report.problems
        assert_store_equals_catalog(store)  # and an opener agrees
    finally:
        store.catalog.close()


def test_a_vector_inserted_without_its_generation_gets_the_latest(base):
    """An insert path that forgets the column (a raw INSERT) still leaves a row openers catch up
    (the trigger, in SQLite's and in PostgreSQL's language)."""
    catalog = Catalog.open(base)
    state = catalog.state()
    catalog.close()
    write(base, added=1, seed=13)  # one more commit, and a row to copy
    catalog = Catalog.open(base)
    with catalog._write() as conn:
        image_id = conn.execute(
            text(
                "INSERT INTO images (id, path, size, mtime_ns, content_hash, width, height, format, "
                "indexed_at) VALUES (100000, :path, 1, 1, 'raw', 1, 1, 'JPEG', 0) RETURNING id"
            ),
            {"path": b"/raw!"},
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO vectors (image_id, model_id, vector) "
                "SELECT :image, model_id, vector FROM vectors ORDER BY image_id LIMIT 1"
            ),
            {"image": image_id},
        )
    catalog.close()
    catalog = Catalog.open(base)
    try:
        changes = changes_since(catalog, state.generation, state.model_id, DIM)
        assert changes is not None and image_id in changes.added.tolist()
    finally:
        catalog.close()


def test_meta_records_the_change_log_start_for_new_catalogs(tmp_path):
    index_dir = tmp_path / "fresh"
    index_dir.mkdir()
    catalog = Catalog.open(index_dir, create=True)
    try:
        assert catalog.get_meta(CHANGES_FROM) == str(catalog.state().generation)
        assert json.loads(json.dumps(catalog.get_meta("schema_version"))) == "3"
    finally:
        catalog.close()


def test_statistics_are_refreshed_after_a_large_run_only(base, monkeypatch):
    """ANALYZE (PostgreSQL) samples the whole table: a writer that changed a few rows leaves it to
    autovacuum, one that changed many refreshes it on the way out."""
    refreshed: list[int] = []
    monkeypatch.setattr(Catalog, "refresh_statistics", lambda self: refreshed.append(1))
    write(base, added=3, seed=21)
    assert refreshed == []
    monkeypatch.setattr(writer_mod, "STATISTICS_AFTER", 100)
    write(base, added=100, seed=22)
    assert refreshed == [1]
