"""Which model an index run uses: what the user named, else the index's own, else the default."""

from __future__ import annotations

import os

from retrieval.core.locations import resolve_index_dir
from retrieval.embedding.spec import DEFAULT_ARCH, ModelSignature, ModelSpec, default_pretrained
from retrieval.storage.catalog import open_catalog
from retrieval.storage.catalog_location import catalog_exists, resolve_catalog


def recorded_signature(
    index_dir: str | os.PathLike[str] | None, catalog_url: str | None = None
) -> ModelSignature | None:
    """The model an existing index was built with (None for a new or empty index)."""
    directory = resolve_index_dir(index_dir)
    if not catalog_exists(resolve_catalog(directory, catalog_url)):
        return None
    catalog = open_catalog(directory, create=False, url=catalog_url)
    try:
        raw = catalog.model_signature()
    finally:
        catalog.close()
    return None if raw is None else ModelSignature.from_dict(raw)


def resolve_model_spec(
    index_dir: str | os.PathLike[str] | None,
    arch: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    *,
    catalog: str | None = None,
) -> ModelSpec:
    """The model to index with: what the user named, else what the index was built with, else
    the default (ViT-B-32, laion2b_s34b_b79k). An architecture named without weights gets its
    own default tag (see spec.default_pretrained), not ViT-B-32's."""
    recorded = recorded_signature(index_dir, catalog)
    if recorded is not None and arch in (None, recorded.arch):
        return ModelSpec(
            recorded.arch, pretrained or recorded.pretrained, device, precision, recorded.seed, backend
        )
    arch = arch or DEFAULT_ARCH
    return ModelSpec(arch, pretrained or default_pretrained(arch), device, precision, backend=backend)
