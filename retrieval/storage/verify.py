"""`verify`: check the index's invariants; `repair`: restore them from what is durable.

The catalog (rows and their vectors, committed together) is the truth; the FAISS file is a
cache of it, usually some commits behind by design (the writer rewrites it only when that pays):
what is checked is the file caught up through the catalog's change log, exactly what an opener
searches. Repair therefore rebuilds FAISS from the catalog, and drops only rows whose stored
vector is malformed, so that the next `clipdex index` embeds those few files again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from retrieval.core.locations import is_url

from .ann import AnnIndex, load_cache
from .catalog import NORM_TOLERANCE
from .faiss_index import FAISS_FILE, reconcile
from .vector_store import VectorStore, apply_changes, stamp_is_ancestor, stamp_is_current
from .writer import IndexWriter


@dataclass
class VerifyReport:
    images: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_index(store: VectorStore, *, repair: bool = False, check_files: bool = True) -> VerifyReport:
    report = VerifyReport()
    catalog = store.catalog
    if catalog.active_model() is None:
        if catalog.count():
            report.problems.append("images are indexed but the model record is missing")
        return report
    dim = store.dim
    with catalog.snapshot() as snap:  # the vectors, the state and the log as of one commit
        return _verify(store, snap, report, dim, repair=repair, check_files=check_files)


def _verify(  # type: ignore[no-untyped-def]
    store: VectorStore, snap, report: VerifyReport, dim: int, *, repair: bool, check_files: bool
) -> VerifyReport:
    catalog = store.catalog
    bad_ids: list[int] = []
    good_ids: list[np.ndarray] = []
    good_vecs: list[np.ndarray] = []
    for ids, blobs in snap.iter_embedding_blobs():
        for row_id, blob in zip(ids.tolist(), blobs):
            vec = np.frombuffer(blob, dtype=np.float32) if len(blob) == dim * 4 else None
            if (
                vec is None
                or not np.all(np.isfinite(vec))
                or abs(float(np.linalg.norm(vec)) - 1.0) > NORM_TOLERANCE
            ):
                bad_ids.append(row_id)
            else:
                good_ids.append(np.int64(row_id))
                good_vecs.append(vec)
    report.images = len(good_ids) + len(bad_ids)
    if bad_ids:
        report.problems.append(
            f"{len(bad_ids)} catalog rows hold a malformed vector (wrong size, not finite or not unit-norm)"
        )

    # Rows with no vector of the active model (not even a pending one being built) can never
    # be found: repair drops them so that the next index run embeds those files again.
    pending = catalog.pending_model()
    unsearchable = np.setdiff1d(
        catalog.ids_without_vector(catalog.active_model().id),  # type: ignore[union-attr]
        catalog.ids(pending.id) if pending is not None else np.empty(0, np.int64),
    ).tolist()
    if unsearchable:
        report.problems.append(f"{len(unsearchable)} catalog rows have no vector")
        report.images += len(unsearchable)

    catalog_ids = np.asarray(good_ids, dtype=np.int64)
    stored = load_cache(store.path, dim)  # flat or ANN (clipdex optimize)
    state = snap.state()
    faiss_ok = False
    if stored is None:
        if report.images:
            report.problems.append(f"{FAISS_FILE} is missing or unreadable")
    elif not (stamp_is_current(stored.stamp, state) or stamp_is_ancestor(stored.stamp, state, snap)):
        report.problems.append(f"{FAISS_FILE} does not belong to this catalog or its model (never used)")
    else:
        # Brought up to this state as an opener would: from the log, or (a file older than the
        # log) by the id diff. What is left to find is what an opener could not mend.
        assert stored.stamp is not None and state.model_id is not None
        changes = snap.change_stream(stored.stamp.generation, state.model_id, dim)
        if changes is not None:
            apply_changes(stored, changes)
        else:
            reconcile(stored, snap.ids(), lambda ids: snap.embeddings(ids, dim))
        faiss_ids = stored.ids()
        extra = np.setdiff1d(faiss_ids, catalog_ids)
        missing = np.setdiff1d(catalog_ids, faiss_ids)
        if len(faiss_ids) != len(np.unique(faiss_ids)):
            report.problems.append("the FAISS index holds an id twice")
        elif len(extra) or len(missing):
            report.problems.append(
                f"FAISS and catalog differ: {len(missing)} ids only in the catalog, "
                f"{len(extra)} only in FAISS"
            )
        elif isinstance(stored, AnnIndex):  # codes, not vectors: lossy by design, ids checked
            faiss_ok = True
        else:
            order = np.argsort(faiss_ids)
            faiss_vecs = stored.reconstruct_all()[order]
            mine = np.stack(good_vecs)[np.argsort(catalog_ids)] if good_vecs else faiss_vecs
            if len(mine) and float(np.max(np.abs(faiss_vecs - mine))) > 1e-6:
                report.problems.append("FAISS vectors differ from the catalog's")
            else:
                faiss_ok = True

    if check_files:
        for record in catalog.records().values():
            # A row of `clipdex import` may name a URL: there is no local file to look for.
            if not os.path.exists(record.path) and not is_url(record.path):
                report.missing_files.append(record.path)

    if repair and report.problems:
        with IndexWriter(store) as writer:
            if bad_ids or unsearchable:
                catalog.commit_changes(removed=bad_ids + unsearchable)
                report.repaired.append(
                    f"dropped {len(bad_ids) + len(unsearchable)} rows without a well-formed vector "
                    "(the next index run embeds them again)"
                )
            if not faiss_ok or bad_ids or unsearchable:
                rebuilt = store.rebuild()
                writer.save()
                report.repaired.append(f"rebuilt {FAISS_FILE} from the catalog ({rebuilt.ntotal} vectors)")
        report.problems.clear()
    return report
