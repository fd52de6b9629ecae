"""Exact search filters as values: which images a search may return.

storage.vector_store.VectorStore.filter_plan applies them by selectivity: the matching ids
listed (Catalog.select_ids) and searched alone, or, for many matches on an approximate index,
the search's candidates checked (Catalog.filter_ids) and more asked for until enough match.
Either way `-k 10` returns 10 hits whenever 10 images match.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from retrieval.core.errors import ClipdexError

# User spellings of a type -> the Pillow format names the catalog holds.
_FORMAT_ALIASES = {
    "jpg": ("JPEG", "MPO"),
    "jpeg": ("JPEG", "MPO"),
    "jpe": ("JPEG", "MPO"),
    "tif": ("TIFF",),
    "heic": ("HEIF",),
    "heif": ("HEIF",),
}


@dataclass(frozen=True)
class Filters:
    """Conditions an image must all meet. Empty fields do not filter.

    folders: under any of these folders (recursively). globs: the path matches any of these
    patterns (a pattern without '/' is matched against the file name, one with '/' against the
    whole path). after/before: date taken (EXIF, else the file's modification time) as unix
    time, `after <= t < before`. formats: any of these types (jpeg, png, ...). min_width /
    min_height: in pixels, as displayed. tags: every one of these labels was stored by
    `classify --store`.
    """

    folders: tuple[str, ...] = ()
    globs: tuple[str, ...] = ()
    after: float | None = None
    before: float | None = None
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("folders", "globs", "formats", "tags"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def empty(self) -> bool:
        return not (
            self.folders
            or self.globs
            or self.formats
            or self.tags
            or self.after is not None
            or self.before is not None
            or self.min_width is not None
            or self.min_height is not None
        )


def parse_date(text: str, option: str = "date") -> float:
    """`2020-01-01`, `2020-01-01T12:30` or `2020-01-01 12:30:00` in local time (as EXIF dates
    are read), or a unix time; returns unix time."""
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        raise ClipdexError(f"{option}: {text!r} is not a date (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """`jpeg,png` -> the catalog's format names ('JPEG', 'MPO', 'PNG')."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    out: list[str] = []
    for item in items:
        name = item.strip().lower().lstrip(".")
        if not name:
            continue
        for fmt in _FORMAT_ALIASES.get(name, (name.upper(),)):
            if fmt not in out:
                out.append(fmt)
    if not out:
        raise ClipdexError("--type needs at least one type (jpeg, png, webp, gif, bmp, tiff, heic)")
    return tuple(out)


def folder_prefixes(folders: Sequence[str]) -> list[bytes]:
    """Each folder as stored paths begin: absolute, and also through its symlinks resolved."""
    out: list[bytes] = []
    for folder in folders:
        path = os.path.expanduser(folder)
        for form in (os.path.abspath(path), os.path.realpath(path)):
            prefix = os.fsencode(form.rstrip(os.sep) + os.sep) if form != os.sep else os.fsencode(os.sep)
            if prefix not in out:
                out.append(prefix)
    return out


def glob_matches(pattern: str, path: str) -> bool:
    target = path if "/" in pattern else os.path.basename(path)
    return fnmatch.fnmatchcase(target, pattern)
