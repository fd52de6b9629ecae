"""clipdex's core and query side: `from retrieval import ImageIndex`.

Names are imported lazily so that `import retrieval` stays cheap (a cold text query should
not pay for torch unless it has to embed something).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "ClipModel",
    "ClipdexError",
    "Hit",
    "ImageIndex",
    "IndexInfo",
    "ModelMismatchError",
    "ModelSignature",
    "ModelSpec",
]

_WHERE = {
    "ClipModel": "embedding.clip_model",
    "ModelSpec": "embedding.clip_model",
    "ModelSignature": "embedding.clip_model",
    "ImageIndex": "index",
    "IndexInfo": "index",
    "Hit": "core.hits",
    "ClipdexError": "core.errors",
    "ModelMismatchError": "core.errors",
}

if TYPE_CHECKING:
    from retrieval.core.errors import ClipdexError, ModelMismatchError
    from retrieval.core.hits import Hit
    from retrieval.embedding.clip_model import ClipModel, ModelSignature, ModelSpec
    from retrieval.index import ImageIndex, IndexInfo


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
