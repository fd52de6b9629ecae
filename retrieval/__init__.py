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
    "ClipModel": "model",
    "ModelSpec": "model",
    "ModelSignature": "model",
    "ImageIndex": "store",
    "IndexInfo": "store",
    "Hit": "hits",
    "ClipdexError": "errors",
    "ModelMismatchError": "errors",
}

if TYPE_CHECKING:
    from .errors import ClipdexError, ModelMismatchError
    from .hits import Hit
    from .model import ClipModel, ModelSignature, ModelSpec
    from .store import ImageIndex, IndexInfo


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
