"""Search results must equal a brute-force computation done straight with open_clip + numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_ARCH, make_scene, write_scenes
from PIL import Image

from indexer import index_folders
from retrieval.index import ImageIndex
from retrieval.storage.catalog import Catalog
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex

TOL = 1e-5
TEXTS = [
    "a red circle",
    "a photo of a dog on the beach",
    "blue sky over green hills",
    "a yellow square on a white background",
    "sunset",
]


# -- the direct computation -----------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def direct_image_vectors(model, paths) -> np.ndarray:
    with torch.inference_mode():
        pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
        feats = model.model.encode_image(pixels).float().numpy()
    return _unit(feats)


def encode_texts_directly(model, texts) -> np.ndarray:
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)  # open_clip's own, not clipdex's
    with torch.inference_mode():
        feats = model.model.encode_text(tokenizer(list(texts))).float().numpy()
    return _unit(feats)


def assert_same_ranking(hits, expected: dict[int, float], k: int) -> None:
    """`hits` are the top-k of `expected` (id -> score): scores within TOL, order exact
    wherever the expected scores are separated by more than TOL."""
    order = sorted(expected, key=lambda i: (-expected[i], i))
    top = order[:k]
    assert len(hits) == len(top)
    assert [h.rank for h in hits] == list(range(1, len(top) + 1))
    got_ids = [h.id for h in hits]
    assert len(set(got_ids)) == len(got_ids), "duplicate hits"
    for h in hits:
        assert h.id in expected, f"hit {h.id} is not a candidate"
        assert abs(h.score - expected[h.id]) <= TOL, (h.id, h.score, expected[h.id])
    np.testing.assert_allclose([h.score for h in hits], [expected[i] for i in top], atol=TOL, rtol=0)
    for pos, want in enumerate(top):
        neighbours = [expected[order[j]] for j in (pos - 1, pos + 1) if 0 <= j < len(order)]
        if all(abs(expected[want] - s) > TOL for s in neighbours):
            assert got_ids[pos] == want, f"rank {pos + 1}: got {got_ids[pos]}, expected {want}"
    kth = expected[top[-1]]
    for i in order:
        if expected[i] > kth + TOL:
            assert i in got_ids, f"id {i} (score {expected[i]}) beats the k-th and is missing"


# -- the index ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tiny_clip_model, tmp_path_factory):
    """30 indexed scenes (read-only for the tests of this module) and 3 unindexed queries."""
    root = tmp_path_factory.mktemp("equality")
    photos = root / "photos"
    write_scenes(photos, 26)
    for i in range(2):  # near-duplicates inside the index
        img = make_scene(200 + i, (160, 120))
        img.save(photos / f"dup{i}.png")
        img.resize((96, 72), Image.Resampling.LANCZOS).save(photos / f"dup{i}_small.png")
    queries = write_scenes(root / "queries", 3, seed0=500, prefix="query")
    index_dir = root / "index"
    summary = index_folders([photos], index_dir, model=tiny_clip_model)
    assert summary.added == 30 and not summary.failed
    catalog = Catalog.open(index_dir)
    records = catalog.records()
    catalog.close()
    paths = {r.id: r.path for r in records.values()}
    ids = sorted(paths)
    vecs = direct_image_vectors(tiny_clip_model, [paths[i] for i in ids])
    direct = {i: vecs[n] for n, i in enumerate(ids)}
    return {"dir": index_dir, "photos": photos, "queries": queries, "paths": paths, "direct": direct}


@pytest.fixture(scope="module")
def opened(built):
    idx = ImageIndex.open(built["dir"], device="cpu")
    yield idx
    idx.close()


def _expected_scores(direct: dict[int, np.ndarray], query: np.ndarray, exclude=()) -> dict[int, float]:
    q = _unit(query)
    return {i: float(v @ q) for i, v in direct.items() if i not in exclude}


def test_catalog_holds_exactly_the_indexed_files(built):
    on_disk = sorted(str(p) for p in built["photos"].iterdir())
    assert sorted(built["paths"].values()) == on_disk


@pytest.mark.parametrize("text", TEXTS)
def test_search_text_equals_brute_force(built, opened, tiny_clip_model, text):
    q = encode_texts_directly(tiny_clip_model, [text])[0]
    expected = _expected_scores(built["direct"], q)
    hits = opened.search_text(text, k=7)
    assert_same_ranking(hits, expected, 7)
    for h in hits:
        assert h.path == built["paths"][h.id]


def _query_images(built):
    indexed = [built["paths"][i] for i in sorted(built["paths"])[::9][:2]]  # 2 indexed files
    return indexed + [str(p) for p in built["queries"]]  # + 3 unindexed files


@pytest.mark.parametrize("which", range(5))
def test_search_image_equals_brute_force(built, opened, tiny_clip_model, which):
    path = _query_images(built)[which]
    q = direct_image_vectors(tiny_clip_model, [path])[0]
    own = [i for i, p in built["paths"].items() if p == path]
    expected = _expected_scores(built["direct"], q, exclude=own)
    hits = opened.search_image(path, k=6)
    assert_same_ranking(hits, expected, 6)
    assert all(h.path != path for h in hits)
    assert all(h.path == built["paths"][h.id] for h in hits)


def test_search_image_include_self_ranks_itself_first(built, opened, tiny_clip_model):
    path = _query_images(built)[0]
    q = direct_image_vectors(tiny_clip_model, [path])[0]
    hits = opened.search_image(path, k=5, exclude_self=False)
    assert_same_ranking(hits, _expected_scores(built["direct"], q), 5)
    assert hits[0].path == path and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_search_image_accepts_pil_images(built, opened, tiny_clip_model):
    path = str(built["queries"][0])
    q = direct_image_vectors(tiny_clip_model, [path])[0]
    hits = opened.search_image(Image.open(path), k=4)
    assert_same_ranking(hits, _expected_scores(built["direct"], q), 4)


def test_near_duplicate_is_the_top_hit(built, opened):
    for i in range(2):
        hits = opened.search_image(built["photos"] / f"dup{i}.png", k=3)
        assert Path(hits[0].path).name == f"dup{i}_small.png"
        assert hits[0].score > hits[1].score + 0.001


@pytest.mark.parametrize("seed", range(5))
def test_search_vector_equals_brute_force(built, opened, seed):
    q = np.random.default_rng(seed).normal(size=64).astype(np.float32) * 3.0  # not unit-norm
    expected = _expected_scores(built["direct"], q)
    assert_same_ranking(opened.search_vector(q, k=8), expected, 8)


def test_search_vector_with_allowed_ids(built, opened):
    q = np.random.default_rng(42).normal(size=64).astype(np.float32)
    allowed = np.array(sorted(built["paths"])[1::3], dtype=np.int64)
    expected = {i: s for i, s in _expected_scores(built["direct"], q).items() if i in set(allowed.tolist())}
    hits = opened.search_vector(q, k=5, allowed_ids=allowed)
    assert_same_ranking(hits, expected, 5)


def test_k_larger_than_the_index_returns_everything(built, opened):
    q = np.ones(64, dtype=np.float32)
    hits = opened.search_vector(q, k=1000)
    assert sorted(h.id for h in hits) == sorted(built["paths"])
    assert_same_ranking(hits, _expected_scores(built["direct"], q), 1000)


def test_stored_vectors_are_unit_float32_and_equal_to_direct(built):
    catalog = Catalog.open(built["dir"])
    try:
        dim = 64
        seen = []
        for ids, blobs in catalog.iter_embedding_blobs(batch=7):
            for i, blob in zip(ids.tolist(), blobs):
                assert len(blob) == dim * 4
                v = np.frombuffer(blob, dtype=np.float32)
                assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
                np.testing.assert_allclose(v, built["direct"][i], atol=TOL)
                seen.append(i)
        assert seen == sorted(built["paths"])
        faiss_file = FaissIndex.load(built["dir"] / FAISS_FILE, dim)
        assert faiss_file is not None
        assert faiss_file.ntotal == catalog.count() == len(built["paths"])
        fids = faiss_file.ids()
        assert np.array_equal(np.sort(fids), catalog.ids())
        fvecs = faiss_file.reconstruct_all()
        assert fvecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(fvecs, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(fvecs, catalog.embeddings(fids.tolist(), dim))
    finally:
        catalog.close()


def test_query_embeddings_equal_direct_ones(opened, tiny_clip_model, built):
    np.testing.assert_allclose(
        opened.embed_text(TEXTS[0]), encode_texts_directly(tiny_clip_model, TEXTS[:1])[0], atol=TOL
    )
    path = str(built["queries"][1])
    np.testing.assert_allclose(
        opened.embed_image(path), direct_image_vectors(tiny_clip_model, [path])[0], atol=TOL
    )
