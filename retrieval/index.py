"""ImageIndex: one directory holding the catalog, the FAISS file and the writer lock.

Readers never take the lock: they read the last committed catalog state (SQLite WAL) and bring
the FAISS file in line with it in memory. The one writer (IndexWriter) holds the lock, commits
catalog rows and vectors together, and saves FAISS at checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.core.errors import ClipdexError, IndexNotFoundError, IndexWriteError
from retrieval.core.hits import Hit
from retrieval.core.locations import resolve_index_dir
from retrieval.embedding.clip_model import ModelSignature, ModelSpec, check_spec_matches
from retrieval.embedding.query_cache import TextCache
from retrieval.embedding.text_embedder import (
    PrefetchedText,
    TextFn,
    load_onnx_text,
    model_key,
    onnx_text_path,
)
from retrieval.storage.catalog import (
    CATALOG_NAME,
    Catalog,
    CatalogState,
    Failure,
    ImageRecord,
    IndexUpgradeNeeded,
    Move,
    NewImage,
)
from retrieval.storage.faiss_index import VECTORS_NAME, ReconcileReport, Stamp, VectorIndex, reconcile
from retrieval.storage.lock import WriterLock

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.embedding.clip_model import ClipModel
    from retrieval.search.duplicates import DuplicateGroup
    from retrieval.search.filters import Filters
    from retrieval.search.query import Query
    from retrieval.search.zeroshot import ImageLabels, LabelScore


@dataclass(frozen=True)
class IndexInfo:
    directory: str
    model: ModelSignature | None
    images: int
    bytes_on_disk: int
    updated_at: float | None
    index_id: str | None = None


def resolve_model_spec(
    path: str | os.PathLike[str] | None,
    arch: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
) -> ModelSpec:
    """The model to index with: what the user named, else what the index was built with, else
    the default (ViT-B-32, laion2b_s34b_b79k). An architecture named without weights gets its
    own default tag (see model.default_pretrained), not ViT-B-32's."""
    from retrieval.embedding.clip_model import DEFAULT_ARCH, default_pretrained

    recorded = None
    directory = resolve_index_dir(path)
    if (directory / CATALOG_NAME).exists():
        with ImageIndex.open(directory) as index:
            recorded = index.signature
    if recorded is not None and arch in (None, recorded.arch):
        return ModelSpec(
            recorded.arch, pretrained or recorded.pretrained, device, precision, recorded.seed, backend
        )
    arch = arch or DEFAULT_ARCH
    return ModelSpec(arch, pretrained or default_pretrained(arch), device, precision, backend=backend)


class ImageIndex:
    """A searchable image index. Open it with `ImageIndex.open(path)`."""

    def __init__(self, directory: Path, catalog: Catalog, device: str = "auto", precision: str = "auto"):
        self.directory = directory
        self.catalog = catalog
        self._device = device
        self._precision = precision
        self._model: ClipModel | None = None
        self._vectors: VectorIndex | None = None
        self._vectors_state: CatalogState | None = None  # the catalog state `_vectors` reflects
        self._text_fn: TextFn | None = None
        self._prefetched: PrefetchedText | None = None
        self._text_cache: TextCache | None = None
        raw = catalog.model_signature()
        self.signature: ModelSignature | None = None if raw is None else ModelSignature.from_dict(raw)

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        model: ModelSpec | None = None,
        device: str = "auto",
        precision: str = "auto",
        prefetched_text: PrefetchedText | None = None,
    ) -> ImageIndex:
        """Open an existing index (default location when `path` is None).

        With `model`, refuses an index built with another model instead of returning garbage.
        `prefetched_text` (see `prefetch_text_encoder`) is used for text queries if it fits.
        """
        directory = resolve_index_dir(path)
        if not (directory / CATALOG_NAME).exists():
            raise IndexNotFoundError(f"no index at {directory}: build one with 'clipdex index FOLDER'")
        index = cls(directory, _open_catalog(directory, create=False), device, precision)
        index._prefetched = prefetched_text
        if model is not None and index.signature is not None:
            check_spec_matches(index.signature, model, f"index {directory}")
        return index

    @classmethod
    def create(cls, path: str | os.PathLike[str] | None, model: ModelSpec) -> ImageIndex:
        """Open the index at `path`, creating it for `model` if it does not exist yet."""
        directory = resolve_index_dir(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexWriteError(f"cannot create index folder {directory}: {exc.strerror or exc}") from None
        index = cls(directory, _open_catalog(directory, create=True), model.device, model.precision)
        if index.signature is not None:
            try:
                check_spec_matches(index.signature, model, f"index {directory}")
            except BaseException:
                index.close()
                raise
        return index

    def close(self) -> None:
        if self._text_cache is not None:
            self._text_cache.close()
        self.catalog.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- model ----------------------------------------------------------------------------
    @property
    def model(self) -> ClipModel:
        """The index's model, loaded on first use."""
        if self._model is None:
            if self.signature is None:
                raise ClipdexError(f"index {self.directory} is empty: index a folder first")
            self.use_model(self.signature.spec(self._device, self._precision))
        assert self._model is not None
        return self._model

    def use_model(self, spec: ModelSpec | ClipModel) -> ClipModel:
        """Load (or adopt) a model, checking it against the index's record."""
        from retrieval.embedding.clip_model import ClipModel

        loaded = spec if isinstance(spec, ClipModel) else None
        if loaded is None:
            assert isinstance(spec, ModelSpec)
            if self.signature is not None:
                check_spec_matches(self.signature, spec, f"index {self.directory}")
            loaded = ClipModel(spec)
        if self.signature is not None:
            self.signature.check_compatible(loaded.signature, f"index {self.directory}")
        self._model = loaded
        return loaded

    @property
    def dim(self) -> int:
        if self.signature is None:
            raise ClipdexError(f"index {self.directory} is empty: index a folder first")
        return self.signature.dim

    # -- vectors --------------------------------------------------------------------------
    def vectors(self) -> VectorIndex:
        """The FAISS index, brought in line with the last committed catalog state."""
        if self._vectors is None:
            self._vectors = self._load_vectors()
        return self._vectors

    def _load_vectors(self) -> VectorIndex:
        vectors, self._vectors_state, _ = load_vectors(self.directory, self.catalog, self.dim)
        return vectors

    def refresh(self) -> None:
        """See what a concurrent writer committed since the index was opened (a reindex that
        switched models included)."""
        if self._vectors is None:
            return
        state = self.catalog.state()
        if state == self._vectors_state:
            return
        if state.model_id != self._vectors_state.model_id:
            raw = self.catalog.model_signature()
            self.signature = None if raw is None else ModelSignature.from_dict(raw)
            self._model = self._text_fn = None
            self._text_cache = None
            self._vectors = None
            if self.signature is not None:
                self._vectors = self._load_vectors()
            return
        dim = self.dim
        _reconcile_retrying(self._vectors, self.catalog, dim, self.directory)
        self._vectors_state = state

    # -- queries --------------------------------------------------------------------------
    def search_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        allowed_ids: np.ndarray | None = None,
        exclude_ids: Sequence[int] = (),
    ) -> list[Hit]:
        """Top-k images by cosine similarity to `vector` (normalised here)."""
        if k <= 0:
            return []
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ClipdexError(f"query vector has dimension {q.shape[1]}, the index {self.dim}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0.0:
            raise ClipdexError("query vector is zero or not finite")
        q = q / norm
        vectors = self.vectors()
        excluded = set(exclude_ids)
        want = k + len(excluded)
        while True:
            scores, ids = vectors.search(q, want, allowed_ids)
            pairs = [
                (float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in excluded
            ]
            records = self.catalog.records([i for _, i in pairs])
            # Never trust a FAISS id without its catalog row (deleted since this reader loaded).
            kept = [(s, i) for s, i in pairs if i in records]
            exhausted = len(ids[0]) < want or ids[0][-1] < 0 or want >= vectors.ntotal
            if len(kept) >= k or exhausted:
                break
            want *= 2
        # Ties broken by id so that results (and paging) are deterministic.
        kept.sort(key=lambda p: (-p[0], p[1]))
        return [_hit(rank, score, records[i]) for rank, (score, i) in enumerate(kept[:k], start=1)]

    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        return self.search_vector(self.embed_text(text), k)

    def search_image(
        self, image: str | os.PathLike[str] | Image.Image, k: int = 10, *, exclude_self: bool = True
    ) -> list[Hit]:
        """Images similar to `image` (a path or a PIL image). An indexed query image is left
        out of its own results unless `exclude_self` is False."""
        exclude: list[int] = []
        if exclude_self and not _is_pil(image):
            record = self.catalog.record_by_path(os.path.abspath(os.fspath(image)))  # type: ignore[arg-type]
            if record is not None:
                exclude.append(record.id)
        return self.search_vector(self.embed_image(image), k, exclude_ids=exclude)

    def embed_text(self, text: str) -> np.ndarray:
        """The query embedding of `text`: from the cache, else the exported ONNX text tower
        (no torch import), else the torch model."""
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts or any(not t.strip() for t in texts):
            raise ClipdexError("empty text query")
        if self.signature is None:
            raise ClipdexError(f"index {self.directory} is empty: index a folder first")
        if self._text_cache is None:
            self._text_cache = TextCache(self.directory, model_key(self.signature))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo = []
        for i, text in enumerate(texts):
            cached = self._text_cache.get(text)
            if cached is not None and cached.shape == (self.dim,):
                out[i] = cached
            else:
                todo.append(i)
        if todo:
            fresh = self._encode_texts([texts[i] for i in todo])
            for i, vec in zip(todo, fresh):
                out[i] = vec
                self._text_cache.put(texts[i], vec)
        return out

    def _encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None and self._text_fn is None and self._prefetched is not None:
            self._text_fn = self._prefetched.get(self.signature)  # type: ignore[arg-type]
        if self._model is None and self._text_fn is None:
            self._text_fn = load_onnx_text(self.directory, self.signature)  # type: ignore[arg-type]
        if self._model is None and self._text_fn is not None:
            return self._text_fn(texts)
        return self.model.encode_texts(texts)

    def embed_image(self, image: str | os.PathLike[str] | Image.Image) -> np.ndarray:
        from retrieval.core.images import load_image

        loaded = load_image(image if _is_pil(image) else os.fspath(image))  # type: ignore[arg-type]
        return self.model.encode_pil([loaded.image])[0]

    # -- query power: combined queries, filters, duplicates, zero-shot labels --------------
    # Thin entry points; the logic lives in query.py, filters.py, duplicates.py, zeroshot.py.
    def search_query(
        self,
        query: Query | str,
        k: int = 10,
        *,
        filters: Filters | None = None,
        min_score: float | None = None,
        within: float | None = None,
        offset: int = 0,
        exclude_self: bool = True,
    ) -> list[Hit]:
        """Search with a combined query (`Query`, or its compact text form), exact `filters`,
        score cut-offs and paging. Indexed query images are left out unless `exclude_self`
        is False."""
        from retrieval.search.query import run_query

        return run_query(
            self,
            query,
            k,
            filters=filters,
            min_score=min_score,
            within=within,
            offset=offset,
            exclude_self=exclude_self,
        )

    def embed_query(self, query: Query | str) -> np.ndarray:
        """The unit query vector: normalised weighted sum of the normalised term vectors."""
        from retrieval.search.query import query_vector

        return query_vector(self, query)

    def embed_labels(
        self, labels: Sequence[str], *, ensemble: bool = True, templates: Sequence[str] | None = None
    ) -> np.ndarray:
        """One unit vector per label (prompt-ensembled unless `ensemble` is False)."""
        from retrieval.search.query import embed_labels

        return embed_labels(self, labels, ensemble=ensemble, templates=templates)

    def select_ids(self, filters: Filters) -> np.ndarray:
        """Ids of the images that meet `filters` (for `search_vector(allowed_ids=...)`)."""
        from retrieval.search.filters import select_ids

        return select_ids(self, filters)

    def duplicates(self, threshold: float = 0.95) -> list[DuplicateGroup]:
        """Groups of near-duplicates: pairs with cosine above `threshold`, connected."""
        from retrieval.search.duplicates import find_duplicates

        return find_duplicates(self, threshold)

    def classify(self, labels: Sequence[str], **options: object) -> list[ImageLabels]:
        """Zero-shot label probabilities per indexed image (see zeroshot.classify)."""
        from retrieval.search.zeroshot import classify

        return classify(self, labels, **options)  # type: ignore[arg-type]

    def describe(
        self, image: str | os.PathLike[str] | Image.Image, texts: Sequence[str], **options: object
    ) -> list[LabelScore]:
        """Candidate texts ranked for `image`, best first (see zeroshot.describe_image)."""
        from retrieval.search.zeroshot import describe_image

        return describe_image(self, image, texts, **options)  # type: ignore[arg-type]

    def store_tags(self, results: Sequence[ImageLabels], labels: Sequence[str]) -> int:
        """Save classify results as tags (the `tags` filter reads them), as the index's writer."""
        from retrieval.search.zeroshot import store_tags

        with self.writer():
            return store_tags(self.catalog, results, labels)

    # -- facts ----------------------------------------------------------------------------
    def info(self) -> IndexInfo:
        size = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        updated = self.catalog.get_meta("updated_at")
        return IndexInfo(
            directory=str(self.directory),
            model=self.signature,
            images=self.catalog.count(),
            bytes_on_disk=size,
            updated_at=float(updated) if updated else None,
            index_id=self.catalog.get_meta("index_id"),
        )

    def records(self, ids: Sequence[int] | None = None) -> dict[int, ImageRecord]:
        return self.catalog.records(ids)

    def writer(self) -> IndexWriter:
        return IndexWriter(self)


class IndexWriter:
    """The single writer: holds the lock, commits batches, saves FAISS at checkpoints.

    Vectors go to the active model, or, during a reindex (`begin_reindex`), to a pending model
    built beside it: searches keep using the active model until `finish_reindex` swaps them in
    one transaction.
    """

    def __init__(self, index: ImageIndex, checkpoint_seconds: float = 60.0):
        self.index = index
        self.lock = WriterLock(index.directory)
        self.checkpoint_seconds = checkpoint_seconds
        self._last_save = time.monotonic()
        self._dirty = False
        self._pending: tuple[int, ClipModel] | None = None  # (model id, model) of a reindex

    def __enter__(self) -> IndexWriter:
        self.lock.acquire()
        self._remove_orphans()
        return self

    def _remove_orphans(self) -> None:
        """Temporary files of a writer killed before its rename: whole copies of the index.
        Only the lock holder may remove them (a live writer's are its own)."""
        for tmp in self.index.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._dirty:
                self.save()
        finally:
            self.lock.release()

    def bind_model(self, model: ClipModel) -> None:
        """Adopt `model`; an empty index records its signature, a filled one must match it."""
        index = self.index
        if index.signature is None:
            index.catalog.set_model_signature(model.signature.to_dict())
            index.signature = model.signature
            index._vectors = None
        index.use_model(model)

    # -- reindex: a new set of vectors built beside the searchable one -----------------------
    def begin_reindex(self, model: ClipModel, carry_over: Sequence[int] = ()) -> None:
        """Embed into a pending model from now on, resuming an interrupted reindex to the same
        model. `carry_over`: images this run will not embed again; with the same model their
        vectors are copied (with another model they cannot be, and the caller refuses)."""
        index = self.index
        catalog = index.catalog
        if index.signature is None:
            self.bind_model(model)
            return
        pending = catalog.pending_model()
        if pending is not None and ModelSignature.from_dict(pending.signature).matches(model.signature):
            target = pending.id
        else:
            target = catalog.begin_pending(model.signature.to_dict())
        if index.signature.matches(model.signature) and len(carry_over):
            active = catalog.active_model()
            assert active is not None
            done = set(catalog.ids(target).tolist())
            catalog.copy_vectors(active.id, target, [i for i in carry_over if i not in done])
        self._pending = (target, model)

    @property
    def reindexing(self) -> bool:
        return self._pending is not None

    def reindexed_ids(self) -> set[int]:
        """Images that already have a vector of the pending model (from an interrupted run)."""
        return set() if self._pending is None else set(self.index.catalog.ids(self._pending[0]).tolist())

    def finish_reindex(self) -> bool:
        """Swap the pending model in, if every image has its vector; False (nothing changed,
        the next run resumes) while some do not."""
        if self._pending is None:
            return False
        target, model = self._pending
        index = self.index
        if len(index.catalog.ids_without_vector(target)):
            return False
        old = index.signature
        index.catalog.promote_pending()
        self._pending = None
        index.signature = model.signature
        index._model = model
        index._vectors = None
        index._text_fn = None
        self.save()  # a fresh FAISS file for the new model, built from the catalog
        if old is not None and old.key() != model.signature.key():
            _remove_derived_files(index.directory, old)
        return True

    # -- vectors ----------------------------------------------------------------------------
    def reconcile(self) -> ReconcileReport:
        """Bring the FAISS file in line with the catalog after a crash, and save it if needed."""
        index = self.index
        vectors, index._vectors_state, report = load_vectors(index.directory, index.catalog, index.dim)
        index._vectors = vectors
        if report.changed or vectors.stamp is None:
            self.save()
        return report

    def commit(
        self,
        added: Sequence[NewImage] = (),
        moved: Sequence[Move] = (),
        removed: Sequence[int] = (),
        touched: Sequence[Move] = (),
        failed: Sequence[Failure] = (),
        forget_failures: Sequence[str] = (),
        revectored: Sequence[tuple[int, np.ndarray]] = (),
    ) -> list[int]:
        """One transaction in the catalog, then the same change in FAISS (in memory).

        `revectored` ((image id, vector)) only during a reindex: known images embedded again."""
        index = self.index
        if revectored and self._pending is None:
            raise ClipdexError("revectored images need a reindex in progress")
        # Load FAISS *before* committing: loading reconciles with the catalog, and would
        # otherwise add the rows of this very commit a second time below.
        vectors = index.vectors()
        target = None if self._pending is None else self._pending[0]
        new_ids = index.catalog.commit_changes(
            added=added,
            moved=moved,
            removed=removed,
            touched=touched,
            failed=failed,
            forget_failures=forget_failures,
            revectored=revectored,
            model_id=target,
        )
        vectors.remove(np.asarray(removed, dtype=np.int64))
        if added and target is None:
            vectors.add(np.asarray(new_ids, dtype=np.int64), np.stack([a.vector for a in added]))
        if added or removed:
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_save >= self.checkpoint_seconds:
            self.save()
        return new_ids

    def save(self) -> None:
        """Save FAISS stamped with the catalog state it reflects: this writer applied every
        commit since it took the lock, so that is the catalog's current state."""
        index = self.index
        state = index.catalog.state()
        vectors = index.vectors()
        stamp = (
            None
            if state.model_id is None
            else Stamp(state.index_id, state.model_id, state.generation, state.nonce)
        )
        vectors.save(index.directory / VECTORS_NAME, stamp)
        index._vectors_state = state
        self._last_save = time.monotonic()
        self._dirty = False


# -- the FAISS file as a cache of the catalog: when to trust it --------------------------------
def stamp_is_current(stamp: Stamp | None, state: CatalogState) -> bool:
    """The file reflects exactly the catalog's last commit: usable without reading any id."""
    return stamp is not None and (stamp.index_id, stamp.model_id, stamp.generation, stamp.nonce) == (
        state.index_id,
        state.model_id,
        state.generation,
        state.nonce,
    )


def stamp_is_ancestor(stamp: Stamp | None, state: CatalogState, catalog: Catalog) -> bool:
    """The file reflects an earlier commit of this very catalog and model. Ids are never reused
    within one catalog's history, so adding and removing the ids that differ brings it up to
    date. A file of another catalog (recreated, copied, restored from a backup) is not: the
    same ids may name other images there."""
    return (
        stamp is not None
        and (stamp.index_id, stamp.model_id) == (state.index_id, state.model_id)
        and stamp.generation <= state.generation
        and catalog.has_commit(stamp.generation, stamp.nonce)
    )


def load_vectors(
    directory: Path, catalog: Catalog, dim: int
) -> tuple[VectorIndex, CatalogState, ReconcileReport]:
    """The FAISS index for the catalog's active model: the saved file when it can be trusted
    (brought up to date), else rebuilt from the catalog's vectors."""
    state = catalog.state()
    saved = VectorIndex.load(directory / VECTORS_NAME, dim)
    if saved is not None and stamp_is_current(saved.stamp, state):
        return saved, state, ReconcileReport(0, 0)
    if saved is None or not stamp_is_ancestor(saved.stamp, state, catalog):
        saved = VectorIndex.empty(dim)
    report = _reconcile_retrying(saved, catalog, dim, directory)
    return saved, state, report


def _reconcile_retrying(vectors: VectorIndex, catalog: Catalog, dim: int, directory: Path) -> ReconcileReport:
    for _attempt in range(3):
        try:
            return reconcile(vectors, catalog.ids(), lambda ids: catalog.vectors(ids, dim))
        except KeyError:  # a row was deleted between reading ids and vectors: read again
            continue
    raise ClipdexError(f"index {directory} keeps changing under this reader; try again")


def _open_catalog(directory: Path, *, create: bool) -> Catalog:
    """Open (with `create`: or make) the catalog; a catalog of an older clipdex is upgraded
    first, under the writer lock, whoever opens it."""
    if (directory / CATALOG_NAME).exists():
        try:
            return Catalog.open(directory)
        except IndexUpgradeNeeded:
            pass
        except IndexNotFoundError:  # its creation was interrupted: finish it, if allowed to
            if not create:
                raise
    elif not create:
        raise IndexNotFoundError(f"no index at {directory}: build one with 'clipdex index FOLDER'")
    with WriterLock(directory):
        return Catalog.open(directory, create=True)


def _remove_derived_files(directory: Path, signature: ModelSignature) -> None:
    """Files made for a model the index no longer uses (its exported text tower)."""
    text = onnx_text_path(directory, signature)
    for path in directory.glob(text.name + "*"):
        with contextlib.suppress(OSError):
            path.unlink()


def _hit(rank: int, score: float, record: ImageRecord) -> Hit:
    return Hit(
        rank=rank, score=score, path=record.path, id=record.id, width=record.width, height=record.height
    )


def _is_pil(obj: object) -> bool:
    return type(obj).__module__.startswith("PIL.")
