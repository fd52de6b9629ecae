"""ImageIndex: the front door. One directory: the catalog, the FAISS cache and the writer lock.

It opens the pieces and hands each operation the narrow ones it needs: the vector store and the
catalog (storage), the model and the text embedder (embedding), the query, ranking, duplicate and
zero-shot functions (search). Readers never take the writer lock: they read the last committed
catalog state (SQLite WAL) and bring the FAISS cache in line with it in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.core.filters import Filters
from retrieval.core.hits import Hit
from retrieval.core.locations import resolve_index_dir
from retrieval.embedding.spec import ModelSignature, ModelSpec, check_spec_matches
from retrieval.embedding.text_embedder import PrefetchedText, TextEmbedder
from retrieval.search import duplicates, zeroshot
from retrieval.search.query import Query
from retrieval.search.query_vectors import embed_labels, query_vector
from retrieval.search.ranking import Cutoffs, search_page, top_hits
from retrieval.storage import index_rules
from retrieval.storage.catalog import Catalog, open_catalog
from retrieval.storage.optimize import OptimizeReport, optimize, vector_index_facts
from retrieval.storage.records import ImageRecord
from retrieval.storage.vector_store import FilterPlan, VectorStore
from retrieval.storage.verify import VerifyReport, verify_index
from retrieval.storage.writer import IndexWriter

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.embedding.clip_model import ClipModel


@dataclass(frozen=True)
class IndexInfo:
    directory: str
    model: ModelSignature | None
    images: int
    bytes_on_disk: int
    updated_at: float | None
    index_id: str | None = None
    vector_index: str | None = None  # "Flat" (exact) or the ANN index's factory, e.g. "IVF4096_HNSW32,PQ128"
    nprobe: int | None = None  # lists an ANN search scans
    recall_at_10: float | None = None  # against exact search, measured when the index was built
    rerank_at_10: int | None = None  # candidates an ANN top-10 scores exactly from the catalog
    catalog: str | None = None  # where the catalog is: its file, or its PostgreSQL URL (no password)


class ImageIndex:
    """A searchable image index. Open it with `ImageIndex.open(path)`."""

    def __init__(self, directory: Path, catalog: Catalog, device: str = "auto", precision: str = "auto"):
        self.directory = directory
        self.catalog = catalog
        self.store = VectorStore(directory, catalog)
        self._device = device
        self._precision = precision
        self._model: ClipModel | None = None
        self._prefetched: PrefetchedText | None = None
        self._texts: TextEmbedder | None = None
        self.signature: ModelSignature | None = None
        self._read_signature()

    def _read_signature(self) -> None:
        raw = self.catalog.model_signature()
        self.signature = None if raw is None else ModelSignature.from_dict(raw)

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
        `prefetched_text` (see PrefetchedText) is used for text queries if it fits.
        """
        directory = resolve_index_dir(path)
        index = cls(directory, open_catalog(directory, create=False), device, precision)
        index._prefetched = prefetched_text
        if model is not None and index.signature is not None:
            check_spec_matches(index.signature, model, f"index {directory}")
        return index

    def close(self) -> None:
        if self._texts is not None:
            self._texts.close()
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
            self.use_model(self._require_signature().spec(self._device, self._precision))
        assert self._model is not None
        return self._model

    def use_model(self, spec: ModelSpec | ClipModel) -> ClipModel:
        """Load (or adopt) a model, checking it against the index's record."""
        # Here, not at the top: a cold text query (cache or ONNX text tower) never needs a model.
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
        return self._require_signature().dim

    def _require_signature(self) -> ModelSignature:
        if self.signature is None:
            raise ClipdexError(f"index {self.directory} is empty: index a folder first")
        return self.signature

    def refresh(self) -> None:
        """See what a concurrent writer committed since the index was opened (a reindex that
        switched models included)."""
        if self.store.refresh():
            self._read_signature()
            self._model = None
            if self._texts is not None:
                self._texts.close()
                self._texts = None

    # -- embedding ------------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        """The query embedding of `text`: from the cache, else the exported ONNX text tower
        (no torch import), else the torch model."""
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._texts is None:
            self._texts = TextEmbedder(
                self.directory,
                self._require_signature(),
                loaded_model=lambda: self._model,
                load_model=lambda: self.model,
                prefetched=self._prefetched,
            )
        return self._texts.embed(texts)

    def embed_image(self, image: str | os.PathLike[str] | Image.Image) -> np.ndarray:
        from retrieval.core.images import load_image  # Pillow: text queries start without it

        loaded = load_image(image if _is_pil(image) else os.fspath(image))  # type: ignore[arg-type]
        return self.model.encode_pil([loaded.image])[0]

    def embed_query(self, query: Query | str) -> np.ndarray:
        """The unit query vector: normalised weighted sum of the normalised term vectors."""
        return query_vector(query, self.embed_texts, self.embed_image)

    def embed_labels(
        self, labels: Sequence[str], *, ensemble: bool = True, templates: Sequence[str] | None = None
    ) -> np.ndarray:
        """One unit vector per label (prompt-ensembled unless `ensemble` is False)."""
        return embed_labels(self.embed_texts, labels, ensemble=ensemble, templates=templates)

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
        self._require_signature()
        return top_hits(self.store, vector, k, allowed_ids=allowed_ids, exclude_ids=exclude_ids)

    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        return self.search_vector(self.embed_text(text), k)

    def search_image(
        self, image: str | os.PathLike[str] | Image.Image, k: int = 10, *, exclude_self: bool = True
    ) -> list[Hit]:
        """Images similar to `image` (a path or a PIL image). An indexed query image is left
        out of its own results unless `exclude_self` is False."""
        exclude = self._indexed_ids([image]) if exclude_self and not _is_pil(image) else []
        return self.search_vector(self.embed_image(image), k, exclude_ids=exclude)

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
        if isinstance(query, str):
            query = Query.parse(query)
        exclude = self._indexed_ids(query.image_paths()) if exclude_self else []
        return self.rank(
            self.embed_query(query),
            k,
            filters=filters,
            min_score=min_score,
            within=within,
            offset=offset,
            exclude_ids=exclude,
        )

    def rank(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        filters: Filters | None = None,
        min_score: float | None = None,
        within: float | None = None,
        offset: int = 0,
        exclude_ids: Sequence[int] = (),
        exclude_digests: Sequence[str] = (),
    ) -> list[Hit]:
        """One page of the ranking for a query vector: exact `filters`, score cut-offs, paging,
        and the images `exclude_ids` left out, and those whose file's sha256 is one of
        `exclude_digests` (the indexed copies of an uploaded image, say)."""
        # The plan by selectivity (VectorStore.filter_plan): the matching ids, or for an ANN
        # index and a filter matching many images, a check of the search's candidates.
        plan = self.store.filter_plan(filters) if filters is not None and not filters.empty else FilterPlan()
        cutoffs = Cutoffs(
            min_score=min_score,
            within=within,
            offset=offset,
            exclude_ids=tuple(exclude_ids),
            exclude_digests=tuple(exclude_digests),
        )
        return search_page(
            self.store,
            vector,
            k,
            allowed_ids=plan.allowed_ids,
            candidate_filter=plan.candidate_filter,
            cutoffs=cutoffs,
        )

    def _indexed_ids(self, paths: Sequence[str | os.PathLike[str]]) -> list[int]:
        """Catalog ids of those query images that are indexed themselves."""
        records = (
            self.catalog.record_by_path(os.path.abspath(os.path.expanduser(os.fspath(p)))) for p in paths
        )
        return [r.id for r in records if r is not None]

    def select_ids(self, filters: Filters) -> np.ndarray:
        """Ids of the images that meet `filters` (for `search_vector(allowed_ids=...)`)."""
        return self.catalog.select_ids(filters)

    # -- duplicates and zero-shot labels --------------------------------------------------------
    def duplicates(self, threshold: float = duplicates.DEFAULT_THRESHOLD) -> list[duplicates.DuplicateGroup]:
        """Groups of near-duplicates: pairs with cosine above `threshold`, connected."""
        return duplicates.find_duplicates(self.store, threshold)

    def calibration(self) -> zeroshot.Calibration:
        """How this model turns cosines into probabilities: from the index's record; an index
        written before it was recorded loads the model once."""
        sig = self._require_signature()
        if sig.logit_scale is not None:
            return zeroshot.Calibration(
                float(sig.logit_scale), None if sig.logit_bias is None else float(sig.logit_bias)
            )
        return zeroshot.Calibration(float(self.model.logit_scale), self.model.logit_bias)

    def classify(
        self,
        labels: Sequence[str],
        *,
        ensemble: bool = True,
        templates: Sequence[str] | None = None,
        filters: Filters | None = None,
        top: int | None = 1,
        min_probability: float = 0.0,
    ) -> list[zeroshot.ImageLabels]:
        """Zero-shot label probabilities per indexed image (or those meeting `filters`), by id;
        each keeps its `top` most probable labels (all with None) at or above `min_probability`."""
        labels = zeroshot.unique(labels)
        if not labels:
            raise ClipdexError("no labels given")
        vectors = self.embed_labels(labels, ensemble=ensemble, templates=templates)
        return zeroshot.classify(
            self.store,
            labels,
            vectors,
            self.calibration(),
            filters=filters,
            top=top,
            min_probability=min_probability,
        )

    def describe(
        self,
        image: str | os.PathLike[str] | Image.Image,
        texts: Sequence[str],
        *,
        ensemble: bool = False,
        templates: Sequence[str] | None = None,
        k: int | None = None,
    ) -> list[zeroshot.LabelScore]:
        """Candidate texts ranked for `image` (image-to-text), best first, ties in given order."""
        texts = zeroshot.unique(texts)
        if not texts:
            raise ClipdexError("no candidate texts given")
        text_vectors = self.embed_labels(texts, ensemble=ensemble, templates=templates)
        return zeroshot.rank_texts(texts, text_vectors, self.embed_image(image), self.calibration(), k)

    def store_tags(self, results: Sequence[zeroshot.ImageLabels], labels: Sequence[str]) -> int:
        """Save classify results as tags (the `tags` filter reads them), as the index's writer."""
        with self.writer():
            return zeroshot.store_tags(self.catalog, results, labels)

    # -- facts and upkeep -----------------------------------------------------------------
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
            catalog=self.catalog.location.describe(),
            **vector_index_facts(self.store),
        )

    def optimize(
        self,
        *,
        max_memory: int = index_rules.DEFAULT_MAX_MEMORY,
        target_recall: float = index_rules.DEFAULT_TARGET_RECALL,
        exact_below: int = index_rules.EXACT_BELOW,
    ) -> OptimizeReport:
        """Build the vector index the rules choose for this size (exact below `exact_below`
        vectors, else IVF), measure its recall@10, record both; as the index's writer."""
        report = optimize(
            self.store, max_memory=max_memory, target_recall=target_recall, exact_below=exact_below
        )
        self.store.reset()
        return report

    def records(self, ids: Sequence[int] | None = None) -> dict[int, ImageRecord]:
        return self.catalog.records(ids)

    def verify(self, *, repair: bool = False, check_files: bool = True) -> VerifyReport:
        """Check the index's invariants; with `repair`, restore them from the catalog."""
        return verify_index(self.store, repair=repair, check_files=check_files)

    def writer(self) -> IndexWriter:
        """The single writer (takes the lock when entered: `with index.writer() as w:`)."""
        return IndexWriter(self.store)


def _is_pil(obj: object) -> bool:
    return type(obj).__module__.startswith("PIL.")
