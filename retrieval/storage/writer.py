"""IndexWriter: the one process allowed to change an index, while it holds the writer lock.

Each commit is one catalog transaction (rows and their embeddings together), then the same
change in the FAISS index in memory. The catalog is the durable copy: the FAISS file is rewritten
only when openers could not catch up from it cheaply (VectorStore.should_save: far enough behind,
or not a base at all), checked after each commit and on the way out (unless interrupted), and
always after a reindex swap or a rebuild; never on a timer. A bulk load (`defer_saves`: clipdex
import) rewrites it mid-run only when there is no base at all. During a reindex the embeddings go
to a pending model built beside the active one: searches keep using the active model until
`finish_reindex` swaps them in one transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np

from retrieval.core.errors import ClipdexError

from .faiss_index import ReconcileReport, apply_to
from .records import FailureRecord, Move, NewImage
from .vector_store import VectorStore

SignatureMatch = Callable[[dict, dict], bool]  # same model? (two recorded signatures)
# Rows added, removed or re-embedded by one writer past which it refreshes the catalog's
# statistics on the way out (Catalog.refresh_statistics; PostgreSQL only): a run that changed a
# few rows leaves it to autovacuum rather than sampling a million-row table each time.
STATISTICS_AFTER = 1000


class IndexWriter:
    def __init__(
        self, store: VectorStore, save_after_changes: int | None = None, *, defer_saves: bool = False
    ):
        """`save_after_changes`: rewrite the file once it is more than this many changes behind
        (None: the store's rule, VectorStore.should_save; 0: after every commit, for tests that
        need saves to interrupt). `defer_saves`: a bulk load; no rewrite before the writer
        finishes, unless no file is there to catch up from (openers meanwhile catch up on every
        change since the last file, as the change log allows). A growing flat index rewritten
        at each 50k or 10% of growth writes about 7x its final size (13 GB of a million-vector
        import's 24.5 GB), all of it replaced by the ANN index built at the end."""
        self.store = store
        self.catalog = store.catalog
        self.lock = store.catalog.writer_lock()
        self.save_after_changes = save_after_changes
        self.defer_saves = defer_saves
        self._pending: int | None = None  # the model id a reindex embeds into
        self.rows_changed = 0  # by this writer's commits (STATISTICS_AFTER)

    def __enter__(self) -> IndexWriter:
        self.lock.acquire()
        self._remove_orphans()
        return self

    def _remove_orphans(self) -> None:
        """Temporary files of a writer killed before its rename: whole copies of the index.
        Only the lock holder may remove them (a live writer's are its own)."""
        for tmp in self.store.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            # Any way out that is not an error (a second Ctrl-C, an exit, a cancellation) asks to
            # stop now: no file rewrite (seconds for a flat index of a million) nor statistics;
            # openers catch up from the change log instead, until the next writer finishes.
            if exc_type is None or issubclass(exc_type, Exception):
                self._save_if_due(finishing=True)
                if self.rows_changed >= STATISTICS_AFTER:
                    self.catalog.refresh_statistics()
        finally:
            self.lock.release()

    def bind_signature(self, signature: dict) -> None:
        """An empty index records the model it is built with (a filled one keeps its own: the
        caller checks that they match)."""
        if self.catalog.active_model() is None:
            self.catalog.set_model_signature(signature)
            self.store.reset()

    # -- reindex: new embeddings built beside the searchable ones -------------------------------
    def begin_reindex(
        self, signature: dict, same_model: SignatureMatch, carry_over: Sequence[int] = ()
    ) -> None:
        """Embed into a pending model from now on, resuming an interrupted reindex to the same
        model. `carry_over`: images this run will not embed again; when the model does not
        change their embeddings are copied (with another model they cannot be: the caller
        refuses)."""
        active = self.catalog.active_model()
        if active is None:
            self.bind_signature(signature)
            return
        pending = self.catalog.pending_model()
        if pending is not None and same_model(pending.signature, signature):
            target = pending.id
        else:
            target = self.catalog.begin_pending(signature)
        if len(carry_over) and same_model(active.signature, signature):
            done = set(self.catalog.ids(target).tolist())
            self.catalog.copy_embeddings(active.id, target, [i for i in carry_over if i not in done])
        self._pending = target

    @property
    def reindexing(self) -> bool:
        return self._pending is not None

    def reindexed_ids(self) -> set[int]:
        """Images that already have an embedding of the pending model (an interrupted run's)."""
        return set() if self._pending is None else set(self.catalog.ids(self._pending).tolist())

    def finish_reindex(self) -> dict | None:
        """Swap the pending model in if every image has its embedding, and return the signature
        it replaced; None (nothing changed, the next run resumes) while some have none."""
        if self._pending is None:
            raise ClipdexError("no reindex in progress")
        if len(self.catalog.ids_without_vector(self._pending)):
            return None
        old = self.catalog.model_signature()
        self.catalog.promote_pending()
        self._pending = None
        self.store.reset()
        self.save()  # a fresh FAISS file for the new model, built from the catalog
        return old

    # -- commits ----------------------------------------------------------------------------------
    def reconcile(self) -> ReconcileReport:
        """Bring the FAISS file in line with the catalog (after a crash), saving it if needed."""
        report = self.store.load()
        self._save_if_due()
        return report

    def commit(
        self,
        added: Sequence[NewImage] = (),
        moved: Sequence[Move] = (),
        removed: Sequence[int] = (),
        touched: Sequence[Move] = (),
        failed: Sequence[FailureRecord] = (),
        forget_failures: Sequence[str] = (),
        revectored: Sequence[tuple[int, np.ndarray]] = (),
    ) -> list[int]:
        """One transaction in the catalog, then the same change in FAISS (in memory).

        `revectored` ((image id, embedding)) only during a reindex: known images embedded again."""
        if revectored and self._pending is None:
            raise ClipdexError("re-embedded images need a reindex in progress")
        # Load FAISS *before* committing: loading reconciles with the catalog, and would
        # otherwise add the rows of this very commit a second time below.
        faiss = self.store.faiss if self.catalog.active_model() is not None else None
        new_ids = self.catalog.commit_changes(
            added=added,
            moved=moved,
            removed=removed,
            touched=touched,
            failed=failed,
            forget_failures=forget_failures,
            revectored=revectored,
            model_id=self._pending,
        )
        self.rows_changed += len(added) + len(removed) + len(revectored)
        if faiss is not None:
            searchable = bool(added) and self._pending is None  # a reindex embeds for later
            vectors = np.empty((0, faiss.dim), np.float32)
            if searchable:
                vectors = np.stack([a.vector for a in added])
            try:
                report = apply_to(
                    faiss,
                    np.asarray(removed, dtype=np.int64),
                    np.asarray(new_ids if searchable else [], dtype=np.int64),
                    vectors,
                )
                self.store.note_commit(report.added + report.removed)
            except BaseException:
                # The catalog holds the commit, the index in memory may hold part of it, or all
                # of it without knowing (a second Ctrl-C between the two calls): drop the index
                # (the next use catches up from the file and the log), never save it.
                self.store.reset()
                raise
        self._save_if_due()
        return new_ids

    def save(self) -> None:
        """Rewrite the file now (after a rebuild; `verify --repair`)."""
        if self.catalog.active_model() is not None:
            self.store.save()

    def _save_if_due(self, *, finishing: bool = False) -> None:
        store = self.store
        if self.defer_saves and not finishing:
            due = store.needs_saving()
        elif self.save_after_changes is None:
            due = store.should_save(finishing=finishing)
        else:
            due = store.needs_saving() or store.unsaved_changes > self.save_after_changes
        if due:
            self.save()
