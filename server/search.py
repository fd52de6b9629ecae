"""Searching for a request: the same steps as `ImageIndex.search_query`, with terms addressed
the server's way (texts, indexed images by id, uploaded images). Runs on the index's worker
thread (see worker.py).

Self-exclusion mirrors the local API: an indexed image used as a term is left out of its own
results, and so is every indexed file with exactly the bytes of an uploaded image (sha256, as
the indexer records it; checked on the rows ranked), unless `include_self`.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.core.errors import ImageLoadError
from retrieval.search.query import Query, Term
from retrieval.storage.records import ImageRecord

from .errors import NotFoundError
from .files import check_indexed
from .params import SearchSpec, TermSpec

if TYPE_CHECKING:
    from retrieval import Hit, ImageIndex


def record_of(index: ImageIndex, image_id: int) -> ImageRecord:
    record = index.records([image_id]).get(image_id)
    if record is None:
        raise NotFoundError(f"no image with id {image_id} in the index")
    return record


def run_search(index: ImageIndex, spec: SearchSpec) -> list[Hit]:
    with contextlib.ExitStack() as stack:
        scratch: list[Path] = []

        def scratch_dir() -> Path:
            # Uploads become temporary files (a query term is a path): in the system's temporary
            # folder, removed when the search ends, never near the photos.
            if not scratch:
                scratch.append(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipdex-"))))
            return scratch[0]

        terms: list[Term] = []
        exclude: set[int] = set()
        digests: set[str] = set()
        for n, spec_term in enumerate(spec.terms):
            term, same = _resolve(index, n, spec_term, scratch_dir)
            terms.append(term)
            exclude.update(same)
            if isinstance(spec_term.value, bytes):  # an upload: its indexed copies, by content
                digests.add(hashlib.sha256(spec_term.value).hexdigest())
        query = Query(terms, spec.ensemble, spec.templates)
        try:
            vector = index.embed_query(query)
        except ImageLoadError as exc:
            raise ImageLoadError(f"an image term cannot be read: {exc}") from None
    return index.rank(
        vector,
        spec.k,
        filters=spec.filters,
        min_score=spec.min_score,
        within=spec.within,
        offset=spec.offset,
        exclude_ids=() if spec.include_self else sorted(exclude),
        exclude_digests=() if spec.include_self else sorted(digests),
    )


def _resolve(index: ImageIndex, n: int, spec: TermSpec, scratch_dir) -> tuple[Term, list[int]]:  # type: ignore[no-untyped-def]
    """The retrieval Term for one request term, and the indexed ids it stands for."""
    if spec.kind == "text":
        assert isinstance(spec.value, str)
        return Term("text", spec.value, spec.weight), []
    if spec.kind == "id":
        assert isinstance(spec.value, int)
        record = record_of(index, spec.value)
        check_indexed(record)  # embedding reads the file: the same checks as serving it
        return Term("image", record.path, spec.weight), [record.id]
    assert isinstance(spec.value, bytes)
    path = scratch_dir() / f"upload-{n}"
    path.write_bytes(spec.value)
    return Term("image", str(path), spec.weight), []
