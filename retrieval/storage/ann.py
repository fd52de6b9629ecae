"""AnnIndex: an approximate (IVF) FAISS index of the catalog's vectors, its file, and exact
re-ranking.

It offers what VectorStore needs from FaissIndex (dim, ntotal, ids, add, remove, search, save,
load, stamp), so that opening, catching up with the catalog by ids and the writer's commits work
the same for both. It holds compressed codes only (IVF lists of SQ8 or PQ codes with their int64
ids: ~72 bytes a vector with PQ64 instead of 2 KB), never the float32 vectors: the catalog holds
those durably, and `search_exact` re-scores the top candidates from it, so every score handed
out is an exact cosine.

The file is the same `vectors.faiss` as the flat index, FAISS's serialisation followed by the
same Stamp trailer: one cache file a directory, one stamp logic (current, ancestor, foreign),
and no flat copy on disk next to the catalog's (at 1M x 512 that copy alone is 2 GB).
`load_cache` tells the two kinds apart by FAISS's four-byte header.

Like the flat index, it is loaded memory-mapped (the lists' codes and ids, and the coarse
centroids, are views of the file: 6 ms to open at 1M x PQ128 instead of ~110 ms to read 145 MB,
and only the lists searched are paged in). The mapped lists are read-only to FAISS (a write
aborts the process): the first change copies them once into memory (`_own_lists`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from . import index_rules
from .faiss_index import FaissIndex, Stamp, StampedIndex, map_or_read_index, omp_threads

_FLAT_HEADER = b"IxM2"  # FAISS's fourcc of IndexIDMap2, the flat cache's outer index
META_KEY = "vector_index"  # catalog meta: JSON of the last optimize's report (storage.optimize)

# (ids, vectors) of those `ids` that have a stored vector, in a consistent order.
VectorsOf = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class AnnIndex(StampedIndex):
    """An `IndexIVF` (IVF-SQ8 or IVF-PQ, inner product) whose ids are catalog row ids."""

    def __init__(self, index: faiss.Index, stamp: Stamp | None = None):
        super().__init__(index, stamp)
        self.ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFPQ, ...SQ
        # The coarse quantizer when it is an HNSW graph (index_rules.coarse_quantizer), found
        # once: nothing replaces it, and downcasting it took ~13 us of every search.
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        self._hnsw: faiss.IndexHNSW | None = quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
        # Candidates re-ranked, a multiple of k, as optimize measured it for this index (kept in
        # the catalog beside nprobe's measurement, not in the FAISS file): None, the default.
        self.rerank_factor: int | None = None

    def rerank_depth(self, k: int) -> int:
        return index_rules.rerank_depth(k, self.rerank_factor)

    def adopt_rerank_factor(self, recorded: str | None) -> None:
        """Use the re-ranking factor of optimize's report (`recorded`: its JSON, META_KEY) when it
        describes this very index (same lists and codes); otherwise, or unreadable, the default
        depth: a report left by another build (a crash between saving the file and recording it)
        must not cut the candidates of this one."""
        self.rerank_factor = None
        try:
            report = json.loads(recorded) if recorded else None
            factor = report["rerank_factor"] if report else None
            if factor is not None and report["plan"]["factory"] == self.description:
                self.rerank_factor = max(1, int(factor))
        except (ValueError, TypeError, KeyError):
            pass

    # -- making and reading ---------------------------------------------------------------
    @classmethod
    def trained(cls, factory: str, sample: np.ndarray, niter: int = 10, seed: int = 1234) -> AnnIndex:
        """An empty index of `factory` trained on `sample` (unit vectors).

        The coarse centroids come from `spherical_kmeans` (numpy's BLAS: on these machines about
        2.5x FAISS's own k-means, whose distance step runs at ~10 GFLOPS against numpy's ~26),
        given to the quantizer, so that FAISS's `train` trains only the codes. 10 iterations:
        centroids move little after that, and the time is proportional to them."""
        x = np.ascontiguousarray(sample, dtype=np.float32)
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        ann = cls(index)
        ann.ivf.quantizer.add(spherical_kmeans(x, ann.nlist, niter=niter, seed=seed))
        if isinstance(ann.ivf, faiss.IndexIVFPQ):
            # Each sub-quantizer is 256 centroids in dim/m dimensions: 128 points a centroid
            # (FAISS's default caps at 256) and 10 iterations halve and more than halve the
            # cost, for codes that only choose candidates re-ranked exactly.
            ann.ivf.pq.cp.niter = niter
            ann.ivf.pq.cp.max_points_per_centroid = 128
            ann.ivf.pq.cp.seed = seed
            # Polysemous training reorders the codes for Hamming pre-filtering, which these
            # searches never use; it cost 45 s of a 47 s training of 10k vectors.
            ann.ivf.do_polysemous_training = False
        if isinstance(ann.ivf, faiss.IndexIVFScalarQuantizer):
            # SQ8 of the vectors themselves, not of their residuals: unit vectors have a known
            # range per dimension, 8 bits lose ~1e-3 of cosine either way, and training then
            # needs no assignment of the sample (10 s of a 63 s build at 200k).
            ann.ivf.by_residual = False
        index.train(x)  # the quantizer holds nlist centroids: FAISS trains the encoder alone
        return ann

    @classmethod
    def load(cls, path: Path, dim: int, *, mmap: bool = True) -> AnnIndex | None:
        """The saved index with its stamp, or None when it is missing, unreadable, not an IVF
        index or of another dimension. Mapped (see the module's docstring) where the OS allows,
        else read straight into the index (no second copy of it in memory); FAISS stops before
        the trailer."""
        try:
            with open(path, "rb", buffering=0) as f:  # index and stamp from one open file
                stamp = Stamp.read(f)
                index = map_or_read_index(f, mmap=mmap)
        except (OSError, RuntimeError, ValueError):
            return None
        if index.d != dim:
            return None
        try:
            faiss.extract_index_ivf(index)
        except RuntimeError:
            return None
        return cls(index, stamp)

    # -- what VectorStore needs --------------------------------------------------------------
    @property
    def nlist(self) -> int:
        return self.ivf.nlist

    @property
    def nprobe(self) -> int:
        return self.ivf.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.ivf.nprobe = max(1, min(int(value), self.nlist))

    @property
    def pq_codes(self) -> bool:
        return isinstance(self.ivf, faiss.IndexIVFPQ)

    @property
    def description(self) -> str:
        """The factory string it was built from, e.g. 'IVF4096_HNSW32,PQ128'."""
        codes = "SQ8" if isinstance(self.ivf, faiss.IndexIVFScalarQuantizer) else ""
        if isinstance(self.ivf, faiss.IndexIVFPQ):
            codes = f"PQ{self.ivf.pq.M}"
        graph = self._graph()
        lists = f"IVF{self.nlist}" + (f"_HNSW{graph.hnsw.nb_neighbors(1)}" if graph is not None else "")
        return f"{lists},{codes}" if codes else lists

    def _graph(self) -> faiss.IndexHNSW | None:
        return self._hnsw

    def _flat_quantizer(self) -> faiss.IndexFlat:
        """The centroids as a flat index: the quantizer itself, or the HNSW graph's storage."""
        graph = self._graph()
        return faiss.downcast_index(graph.storage if graph is not None else self.ivf.quantizer)

    @property
    def mapped(self) -> bool:
        """The lists are read-only views of the file (a fresh load), not memory of their own."""
        lists = faiss.downcast_InvertedLists(self.ivf.invlists)
        if not isinstance(lists, faiss.ArrayInvertedLists):
            return False
        # A list that was empty in the file is loaded as memory of its own: ask a non-empty one.
        first = next((i for i in range(self.nlist) if lists.list_size(i)), None)
        return first is not None and not lists.codes.at(first).is_owned

    def _own_lists(self) -> None:
        """Before any change: copy mapped lists into lists of their own (~40 ms at 1M x PQ128),
        each straight to its size. The coarse centroids stay mapped: nothing changes them."""
        if not self.mapped:
            return
        mapped = self.ivf.invlists
        owned = faiss.ArrayInvertedLists(self.nlist, self.ivf.code_size)
        for list_no in range(self.nlist):
            size = mapped.list_size(list_no)
            if size:
                owned.add_entries(list_no, size, mapped.get_ids(list_no), mapped.get_codes(list_no))
        self.ivf.replace_invlists(owned, True)  # the index frees the mapped lists, owns these
        owned.this.disown()

    def ids(self) -> np.ndarray:
        """Every id it holds (list by list)."""
        invlists = self.ivf.invlists
        parts = []
        for list_no in range(self.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (a writer's commit, an opener catching up). The lists are assigned through the
        HNSW graph where there is one, else with numpy's BLAS (`add_bulk`): FAISS's flat
        assignment took 1.66 s for 10k vectors at 100k x IVF2048 where BLAS took 0.31 s; through
        the graph, 0.51 s against 0.36, and at 1M x IVF4096_HNSW32,PQ128 0.73 s against 0.89."""
        if len(ids) == 0:
            return
        if self._graph() is None:
            self.add_bulk(ids, vectors)
            return
        self._own_lists()
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))

    def add_bulk(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """`add` for a build: the lists are assigned with numpy's BLAS (see `trained`), the
        dominant cost of adding (n x nlist x dim)."""
        if len(ids) == 0:
            return
        self._own_lists()
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        lists = np.ascontiguousarray(nearest(vecs, self._centroids()), dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.ivf.add_core(len(ids), faiss.swig_ptr(vecs), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def _centroids(self) -> np.ndarray:
        flat = self._flat_quantizer()
        return faiss.rev_swig_ptr(flat.get_xb(), self.nlist * self.dim).reshape(self.nlist, self.dim)

    def remove(self, ids: np.ndarray) -> int:
        """Remove `ids` (a scan of the lists' ids: ~8 bytes a vector, a few ms at 1M)."""
        if len(ids) == 0:
            return 0
        self._own_lists()
        return int(self.index.remove_ids(_selector(sorted_unique(ids))))

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k (code scores, ids), -1 where fewer were found. Use `search_exact` for
        exact scores."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, int(k))
        if self.ntotal == 0 or (allowed_ids is not None and len(allowed_ids) == 0):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        params = faiss.SearchParametersIVF()
        params.nprobe = lists = max(1, min(int(nprobe or self.nprobe), self.nlist))
        sel = None  # held here: `params.sel` does not keep the Python object (and its bitmap) alive
        if allowed_ids is not None:
            sel = _selector(sorted_unique(allowed_ids))
            params.sel = sel
        graph = self._graph()
        with omp_threads(1 if len(q) <= 4 else None):
            if graph is None:
                return self.index.search(q, k, params=params)
            if lists > index_rules.HNSW_MAX_NPROBE:
                # The graph finds near lists, not every list asked for: these exactly (a search
                # that scans this many lists spends its time in them, not here).
                return self._search_lists(q, k, params, *self._flat_quantizer().search(q, lists))
            graph_params = faiss.SearchParametersHNSW()  # held here, like `sel`
            graph_params.efSearch = index_rules.quantizer_ef(lists)
            params.quantizer_params = graph_params
            return self.index.search(q, k, params=params)

    def _search_lists(
        self, q: np.ndarray, k: int, params: faiss.SearchParametersIVF, scores: np.ndarray, lists: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the given lists (`lists`, with the query's inner product to their centroids,
        `scores`, row by row): FAISS's own call, whose Python wrapper takes no parameters."""
        out_s = np.empty((len(q), k), dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=np.int64)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        self.ivf.search_preassigned_c(
            len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(lists), faiss.swig_ptr(scores),
            faiss.swig_ptr(out_s), faiss.swig_ptr(out_i), False, params,
        )  # fmt: skip
        return out_s, out_i


def nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the highest-inner-product centroid of each row of `x` (in chunks: 4096 x nlist
    scores at a time, 64 MB at nlist 4096)."""
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = np.argmax(x[start : start + chunk] @ centroids.T, axis=1)
    return out


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int = 10, seed: int = 1234) -> np.ndarray:
    """k unit centroids of unit rows `x` (k-means under inner product: assign to the best
    centroid, average, normalise). An emptied centroid restarts at a random point."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=k, replace=False)].copy()
    for _ in range(niter):
        lists = nearest(x, centroids)
        order = np.argsort(lists, kind="stable")
        counts = np.bincount(lists, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        full = counts > 0
        sums = np.add.reduceat(x[order], starts[full], axis=0)
        centroids[full] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        empty = np.flatnonzero(~full)
        if len(empty):
            centroids[empty] = x[rng.choice(len(x), size=len(empty), replace=False)]
    return np.ascontiguousarray(centroids, dtype=np.float32)


VectorIndex = FaissIndex | AnnIndex


def cache_kind(path: Path) -> str | None:
    """'flat' or 'ivf' from the cache file's header alone (for `info`), None without a file."""
    try:
        with open(path, "rb") as f:
            header = f.read(4)
    except OSError:
        return None
    return "flat" if header == _FLAT_HEADER else "ivf"


def load_cache(path: Path, dim: int) -> VectorIndex | None:
    """The cache file as whichever index it holds (flat or IVF), None when unusable."""
    kind = cache_kind(path)
    if kind is None:
        return None
    return FaissIndex.load(path, dim) if kind == "flat" else AnnIndex.load(path, dim)


def sorted_unique(ids: np.ndarray) -> np.ndarray:
    """`ids` as sorted unique int64, without work when they are so already (Catalog.select_ids):
    numpy's hashing `unique` took 28 ms for 100k ids, per call, per query."""
    a = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(a) < 2 or bool(np.all(a[1:] > a[:-1])):
        return a
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))]


def _selector(ids: np.ndarray) -> faiss.IDSelector:
    """Membership of sorted, unique, non-negative `ids`: a bitmap over 0..max id when that is
    small (ids are AUTOINCREMENT row ids, so dense: 1M ids -> 125 KB, built with one numpy call
    where IDSelectorBatch hashes every id, ~20 ms for 500k), else FAISS's hashed batch."""
    top = int(ids[-1]) if len(ids) else 0
    if len(ids) and int(ids[0]) >= 0 and top < 64 * 2**20:
        bits = np.zeros(top + 1, dtype=bool)
        bits[ids] = True
        packed = np.packbits(bits, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))  # its size in bytes
        sel.referenced = packed  # the bitmap must live as long as the selector
        return sel
    sel = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    return sel


# -- exact answers from approximate candidates ---------------------------------------------------
class CandidateFilter:
    """A filter that matches many images: checked on the candidates of an unfiltered search by
    `keep` (Catalog.filter_ids), so that no id list as long as the matches is built. Where its
    matches turn out rarer near the query than `list_below` (a share of the index), listing
    them pays better: `all_ids` (Catalog.select_ids), called once at most."""

    def __init__(
        self,
        keep: Callable[[np.ndarray], np.ndarray],
        all_ids: Callable[[], np.ndarray],
        list_below: float,
    ):
        self.keep = keep  # candidate ids -> those that match (sorted)
        self._all_ids = all_ids
        self._listed: np.ndarray | None = None
        self.list_below = list_below

    def all_ids(self) -> np.ndarray:
        if self._listed is None:
            self._listed = sorted_unique(self._all_ids())
        return self._listed


def search_exact(
    index: AnnIndex,
    vectors_of: VectorsOf,
    queries: np.ndarray,
    k: int,
    allowed_ids: np.ndarray | None = None,
    candidate_filter: CandidateFilter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (exact cosines, ids) for each query row, padded with -1 like FaissIndex.search.

    Candidates come from the IVF codes; the top `rerank_depth(k)` are scored again from the
    stored vectors. With `allowed_ids`, few matches are scored exactly (all of them: the result
    is then exact), more go through the index with an ID selector and an nprobe raised by the
    filter's selectivity (index_rules.filtered_nprobe). With `candidate_filter` (a filter
    matching many images), an unfiltered search's candidates are checked against it
    (`_post_filtered`). A filter never shortens the result: while fewer than k matching vectors
    were reached, more lists are scanned, up to all of them (README: `-k 10` returns 10 hits
    whenever 10 images match).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, index.dim)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    allowed = None if allowed_ids is None else sorted_unique(allowed_ids)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    if index.ntotal == 0 or (allowed is not None and len(allowed) == 0):
        return out_s, out_i
    for row in range(len(q)):
        kept = None
        if candidate_filter is not None and allowed is None:
            kept = _post_filtered(index, q[row], k, candidate_filter)
            if kept is None:  # the candidates kept missing the filter: list its matches
                allowed = candidate_filter.all_ids()
                if len(allowed) == 0:
                    return out_s, out_i
        if kept is None:
            kept = _selected(index, q[row], k, allowed, vectors_of)
        ids, vecs = vectors_of(kept)
        _fill(out_s[row], out_i[row], *_top(_cosines(vecs, q[row]), ids, k))
    return out_s, out_i


def _selected(
    index: AnnIndex, q: np.ndarray, k: int, allowed: np.ndarray | None, vectors_of: VectorsOf
) -> np.ndarray:
    """The ids to score exactly for one query: every allowed id when there are few, else the
    top rerank-depth candidates of a search restricted to `allowed` (None: unfiltered)."""
    if allowed is not None and len(allowed) <= index_rules.exact_filter_limit(index.pq_codes):
        return allowed
    nprobe = index.nprobe
    if allowed is not None:
        nprobe = index_rules.filtered_nprobe(nprobe, index.nlist, len(allowed) / index.ntotal)
    need = min(k, index.ntotal if allowed is None else len(allowed))
    depth = index.rerank_depth(k)
    while True:
        _, cand = index.search(q, depth, allowed, nprobe=nprobe)
        cand = cand[0][cand[0] >= 0]
        if len(cand) >= need or nprobe >= index.nlist:
            return np.unique(cand)
        # The lists scanned held fewer than k (allowed) vectors: scan 4x as many, up to all
        # of them, so that k are returned whenever k exist.
        nprobe = min(index.nlist, nprobe * 4)


def _post_filtered(index: AnnIndex, q: np.ndarray, k: int, matches: CandidateFilter) -> np.ndarray | None:
    """The ids to score exactly for one query under a filter matching many images: the
    top rerank-depth matching candidates of an unfiltered search, or None where listing the
    matches pays better (they are rarer near the query than `matches.list_below`).

    Each pass asks for enough candidates, from enough lists, that about rerank-depth of them
    match if the filter's share `sel` holds near the query (index_rules.post_filter_candidates,
    filtered_nprobe); the candidates checked tell its share there. A pass that kept k matches,
    with an nprobe at least half what the share seen asks for, answers; otherwise the next pass
    assumes the share seen (halving it at least, down to `list_below`).
    """
    depth = index.rerank_depth(k)
    floor = matches.list_below
    sel = max(index_rules.POST_FILTER_PRIOR, floor)
    while True:
        nprobe = index_rules.filtered_nprobe(index.nprobe, index.nlist, sel)
        want = min(index.ntotal, index_rules.post_filter_candidates(depth, sel))
        _, cand = index.search(q, want, nprobe=nprobe)
        cand = cand[0][cand[0] >= 0]
        kept = cand[np.isin(cand, matches.keep(cand))]  # in the codes' order, best first
        seen = len(kept) / len(cand) if len(cand) else 0.0
        everything = nprobe >= index.nlist and want >= index.ntotal
        asks = index_rules.filtered_nprobe(index.nprobe, index.nlist, seen)
        if everything or (len(kept) >= k and 2 * nprobe >= asks):
            return kept[:depth]
        if seen < floor or sel <= floor:
            return None
        sel = max(floor, min(sel / 2, seen))


def _cosines(vecs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact scores, the same for a pair whatever else is scored with it (float32 BLAS may sum
    in another order for another batch shape, and a last-bit difference would reorder ties
    between pages): summed in float64, then rounded."""
    return (vecs.astype(np.float64) @ q.astype(np.float64)).astype(np.float32)


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id), score descending, ties by id."""
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


def _fill(row_s: np.ndarray, row_i: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
    row_s[: len(scores)] = scores
    row_i[: len(ids)] = ids
