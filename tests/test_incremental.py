"""Incremental indexing: only new and changed files are embedded; moves keep their rows."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_scene, set_mtime, write_scenes

from indexer import IndexOptions, index_folders
from retrieval.core.errors import ClipdexError, IndexLockedError, ModelMismatchError
from retrieval.embedding.spec import ModelSpec
from retrieval.index import ImageIndex
from retrieval.storage.catalog import Catalog
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex

# Every index run here once with its catalog in SQLite, once in PostgreSQL (conftest).
pytestmark = pytest.mark.usefixtures("catalog_backend")


def counts(summary) -> dict[str, int]:
    return {k: getattr(summary, k) for k in ("added", "updated", "moved", "removed", "unchanged")}


def state(index_dir: Path) -> dict[str, int]:
    """path -> id of every catalog row."""
    catalog = Catalog.open(index_dir)
    try:
        return {r.path: r.id for r in catalog.records().values()}
    finally:
        catalog.close()


def assert_consistent(index_dir: Path) -> None:
    """The FAISS file on disk holds exactly the catalog's ids and vectors."""
    catalog = Catalog.open(index_dir)
    try:
        dim = catalog.model_signature()["dim"]
        ids = catalog.ids()
        saved = FaissIndex.load(index_dir / FAISS_FILE, dim)
        assert saved is not None, "no readable FAISS file"
        assert saved.ntotal == catalog.count() == len(ids)
        fids = saved.ids()
        assert np.array_equal(np.sort(fids), ids)
        np.testing.assert_array_equal(saved.reconstruct_all(), catalog.embeddings(fids.tolist(), dim))
    finally:
        catalog.close()


def vector_of(index_dir: Path, row_id: int) -> np.ndarray:
    catalog = Catalog.open(index_dir)
    try:
        return catalog.embeddings([row_id], 64)[0]
    finally:
        catalog.close()


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = os.stat(path)
    set_mtime(path, st.st_mtime_ns + seconds * 1_000_000_000)


def test_add_modify_delete_rename_touch(tmp_path, index_dir, tiny_clip_model):
    m = tiny_clip_model
    folder = tmp_path / "photos"
    paths = write_scenes(folder, 10)

    before = m.images_encoded
    s1 = index_folders([folder], index_dir, model=m)
    assert counts(s1) == {"added": 10, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0}
    assert s1.failed == [] and s1.embedded == 10
    assert m.images_encoded - before == 10
    assert_consistent(index_dir)
    ids1 = state(index_dir)
    assert sorted(ids1) == sorted(str(p) for p in paths)

    # A second run with nothing changed embeds nothing.
    before = m.images_encoded
    s2 = index_folders([folder], index_dir, model=m)
    assert counts(s2) == {"added": 0, "updated": 0, "moved": 0, "removed": 0, "unchanged": 10}
    assert m.images_encoded == before
    assert state(index_dir) == ids1

    modified, deleted, renamed, touched = paths[1], paths[2], paths[3], paths[4]
    make_scene(999, (64, 64)).save(modified)  # other content
    bump_mtime(modified)
    deleted.unlink()
    new_name = folder / "sub" / "renamed.png"
    new_name.parent.mkdir()
    os.rename(renamed, new_name)
    bump_mtime(touched)  # same bytes, new mtime
    fresh = write_scenes(folder, 1, seed0=300, prefix="new")[0]
    touched_vector = vector_of(index_dir, ids1[str(touched)])

    before = m.images_encoded
    s3 = index_folders([folder], index_dir, model=m)
    assert counts(s3) == {"added": 1, "updated": 1, "moved": 1, "removed": 1, "unchanged": 7}
    assert s3.failed == []
    assert m.images_encoded - before == 2  # the new file and the modified one, nothing else
    assert s3.embedded == 2
    assert_consistent(index_dir)

    ids3 = state(index_dir)
    assert sorted(ids3) == sorted(str(p) for p in folder.rglob("*.png"))
    assert ids3[str(new_name)] == ids1[str(renamed)]  # the moved file keeps its row
    assert str(renamed) not in ids3 and str(deleted) not in ids3
    assert ids3[str(touched)] == ids1[str(touched)]
    np.testing.assert_array_equal(vector_of(index_dir, ids3[str(touched)]), touched_vector)
    assert ids3[str(modified)] != ids1[str(modified)]  # re-embedded: a new row id
    assert ids3[str(fresh)] > max(ids1.values())
    for p in paths[5:] + [paths[0]]:
        assert ids3[str(p)] == ids1[str(p)]

    # The touched file's new mtime was recorded: the next run sees it as unchanged outright.
    catalog = Catalog.open(index_dir)
    rec = catalog.record_by_path(str(touched))
    catalog.close()
    assert rec.mtime_ns == os.stat(touched).st_mtime_ns

    before = m.images_encoded
    s4 = index_folders([folder], index_dir, model=m)
    assert counts(s4) == {"added": 0, "updated": 0, "moved": 0, "removed": 0, "unchanged": 10}
    assert m.images_encoded == before
    assert_consistent(index_dir)


def test_moved_file_is_found_by_search_under_its_new_path(tmp_path, index_dir, tiny_clip_model):
    folder = tmp_path / "photos"
    paths = write_scenes(folder, 4)
    index_folders([folder], index_dir, model=tiny_clip_model)
    target = folder / "moved-away.png"
    os.rename(paths[0], target)
    s = index_folders([folder], index_dir, model=tiny_clip_model)
    assert (s.moved, s.added, s.removed) == (1, 0, 0)
    with ImageIndex.open(index_dir, device="cpu") as idx:
        idx.use_model(tiny_clip_model)
        hits = idx.search_image(target, k=1, exclude_self=False)
    assert hits[0].path == str(target)
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_deletions_are_scoped_to_the_indexed_roots(tmp_path, index_dir, tiny_clip_model):
    a = tmp_path / "a"
    b = tmp_path / "ab"  # shares a name prefix with 'a': must not count as inside it
    write_scenes(a, 3)
    write_scenes(b, 2, seed0=50)
    index_folders([a], index_dir, model=tiny_clip_model)
    ids_a = state(index_dir)

    s = index_folders([b], index_dir, model=tiny_clip_model)
    assert counts(s) == {"added": 2, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0}
    after = state(index_dir)
    assert len(after) == 5
    assert all(after[p] == i for p, i in ids_a.items())
    assert_consistent(index_dir)

    # Indexing 'a' again neither touches 'ab' nor thinks its files vanished.
    s = index_folders([a], index_dir, model=tiny_clip_model)
    assert counts(s) == {"added": 0, "updated": 0, "moved": 0, "removed": 0, "unchanged": 3}
    assert state(index_dir) == after


def test_missing_root_is_an_error_and_deletes_nothing(tmp_path, index_dir, tiny_clip_model):
    a, b = tmp_path / "a", tmp_path / "b"
    write_scenes(a, 3)
    write_scenes(b, 2, seed0=20)
    index_folders([a, b], index_dir, model=tiny_clip_model)
    rows = state(index_dir)
    os.rename(a, tmp_path / "unmounted")
    before = tiny_clip_model.images_encoded
    with pytest.raises(ClipdexError, match="not found"):
        index_folders([a, b], index_dir, model=tiny_clip_model)
    with pytest.raises(ClipdexError):
        index_folders([a], index_dir, model=tiny_clip_model)
    assert state(index_dir) == rows
    assert tiny_clip_model.images_encoded == before
    assert_consistent(index_dir)


def test_reindex_embeds_everything_again(tmp_path, index_dir, tiny_clip_model):
    folder = tmp_path / "photos"
    write_scenes(folder, 5)
    index_folders([folder], index_dir, model=tiny_clip_model)
    ids1 = state(index_dir)
    before = tiny_clip_model.images_encoded
    s = index_folders([folder], index_dir, model=tiny_clip_model, options=IndexOptions(reindex=True))
    assert tiny_clip_model.images_encoded - before == 5
    assert counts(s) == {"added": 0, "updated": 5, "moved": 0, "removed": 0, "unchanged": 0}
    ids2 = state(index_dir)
    assert sorted(ids2) == sorted(ids1)
    assert ids2 == ids1  # the same rows (and their tags) stay; only their vectors were replaced
    assert_consistent(index_dir)


def test_reindex_with_another_model_replaces_all_vectors(
    tmp_path, index_dir, tiny_clip_model, other_clip_model
):
    folder = tmp_path / "photos"
    write_scenes(folder, 4)
    index_folders([folder], index_dir, model=tiny_clip_model)
    with pytest.raises(ModelMismatchError):
        index_folders([folder], index_dir, model=other_clip_model)
    s = index_folders([folder], index_dir, model=other_clip_model, options=IndexOptions(reindex=True))
    assert s.added + s.updated == 4 and s.embedded == 4 and not s.failed
    with ImageIndex.open(index_dir) as idx:
        assert idx.signature.weights_id == other_clip_model.signature.weights_id
    rows = state(index_dir)
    assert len(rows) == 4
    from PIL import Image

    for path, row_id in rows.items():
        expected = other_clip_model.encode_pil([Image.open(path).convert("RGB")])[0]
        np.testing.assert_allclose(vector_of(index_dir, row_id), expected, atol=1e-5)
    assert_consistent(index_dir)


def test_reindex_with_another_model_refuses_to_drop_other_roots(
    tmp_path, index_dir, tiny_clip_model, other_clip_model
):
    """Another model's vectors cannot be mixed with the old ones, and images outside the folders
    given would not be embedded again: the switch is refused, and nothing changes."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_scenes(a, 3)
    write_scenes(b, 2, seed0=10)
    index_folders([a], index_dir, model=tiny_clip_model)
    index_folders([b], index_dir, model=tiny_clip_model)
    before = state(index_dir)
    encoded = other_clip_model.images_encoded
    with pytest.raises(ClipdexError, match=r"also holds 3 images outside the folders given"):
        index_folders([b], index_dir, model=other_clip_model, options=IndexOptions(reindex=True))
    assert other_clip_model.images_encoded == encoded
    assert state(index_dir) == before
    with ImageIndex.open(index_dir) as idx:
        assert idx.signature.weights_id == tiny_clip_model.signature.weights_id
        assert idx.catalog.pending_model() is None
    assert_consistent(index_dir)


def test_file_replaced_by_garbage_leaves_the_index(tmp_path, index_dir, tiny_clip_model):
    folder = tmp_path / "photos"
    paths = write_scenes(folder, 3)
    index_folders([folder], index_dir, model=tiny_clip_model)
    paths[0].write_bytes(b"not an image any more")
    bump_mtime(paths[0])
    s = index_folders([folder], index_dir, model=tiny_clip_model)
    assert [p for p, _ in s.failed] == [str(paths[0])]
    assert s.removed == 1 and s.unchanged == 2
    assert str(paths[0]) not in state(index_dir)
    assert_consistent(index_dir)


def test_broken_files_are_reported_not_indexed(tmp_path, index_dir, tiny_clip_model, broken_files):
    folder = broken_files["empty"].parent
    write_scenes(folder, 2)
    s = index_folders([folder], index_dir, model=tiny_clip_model)
    assert s.added == 2
    failed = dict(s.failed)
    assert set(failed) == {str(p) for p in broken_files.values()}
    assert all(reason.strip() for reason in failed.values())
    assert len(state(index_dir)) == 2
    assert_consistent(index_dir)


def test_non_utf8_file_names_survive_indexing_and_moves(tmp_path, index_dir, tiny_clip_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9-\xff.png"
    make_scene(1, (80, 60)).save(os.fsdecode(raw))
    index_folders([folder], index_dir, model=tiny_clip_model)
    rows = state(index_dir)
    assert [os.fsencode(p) for p in rows] == [raw]
    moved = os.fsencode(folder) + b"/na\xefve.png"
    os.rename(raw, moved)
    s = index_folders([folder], index_dir, model=tiny_clip_model)
    assert (s.moved, s.added, s.removed) == (1, 0, 0)
    assert {os.fsencode(p): i for p, i in state(index_dir).items()} == {moved: next(iter(rows.values()))}


def test_interrupted_run_commits_its_batches_and_resumes(tmp_path, index_dir, tiny_clip_model):
    folder = tmp_path / "photos"
    write_scenes(folder, 9)
    stop = threading.Event()
    stop.set()
    s = index_folders(
        [folder], index_dir, model=tiny_clip_model, options=IndexOptions(batch_size=4), stop=stop
    )
    assert s.interrupted
    assert s.added == 4
    assert len(state(index_dir)) == 4
    assert_consistent(index_dir)
    before = tiny_clip_model.images_encoded
    s = index_folders([folder], index_dir, model=tiny_clip_model, options=IndexOptions(batch_size=4))
    assert not s.interrupted
    assert (s.added, s.unchanged) == (5, 4)
    assert tiny_clip_model.images_encoded - before == 5
    assert len(state(index_dir)) == 9
    assert_consistent(index_dir)


def test_a_second_writer_is_refused(tmp_path, index_dir, tiny_clip_model):
    folder = tmp_path / "photos"
    write_scenes(folder, 2)
    index_folders([folder], index_dir, model=tiny_clip_model)
    write_scenes(folder, 1, seed0=70, prefix="late")
    rows = state(index_dir)
    holder = Catalog.open(index_dir)  # its lock: an flock in the folder, or PostgreSQL's advisory lock
    try:
        with holder.writer_lock(), pytest.raises(IndexLockedError, match="being written by another"):
            index_folders([folder], index_dir, model=tiny_clip_model)
    finally:
        holder.close()
    assert state(index_dir) == rows
    s = index_folders([folder], index_dir, model=tiny_clip_model)  # the lock was released
    assert s.added == 1


def test_model_spec_run_without_changes_does_not_load_a_model(
    tmp_path, index_dir, tiny_checkpoint, monkeypatch
):
    import indexer.sync

    folder = tmp_path / "photos"
    write_scenes(folder, 2)
    spec = ModelSpec("clipdex-tiny", str(tiny_checkpoint), device="cpu")
    s = index_folders([folder], index_dir, model=spec)
    assert s.added == 2

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded for a run with nothing to embed")

    monkeypatch.setattr(indexer.sync, "load_image_model", no_model)
    s = index_folders([folder], index_dir, model=spec)
    assert (s.unchanged, s.embedded) == (2, 0)
    assert_consistent(index_dir)


def test_index_again_without_a_model_uses_the_index_model(tmp_path, index_dir, tiny_clip_model):
    """The Python API, like the CLI, re-indexes with the recorded model when none is named."""
    write_scenes(tmp_path / "p", 2)
    index_folders([tmp_path / "p"], index_dir, model=tiny_clip_model.spec)
    write_scenes(tmp_path / "p", 3)
    s = index_folders([tmp_path / "p"], index_dir)
    assert (s.added, s.unchanged) == (1, 2)
