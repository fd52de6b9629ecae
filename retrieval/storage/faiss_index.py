"""FaissIndex: an `IndexIDMap2` over `IndexFlatIP` whose ids are catalog row ids, and its file.

Vectors are unit-norm float32, so inner product is cosine similarity. The file on disk is a
cache of the catalog's vectors: it is written through a temporary file and an atomic rename,
and `reconcile` brings any stale copy (a crash between a commit and a save) back in line with
the catalog by adding and removing the ids that differ.

The file is FAISS's own serialisation followed by a small trailer, the Stamp: which catalog,
model and commit the vectors reflect. FAISS readers stop at the end of the index and ignore it,
so the file stays readable (and memory-mappable) by FAISS itself.

A flat index is loaded memory-mapped (where /proc/self/fd lets it map the very file whose stamp
was read): opening costs no read at all, and the pages are the OS's file cache, shared by every
reader. A mapped index is read-only to FAISS (a write to it aborts the process), so the first
change copies it once into memory of its final size (`_materialize`, the rows removed left out,
the rows added appended): mutate it only through `add`, `remove` and `apply`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from retrieval.core.errors import IndexWriteError

FAISS_FILE = "vectors.faiss"
_TRAILER_MAGIC = b"clipdex-stamp-v1"  # 16 bytes, the file's very end
_MAX_STAMP = 4096  # a stamp's JSON is ~150 bytes: the tail read to find it
_READ_CHUNK = 1 << 22
_FD_DIR = Path("/proc/self/fd")  # a path that opens this process's open file (Linux)
_COPY_ROWS = 65536  # rows per chunk when an index is copied (bounds the temporaries)


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
    def read(cls, f: BinaryIO) -> Stamp | None:
        """The stamp at the end of an open file (its position is left at the start)."""
        size = os.fstat(f.fileno()).st_size
        tail = min(size, _MAX_STAMP)
        f.seek(size - tail)
        stamp = cls.from_file_bytes(np.frombuffer(f.read(tail), dtype=np.uint8))
        f.seek(0)
        return stamp

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


class StampedIndex:
    """What both kinds of cache share (FaissIndex here, ann.AnnIndex): a FAISS index whose ids are
    catalog row ids, the stamp of the file it was loaded from (None: built in memory), and an
    atomic stamped save."""

    def __init__(self, index: faiss.Index, stamp: Stamp | None = None):
        self.index = index
        self.stamp = stamp

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def save(self, path: Path, stamp: Stamp | None = None) -> None:
        save_stamped(self.index, path, stamp)


class FaissIndex(StampedIndex):
    """The exact cache: IndexIDMap2 over IndexFlatIP."""

    @classmethod
    def empty(cls, dim: int) -> FaissIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def from_batches(
        cls, dim: int, count: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> FaissIndex:
        """A flat index of exactly `count` vectors, written in place batch by batch: the vectors
        are held once (adding batch by batch would grow FAISS's buffer by copies)."""
        flat = faiss.IndexFlatIP(dim)
        out = cls(faiss.IndexIDMap2(flat))
        flat.codes.resize(count * dim * 4)
        vectors = faiss.rev_swig_ptr(flat.codes.data(), count * dim * 4).view(np.float32).reshape(count, dim)
        out.index.id_map.resize(count)
        ids = faiss.rev_swig_ptr(out.index.id_map.data(), count).view(np.int64)
        filled = 0
        for batch_ids, batch_vectors in batches:
            end = filled + len(batch_ids)
            if end > count:
                raise ValueError(f"more than the {count} vectors announced")
            ids[filled:end] = batch_ids
            vectors[filled:end] = batch_vectors
            filled = end
        if filled != count:
            raise ValueError(f"{filled} vectors where {count} were announced")
        flat.ntotal = out.index.ntotal = count
        out.index.construct_rev_map()
        return out

    @classmethod
    def load(cls, path: Path, dim: int, *, mmap: bool = True) -> FaissIndex | None:
        """The saved index with its stamp, or None when it is missing, unreadable or of another
        dimension. Index and stamp come from one open file (a writer may rename a new one in),
        read straight into FAISS's buffers (no second copy of the file in memory)."""
        try:
            with open(path, "rb", buffering=0) as f:
                stamp = Stamp.read(f)
                index = _read_index(f, mmap=mmap)
        except (OSError, RuntimeError, ValueError):
            return None
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            return None
        return cls(index, stamp)

    @property
    def mapped(self) -> bool:
        """The vectors are a read-only view of the file (see the module's docstring)."""
        inner = faiss.downcast_index(self.index.index)
        return isinstance(inner, faiss.IndexFlatCodes) and not inner.codes.is_owned

    def apply(self, removed: np.ndarray, added: np.ndarray, vectors: np.ndarray) -> int:
        """Remove, then add (an id in both ends up with its new vector); returns how many were
        removed. A mapped index is copied once, straight to its new size."""
        return self.apply_batches(removed, len(added), [(added, vectors)])

    def apply_batches(
        self, removed: np.ndarray, count: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> int:
        """`apply` with the additions as (ids, vectors) batches, `count` in all."""
        if self.mapped:
            if len(removed) == 0 and count == 0:  # a commit of moves only: no copy of the file
                for _ in announced(0, batches):  # empty ones, or a ValueError
                    pass
                return 0
            return self._materialize(removed, count, batches)
        removed_count = self.remove(removed)
        for ids, vectors in announced(count, batches):
            self.add(ids, vectors)
        return removed_count

    def _materialize(
        self, removed: np.ndarray, count: int, added: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> int:
        """The mapped index, minus `removed`, plus the `count` vectors of `added`, as an index in
        memory of its own."""
        ids = self.ids()
        keep = ~np.isin(ids, removed) if len(removed) else np.ones(len(ids), dtype=bool)
        inner = faiss.downcast_index(self.index.index)
        n, dim = self.ntotal, self.dim
        mapped = faiss.rev_swig_ptr(inner.codes.data(), n * dim * 4).view(np.float32).reshape(n, dim)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for at in range(0, n, _COPY_ROWS):
                rows = slice(at, at + _COPY_ROWS)
                part = keep[rows]
                if part.all():  # views of the file: copied once, straight into place
                    yield ids[rows], mapped[rows]
                else:
                    yield ids[rows][part], mapped[rows][part]
            for added_ids, vectors in added:
                yield (
                    np.ascontiguousarray(added_ids, dtype=np.int64),
                    np.asarray(vectors, dtype=np.float32).reshape(len(added_ids), dim),
                )

        kept = int(keep.sum())
        self.index = FaissIndex.from_batches(dim, kept + count, batches()).index
        return n - kept

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
        if self.mapped:
            self._materialize(np.empty(0, np.int64), len(ids), [(ids, vectors)])
            return
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        if self.mapped:
            return self._materialize(np.asarray(ids, dtype=np.int64), 0, [])
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
        with omp_threads(1 if len(q) <= _FEW_QUERIES else None):
            return self.index.search(q, k, params=params)


_FEW_QUERIES = 4


def save_stamped(index: faiss.Index, path: Path, stamp: Stamp | None) -> None:
    """Write any FAISS index with its stamp atomically: a temporary file in the same directory,
    fsync, rename, fsync the directory. FAISS writes straight into the file (no serialised copy
    of the index in memory)."""
    directory = path.parent
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            _write_index(index, f)
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
    except (OSError, RuntimeError) as exc:  # RuntimeError: FAISS's own, e.g. an index it cannot write
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise IndexWriteError(f"cannot write {path}: {reason}; the previous file is intact") from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def _write_index(index: faiss.Index, f: BinaryIO) -> None:
    """FAISS's serialisation into `f`; the OSError of a failed write (a full disk) comes through
    as itself, not as the RuntimeError FAISS wraps it in."""
    failure: list[OSError] = []

    def write(data: bytes) -> int:
        try:
            return f.write(data) or 0
        except OSError as exc:
            failure.append(exc)
            raise

    try:
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    except RuntimeError:
        if failure:
            raise failure[0] from None
        raise


def _read_index(f: BinaryIO, *, mmap: bool) -> faiss.Index:
    """The index in the open file `f`: mapped where the OS lets FAISS open this very file again
    and the index is a flat one (the only kind `_materialize` copies), else read into memory."""
    if mmap and _FD_DIR.is_dir():
        index = map_or_read_index(f, mmap=True)
        if (
            isinstance(index, faiss.IndexIDMap2)
            and type(faiss.downcast_index(index.index)) is faiss.IndexFlatIP
        ):
            return index
        f.seek(0)
    return faiss.read_index(faiss.PyCallbackIOReader(f.read, _READ_CHUNK))


def map_or_read_index(f: BinaryIO, *, mmap: bool) -> faiss.Index:
    """The index in the open file `f`: memory-mapped where the OS lets FAISS open this very file
    again (its stamp was read from `f`: a writer may have renamed a new file in since), else read
    into memory. A mapped index's buffers are read-only: its owner copies them before a change."""
    if mmap and _FD_DIR.is_dir():
        return faiss.read_index(str(_FD_DIR / str(f.fileno())), faiss.IO_FLAG_MMAP_IFC)
    return faiss.read_index(faiss.PyCallbackIOReader(f.read, _READ_CHUNK))


@contextlib.contextmanager
def omp_threads(threads: int | None) -> Iterator[None]:
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
    vectors = fetch(missing.tolist()) if len(missing) else np.empty((0, index.dim), np.float32)
    apply_to(index, extra, missing, vectors)
    return ReconcileReport(added=len(missing), removed=len(extra))


def apply_to(index, removed: np.ndarray, added: np.ndarray, vectors: np.ndarray) -> ReconcileReport:  # type: ignore[no-untyped-def]
    """Removals, then additions, on a FaissIndex (one copy of a mapped one) or any index with
    `remove` and `add` (an id in both ends up with its new vector)."""
    return apply_batches_to(index, removed, len(added), [(added, vectors)])


def apply_batches_to(  # type: ignore[no-untyped-def]
    index, removed: np.ndarray, count: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]
) -> ReconcileReport:
    """`apply_to` with the `count` additions as (ids, vectors) batches, added as they come."""
    apply = getattr(index, "apply_batches", None)
    if apply is not None:
        removed_count = apply(removed, count, batches)
    else:
        removed_count = index.remove(removed)
        for ids, vectors in announced(count, batches):
            index.add(ids, vectors)
    return ReconcileReport(added=count, removed=int(removed_count))


def announced(
    count: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`batches`, checked to hold `count` vectors in all (ValueError once they hold more or
    fewer: the index they went into is then not to be used)."""
    seen = 0
    for ids, vectors in batches:
        seen += len(ids)
        if seen > count:
            raise ValueError(f"more than the {count} vectors announced")
        yield ids, vectors
    if seen != count:
        raise ValueError(f"{seen} vectors where {count} were announced")
