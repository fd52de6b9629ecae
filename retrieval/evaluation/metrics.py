"""Retrieval and zero-shot figures from unit embeddings: pure numpy, vectorised.

One definition of rank serves every figure: a query's rank is 1 + the number of irrelevant
candidates scoring at least as high as its best relevant one (ties count against the model, so a
collapsed model that gives every candidate the same score ranks last, not first). Recall@K is the
share of queries with rank <= K; zero-shot top-K accuracy is the same with the class texts as
candidates. Chance figures are those of a random ranking: with r relevant among N candidates the
first relevant one is beyond K with probability C(N-r, K) / C(N, K).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_KS = (1, 5, 10)
ZERO_SHOT_KS = (1, 5)
_BLOCK = 1024  # query rows scored at once: 1024 x 100k candidates is 400 MB of float32


@dataclass(frozen=True)
class RankFigures:
    """Recall@K (or top-K accuracy), median and mean rank of one direction, and chance."""

    queries: int
    candidates: int
    recall: dict[int, float]
    median_rank: float
    mean_rank: float
    chance_recall: dict[int, float]
    chance_median_rank: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recall"] = {str(k): v for k, v in self.recall.items()}
        d["chance_recall"] = {str(k): v for k, v in self.chance_recall.items()}
        return d


def first_relevant_ranks(
    queries: np.ndarray, candidates: np.ndarray, relevant_of: Sequence[np.ndarray] | np.ndarray
) -> np.ndarray:
    """Rank of the best relevant candidate for each query (cosine = dot product of unit rows).

    `relevant_of`: per query, the indices of its relevant candidates; a 1-d int array means one
    relevant candidate per query."""
    q = np.asarray(queries, np.float32)
    c = np.asarray(candidates, np.float32)
    ranks = np.empty(len(q), np.int64)
    single = isinstance(relevant_of, np.ndarray) and relevant_of.ndim == 1
    for start in range(0, len(q), _BLOCK):
        stop = min(start + _BLOCK, len(q))
        scores = q[start:stop] @ c.T
        rows = np.arange(stop - start)
        if single:
            cols = np.asarray(relevant_of[start:stop], np.int64)
            best = scores[rows, cols]
            relevant = np.zeros(scores.shape, bool)
            relevant[rows, cols] = True
        else:
            relevant = np.zeros(scores.shape, bool)
            for r, idx in enumerate(relevant_of[start:stop]):
                relevant[r, np.asarray(idx, np.int64)] = True
            best = np.where(relevant, scores, -np.inf).max(axis=1)
        ranks[start:stop] = 1 + ((scores >= best[:, None]) & ~relevant).sum(axis=1)
    return ranks


def rank_figures(
    ranks: np.ndarray, candidates: int, relevant_counts: np.ndarray, ks: Sequence[int]
) -> RankFigures:
    """Figures from ranks; `relevant_counts[q]`: how many candidates are relevant to query q."""
    ranks = np.asarray(ranks)
    counts = np.asarray(relevant_counts, np.int64)
    return RankFigures(
        queries=int(len(ranks)),
        candidates=int(candidates),
        recall={k: float(np.mean(ranks <= k)) for k in ks},
        median_rank=float(np.median(ranks)),
        mean_rank=float(np.mean(ranks)),
        chance_recall={k: float(np.mean(_chance_hit(candidates, counts, k))) for k in ks},
        chance_median_rank=float(np.median(_chance_median(candidates, counts))),
    )


def text_to_image(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> RankFigures:
    """Each caption ranks all images; its own image is the relevant one."""
    owner = np.asarray(caption_image, np.int64)
    ranks = first_relevant_ranks(text_vectors, image_vectors, owner)
    return rank_figures(ranks, len(image_vectors), np.ones(len(owner), np.int64), ks)


def image_to_text(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> RankFigures:
    """Each image ranks all captions; any of its own captions is relevant (the best one counts)."""
    owner = np.asarray(caption_image, np.int64)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(image_vectors) + 1))
    relevant = [order[bounds[i] : bounds[i + 1]] for i in range(len(image_vectors))]
    counts = np.diff(bounds)
    if np.any(counts == 0):
        keep = np.flatnonzero(counts)  # an image without a caption has nothing to find
        image_vectors, relevant, counts = image_vectors[keep], [relevant[i] for i in keep], counts[keep]
    ranks = first_relevant_ranks(image_vectors, text_vectors, relevant)
    return rank_figures(ranks, len(text_vectors), counts, ks)


def zero_shot(
    image_vectors: np.ndarray,
    class_vectors: np.ndarray,
    image_class: np.ndarray,
    ks: Sequence[int] = ZERO_SHOT_KS,
) -> RankFigures:
    """Each image ranks the class texts; top-K accuracy is recall@K with its own class relevant."""
    labels = np.asarray(image_class, np.int64)
    ranks = first_relevant_ranks(image_vectors, class_vectors, labels)
    return rank_figures(ranks, len(class_vectors), np.ones(len(labels), np.int64), ks)


def _chance_hit(n: int, relevant: np.ndarray, k: int) -> np.ndarray:
    """P(a relevant candidate in the top k) of a uniformly random ranking, per query."""
    out = np.empty(len(relevant), np.float64)
    for r in np.unique(relevant):
        out[relevant == r] = 1.0 - _p_none_in_top(n, int(r), min(k, n))
    return out


def _p_none_in_top(n: int, r: int, k: int) -> float:
    """C(n-r, k) / C(n, k) as a product, without huge integers."""
    if k > n - r:
        return 0.0
    i = np.arange(k, dtype=np.float64)
    return float(np.prod((n - r - i) / (n - i)))


def _chance_median(n: int, relevant: np.ndarray) -> np.ndarray:
    """The median rank of the first relevant candidate under a random ranking, per query."""
    out = np.empty(len(relevant), np.float64)
    for r in np.unique(relevant):
        r = int(r)
        if r == 1:
            out[relevant == r] = (n + 1) / 2.0  # uniform on 1..n
            continue
        # P(first > k) = C(n-r, k)/C(n, k); the median is the first k where it falls to 1/2 or below.
        k = np.arange(0, n - r + 1, dtype=np.float64)
        survive = (
            np.concatenate([[1.0], np.cumprod((n - r - k[:-1]) / (n - k[:-1]))]) if len(k) > 1 else [1.0]
        )
        below = np.flatnonzero(np.asarray(survive) <= 0.5)
        out[relevant == r] = float(below[0]) if len(below) else float(n - r + 1)
    return out
