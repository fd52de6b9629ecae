"""`clipdex serve`: the index over HTTP (server.app), and `RemoteIndex`, its Python client.

Names load lazily: `from server import RemoteIndex` needs neither FastAPI nor uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["RemoteIndex", "create_app", "run"]

_WHERE = {"RemoteIndex": "client", "create_app": "app", "run": "app"}

if TYPE_CHECKING:
    from .app import create_app, run
    from .client import RemoteIndex


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
