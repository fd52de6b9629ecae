"""`clipdex import`: embeddings made elsewhere, in clip-retrieval's layout (img_emb/img_emb_N.npy
paired by N with metadata/metadata_N.parquet), become a searchable index of the named model:
checked, normalised, keyed by path (a second import adds nothing twice, an interrupted one
resumes), bad shards reported and skipped, another model refused, and the imported rows are
neither broken for `verify` nor re-embedded by `clipdex index`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_ARCH, write_scenes

from indexer import index_folders
from indexer.import_embeddings import ImportOptions, import_embeddings
from retrieval.core.errors import ClipdexError, ModelMismatchError
from retrieval.index import ImageIndex
from retrieval.storage.catalog import open_catalog

# Every import here once into a SQLite catalog, once into PostgreSQL (conftest).
pytestmark = pytest.mark.usefixtures("catalog_backend")

DIM = 64  # clipdex-tiny


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_shard(
    root: Path, number: int, vectors: np.ndarray, columns: dict[str, list], *, width: int = 1
) -> None:
    """One shard as clip-retrieval writes it (float16 vectors, zero-padded numbers)."""
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    name = str(number).zfill(width)
    np.save(root / "img_emb" / f"img_emb_{name}.npy", vectors)
    pq.write_table(pa.table(columns), root / "metadata" / f"metadata_{name}.parquet")


def paths_for(folder: str, start: int, n: int, ext: str = "jpg") -> list[str]:
    return [f"{folder}/img{i:05d}.{ext}" for i in range(start, start + n)]


@pytest.fixture
def embedding_set(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two good shards (one of file paths, one of URLs with widths and a sha256), 250 rows."""
    rng = np.random.default_rng(0)
    root = tmp_path / "embeddings"
    a = unit(rng, 150).astype(np.float16)
    b = unit(rng, 100).astype(np.float16)
    pa_paths = paths_for("/imported/a", 0, 150)
    urls = [f"https://example.com/x/{i}.png?size=big" for i in range(100)]
    write_shard(root, 0, a, {"image_path": pa_paths, "caption": ["c"] * 150}, width=2)
    write_shard(
        root,
        1,
        b,
        {
            "image_path": [f"{i:09d}" for i in range(100)],  # webdataset keys: the url names the image
            "url": urls,
            "width": [256] * 100,
            "original_width": [1024] * 50 + [None] * 50,
            "height": [200] * 100,
            "sha256": ["ab" * 32] * 100,
        },
        width=2,
    )
    expected = dict(zip(pa_paths, a.astype(np.float32)))
    expected.update(zip(urls, b.astype(np.float32)))
    return root, expected


def stored_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    catalog = open_catalog(index_dir, create=False)
    try:
        records = catalog.records()
        ids = sorted(records)
        vecs = catalog.embeddings(ids, catalog.dim_of(catalog.active_model().id))
        return {records[i].path: v for i, v in zip(ids, vecs)}
    finally:
        catalog.close()


def test_import_builds_a_searchable_index(embedding_set, index_dir, tiny_clip_model):
    root, expected = embedding_set
    summary = import_embeddings(root, index_dir, tiny_clip_model)
    assert (summary.added, summary.already, summary.rejected, summary.bad_shards) == (250, 0, 0, [])
    stored = stored_vectors(index_dir)
    assert set(stored) == set(expected)
    for path, vec in expected.items():
        want = vec / np.linalg.norm(vec)
        np.testing.assert_allclose(stored[path], want, atol=1e-6)
        assert abs(np.linalg.norm(stored[path]) - 1.0) < 1e-5
    with ImageIndex.open(index_dir) as idx:
        assert idx.signature.matches(tiny_clip_model.signature)  # text queries use the same model
        query = idx.embed_text("a red circle")
        hits = idx.search_text("a red circle", k=5)
        paths = list(stored)
        scores = np.stack([stored[p] for p in paths]) @ query
        assert [h.path for h in hits] == [paths[i] for i in np.argsort(-scores)[:5]]
        records = {r.path: r for r in idx.records().values()}
    url = "https://example.com/x/3.png?size=big"
    assert (records[url].width, records[url].height, records[url].format) == (1024, 200, "PNG")
    assert records["https://example.com/x/70.png?size=big"].width == 256
    assert records[url].content_hash == "ab" * 32
    local = records["/imported/a/img00007.jpg"]
    assert (local.size, local.mtime_ns, local.content_hash, local.format) == (0, 0, "", "JPEG")


def test_an_import_writes_the_cache_file_once_at_the_end(
    embedding_set, index_dir, tiny_clip_model, monkeypatch
):
    """A growing cache file rewritten mid-import is wasted (replaced at the end): a new index
    gets its empty file when its model is bound (openers catch up from it), then one at the end."""
    import retrieval.storage.vector_store as vector_store_mod

    monkeypatch.setattr(vector_store_mod, "SAVE_MIN_CHANGES", 0)  # the store's rule: every commit
    monkeypatch.setattr(vector_store_mod, "SAVE_FRACTION", 0.0)
    saves = []
    real_save = vector_store_mod.VectorStore.save
    monkeypatch.setattr(vector_store_mod.VectorStore, "save", lambda self: saves.append(1) or real_save(self))
    root, expected = embedding_set
    summary = import_embeddings(
        root, index_dir, tiny_clip_model, ImportOptions(batch_size=40, optimize=False)
    )
    assert summary.added == 250 and len(saves) == 2  # 7 commits
    with ImageIndex.open(index_dir) as idx:
        assert idx.verify(check_files=False).ok and idx.info().images == 250


def test_importing_again_adds_nothing_twice(embedding_set, index_dir, tiny_clip_model):
    root, expected = embedding_set
    import_embeddings(root, index_dir, tiny_clip_model)
    again = import_embeddings(root, index_dir, tiny_clip_model)
    assert (again.added, again.already) == (0, 250)
    with ImageIndex.open(index_dir) as idx:
        assert idx.info().images == 250
        assert idx.verify(check_files=False).ok


def test_an_interrupted_import_resumes(embedding_set, index_dir, tiny_clip_model):
    root, expected = embedding_set
    stop = threading.Event()
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        stop.set()  # after the first committed batch

    first = import_embeddings(
        root, index_dir, tiny_clip_model, ImportOptions(batch_size=40), progress=progress, stop=stop
    )
    assert first.interrupted and first.added == 40 and seen == [40]
    rest = import_embeddings(root, index_dir, tiny_clip_model, ImportOptions(batch_size=40))
    assert (rest.added, rest.already) == (210, 40)
    assert set(stored_vectors(index_dir)) == set(expected)


def test_a_path_twice_in_the_set_is_imported_once(tmp_path, index_dir, tiny_clip_model):
    rng = np.random.default_rng(1)
    root = tmp_path / "emb"
    write_shard(root, 0, unit(rng, 3), {"image_path": ["/p/a.jpg", "/p/b.jpg", "/p/a.jpg"]})
    summary = import_embeddings(root, index_dir, tiny_clip_model)
    assert (summary.added, summary.already) == (2, 1)


def test_bad_shards_are_reported_and_skipped(tmp_path, index_dir, tiny_clip_model):
    rng = np.random.default_rng(2)
    root = tmp_path / "emb"
    write_shard(root, 0, unit(rng, 10), {"image_path": paths_for("/good/0", 0, 10)})
    write_shard(root, 1, unit(rng, 10, dim=32), {"image_path": paths_for("/bad/dim", 0, 10)})
    write_shard(root, 2, unit(rng, 10), {"image_path": paths_for("/bad/count", 0, 9)})
    write_shard(root, 3, unit(rng, 10), {"image_path": paths_for("/bad/npy", 0, 10)})
    (root / "img_emb" / "img_emb_3.npy").write_bytes(b"\x93NUMPY garbage")
    write_shard(root, 4, unit(rng, 10), {"image_path": paths_for("/bad/parquet", 0, 10)})
    (root / "metadata" / "metadata_4.parquet").write_bytes(b"PAR1 not really")
    write_shard(root, 5, unit(rng, 10), {"caption": ["no path column"] * 10})
    np.save(root / "img_emb" / "img_emb_6.npy", unit(rng, 10))  # no metadata to pair with
    write_shard(root, 7, unit(rng, 10), {"image_path": paths_for("/good/7", 0, 10)})
    write_shard(root, 8, np.arange(10 * DIM).reshape(10, DIM), {"image_path": paths_for("/bad/int", 0, 10)})
    summary = import_embeddings(root, index_dir, tiny_clip_model)
    assert summary.added == 20
    bad = {Path(f).name: reason for f, reason in summary.bad_shards}
    assert set(bad) == {
        "img_emb_1.npy",
        "metadata_2.parquet",
        "img_emb_3.npy",
        "metadata_4.parquet",
        "metadata_5.parquet",
        "img_emb_6.npy",
        "img_emb_8.npy",
    }
    assert "64-dimensional" in bad["img_emb_1.npy"]
    assert "9 metadata rows for 10 embeddings" in bad["metadata_2.parquet"]
    assert "image_path or url" in bad["metadata_5.parquet"]
    assert {p.rsplit("/", 1)[0] for p in stored_vectors(index_dir)} == {"/good/0", "/good/7"}


def test_rows_without_a_usable_vector_or_path_are_rejected(tmp_path, index_dir, tiny_clip_model):
    rng = np.random.default_rng(3)
    root = tmp_path / "emb"
    vecs = unit(rng, 6) * 3.0  # not normalised: normalised on the way in
    vecs[1] = np.nan
    vecs[2] = 0.0
    vecs[3, 5] = np.inf
    paths = ["/p/0.jpg", "/p/1.jpg", "/p/2.jpg", "/p/3.jpg", None, "/p/5.jpg"]
    write_shard(root, 0, vecs, {"image_path": paths})
    summary = import_embeddings(root, index_dir, tiny_clip_model)
    assert (summary.added, summary.rejected) == (2, 4)
    stored = stored_vectors(index_dir)
    assert sorted(stored) == ["/p/0.jpg", "/p/5.jpg"]
    np.testing.assert_allclose(stored["/p/0.jpg"], vecs[0] / 3.0, atol=1e-6)


def test_an_index_of_another_model_is_refused(embedding_set, index_dir, tiny_clip_model, other_clip_model):
    root, _ = embedding_set
    import_embeddings(root, index_dir, tiny_clip_model)
    with pytest.raises(ModelMismatchError):
        import_embeddings(root, index_dir, other_clip_model)
    with pytest.raises(ModelMismatchError):
        import_embeddings(root, index_dir, other_clip_model.spec)


def test_imported_files_are_not_broken_for_verify_or_index(tmp_path, index_dir, tiny_clip_model):
    """Local files that exist get their size and mtime: `clipdex index` on their folder finds them
    unchanged (embeds nothing); URLs are not missing files for `verify --check-files`."""
    rng = np.random.default_rng(4)
    photos = write_scenes(tmp_path / "photos", 4)
    root = tmp_path / "emb"
    write_shard(root, 0, unit(rng, 4), {"image_path": [str(p) for p in photos]})
    write_shard(root, 1, unit(rng, 3), {"url": [f"http://h/{i}.jpg" for i in range(3)]})
    assert import_embeddings(root, index_dir, tiny_clip_model).added == 7
    with ImageIndex.open(index_dir) as idx:
        report = idx.verify(check_files=True)
    assert report.ok and report.missing_files == []
    before = tiny_clip_model.images_encoded
    summary = index_folders([tmp_path / "photos"], index_dir, tiny_clip_model)
    assert (summary.added, summary.updated, summary.unchanged) == (0, 0, 4)
    assert tiny_clip_model.images_encoded == before
    assert len(stored_vectors(index_dir)) == 7


def test_cli_import(embedding_set, tmp_path):
    root, expected = embedding_set
    index_dir = tmp_path / "cli-index"
    args = [
        sys.executable, "-m", "cli.main", "import", str(root), "--index", str(index_dir),
        "--model", TINY_ARCH, "--pretrained", "random", "--json",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["added"], data["bad_shards"]) == (250, [])
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["already"] == 250
    (root / "img_emb" / "img_emb_01.npy").write_bytes(b"broken")
    broken = subprocess.run(args[:-1], capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1 and "img_emb_01.npy" in broken.stderr
    mismatch = subprocess.run(
        [*args[:7], "--model", TINY_ARCH, "--pretrained", str(tmp_path / "nope.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert mismatch.returncode == 1 and mismatch.stderr.startswith("clipdex: error:")


def test_an_unfinished_reindex_is_not_mixed_with_an_import(embedding_set, index_dir, tiny_clip_model):
    """Finishing a reindex drops every image the new model has no vector for: an import in
    between would be lost, so it is refused until the reindex is finished."""
    root, _ = embedding_set
    import_embeddings(root, index_dir, tiny_clip_model, ImportOptions(batch_size=100))
    catalog = open_catalog(index_dir, create=False)
    try:
        catalog.begin_pending(tiny_clip_model.signature.to_dict())
    finally:
        catalog.close()
    with pytest.raises(ClipdexError, match="reindex"):
        import_embeddings(root, index_dir, tiny_clip_model)
