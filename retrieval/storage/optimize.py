"""`clipdex optimize`: build the vector index the rules choose (storage.index_rules), measure its
recall@10 against exact search, and record both in the catalog.

An ANN index is built in two streaming passes over the catalog, never holding the flat vectors
(at 1M x 512 they are 2 GB): a random sample trains the coarse quantizer and the codes, then
every vector is added chunk by chunk. Recall is measured on held-out queries of the very
distribution searched: stored vectors drawn at random and kept out of the index while it is
measured (added last). Their exact top-10 is computed on the fly during the adding pass.

Recall after exact re-ranking equals the share of the true top-10 found among the candidates
(re-ranking scores them exactly, so a true neighbour among them ranks where it belongs), which
is what is measured, for each nprobe tried, without reading any vector again; then, at the
nprobe chosen, for each re-ranking depth (the first d candidates of the deepest search: FAISS
returns them best code score first), and the smallest depth that reaches the target is recorded
for searches to use (`rerank_factor`: each candidate is a random read of the catalog).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from retrieval.core.errors import ClipdexError

from . import index_rules
from .ann import META_KEY, AnnIndex, cache_kind
from .catalog import CatalogSnapshot, decode_vectors
from .index_rules import IndexPlan
from .vector_store import VectorStore, stamp_of
from .writer import IndexWriter

RECALL_K = index_rules.RECALL_K
DEFAULT_QUERIES = 256  # held-out queries: recall@10 within ~0.01 (2 s.e.) around 0.95
_CHUNK = 8192


@dataclass(frozen=True)
class OptimizeReport:
    plan: IndexPlan
    nprobe: int | None  # None for exact search
    recall_at_10: float  # 1.0 for exact search
    target_recall: float
    queries: int  # held-out queries the recall was measured on (0: exact)
    seconds: float
    built_at: float
    # Candidates re-ranked per search, as a multiple of k (index_rules.rerank_depth); None:
    # exact search, or recorded before it was measured (the default depth then).
    rerank_factor: int | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["plan"] = self.plan.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> OptimizeReport:
        return cls(**{**raw, "plan": IndexPlan(**raw["plan"])})


def optimize(store: VectorStore, **settings: Any) -> OptimizeReport:
    """Take the writer lock and build the index the rules choose: `optimize_locked`, whose
    keyword settings (and defaults) this takes."""
    with IndexWriter(store) as writer:
        return optimize_locked(writer, **settings)


def optimize_if_needed(writer: IndexWriter, **options: object) -> OptimizeReport | None:
    """After a large import: build the ANN index when the rules want one and the index is still
    flat, or has grown past twice the size its lists were planned for. None when nothing was done."""
    store = writer.store
    model = store.catalog.active_model()
    if model is None:
        return None
    with store.catalog.snapshot() as snap:
        n = snap.count_vectors(model.id)
    exact_below = int(options.get("exact_below", index_rules.EXACT_BELOW))  # type: ignore[call-overload]
    if n < exact_below:
        return None
    last = recorded(store)
    if cache_kind(store.path) == "ivf" and last is not None and n <= 2 * last.plan.vectors:
        return None
    return optimize_locked(writer, **options)  # type: ignore[arg-type]


def recorded(store: VectorStore) -> OptimizeReport | None:
    """What the last optimize recorded (None: never run, or unreadable)."""
    raw = store.catalog.get_meta(META_KEY)
    if not raw:
        return None
    try:
        return OptimizeReport.from_dict(json.loads(raw))
    except (ValueError, TypeError, KeyError):
        return None


def vector_index_facts(store: VectorStore) -> dict:
    """For `info`: the kind of the cache file (from its header: nothing loaded) and what
    optimize measured for it. A flat index is exact: recall 1."""
    kind = cache_kind(store.path)
    if kind is None:
        return {"vector_index": None}
    if kind == "flat":
        return {"vector_index": "Flat", "recall_at_10": 1.0}
    last = recorded(store)
    if last is None or not last.plan.approximate:
        return {"vector_index": "IVF", "rerank_at_10": index_rules.rerank_depth(RECALL_K)}
    return {
        "vector_index": last.plan.factory,
        "nprobe": last.nprobe,
        "recall_at_10": last.recall_at_10,
        "rerank_at_10": index_rules.rerank_depth(RECALL_K, last.rerank_factor),
    }


def optimize_locked(
    writer: IndexWriter,
    *,
    max_memory: int = index_rules.DEFAULT_MAX_MEMORY,
    target_recall: float = index_rules.DEFAULT_TARGET_RECALL,
    exact_below: int = index_rules.EXACT_BELOW,
    queries: int = DEFAULT_QUERIES,
    seed: int = 0,
) -> OptimizeReport:
    """Build, measure, save and record, as `writer` (which holds the lock: nothing commits
    meanwhile, so the index reflects the catalog state it is stamped with)."""
    if not 0.0 < target_recall <= 1.0:
        raise ClipdexError(f"--target-recall must be in (0, 1], not {target_recall}")
    store = writer.store
    catalog = store.catalog
    if catalog.active_model() is None:
        raise ClipdexError(f"index {store.directory} is empty: index a folder first")
    start = time.monotonic()
    dim = store.dim
    with catalog.snapshot() as snap:
        state = snap.state()
        n = snap.count_vectors(state.model_id)
        plan = index_rules.choose_plan(n, dim, max_memory=max_memory, exact_below=exact_below)
        if plan.approximate:
            ann, nprobe, factor, recall, measured = _build_ann(snap, plan, target_recall, queries, seed)
    if plan.approximate:
        ann.nprobe = nprobe
        ann.save(store.path, stamp_of(state))
        ann.stamp = stamp_of(state)
        store.reset()  # the next use loads the new file, current as it is (and this report)
        report = OptimizeReport(plan, nprobe, recall, target_recall, measured, 0.0, time.time(), factor)
    else:
        if cache_kind(store.path) != "flat":  # an ANN index of a library that shrank
            store.rebuild()
            writer.save()
        report = OptimizeReport(plan, None, 1.0, target_recall, 0, 0.0, time.time())
    report = replace(report, seconds=round(time.monotonic() - start, 3))
    catalog.set_meta(META_KEY, json.dumps(report.to_dict(), sort_keys=True))
    return report


def _build_ann(
    snap: CatalogSnapshot, plan: IndexPlan, target: float, queries: int, seed: int
) -> tuple[AnnIndex, int, int, float, int]:
    """(index, nprobe, re-ranking factor, their recall@10, held-out queries it was measured on)."""
    rng = np.random.default_rng(seed)
    ids = snap.ids()
    held = np.sort(rng.choice(ids, size=min(max(2, queries), len(ids) // 10), replace=False))
    rest = np.setdiff1d(ids, held, assume_unique=True)  # held-out queries train nothing
    train_ids = np.sort(rng.choice(rest, size=min(plan.train_size, len(rest)), replace=False))
    del ids, rest  # 8 bytes a vector: not kept through the adding pass
    ann = AnnIndex.trained(plan.factory, snap.embeddings(train_ids.tolist(), plan.dim))
    q = snap.embeddings(held.tolist(), plan.dim)
    truth = _RunningTop(q, RECALL_K)
    for chunk_ids, blobs in snap.iter_embedding_blobs(batch=_CHUNK):
        vecs = decode_vectors(blobs, plan.dim)
        keep = ~np.isin(chunk_ids, held, assume_unique=True)
        ann.add_bulk(chunk_ids[keep], vecs[keep])
        truth.update(chunk_ids[keep], vecs[keep])
    deepest = index_rules.rerank_depth(RECALL_K, index_rules.RERANK_FACTORS[-1])
    searched: dict[int, np.ndarray] = {}  # nprobe -> candidates at the deepest depth

    def recall_at(nprobe: int, depth: int) -> float:
        if nprobe not in searched:
            searched[nprobe] = ann.search(q, deepest, nprobe=nprobe)[1]
        return _recall(searched[nprobe][:, :depth], truth.ids)  # best code score first

    needed = index_rules.recall_to_measure(target, int((truth.ids >= 0).sum()))
    choice = index_rules.pick_search(recall_at, plan.nlist, ann.ntotal / plan.nlist, needed)
    ann.add(held, q)  # the held-out vectors belong in the index too
    return ann, choice.nprobe, choice.rerank_factor, round(choice.recall, 4), len(held)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


class _RunningTop:
    """The exact top-k of each query (as a set: recall needs no order) over vectors seen chunk
    by chunk."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q = queries
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) == 0:
            return
        scores = np.concatenate([self.scores, self.q @ vecs.T], axis=1)
        all_ids = np.concatenate([self.ids, np.broadcast_to(ids, (len(self.q), len(ids)))], axis=1)
        top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]  # the k best, unordered
        self.scores = np.take_along_axis(scores, top, axis=1)
        self.ids = np.take_along_axis(all_ids, top, axis=1)
