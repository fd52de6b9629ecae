"""VectorStore: the FAISS index of the catalog's active model, kept in line with the catalog.

The catalog holds every embedding durably; the FAISS file beside it is a cache, stamped with the
catalog identity, model and commit it reflects (storage.faiss_index.Stamp). Opening trusts the
file as far as its stamp allows: a file of the catalog's last commit is used as it is, without
reading a single id; one of an earlier commit of the same catalog is brought up to date by the
ids that differ (ids are never reused within one catalog's history); any other file (another
catalog, a restored backup, clipdex 0.1) is never used, and the index is rebuilt from the catalog.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.core.errors import ClipdexError

from .catalog import Catalog, CatalogState
from .faiss_index import FAISS_FILE, FaissIndex, ReconcileReport, Stamp, reconcile


def stamp_is_current(stamp: Stamp | None, state: CatalogState) -> bool:
    """The file reflects exactly the catalog's last commit."""
    return stamp is not None and stamp == stamp_of(state)


def stamp_is_ancestor(stamp: Stamp | None, state: CatalogState, catalog: Catalog) -> bool:
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


class VectorStore:
    """The searchable embeddings of one index directory: its catalog and its FAISS cache."""

    def __init__(self, directory: Path, catalog: Catalog):
        self.directory = directory
        self.catalog = catalog
        self._faiss: FaissIndex | None = None
        self._state: CatalogState | None = None  # the catalog state `_faiss` reflects

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
        """(Re)load from the file as far as its stamp allows, else rebuild from the catalog."""
        state = self.catalog.state()
        dim = self.dim
        saved = FaissIndex.load(self.path, dim)
        if saved is not None and stamp_is_current(saved.stamp, state):
            self._faiss, self._state = saved, state
            return ReconcileReport(0, 0)
        if saved is None or not stamp_is_ancestor(saved.stamp, state, self.catalog):
            saved = FaissIndex.empty(dim)
        report = self._reconcile(saved)
        self._faiss, self._state = saved, state
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
        self._reconcile(self._faiss)
        self._state = state
        return False

    def rebuild(self) -> FaissIndex:
        """A new FAISS index from the catalog's embeddings alone (the file is not read)."""
        self._faiss, self._state = FaissIndex.empty(self.dim), self.catalog.state()
        self._reconcile(self._faiss)
        return self._faiss

    def reset(self) -> None:
        """Forget the FAISS index in memory; the next use loads it again."""
        self._faiss = self._state = None

    def needs_saving(self) -> bool:
        """The file on disk is not a trusted copy of what is in memory."""
        return self._faiss is not None and self._faiss.stamp is None

    def save(self) -> None:
        """Save, stamped with the catalog's current state. Only the writer calls this: it applied
        every commit since it took the lock, so its FAISS index reflects that state."""
        state = self.catalog.state()
        faiss = self.faiss
        stamp = stamp_of(state)
        faiss.save(self.path, stamp)
        faiss.stamp = stamp
        self._state = state

    def _reconcile(self, faiss: FaissIndex) -> ReconcileReport:
        dim = faiss.dim
        for _attempt in range(3):
            try:
                report = reconcile(faiss, self.catalog.ids(), lambda ids: self.catalog.embeddings(ids, dim))
            except KeyError:  # a row was deleted between reading ids and embeddings: read again
                continue
            if report.changed:
                faiss.stamp = None  # no longer what the file holds
            return report
        raise ClipdexError(f"index {self.directory} keeps changing under this reader; try again")
