"""Approximate search: `optimize` builds an IVF index by the rules, search re-ranks its
candidates exactly, filters keep their promise, and the index follows adds and deletes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.embedding.spec import ModelSignature
from retrieval.index import ImageIndex
from retrieval.search.ranking import top_hits
from retrieval.storage import index_rules
from retrieval.storage.ann import AnnIndex, cache_kind
from retrieval.storage.catalog import Catalog, open_catalog
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex
from retrieval.storage.optimize import optimize, recorded
from retrieval.storage.records import NewImage
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.writer import IndexWriter

DIM = 64
N = 60_000
SIGNATURE = ModelSignature("clipdex-tiny", "synthetic", "random", DIM).to_dict()


def clustered(n: int, seed: int = 0, dim: int = DIM, sub: int = 16, clusters: int = 300) -> np.ndarray:
    """Unit vectors with the structure of real embeddings: a mixture of clusters in a random
    `sub`-dimensional subspace plus small isotropic noise (same generator seed: same clusters)."""
    rng = np.random.default_rng(1234)
    basis = np.linalg.qr(rng.normal(size=(dim, sub)))[0]
    centers = rng.normal(size=(clusters, sub))
    draw = np.random.default_rng(seed)
    z = centers[draw.integers(0, clusters, n)] + 0.35 * draw.normal(size=(n, sub))
    v = z @ basis.T + 0.05 * draw.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def images(vectors: np.ndarray, start: int = 0) -> list[NewImage]:
    return [
        NewImage(f"/synthetic/{start + i}.jpg", 1, 1, f"h{start + i}", 8, 8, "JPEG", None, v)
        for i, v in enumerate(vectors)
    ]


def make_index(directory: Path, vectors: np.ndarray) -> None:
    directory.mkdir(parents=True)
    catalog = open_catalog(directory, create=True)
    with IndexWriter(VectorStore(directory, catalog)) as writer:
        writer.bind_signature(SIGNATURE)
        for start in range(0, len(vectors), 20_000):
            writer.commit(added=images(vectors[start : start + 20_000], start))
    catalog.close()


_ALL: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # catalog path, generation -> (ids, vectors)


def brute(catalog: Catalog, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[list, list]:
    """Exact top-k by numpy over every stored vector (read once per catalog state)."""
    key = f"{catalog.path}:{catalog.state().generation}"
    if key not in _ALL:
        ids = catalog.ids()
        _ALL[key] = ids, catalog.embeddings(ids.tolist(), DIM)
    ids, vecs = _ALL[key]
    if allowed is not None:
        keep = np.isin(ids, allowed)
        ids, vecs = ids[keep], vecs[keep]
    scores = vecs.astype(np.float64) @ q.astype(np.float64)
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist(), scores[order].tolist()


@pytest.fixture(scope="module")
def ann_dir(tmp_path_factory) -> Path:
    """60k clustered vectors, optimized with the threshold lowered so that the ANN index is built."""
    directory = tmp_path_factory.mktemp("ann") / "index"
    make_index(directory, clustered(N))
    catalog = open_catalog(directory, create=False)
    optimize(VectorStore(directory, catalog), exact_below=1000, queries=200)
    catalog.close()
    return directory


@pytest.fixture
def ann_copy(ann_dir, tmp_path) -> Path:
    """A copy to change (adds, deletes) without disturbing the module's index."""
    import shutil

    return Path(shutil.copytree(ann_dir, tmp_path / "index"))


def test_optimize_builds_an_ivf_index_and_records_plan_nprobe_and_recall(ann_dir):
    assert cache_kind(ann_dir / FAISS_FILE) == "ivf"
    with ImageIndex.open(ann_dir) as idx:
        report = recorded(idx.store)
        assert report is not None
        assert report.plan.kind == "ivf" and report.plan.factory.startswith("IVF")
        assert report.recall_at_10 >= 0.95 and 1 <= report.nprobe <= report.plan.nlist
        index = idx.store.faiss
        assert isinstance(index, AnnIndex) and index.ntotal == N and index.nprobe == report.nprobe
        info = idx.info()
        assert info.vector_index == report.plan.factory
        assert info.nprobe == report.nprobe and info.recall_at_10 == report.recall_at_10
        depth = index_rules.rerank_depth(10, report.rerank_factor)
        assert info.rerank_at_10 == index.rerank_depth(10) == depth


def test_the_query_process_holds_codes_not_float_vectors(ann_dir):
    with ImageIndex.open(ann_dir) as idx:
        index = idx.store.faiss
        assert isinstance(index, AnnIndex)
        assert index.ivf.code_size < 4 * DIM  # SQ8 or PQ codes, never the float32 rows
        assert not hasattr(index, "reconstruct_all")


def test_ann_scores_are_the_exact_cosines_of_the_returned_ids(ann_dir):
    queries = clustered(20, seed=7)
    with ImageIndex.open(ann_dir) as idx:
        for q in queries:
            scores, ids = idx.store.search(q, 10)
            ids = ids[0][ids[0] >= 0]
            exact = idx.catalog.embeddings(ids.tolist(), DIM).astype(np.float64) @ q.astype(np.float64)
            np.testing.assert_allclose(scores[0][: len(ids)], exact, rtol=0, atol=1e-6)
            assert list(scores[0]) == sorted(scores[0], reverse=True)
            deeper_scores, deeper_ids = idx.store.search(q, 50)  # same pair, same score, any depth
            by_id = dict(zip(deeper_ids[0].tolist(), deeper_scores[0].tolist()))
            assert [by_id[i] for i in ids.tolist()] == scores[0][: len(ids)].tolist()


def test_recall_at_10_on_queries_not_in_the_index(ann_dir):
    queries = clustered(100, seed=99)  # same distribution, not stored
    found = 0
    with ImageIndex.open(ann_dir) as idx:
        for q in queries:
            truth, truth_scores = brute(idx.catalog, q, 10)
            hits = idx.search_vector(q, k=10)
            found += len(set(truth) & {h.id for h in hits})
            by_id = dict(zip(truth, truth_scores))
            for h in hits:  # printed scores are exact cosines
                if h.id in by_id:
                    assert h.score == pytest.approx(by_id[h.id], abs=1e-6)
    assert found / (10 * len(queries)) >= 0.95


def test_adds_and_deletes_after_optimize_are_seen_by_this_and_a_new_reader(ann_copy):
    catalog = open_catalog(ann_copy, create=False)
    store = VectorStore(ann_copy, catalog)
    probe = clustered(1, seed=5)[0]
    victim = brute(catalog, probe, 1)[0][0]
    with IndexWriter(store) as writer:
        assert isinstance(store.faiss, AnnIndex)
        (new_id,) = writer.commit(added=images(probe[None, :], start=10**6))
        writer.commit(removed=[victim])
        hits = top_hits(store, probe, k=5)
        assert hits[0].id == new_id and hits[0].score == pytest.approx(1.0, abs=1e-6)
        assert victim not in [h.id for h in hits]
    catalog.close()
    with ImageIndex.open(ann_copy) as idx:
        assert isinstance(idx.store.faiss, AnnIndex)  # caught up from the ANN file, not rebuilt flat
        assert idx.store.faiss.ntotal == N
        hits = idx.search_vector(probe, k=5)
        assert hits[0].id == new_id and victim not in [h.id for h in hits]


def test_a_reader_process_searches_the_writers_ann_index(ann_dir):
    q = clustered(1, seed=11)[0]
    script = (
        "import sys, json, numpy as np\n"
        "from retrieval.index import ImageIndex\n"
        "with ImageIndex.open(sys.argv[1]) as idx:\n"
        "    hits = idx.search_vector(np.array(json.loads(sys.argv[2]), np.float32), k=5)\n"
        "    print(json.dumps([type(idx.store.faiss).__name__, [h.id for h in hits]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ann_dir), json.dumps(q.tolist())],
        capture_output=True,
        text=True,
        check=True,
    )
    kind, ids = json.loads(out.stdout)
    assert kind == "AnnIndex"
    with ImageIndex.open(ann_dir) as idx:
        assert ids == brute(idx.catalog, q, 5)[0]


def test_a_small_filter_is_scored_exactly(ann_dir):
    rng = np.random.default_rng(3)
    with ImageIndex.open(ann_dir) as idx:
        allowed = np.sort(rng.choice(idx.catalog.ids(), size=200, replace=False))
        assert len(allowed) <= index_rules.SMALL_FILTER
        for q in clustered(5, seed=12):
            hits = idx.search_vector(q, k=10, allowed_ids=allowed)
            ids, scores = brute(idx.catalog, q, 10, allowed)
            assert [h.id for h in hits] == ids
            assert [h.score for h in hits] == pytest.approx(scores, abs=1e-6)


def test_a_large_filter_returns_only_allowed_ids_k_of_them(ann_dir):
    with ImageIndex.open(ann_dir) as idx:
        ids = idx.catalog.ids()
        allowed = ids[ids % 2 == 0]  # 30k > SMALL_FILTER: through the index, with a selector
        assert len(allowed) > index_rules.SMALL_FILTER
        for q in clustered(5, seed=13):
            hits = idx.search_vector(q, k=10, allowed_ids=allowed)
            assert len(hits) == 10 and all(h.id % 2 == 0 for h in hits)
            truth = brute(idx.catalog, q, 10, allowed)[0]
            assert len(set(truth) & {h.id for h in hits}) >= 8


def test_a_filter_never_shortens_the_result_when_the_probed_lists_miss_it(ann_dir, monkeypatch):
    """README: `-k 10` returns 10 hits whenever 10 images match, even when the allowed images lie
    outside every list an nprobe of 1 scans."""
    monkeypatch.setattr(index_rules, "SMALL_FILTER", 0)  # force the ID-selector plan
    q = clustered(1, seed=21)[0]
    with ImageIndex.open(ann_dir) as idx:
        idx.store.faiss.nprobe = 1
        far = brute(idx.catalog, -q, 12)[0]  # the images least like the query
        hits = idx.search_vector(q, k=10, allowed_ids=np.asarray(sorted(far)))
        assert len(hits) == 10 and {h.id for h in hits} <= set(far)


def test_below_the_threshold_optimize_keeps_exact_flat_search(tmp_path):
    directory = tmp_path / "small"
    make_index(directory, clustered(2000, seed=4))
    catalog = open_catalog(directory, create=False)
    report = optimize(VectorStore(directory, catalog))
    assert report.plan.kind == "flat" and report.recall_at_10 == 1.0 and report.nprobe is None
    assert cache_kind(directory / FAISS_FILE) == "flat"
    catalog.close()


def test_optimize_back_to_flat_replaces_an_ann_index(ann_copy):
    catalog = open_catalog(ann_copy, create=False)
    store = VectorStore(ann_copy, catalog)
    report = optimize(store, exact_below=10**6)
    assert report.plan.kind == "flat"
    assert isinstance(FaissIndex.load(ann_copy / FAISS_FILE, DIM), FaissIndex)
    assert isinstance(store.faiss, FaissIndex) and store.faiss.ntotal == N
    catalog.close()


def test_verify_accepts_an_ann_cache_and_sees_a_missing_id(ann_copy):
    with ImageIndex.open(ann_copy) as idx:
        assert idx.verify(check_files=False).ok
    catalog = Catalog.open(ann_copy)
    victim = int(catalog.ids()[0])
    catalog.close()
    index = AnnIndex.load(ann_copy / FAISS_FILE, DIM)
    assert index is not None
    index.remove(np.array([victim]))
    index.save(ann_copy / FAISS_FILE, index.stamp)
    with ImageIndex.open(ann_copy) as idx:
        report = idx.verify(check_files=False)
        assert not report.ok and "1 ids only in the catalog" in " ".join(report.problems)


def test_duplicates_through_the_ann_index_find_the_planted_pairs_with_exact_scores(ann_copy):
    from retrieval.search.duplicates import find_duplicates

    rng = np.random.default_rng(8)
    originals = clustered(6, seed=31)
    copies = originals + 0.004 * rng.normal(size=originals.shape).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    catalog = open_catalog(ann_copy, create=False)
    store = VectorStore(ann_copy, catalog)
    with IndexWriter(store) as writer:
        a = writer.commit(added=images(originals, start=2 * 10**6))
        b = writer.commit(added=images(copies, start=3 * 10**6))
    assert isinstance(store.faiss, AnnIndex)
    groups = find_duplicates(store, threshold=0.999)
    pairs = {(p[0], p[1]): p[2] for g in groups for p in g.pairs}
    assert {(x, y) for x, y in zip(a, b)} <= set(pairs)
    for (x, y), score in pairs.items():  # every pair reported is checked exactly
        exact = float(catalog.embeddings([x], DIM)[0].astype(np.float64) @ catalog.embeddings([y], DIM)[0])
        assert score == pytest.approx(exact, abs=1e-9) and score > 0.999
    catalog.close()


def test_cli_optimize_and_info_show_the_index_type_nprobe_and_recall(tmp_path):
    directory = tmp_path / "cli-index"
    make_index(directory, clustered(3000, seed=41))
    clipdex = Path(sys.executable).with_name("clipdex")
    base = [str(clipdex)] if clipdex.exists() else [sys.executable, "-m", "cli.main"]

    def run(*args: str) -> str:
        return subprocess.run([*base, *args], capture_output=True, text=True, check=True).stdout

    out = json.loads(run("optimize", "--index", str(directory), "--exact-below", "1000", "--json"))
    assert out["plan"]["kind"] == "ivf" and out["recall_at_10"] >= 0.95
    info = json.loads(run("info", "--index", str(directory), "--json"))
    assert info["vector_index"] == out["plan"]["factory"] and info["nprobe"] == out["nprobe"]
    assert info["recall_at_10"] == out["recall_at_10"]
    text = run("info", "--index", str(directory))
    assert f"approximate {out['plan']['factory']}, nprobe {out['nprobe']}" in text
    flat = run("optimize", "--index", str(directory))
    assert "Flat (exact search)" in flat
    assert "search:   exact (Flat)" in run("info", "--index", str(directory))
    bad = subprocess.run(
        [*base, "optimize", "--index", str(directory), "--max-memory", "lots"], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "clipdex: error: not a size: 'lots' (examples: 512M, 2G)"


def test_classify_reads_exact_vectors_when_the_index_holds_codes(ann_dir):
    from retrieval.search import zeroshot

    labels = clustered(3, seed=51)
    with ImageIndex.open(ann_dir) as idx:
        assert isinstance(idx.store.faiss, AnnIndex)
        results = zeroshot.classify(idx.store, ["a", "b", "c"], labels, zeroshot.Calibration(100.0))
        assert len(results) == N
        sample = results[::5000]
        vecs = idx.catalog.embeddings([r.id for r in sample], DIM)
        best = np.argmax(vecs.astype(np.float64) @ labels.T.astype(np.float64), axis=1)
        assert [r.labels[0].label for r in sample] == [["a", "b", "c"][b] for b in best]


def test_optimize_if_needed_builds_once_then_only_after_the_library_doubles(tmp_path):
    from retrieval.storage.optimize import optimize_if_needed

    directory = tmp_path / "grow"
    make_index(directory, clustered(3000, seed=61))
    catalog = open_catalog(directory, create=False)
    store = VectorStore(directory, catalog)
    with IndexWriter(store) as writer:
        assert optimize_if_needed(writer, exact_below=5000) is None  # below the threshold: flat
        assert cache_kind(directory / FAISS_FILE) == "flat"
        first = optimize_if_needed(writer, exact_below=1000)
        assert first is not None and cache_kind(directory / FAISS_FILE) == "ivf"
        assert optimize_if_needed(writer, exact_below=1000) is None  # already built for this size
        writer.commit(added=images(clustered(3001, seed=62), start=10**5))
        again = optimize_if_needed(writer, exact_below=1000)
        assert again is not None and again.plan.vectors == 6001
        assert isinstance(store.faiss, AnnIndex) and store.faiss.ntotal == 6001
    catalog.close()


def test_a_reader_re_ranks_with_its_own_models_vectors_after_a_reindex_swap(tmp_path):
    """A reader that has not refreshed since a reindex swapped in another model (same dimension)
    keeps scoring its candidates with the vectors of the model its index and query belong to."""
    directory = tmp_path / "index"
    vectors = clustered(3000, seed=3)
    make_index(directory, vectors)
    catalog = open_catalog(directory, create=False)
    optimize(VectorStore(directory, catalog), exact_below=1000, queries=100)
    reader = VectorStore(directory, Catalog.open(directory))
    try:
        assert isinstance(reader.faiss, AnnIndex)
        ids = catalog.ids()
        old = catalog.embeddings(ids.tolist(), DIM)
        other = {**SIGNATURE, "pretrained": "other-weights"}
        with IndexWriter(VectorStore(directory, catalog)) as writer:
            writer.begin_reindex(other, lambda a, b: a == b)
            writer.commit(revectored=[(int(i), -v) for i, v in zip(ids, old)])  # other embeddings
            assert writer.finish_reindex() is not None
        q = vectors[17]
        scores, found = reader.search(q, 10)  # no refresh: still the first model's index
        found_ids = found[0][found[0] >= 0]
        by_id = dict(zip(ids.tolist(), old.astype(np.float64) @ q.astype(np.float64)))
        expected = [by_id[i] for i in found_ids.tolist()]
        np.testing.assert_allclose(scores[0][: len(found_ids)], expected, atol=1e-6)
    finally:
        reader.catalog.close()
        catalog.close()


def test_optimize_records_the_rerank_depth_it_measured_and_readers_use_it(ann_dir, monkeypatch):
    """Each candidate re-ranked is a read of the catalog: the depth is measured with nprobe
    (recall@10 >= target at the depth recorded) and searches read that many, not a fixed 100."""
    with ImageIndex.open(ann_dir) as idx:
        report = recorded(idx.store)
        assert report is not None and report.rerank_factor in index_rules.RERANK_FACTORS
        index = idx.store.faiss
        assert isinstance(index, AnnIndex) and index.rerank_factor == report.rerank_factor
        read: list[int] = []
        stored_vectors = idx.catalog.stored_vectors

        def counting(ids, dim, model_id):  # type: ignore[no-untyped-def]
            read.append(len(ids))
            return stored_vectors(ids, dim, model_id)

        monkeypatch.setattr(idx.catalog, "stored_vectors", counting)
        idx.store.search(clustered(1, seed=3)[0], 10)
        assert read == [index_rules.rerank_depth(10, report.rerank_factor)]


def test_a_recorded_rerank_factor_of_another_build_is_not_used(ann_dir):
    with ImageIndex.open(ann_dir) as idx:
        index = idx.store.faiss
        assert isinstance(index, AnnIndex)
        raw = json.loads(idx.catalog.get_meta("vector_index") or "{}")
        raw["plan"]["factory"] = "IVF8,PQ4"  # a report left by another build: its depth may be too shallow
        index.adopt_rerank_factor(json.dumps(raw))
        assert index.rerank_factor is None and index.rerank_depth(10) == index_rules.rerank_depth(10)
        for broken in (None, "", "not json", json.dumps({"rerank_factor": 2})):
            index.adopt_rerank_factor(broken)
            assert index.rerank_factor is None


def test_a_loaded_ann_index_is_mapped_and_copied_once_before_a_change(ann_copy):
    """Opening maps the file (no read of the codes); a change first copies the lists (a write to
    a mapped list would abort the process), and then answers as an index read into memory."""
    path = ann_copy / FAISS_FILE
    mapped, read = AnnIndex.load(path, DIM), AnnIndex.load(path, DIM, mmap=False)
    assert mapped is not None and read is not None
    assert mapped.mapped and not read.mapped and mapped.stamp == read.stamp
    queries = clustered(5, seed=21)
    for index in (mapped, read):
        index.nprobe = 4
    assert np.array_equal(mapped.search(queries, 20)[1], read.search(queries, 20)[1])
    gone = mapped.search(queries[:1], 3)[1][0]
    extra_ids = np.arange(10**6, 10**6 + 50, dtype=np.int64)
    extra = clustered(50, seed=22)
    for index in (mapped, read):
        assert index.remove(gone) == 3
        index.add(extra_ids, extra)
    assert not mapped.mapped
    assert mapped.ntotal == read.ntotal == N - 3 + 50
    assert np.array_equal(np.sort(mapped.ids()), np.sort(read.ids()))
    assert np.array_equal(mapped.search(queries, 20)[1], read.search(queries, 20)[1])
    assert not np.isin(gone, mapped.search(queries[:1], 20)[1]).any()


def test_a_mapped_index_whose_first_list_is_empty_is_still_copied_before_a_change(ann_copy, tmp_path):
    """An empty list loads as memory of its own while the others stay mapped: telling mapped
    from owned by the first list alone let an add write into a mapped list (FAISS aborts the
    process: 'cannot be performed on a viewed vector')."""
    index = AnnIndex.load(ann_copy / FAISS_FILE, DIM, mmap=False)
    assert index is not None
    lists = index.ivf.invlists
    first = faiss.rev_swig_ptr(lists.get_ids(0), lists.list_size(0)).copy()
    assert len(first) and index.remove(first) == len(first)
    path = tmp_path / FAISS_FILE
    index.save(path, index.stamp)
    loaded = AnnIndex.load(path, DIM)
    assert loaded is not None and loaded.ivf.invlists.list_size(0) == 0
    assert loaded.mapped
    extra_ids = np.arange(10**6, 10**6 + 50, dtype=np.int64)
    extra = clustered(50, seed=23)
    for changed in (loaded, index):
        changed.add(extra_ids, extra)
    assert not loaded.mapped
    assert np.array_equal(np.sort(loaded.ids()), np.sort(index.ids()))


def test_an_hnsw_coarse_quantizer_still_scans_every_list_a_filtered_search_asks_for(ann_dir):
    """The graph finds the lists nearest a query; a search over all lists (a rare filter) must
    still reach every allowed id, however far from the query its list lies."""
    index = AnnIndex.load(ann_dir / FAISS_FILE, DIM)
    assert index is not None and "_HNSW" in index.description
    ids = index.ids()
    allowed = np.sort(np.random.default_rng(0).choice(ids, size=300, replace=False))
    q = clustered(3, seed=31)
    for nprobe in (index.nlist, index_rules.HNSW_MAX_NPROBE + 1):
        _, found = index.search(q, 300, allowed, nprobe=nprobe)
        if nprobe == index.nlist:
            assert all(set(row.tolist()) == set(allowed.tolist()) for row in found)
        else:
            assert np.isin(found[found >= 0], allowed).all()
    _, near = index.search(q, 10, nprobe=index.nprobe)  # through the graph
    _, exact_lists = index.search(q, 10, nprobe=index.nlist)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(near.tolist(), exact_lists.tolist())]) >= 0.5


def test_add_assigns_lists_as_faiss_would_and_searches_the_same():
    """`add` assigns the lists with numpy's BLAS where the quantizer is flat (FAISS's own
    assignment was 5x slower for an opener catching up): the same lists, the same answers."""
    data = clustered(4000, seed=41)
    ours = AnnIndex.trained("IVF64,SQ8", data[:2000])
    theirs = AnnIndex.trained("IVF64,SQ8", data[:2000])
    ids = np.arange(len(data), dtype=np.int64)
    ours.add(ids, data)
    theirs.index.add_with_ids(data, ids)
    for list_no in range(ours.nlist):
        a, b = ours.ivf.invlists, theirs.ivf.invlists
        got = faiss_ids(a, list_no)
        assert np.array_equal(np.sort(got), np.sort(faiss_ids(b, list_no)))
    q = clustered(5, seed=42)
    assert np.array_equal(ours.search(q, 10, nprobe=4)[1], theirs.search(q, 10, nprobe=4)[1])


def faiss_ids(invlists, list_no: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    import faiss

    size = invlists.list_size(list_no)
    return faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy() if size else np.empty(0, np.int64)
