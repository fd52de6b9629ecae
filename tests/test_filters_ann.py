"""Filtered search with an ANN index: the plan follows the filter's selectivity (few matches:
their ids listed and searched through an ID selector or scored exactly; many: an unfiltered
search's candidates checked against the filter, no id list built), recall@10 against exact
filtered search stays at the unfiltered level for a ~1% and a ~50% filter, scores are exact
cosines, and `-k 10` returns 10 hits whenever 10 images match, in both plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_ann import DIM, SIGNATURE, clustered

from retrieval.core.filters import Filters
from retrieval.index import ImageIndex
from retrieval.storage import index_rules
from retrieval.storage.ann import AnnIndex
from retrieval.storage.catalog import Catalog, open_catalog
from retrieval.storage.optimize import optimize
from retrieval.storage.records import NewImage
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.writer import IndexWriter

N = 40_000  # 1% of it (400) is more than SMALL_FILTER: the 1% filter goes through the selector
FAR = 8_000  # images of /lib/far, far from `near_queries`: more than list_matches_below(N + FAR)
ONE_PCT = Filters(folders=("/lib/d00",))
HALF = Filters(formats=("JPEG",))
FAR_FOLDER = Filters(folders=("/lib/far",))


def path_of(i: int) -> str:
    return f"/lib/d{i % 100:02d}/{i}.{'jpg' if i % 2 == 0 else 'png'}"


def new_images(vectors: np.ndarray, paths: list[str]) -> list[NewImage]:
    return [
        NewImage(p, 1, 1, f"h{p}", 8, 8, "JPEG" if p.endswith(".jpg") else "PNG", None, v)
        for p, v in zip(paths, vectors)
    ]


def around(center: np.ndarray, n: int, spread: float, seed: int) -> np.ndarray:
    v = center + spread * np.random.default_rng(seed).normal(size=(n, DIM)) / np.sqrt(DIM)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


ANCHOR = clustered(1, seed=5)[0]


def far_vectors() -> np.ndarray:
    """Unit vectors around the opposite of ANCHOR: cosine ~ -0.9 to `near_queries`."""
    return around(-ANCHOR, FAR, 0.3, seed=77)


def near_queries(n: int) -> np.ndarray:
    return around(ANCHOR, n, 0.1, seed=78)


def queries(n: int) -> np.ndarray:
    return clustered(n, seed=99)  # the same distribution, not in the index


@pytest.fixture(scope="module")
def filtered_dir(tmp_path_factory) -> Path:
    """N clustered vectors spread over 100 folders, half JPEG, plus FAR far ones; optimized with
    the threshold lowered so that an IVF index is built."""
    directory = tmp_path_factory.mktemp("filtered-ann") / "index"
    directory.mkdir()
    catalog = open_catalog(directory, create=True)
    vectors = clustered(N)
    with IndexWriter(VectorStore(directory, catalog)) as writer:
        writer.bind_signature(SIGNATURE)
        for start in range(0, N, 20_000):
            chunk = vectors[start : start + 20_000]
            writer.commit(added=new_images(chunk, [path_of(start + i) for i in range(len(chunk))]))
        writer.commit(added=new_images(far_vectors(), [f"/lib/far/{i}.png" for i in range(FAR)]))
    optimize(VectorStore(directory, catalog), exact_below=1000, queries=200)
    catalog.close()
    return directory


_MATCHING: dict[tuple[str, Filters], tuple[np.ndarray, np.ndarray]] = {}


def truth(catalog: Catalog, q: np.ndarray, filters: Filters, k: int = 10) -> tuple[list[int], list[float]]:
    """Exact filtered top-k by numpy over the matching stored vectors (read once per filter)."""
    key = (str(catalog.path), filters)
    if key not in _MATCHING:
        ids = catalog.select_ids(filters)
        _MATCHING[key] = ids, catalog.embeddings(ids.tolist(), DIM).astype(np.float64)
    ids, vecs = _MATCHING[key]
    scores = vecs @ q.astype(np.float64)
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist(), scores[order].tolist()


@pytest.mark.parametrize("filters", [ONE_PCT, HALF], ids=["1pct-folder", "50pct-type"])
def test_filtered_recall_at_10_matches_unfiltered_and_scores_are_exact(filtered_dir, filters):
    found, total = 0, 0
    with ImageIndex.open(filtered_dir) as idx:
        assert isinstance(idx.store.faiss, AnnIndex)
        matching = set(idx.catalog.select_ids(filters).tolist())
        for q in queries(100):
            want, want_scores = truth(idx.catalog, q, filters)
            hits = idx.rank(q, 10, filters=filters)
            assert len(hits) == 10 and {h.id for h in hits} <= matching
            by_id = dict(zip(want, want_scores))
            for h in hits:  # printed scores are the exact cosines
                exact = float(idx.catalog.embeddings([h.id], DIM)[0].astype(np.float64) @ q)
                assert h.score == pytest.approx(exact, abs=1e-6)
                if h.id in by_id:
                    assert h.score == pytest.approx(by_id[h.id], abs=1e-6)
            found += len(set(want) & {h.id for h in hits})
            total += len(want)
    assert found / total >= 0.95


def test_the_plan_lists_few_matches_and_checks_candidates_for_many(filtered_dir):
    with ImageIndex.open(filtered_dir) as idx:
        limit = index_rules.list_matches_below(idx.store.faiss.ntotal)
        assert idx.catalog.count_matches(ONE_PCT) < limit <= idx.catalog.count_matches(HALF)
        few = idx.store.filter_plan(ONE_PCT)
        assert few.lists_matches and few.allowed_ids.tolist() == idx.catalog.select_ids(ONE_PCT).tolist()
        many = idx.store.filter_plan(HALF)
        assert not many.lists_matches and many.candidate_filter is not None
        assert many.candidate_filter.list_below == index_rules.list_share_below(idx.store.faiss.ntotal)


def test_many_matches_never_list_their_ids(filtered_dir, monkeypatch):
    """A 50% filter is checked on candidates: Catalog.select_ids (500k ids at a million images)
    is never called."""

    def refuse(self, filters):  # type: ignore[no-untyped-def]
        raise AssertionError("select_ids called for a filter matching many images")

    monkeypatch.setattr(Catalog, "select_ids", refuse)
    with ImageIndex.open(filtered_dir) as idx:
        for q in queries(10):
            for k in (1, 10, 50):
                hits = idx.rank(q, k, filters=HALF)
                assert len(hits) == k and all(h.path.endswith(".jpg") for h in hits)
        page = idx.rank(queries(1)[0], 10, filters=HALF, offset=10)
        assert len(page) == 10 and all(h.path.endswith(".jpg") for h in page)


def test_many_matches_far_from_the_query_still_give_k_hits(filtered_dir, monkeypatch):
    """The candidates miss /lib/far (its images are the queries' opposites): the search lists
    its matches instead, once, and returns k hits, all of them from there."""
    listed = []
    select_ids = Catalog.select_ids

    def counted(self, filters):  # type: ignore[no-untyped-def]
        listed.append(filters)
        return select_ids(self, filters)

    with ImageIndex.open(filtered_dir) as idx:
        assert idx.catalog.count_matches(FAR_FOLDER) >= index_rules.list_matches_below(idx.store.faiss.ntotal)
        assert not idx.store.filter_plan(FAR_FOLDER).lists_matches
        monkeypatch.setattr(Catalog, "select_ids", counted)
        for q in near_queries(3):
            hits = idx.rank(q, 10, filters=FAR_FOLDER)
            assert len(hits) == 10 and all(h.path.startswith("/lib/far/") for h in hits)
            assert len(listed) == 1  # one list for all the pages search_page fetched
            want, _ = truth(idx.catalog, q, FAR_FOLDER)
            listed.clear()
            assert len(set(want) & {h.id for h in hits}) >= 8


def test_few_matches_far_from_the_query_still_give_k_hits_and_fewer_give_all(filtered_dir):
    far_and_few = Filters(globs=("/lib/far/1?.png",))  # 10 images
    far_and_fewer = Filters(globs=("/lib/far/7.png", "/lib/far/8.png", "/lib/far/9.png"))
    far_selector = Filters(globs=("/lib/far/1???.png",))  # 1000 > SMALL_FILTER: the ID selector
    with ImageIndex.open(filtered_dir) as idx:
        idx.store.faiss.nprobe = 1
        q = near_queries(1)[0]
        assert [h.id for h in idx.rank(q, 10, filters=far_and_few)] == truth(idx.catalog, q, far_and_few)[0]
        assert len(idx.rank(q, 10, filters=far_and_fewer)) == 3
        hits = idx.rank(q, 10, filters=far_selector)
        assert len(hits) == 10 and all(h.path.startswith("/lib/far/1") for h in hits)


def test_filtered_nprobe_scales_with_selectivity_uncapped():
    assert index_rules.filtered_nprobe(3, 2048, 0.01) == 300
    assert index_rules.filtered_nprobe(3, 2048, 0.5) == 6
    assert index_rules.filtered_nprobe(3, 2048, 1.0) == 3
    assert index_rules.filtered_nprobe(3, 2048, 0.0001) == 2048
