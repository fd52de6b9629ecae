"""`index --reindex` builds the new vectors beside the old ones and swaps them in one transaction.

Searches keep using the old model until the swap; a reindex that is stopped or killed leaves the
old index whole, and the next reindex resumes where it stopped.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import write_scenes
from PIL import Image
from test_crash_safety import _kill_me, fork_indexer, killed_by_sigkill, reap

import retrieval.storage.catalog as catalog_mod
from indexer import IndexOptions, index_folders
from retrieval.embedding.text_embedder import onnx_text_path
from retrieval.index import ImageIndex
from retrieval.storage.catalog import Catalog
from retrieval.storage.verify import verify_index

# Every index run here once with its catalog in SQLite, once in PostgreSQL (conftest).
pytestmark = pytest.mark.usefixtures("catalog_backend")

REINDEX = IndexOptions(reindex=True, batch_size=2, decode_workers=1, commit_every=2)


def own_vectors(model, paths) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {str(p): model.encode_pil([Image.open(p).convert("RGB")])[0] for p in paths}


def assert_searchable_with(index_dir, expected: dict[str, np.ndarray], weights_id: str) -> None:  # type: ignore[no-untyped-def]
    """The index answers with `expected`'s model: each image first for its own vector, cosine 1."""
    with ImageIndex.open(index_dir) as index:
        assert index.signature.weights_id == weights_id
        assert index.store.faiss.ntotal == len(expected)
        for path, vec in expected.items():
            (top,) = index.search_vector(vec, k=1)
            assert top.path == path and top.score == pytest.approx(1.0, abs=1e-5)
        assert verify_index(index.store, check_files=False).ok


@pytest.fixture
def built(tmp_path, tiny_clip_model):  # type: ignore[no-untyped-def]
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = write_scenes(photos, 8)
    index_folders([photos], index_dir, tiny_clip_model)
    return photos, index_dir, paths


def test_a_stopped_reindex_leaves_the_old_model_searchable_and_resumes(
    built, tiny_clip_model, other_clip_model
):
    photos, index_dir, paths = built
    old = own_vectors(tiny_clip_model, paths)
    stop = threading.Event()

    def on_progress(done: int, total: int) -> None:
        stop.set()  # after the first commit

    encoded = other_clip_model.images_encoded
    first = index_folders([photos], index_dir, other_clip_model, REINDEX, progress=on_progress, stop=stop)
    assert first.interrupted and 0 < first.embedded < 8
    assert other_clip_model.images_encoded - encoded == first.embedded
    # Mid-reindex: every image still found through the old model's vectors.
    assert_searchable_with(index_dir, old, tiny_clip_model.signature.weights_id)
    with ImageIndex.open(index_dir) as index:
        assert index.catalog.pending_model() is not None
        # The old model's fast text path is intact, and the new one's is not exported yet.
        assert onnx_text_path(index_dir, tiny_clip_model.signature).is_file()
        assert not onnx_text_path(index_dir, other_clip_model.signature).exists()

    encoded = other_clip_model.images_encoded
    second = index_folders([photos], index_dir, other_clip_model, REINDEX)
    assert not second.interrupted and not second.reindex_pending
    assert other_clip_model.images_encoded - encoded == 8 - first.embedded  # resumed, nothing twice
    assert_searchable_with(
        index_dir, own_vectors(other_clip_model, paths), other_clip_model.signature.weights_id
    )
    with ImageIndex.open(index_dir) as index:
        assert index.catalog.pending_model() is None
    # Derived files of the old model went with it; the new model's text tower is in place.
    assert not list(index_dir.glob(onnx_text_path(index_dir, tiny_clip_model.signature).name + "*"))
    assert onnx_text_path(index_dir, other_clip_model.signature).is_file()


def test_a_killed_reindex_leaves_the_old_index_intact(built, tiny_clip_model, other_clip_model):
    photos, index_dir, paths = built
    old = own_vectors(tiny_clip_model, paths)

    def arm() -> None:  # die inside the third write of new vectors
        real = catalog_mod.Catalog.commit_changes
        calls = [0]

        def commit_changes(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("revectored"):
                calls[0] += 1
                if calls[0] == 3:
                    _kill_me()
            return real(self, *args, **kwargs)

        catalog_mod.Catalog.commit_changes = commit_changes

    status = reap(fork_indexer(photos, index_dir, other_clip_model, arm=arm, options=REINDEX))
    assert killed_by_sigkill(status), status
    assert_searchable_with(index_dir, old, tiny_clip_model.signature.weights_id)
    catalog = Catalog.open(index_dir)
    try:
        pending = catalog.pending_model()
        assert pending is not None and len(catalog.ids(pending.id)) == 4  # two batches of 2 committed
    finally:
        catalog.close()

    encoded = other_clip_model.images_encoded
    summary = index_folders([photos], index_dir, other_clip_model, REINDEX)
    assert other_clip_model.images_encoded - encoded == 4 and summary.unchanged == 4
    assert_searchable_with(
        index_dir, own_vectors(other_clip_model, paths), other_clip_model.signature.weights_id
    )


def test_a_reindex_that_cannot_read_a_file_does_not_swap(
    built, tiny_clip_model, other_clip_model, monkeypatch
):
    photos, index_dir, paths = built
    old = own_vectors(tiny_clip_model, paths)
    import indexer.decode as decode_mod

    real = decode_mod.read_stable

    def flaky(path, max_bytes):  # type: ignore[no-untyped-def]
        if path == str(paths[3]):
            raise PermissionError(13, "Permission denied")
        return real(path, max_bytes)

    monkeypatch.setattr(decode_mod, "read_stable", flaky)
    summary = index_folders([photos], index_dir, other_clip_model, REINDEX)
    assert summary.reindex_pending and [p for p, _ in summary.failed] == [str(paths[3])]
    assert_searchable_with(index_dir, old, tiny_clip_model.signature.weights_id)  # nothing lost

    monkeypatch.setattr(decode_mod, "read_stable", real)
    encoded = other_clip_model.images_encoded
    summary = index_folders([photos], index_dir, other_clip_model, REINDEX)
    assert not summary.reindex_pending and other_clip_model.images_encoded - encoded == 1
    assert_searchable_with(
        index_dir, own_vectors(other_clip_model, paths), other_clip_model.signature.weights_id
    )
