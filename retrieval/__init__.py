"""clipdex's core and query side: `from retrieval import ImageIndex`.

Names are imported lazily so that `import retrieval` stays cheap (a cold text query should
not pay for torch unless it has to embed something).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "ClipModel",
    "ClipdexError",
    "DuplicateGroup",
    "Filters",
    "Hit",
    "ImageIndex",
    "ImageLabels",
    "IndexInfo",
    "LabelScore",
    "ModelMismatchError",
    "ModelSignature",
    "ModelSpec",
    "Query",
    "Term",
    "VerifyReport",
]

_WHERE = {
    "ClipModel": "embedding.clip_model",
    "ModelSpec": "embedding.spec",
    "ModelSignature": "embedding.spec",
    "ImageIndex": "index",
    "IndexInfo": "index",
    "Hit": "core.hits",
    "Filters": "core.filters",
    "ClipdexError": "core.errors",
    "ModelMismatchError": "core.errors",
    "Query": "search.query",
    "Term": "search.query",
    "DuplicateGroup": "search.duplicates",
    "ImageLabels": "search.zeroshot",
    "LabelScore": "search.zeroshot",
    "VerifyReport": "storage.verify",
}

if TYPE_CHECKING:
    from retrieval.core.errors import ClipdexError, ModelMismatchError
    from retrieval.core.filters import Filters
    from retrieval.core.hits import Hit
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSignature, ModelSpec
    from retrieval.index import ImageIndex, IndexInfo
    from retrieval.search.duplicates import DuplicateGroup
    from retrieval.search.query import Query, Term
    from retrieval.search.zeroshot import ImageLabels, LabelScore
    from retrieval.storage.verify import VerifyReport


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
