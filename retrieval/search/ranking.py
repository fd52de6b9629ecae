"""Ranked hits from a query vector: the vector store's top-k (exact cosines, whether the index is
flat or approximate), checked against the catalog, cut and paged."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.core.hits import Hit
from retrieval.storage.ann import CandidateFilter
from retrieval.storage.records import ImageRecord
from retrieval.storage.vector_store import VectorStore


def top_hits(
    store: VectorStore,
    vector: np.ndarray,
    k: int = 10,
    *,
    allowed_ids: np.ndarray | None = None,
    exclude_ids: Sequence[int] = (),
    exclude_digests: Collection[str] = (),
    candidate_filter: CandidateFilter | None = None,
) -> list[Hit]:
    """Top-k images by cosine similarity to `vector` (normalised here), ties broken by id;
    restricted to `allowed_ids`, or to the matches of `candidate_filter` (VectorStore.filter_plan).
    Left out: `exclude_ids`, and the files whose recorded sha256 is one of `exclude_digests`
    (checked on the rows ranked, whatever their vectors: no index of the digests needed)."""
    if k <= 0:
        return []
    dim = store.dim
    q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    if q.shape[1] != dim:
        raise ClipdexError(f"query vector has dimension {q.shape[1]}, the index {dim}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise ClipdexError("query vector is zero or not finite")
    q = q / norm
    ntotal = store.faiss.ntotal
    excluded = set(exclude_ids)
    digests = frozenset(exclude_digests)
    want = k + len(excluded)
    while True:
        # Exact cosines in both modes: an ANN index's candidates are re-scored from the catalog.
        scores, ids = store.search(q, want, allowed_ids, candidate_filter=candidate_filter)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in excluded]
        records = store.catalog.records([i for _, i in pairs])
        # Never trust a FAISS id without its catalog row (deleted since this reader loaded).
        kept = [(s, i) for s, i in pairs if i in records and records[i].content_hash not in digests]
        exhausted = len(ids[0]) < want or ids[0][-1] < 0 or want >= ntotal
        if len(kept) >= k or exhausted:
            break
        want *= 2
    kept.sort(key=lambda p: (-p[0], p[1]))  # deterministic results (and paging)
    return [hit(rank, score, records[i]) for rank, (score, i) in enumerate(kept[:k], start=1)]


def hit(rank: int, score: float, record: ImageRecord) -> Hit:
    return Hit(
        rank=rank, score=score, path=record.path, id=record.id, width=record.width, height=record.height
    )


@dataclass(frozen=True)
class Cutoffs:
    """Which part of the ranked list to return.

    `min_score`: drop hits below this cosine. `within`: keep hits within this margin of the best
    score (of the whole list, not of the page). `offset`: skip that many hits (paging).
    """

    min_score: float | None = None
    within: float | None = None
    offset: int = 0
    exclude_ids: tuple[int, ...] = field(default_factory=tuple)
    exclude_digests: tuple[str, ...] = field(default_factory=tuple)  # sha256 of files to leave out

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ClipdexError("offset must be 0 or more")
        if self.within is not None and self.within < 0:
            raise ClipdexError("--within must be 0 or more")


def search_page(
    store: VectorStore,
    vector: np.ndarray,
    k: int,
    *,
    allowed_ids: np.ndarray | None = None,
    candidate_filter: CandidateFilter | None = None,
    cutoffs: Cutoffs = Cutoffs(),
) -> list[Hit]:
    """Hits offset+1 .. offset+k of the full ranking (score descending, ties by id), after the
    score cut-offs. Pages concatenate to the unpaged list: the tie group at the page's end is
    always fetched whole, so FAISS never picks among equal scores for us."""
    if k <= 0:
        return []
    if allowed_ids is not None and len(allowed_ids) == 0:
        return []
    end = cutoffs.offset + k
    want = end + 1
    while True:
        hits = top_hits(
            store,
            vector,
            want,
            allowed_ids=allowed_ids,
            exclude_ids=cutoffs.exclude_ids,
            exclude_digests=cutoffs.exclude_digests,
            candidate_filter=candidate_filter,
        )
        if len(hits) < want or hits[-1].score < hits[end - 1].score:
            break
        want *= 2
    if not hits:
        return []
    best = hits[0].score
    if cutoffs.min_score is not None:
        hits = [h for h in hits if h.score >= cutoffs.min_score]
    if cutoffs.within is not None:
        hits = [h for h in hits if h.score >= best - cutoffs.within]
    return hits[cutoffs.offset : end]
