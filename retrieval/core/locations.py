"""Where indexes and caches live by default."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_INDEX = "CLIPDEX_INDEX"


def default_index_dir() -> Path:
    """$CLIPDEX_INDEX, else the per-user data directory (XDG_DATA_HOME on Linux)."""
    env = os.environ.get(ENV_INDEX)
    if env:
        return Path(env).expanduser()
    # platformdirs follows XDG_DATA_HOME, macOS and Windows conventions.
    return Path(platformdirs.user_data_dir("clipdex", appauthor=False)) / "index"


def resolve_index_dir(path: str | os.PathLike[str] | None) -> Path:
    return Path(path).expanduser() if path is not None else default_index_dir()


def is_url(path: str) -> bool:
    """A catalog path that names a remote image (`clipdex import` of a URL), not a local file."""
    scheme, sep, _rest = path.partition("://")
    return bool(sep) and scheme.isascii() and scheme.isalpha()
