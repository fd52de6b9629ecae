"""VectorStore: the FAISS index of the catalog's active model, kept in line with the catalog.

The catalog holds every embedding durably; the FAISS file beside it is a cache, stamped with the
catalog identity, model and commit it reflects (storage.faiss_index.Stamp). Opening trusts the
file as far as its stamp allows: a file of the catalog's last commit is used as it is, without
reading a single id; one of an earlier commit of the same catalog catches up with what changed
since (CatalogSnapshot.change_stream: the rows written and the removals logged after its
generation, read through an index, never all ids, the vectors a batch at a time); a file
older than the change log (written before the schema-3 upgrade, or before the log was trimmed)
is brought up to date by the ids that differ; any other file (another catalog, a restored
backup, clipdex 0.1) is never used, and the index is rebuilt from the catalog, streamed in id
order into a buffer of its final size.

The file is rewritten only when catching up from it would cost more than a small fraction of a
rewrite (`should_save`), or once at the end of a bulk load (IndexWriter's `defer_saves`): the
catalog, not the file, is the durable copy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.core.filters import Filters

from . import index_rules
from .ann import META_KEY, AnnIndex, CandidateFilter, load_cache, search_exact
from .catalog import Catalog, CatalogSnapshot, CatalogState, ChangeStream, decode_vectors
from .faiss_index import FAISS_FILE, FaissIndex, ReconcileReport, Stamp, apply_batches_to, reconcile

# Rewrite the cache file once it is far enough behind the catalog (vectors removed + added since
# its stamp) that openers, who catch up by reading each change from SQLite (~10 us a vector
# against ~3 us to load it from the file, bench/storage_scale.py), would pay more than a small
# fraction of a full load:
# - SAVE_FRACTION of the file: an open then costs at most ~1.3x a plain load, and a writer
#   rewrites the file at most once per 10% of it changed (adding 10k images to a million-image
#   index rewrites nothing: 20 MB into the catalog instead of 2 GB of FAISS file).
# - SAVE_MIN_CHANGES, while a run is still committing: a long first run (a million images) would
#   otherwise rewrite the file at every 10% of growth from its first batch on; 50k changes are
#   ~0.5 s of catch-up for a reader opening mid-run, and bound the rewrites to one per 50k
#   (clipdex import defers them all to its end: its readers catch up on more).
#   When the writer finishes, the fraction alone decides: a small library ends each run with a
#   file an opener loads as it is.
SAVE_FRACTION = 0.10
SAVE_MIN_CHANGES = 50_000


def save_threshold(ntotal: int, *, finishing: bool = False) -> int:
    """Changes beyond the file's stamp past which the writer rewrites the file."""
    fraction = int(SAVE_FRACTION * ntotal)
    return fraction if finishing else max(SAVE_MIN_CHANGES, fraction)


def stamp_is_current(stamp: Stamp | None, state: CatalogState) -> bool:
    """The file reflects exactly the catalog's last commit."""
    return stamp is not None and stamp == stamp_of(state)


def stamp_is_ancestor(stamp: Stamp | None, state: CatalogState, catalog: Catalog | CatalogSnapshot) -> bool:
    """The file reflects an earlier commit of this very catalog and model."""
    return (
        stamp is not None
        and (stamp.index_id, stamp.model_id) == (state.index_id, state.model_id)
        and stamp.generation <= state.generation
        and catalog.has_commit(stamp.generation, stamp.nonce)
    )


def stamp_of(state: CatalogState) -> Stamp | None:
    if state.model_id is None:
        return None
    return Stamp(state.index_id, state.model_id, state.generation, state.nonce)


def apply_changes(faiss: FaissIndex, changes: ChangeStream) -> ReconcileReport:
    """Removals first: an id removed and written again after the stamp ends up with its new
    vector. The stream is closed on the way out, read to its end or not (its cursor with it)."""
    with contextlib.closing(changes.batches):
        return apply_batches_to(faiss, changes.removed, changes.added_count, changes.batches)


@dataclass(frozen=True)
class FilterPlan:
    """Which images a filtered search may return: the sorted ids of every match, or a check of
    candidate ids (ann.CandidateFilter) for a filter matching many images. Neither: unfiltered."""

    allowed_ids: np.ndarray | None = None
    candidate_filter: CandidateFilter | None = None

    @property
    def lists_matches(self) -> bool:
        return self.allowed_ids is not None


class VectorStore:
    """The searchable embeddings of one index directory: its catalog and its FAISS cache."""

    def __init__(self, directory: Path, catalog: Catalog):
        self.directory = directory
        self.catalog = catalog
        self._faiss: FaissIndex | None = None
        self._state: CatalogState | None = None  # the catalog state `_faiss` reflects
        # The file on disk, as the base of what is in memory: its generation when an opener can
        # catch up from it through the change log, else None (missing, foreign, or older than
        # the log: the writer must rewrite it); and how many changes lie between the two.
        self._file_generation: int | None = None
        self._unsaved = 0

    @property
    def path(self) -> Path:
        return self.directory / FAISS_FILE

    @property
    def dim(self) -> int:
        if self._faiss is not None:  # the loaded index knows (a search need not read the catalog)
            return self._faiss.dim
        signature = self.catalog.model_signature()
        if signature is None:
            raise ClipdexError(f"index {self.directory} is empty: index a folder first")
        return int(signature["dim"])

    @property
    def faiss(self) -> FaissIndex:
        """The FAISS index, loaded (and brought in line with the catalog) on first use."""
        if self._faiss is None:
            self.load()
        assert self._faiss is not None
        return self._faiss

    def load(self) -> ReconcileReport:
        """(Re)load from the file as far as its stamp allows, else rebuild from the catalog.
        The catalog is read in one snapshot, so the index reflects exactly the state recorded."""
        dim = self.dim
        saved = load_cache(self.path, dim)  # flat, or the ANN index `clipdex optimize` built
        with self.catalog.snapshot() as snap:
            state = snap.state()
            if saved is None or not (
                stamp_is_current(saved.stamp, state) or stamp_is_ancestor(saved.stamp, state, snap)
            ):
                return self._rebuilt(snap, state, dim)
            assert saved.stamp is not None
            base = saved.stamp.generation
            if base == state.generation:
                self._use(saved, state, file_generation=base, unsaved=0)
                return ReconcileReport(0, 0)
            changes = self._changes(snap, base, state, dim)
            if changes is None:  # the file is older than the change log: diff all ids, once
                report = self._reconcile(saved, snap)
                self._use(saved, state, file_generation=None, unsaved=report.added + report.removed)
                return report
            report = apply_changes(saved, changes)
            self._use(saved, state, file_generation=base, unsaved=changes.count)
            return report

    def refresh(self) -> bool:
        """See what a writer committed since: True when the active model changed (a reindex was
        swapped in), so that whoever holds a model for this index must drop it."""
        if self._faiss is None:
            return False
        state = self.catalog.state()
        if state == self._state:
            return False
        assert self._state is not None
        if state.model_id != self._state.model_id:
            self.reset()
            return True
        try:
            with self.catalog.snapshot() as snap:
                state = snap.state()
                if state.model_id != self._state.model_id:  # swapped in meanwhile
                    self.reset()
                    return True
                changes = self._changes(snap, self._state.generation, state, self._faiss.dim)
                if changes is None:
                    report = self._reconcile(self._faiss, snap)
                    self._unsaved += report.added + report.removed
                else:
                    apply_changes(self._faiss, changes)
                    self._unsaved += changes.count
        except BaseException:
            # The index in use may hold part or all of the changes (batches go in as they are
            # read; the snapshot's end may fail after them) while `_state` is still the old one:
            # a retry would add them twice. Dropped: the next use loads it afresh.
            self.reset()
            raise
        self._state = state
        return False

    def rebuild(self) -> FaissIndex:
        """A new FAISS index from the catalog's embeddings alone (the file is not read)."""
        with self.catalog.snapshot() as snap:
            self._rebuilt(snap, snap.state(), self.dim)
        assert self._faiss is not None
        return self._faiss

    def reset(self) -> None:
        """Forget the FAISS index in memory; the next use loads it again."""
        self._faiss = self._state = None
        self._file_generation, self._unsaved = None, 0

    def needs_saving(self) -> bool:
        """The file on disk is no base an opener can catch up from (missing, rebuilt, foreign,
        or older than the change log)."""
        return self._faiss is not None and self._file_generation is None

    @property
    def unsaved_changes(self) -> int:
        """Vectors added or removed in memory since the file's stamp: what an opener catches up."""
        return self._unsaved

    def should_save(self, *, finishing: bool = False) -> bool:
        """Rewriting the file pays: openers could not catch up from it, or would read more
        changes than a small fraction of a rewrite (save_threshold; `finishing`: the writer is
        done)."""
        if self._faiss is None:
            return False
        return self.needs_saving() or self._unsaved > save_threshold(self._faiss.ntotal, finishing=finishing)

    def note_commit(self, changes: int) -> None:
        """The writer applied its own commit to the index in memory: it now reflects the
        catalog's last commit (the writer holds the lock: no other commit came between)."""
        if self._faiss is not None:
            self._state = self.catalog.state()
            self._unsaved += changes

    def save(self) -> None:
        """Save, stamped with the catalog state the index in memory reflects (`_state`: the writer
        moves it with each commit it applies, note_commit), never merely the catalog's latest: an
        index that missed a commit must not be stamped as holding it. The removals logged up to
        the replaced file's stamp are then of no use to any cache file: trimmed."""
        faiss = self.faiss  # loads (and sets `_state`) if needed
        state = self._state
        assert state is not None
        stamp = stamp_of(state)
        faiss.save(self.path, stamp)
        faiss.stamp = stamp
        replaced = self._file_generation
        self._state, self._file_generation, self._unsaved = state, state.generation, 0
        if replaced is not None:
            self.catalog.trim_changes(replaced)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed_ids: np.ndarray | None = None,
        *,
        candidate_filter: CandidateFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (exact cosines, ids) per query row, -1 where fewer exist: the flat index answers
        exactly; an ANN index's candidates are scored again from the catalog (storage.ann).
        `candidate_filter` (from `filter_plan`) restricts the search like `allowed_ids` without
        listing the matches."""
        index = self.faiss
        if isinstance(index, AnnIndex):
            vectors_of = lambda ids: self.stored_vectors(ids.tolist())  # noqa: E731
            return search_exact(index, vectors_of, queries, k, allowed_ids, candidate_filter)
        if candidate_filter is not None and allowed_ids is None:
            allowed_ids = candidate_filter.all_ids()  # exact search: the filter runs inside FAISS
        return index.search(queries, k, allowed_ids)

    def filter_plan(self, filters: Filters) -> FilterPlan:
        """How a search applies `filters`, by their selectivity. An exact (flat) index, or an
        ANN index and few matches (counted up to index_rules.list_matches_below), list the
        matching ids (Catalog.select_ids); more matches are checked on the ANN search's
        candidates (Catalog.filter_ids), so that no id list as long as the matches is built (a
        50% filter at 1M: 500k ids, 0.44 s), and listed only where the candidates show them
        rarer near the query than that (storage.ann._post_filtered). The filter is exact."""
        index = self.faiss
        if not isinstance(index, AnnIndex):
            return FilterPlan(allowed_ids=self.catalog.select_ids(filters))
        limit = index_rules.list_matches_below(index.ntotal)
        if self.catalog.count_matches(filters, limit) < limit:
            return FilterPlan(allowed_ids=self.catalog.select_ids(filters))
        catalog = self.catalog
        return FilterPlan(
            candidate_filter=CandidateFilter(
                keep=lambda ids: catalog.filter_ids(ids, filters),
                all_ids=lambda: catalog.select_ids(filters),
                list_below=index_rules.list_share_below(index.ntotal),
            )
        )

    def stored_vectors(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of `ids` stored for the model this index holds (ids deleted
        since it loaded are left out): the exact vectors behind an ANN index's codes."""
        index = self.faiss
        assert self._state is not None and self._state.model_id is not None
        return self.catalog.stored_vectors(ids, index.dim, self._state.model_id)

    def exact_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids, their exact vectors) of everything searchable: from the flat index, or
        for an ANN index (codes only) from the catalog."""
        index = self.faiss
        ids = index.ids()
        if isinstance(index, AnnIndex):
            return self.stored_vectors(np.sort(ids).tolist())
        order = np.argsort(ids, kind="stable")
        return ids[order], index.reconstruct_all()[order]

    # -- internals --------------------------------------------------------------------------
    def _use(
        self, faiss: FaissIndex, state: CatalogState, *, file_generation: int | None, unsaved: int
    ) -> None:
        if isinstance(faiss, AnnIndex):  # how deep to re-rank: what optimize measured for it
            faiss.adopt_rerank_factor(self.catalog.get_meta(META_KEY))
        self._faiss, self._state = faiss, state
        self._file_generation, self._unsaved = file_generation, unsaved

    def _changes(
        self, snap: CatalogSnapshot, since: int, state: CatalogState, dim: int
    ) -> ChangeStream | None:
        assert state.model_id is not None
        return snap.change_stream(since, state.model_id, dim)

    def _rebuilt(self, snap: CatalogSnapshot, state: CatalogState, dim: int) -> ReconcileReport:
        """Stream every vector of the snapshot into a flat index of its final size."""
        count = snap.count_vectors(state.model_id) if state.model_id is not None else 0
        batches = (
            (ids, decode_vectors(blobs, dim))
            for ids, blobs in snap.iter_embedding_blobs(batch=8192, model_id=state.model_id)
        )
        faiss = FaissIndex.from_batches(dim, count, batches) if count else FaissIndex.empty(dim)
        self._use(faiss, state, file_generation=None, unsaved=count)
        return ReconcileReport(added=count, removed=0)

    def _reconcile(self, faiss: FaissIndex, snap: CatalogSnapshot) -> ReconcileReport:
        """The full id diff (reads every id): only for a base older than the change log."""
        dim = faiss.dim
        report = reconcile(faiss, snap.ids(), lambda ids: snap.embeddings(ids, dim))
        if report.changed:
            faiss.stamp = None  # no longer what the file holds
        return report
