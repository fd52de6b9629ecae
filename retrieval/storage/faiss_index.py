"""FaissIndex: an `IndexIDMap2` over `IndexFlatIP` whose ids are catalog row ids, and its file.

Vectors are unit-norm float32, so inner product is cosine similarity. The file on disk is a
cache of the catalog's vectors: it is written through a temporary file and an atomic rename,
and `reconcile` brings any stale copy (a crash between a commit and a save) back in line with
the catalog by adding and removing the ids that differ.

The file is FAISS's own serialisation followed by a small trailer, the Stamp: which catalog,
model and commit the vectors reflect. FAISS readers stop at the end of the index and ignore it,
so the file stays readable (and memory-mappable) by FAISS itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval.core.errors import IndexWriteError

FAISS_FILE = "vectors.faiss"
_TRAILER_MAGIC = b"clipdex-stamp-v1"  # 16 bytes, the file's very end


@dataclass(frozen=True)
class Stamp:
    """What a saved vector file reflects: catalog identity, active model id, and commit."""

    index_id: str
    model_id: int
    generation: int
    nonce: str

    def to_bytes(self) -> bytes:
        body = json.dumps(
            {
                "index_id": self.index_id,
                "model_id": self.model_id,
                "generation": self.generation,
                "nonce": self.nonce,
            },
            sort_keys=True,
        ).encode()
        return body + len(body).to_bytes(8, "little") + _TRAILER_MAGIC

    @classmethod
    def from_file_bytes(cls, data: np.ndarray) -> Stamp | None:
        """The stamp at the end of a saved file, or None (a file of clipdex 0.1, or damaged)."""
        tail = len(_TRAILER_MAGIC) + 8
        if len(data) < tail or data[-len(_TRAILER_MAGIC) :].tobytes() != _TRAILER_MAGIC:
            return None
        size = int.from_bytes(data[-tail : -len(_TRAILER_MAGIC)].tobytes(), "little")
        if size <= 0 or size > len(data) - tail:
            return None
        try:
            raw = json.loads(data[-tail - size : -tail].tobytes())
            return cls(str(raw["index_id"]), int(raw["model_id"]), int(raw["generation"]), str(raw["nonce"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class ReconcileReport:
    added: int
    removed: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


class FaissIndex:
    def __init__(self, index: faiss.IndexIDMap2, stamp: Stamp | None = None):
        self.index = index
        self.stamp = stamp  # of the file it was loaded from; None for one built in memory

    @classmethod
    def empty(cls, dim: int) -> FaissIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def load(cls, path: Path, dim: int) -> FaissIndex | None:
        """The saved index with its stamp, or None when it is missing, unreadable or of another
        dimension."""
        try:
            data = np.fromfile(path, dtype=np.uint8)
            index = faiss.deserialize_index(data)
        except (OSError, RuntimeError, ValueError):
            return None
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            return None
        return cls(index, Stamp.from_file_bytes(data))

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    def reconstruct_all(self) -> np.ndarray:
        """All embeddings it holds, in the order of `ids()`."""
        n = self.ntotal
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.index.index.reconstruct_n(0, n)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for each query row; ids are -1 where fewer than k exist.

        `allowed_ids` restricts the search to those ids inside FAISS (an ID selector), so a
        filter never shortens the result the way filtering a top-k afterwards would.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        if self.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        params = None
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(np.unique(allowed_ids), dtype=np.int64)
            if len(allowed) == 0:
                return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed)))
        with _omp_threads(1 if len(q) <= _FEW_QUERIES else None):
            return self.index.search(q, k, params=params)

    def save(self, path: Path, stamp: Stamp | None = None) -> None:
        """Write atomically: a temporary file in the same directory, fsync, rename, fsync dir."""
        data = faiss.serialize_index(self.index)
        directory = path.parent
        tmp_name = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data))
                if stamp is not None:
                    f.write(stamp.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise IndexWriteError(
                f"cannot write {path}: {exc.strerror or exc}; the previous file is intact"
            ) from None
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)


_FEW_QUERIES = 4


@contextlib.contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """FAISS's OpenMP threads for this calling thread, restored afterwards (None: unchanged).

    A flat scan for one query vector gains nothing from a second thread, and loses much when the
    cores are busy: every parallel region waits for a thread the scheduler has not run yet (100k x
    512 on a loaded 2-core machine: 22 ms with one thread, 70 ms with two; bench/serve_latency.py
    p50 26 ms against ~100 ms). Batches of queries (duplicates) keep every thread."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def reconcile(index: FaissIndex, catalog_ids: np.ndarray, fetch) -> ReconcileReport:  # type: ignore[no-untyped-def]
    """Make `index` hold exactly `catalog_ids`; `fetch(ids)` returns their stored embeddings."""
    have = index.ids()
    extra = np.setdiff1d(have, catalog_ids, assume_unique=True)
    missing = np.setdiff1d(catalog_ids, have, assume_unique=True)
    index.remove(extra)
    if len(missing):
        index.add(missing, fetch(missing.tolist()))
    return ReconcileReport(added=len(missing), removed=len(extra))
