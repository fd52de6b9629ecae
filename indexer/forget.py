"""`forget_paths`: drop the indexed images under folders or files that are gone.

Indexing refuses a missing root (an unmounted disk must never read as 'every photo was
deleted'), so the rows of a disk that is gone for good need a deliberate way out: this one.
A path that still exists is refused unless asked for, so that a typo never drops a live library.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from retrieval.core.errors import ClipdexError
from retrieval.core.locations import resolve_index_dir
from retrieval.storage.catalog import open_catalog
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.writer import IndexWriter

from .scan import under_roots


@dataclass
class ForgetSummary:
    forgotten: list[tuple[str, int]] = field(default_factory=list)  # (absolute path, images dropped)
    failures_forgotten: int = 0  # failure records dropped with them

    @property
    def images(self) -> int:
        return sum(n for _, n in self.forgotten)


def absolute_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """As `normalize_roots` makes them (so that they compare equal to indexed paths), without
    requiring them to exist."""
    out: list[str] = []
    for path in paths:
        absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if absolute not in out:
            out.append(absolute)
    return out


def check_gone(path: str) -> None:
    """Refuse a path that exists, or whose existence cannot be told (a folder without permission
    is not a gone folder)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ClipdexError(
            f"cannot tell whether {path} still exists ({reason}); pass --force to forget it anyway"
        ) from None
    raise ClipdexError(
        f"{path} still exists: 'clipdex index' keeps it up to date; pass --force to forget it anyway"
    )


def forget_paths(
    index_dir: str | os.PathLike[str] | None,
    paths: Iterable[str | os.PathLike[str]],
    *,
    allow_existing: bool = False,
) -> ForgetSummary:
    """Remove every image at or under `paths` from the index, with their failure records.
    All paths are checked before anything is removed."""
    targets = absolute_paths(paths)
    if not allow_existing:
        for path in targets:
            check_gone(path)
    summary = ForgetSummary()
    directory = resolve_index_dir(index_dir)
    catalog = open_catalog(directory, create=False)
    try:
        # The writer lock: no indexing run adds rows under us meanwhile.
        with IndexWriter(VectorStore(directory, catalog)) as writer:
            remaining = list(catalog.records().values())
            removed: list[int] = []
            for target in targets:
                hit = [r for r in remaining if under_roots(r.path, [target])]
                remaining = [r for r in remaining if not under_roots(r.path, [target])]
                removed.extend(r.id for r in hit)
                summary.forgotten.append((target, len(hit)))
            failures = [p for p in catalog.failures() if under_roots(p, targets)]
            summary.failures_forgotten = len(failures)
            if removed or failures:
                writer.commit(removed=removed, forget_failures=failures)
    finally:
        catalog.close()
    return summary
