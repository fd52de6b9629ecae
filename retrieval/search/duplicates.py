"""Near-duplicate groups: every pair of indexed images whose cosine is above a threshold, joined
into connected components.

FAISS `range_search` on the flat inner-product index finds, for each vector, all vectors
scoring above the threshold (exact, no approximation). The pairs are the edges of a graph; a
union-find turns it into groups, so A~B and B~C put A, B, C in one group even when A and C
score lower (`min_score` says how far apart the loosest two members are).

With an approximate (IVF) index, built by `clipdex optimize` for large libraries, a quadratic
range search is what must be avoided: `ann_pairs` builds a k-nearest-neighbour graph through the
index instead and checks every candidate pair's cosine exactly from the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.storage.ann import AnnIndex
from retrieval.storage.catalog import decode_vectors
from retrieval.storage.vector_store import VectorStore

DEFAULT_THRESHOLD = 0.95
KNN = 16  # neighbours asked per vector when the index is approximate
ANN_SLACK = 0.05  # code scores err by ~0.01-0.03 (PQ): candidates this far below are checked


@dataclass(frozen=True)
class DuplicateGroup:
    ids: tuple[int, ...]  # ascending
    paths: tuple[str, ...]  # in the order of ids
    pairs: tuple[tuple[int, int, float], ...]  # (id_a, id_b, cosine) above the threshold, best first
    min_score: float  # lowest cosine between any two members (chaining can put it below threshold)
    max_score: float  # highest cosine between two members

    def __len__(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict:
        return {
            "size": len(self.ids),
            "min_score": self.min_score,
            "max_score": self.max_score,
            "members": [{"id": i, "path": p} for i, p in zip(self.ids, self.paths)],
            "pairs": [{"a": a, "b": b, "score": s} for a, b, s in self.pairs],
        }


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def similar_pairs(
    ids: np.ndarray, vectors: np.ndarray, index, threshold: float, batch: int = 2048
) -> list[tuple[int, int, float]]:  # type: ignore[no-untyped-def]
    """(id_a, id_b, score) with id_a < id_b for every pair scoring above `threshold`."""
    best: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), batch):
        q = np.ascontiguousarray(vectors[start : start + batch], dtype=np.float32)
        lims, scores, found = index.range_search(q, float(threshold))
        for row in range(len(q)):
            a = int(ids[start + row])
            for pos in range(int(lims[row]), int(lims[row + 1])):
                b = int(found[pos])
                if b == a or b < 0:
                    continue
                key = (a, b) if a < b else (b, a)
                s = float(scores[pos])
                if s > best.get(key, -np.inf):  # the two directions can differ in the last bit
                    best[key] = s
    return [(a, b, s) for (a, b), s in best.items()]


def ann_pairs(
    store: VectorStore, index: AnnIndex, threshold: float, neighbours: int = KNN, batch: int = 4096
) -> list[tuple[int, int, float]]:
    """`similar_pairs` through an ANN index: a k-nearest-neighbour graph instead of a range search
    (IVF codes give no exact radius). Each stored vector, read in id order from the catalog,
    asks the index for its `neighbours` best candidates; those whose code score comes within
    ANN_SLACK of the threshold are scored again exactly from the catalog and kept above it.
    A group larger than `neighbours` stays connected through its members' own lists (union-
    find). Approximate, like the search: a pair both missed by the probed lists and below the
    slack is not found; the recall is the index's (clipdex info)."""
    best: dict[tuple[int, int], float] = {}
    dim = index.dim
    for chunk_ids, blobs in store.catalog.iter_embedding_blobs(batch=batch):
        q = decode_vectors(blobs, dim)
        approx, found = index.search(q, neighbours + 1)
        close = (approx >= threshold - ANN_SLACK) & (found >= 0) & (found != chunk_ids[:, None])
        rows, cols = np.nonzero(close)
        if len(rows) == 0:
            continue
        others, other_vecs = store.stored_vectors(np.unique(found[rows, cols]).tolist())
        where = {int(i): n for n, i in enumerate(others.tolist())}
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = int(chunk_ids[r]), int(found[r, c])
            if b not in where:  # deleted since the index was loaded
                continue
            s = float(np.dot(q[r].astype(np.float64), other_vecs[where[b]].astype(np.float64)))
            key = (a, b) if a < b else (b, a)
            if s > threshold and s > best.get(key, -np.inf):
                best[key] = s
    return [(a, b, s) for (a, b), s in best.items()]


def _rows_of(ids: np.ndarray, vecs: np.ndarray):  # type: ignore[no-untyped-def]
    position = {int(i): n for n, i in enumerate(ids.tolist())}
    return lambda group_ids: vecs[[position[i] for i in group_ids]]


def _catalog_rows(store: VectorStore):  # type: ignore[no-untyped-def]
    """The stored vectors of a group's members (those deleted meanwhile are left out: the group's
    lowest and highest cosine are measured over the members still there)."""
    return lambda group_ids: store.stored_vectors(group_ids)[1]


def find_duplicates(store: VectorStore, threshold: float = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Groups of images whose pairwise cosine exceeds `threshold`, largest group first (then by
    best score, then by smallest id)."""
    if not -1.0 <= threshold <= 1.0:
        raise ClipdexError(f"threshold must be a cosine between -1 and 1, not {threshold}")
    if store.catalog.active_model() is None:
        return []
    faiss = store.faiss
    ids = faiss.ids()
    if len(ids) < 2:
        return []
    if isinstance(faiss, AnnIndex):
        pairs = ann_pairs(store, faiss, threshold)
        vectors_of = _catalog_rows(store)
    else:
        vecs = faiss.reconstruct_all()
        pairs = similar_pairs(ids, vecs, faiss.index, threshold)
        vectors_of = _rows_of(ids, vecs)
    if not pairs:
        return []
    position = {int(i): n for n, i in enumerate(ids.tolist())}
    uf = _UnionFind(len(ids))
    for a, b, _ in pairs:
        uf.union(position[a], position[b])
    members: dict[int, list[int]] = {}
    edges: dict[int, list[tuple[int, int, float]]] = {}
    for a, b, s in pairs:
        root = uf.find(position[a])
        edges.setdefault(root, []).append((a, b, s))
    for root in edges:
        members[root] = []
    for n, i in enumerate(ids.tolist()):
        root = uf.find(n)
        if root in members:
            members[root].append(int(i))
    records = store.catalog.records([i for group in members.values() for i in group])
    groups = []
    for root, group_ids in members.items():
        group_ids.sort()
        rows = vectors_of(group_ids).astype(np.float64)
        lo, hi = _min_max_pairwise(rows)
        group_edges = sorted(edges[root], key=lambda e: (-e[2], e[0], e[1]))
        groups.append(
            DuplicateGroup(
                ids=tuple(group_ids),
                paths=tuple(records[i].path if i in records else "" for i in group_ids),
                pairs=tuple(group_edges),
                min_score=lo,
                max_score=hi,
            )
        )
    groups.sort(key=lambda g: (-len(g.ids), -g.max_score, g.ids[0]))
    return groups


def _min_max_pairwise(rows: np.ndarray, batch: int = 1024) -> tuple[float, float]:
    """Lowest and highest cosine over the distinct pairs of `rows` (unit vectors), in blocks."""
    lo, hi = np.inf, -np.inf
    n = len(rows)
    for start in range(0, n, batch):
        block = rows[start : start + batch] @ rows.T
        for r in range(block.shape[0]):
            others = block[r, start + r + 1 :]
            if others.size:
                lo = min(lo, float(others.min()))
                hi = max(hi, float(others.max()))
    return lo, hi
