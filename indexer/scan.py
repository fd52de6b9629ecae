"""Walk the photo folders: image files in, junk and hidden entries out, symlink loops cut.

Only reads: nothing here (or anywhere in clipdex) writes inside a scanned folder.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from retrieval.errors import ClipdexError
from retrieval.imageio import image_extensions

JUNK_DIRS = {"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "lost+found"}


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanProblem:
    path: str
    reason: str


def is_junk(name: str) -> bool:
    # '.*' covers '._*' (macOS resource forks), '.Trash*', '.thumbnails' and the like.
    return name.startswith(".") or name in JUNK_DIRS


def normalize_roots(roots: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Absolute roots; a missing root is an error, so that an unmounted disk never reads as
    'every photo was deleted'."""
    out: list[str] = []
    for root in roots:
        path = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.exists(path):
            raise ClipdexError(f"folder not found: {path}")
        if path not in out:
            out.append(path)
    return out


def under_roots(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def scan(roots: Iterable[str], extensions: frozenset[str] | None = None) -> Iterator[FileInfo | ScanProblem]:
    exts = extensions if extensions is not None else image_extensions()
    visited: set[tuple[int, int]] = set()
    for root in roots:
        try:
            st = os.stat(root)
        except OSError as exc:
            yield ScanProblem(root, _reason(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, exts, visited, ancestors=())
        elif stat.S_ISREG(st.st_mode) and os.path.splitext(root)[1].lower() in exts:
            yield FileInfo(root, st.st_size, st.st_mtime_ns)


def _walk(
    directory: str,
    exts: frozenset[str],
    visited: set[tuple[int, int]],
    ancestors: tuple[tuple[int, int], ...],
) -> Iterator[FileInfo | ScanProblem]:
    try:
        dst = os.stat(directory)
    except OSError as exc:
        yield ScanProblem(directory, _reason(exc))
        return
    key = (dst.st_dev, dst.st_ino)
    if key in ancestors:
        yield ScanProblem(directory, "symbolic link loop: this folder contains itself")
        return
    if key in visited:  # the same folder reached through another link: scanned once already
        return
    visited.add(key)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield ScanProblem(directory, _reason(exc))
        return
    for entry in entries:
        if is_junk(entry.name):
            continue
        path = entry.path
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:
            if entry.is_symlink():
                looped = exc.errno == errno.ELOOP
                yield ScanProblem(path, "symbolic link loop" if looped else "broken symbolic link")
            elif _has_image_ext(entry.name, exts):
                yield ScanProblem(path, _reason(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(path, exts, visited, ancestors + (key,))
        elif stat.S_ISREG(st.st_mode) and _has_image_ext(entry.name, exts):
            yield FileInfo(path, st.st_size, st.st_mtime_ns)


def _has_image_ext(name: str, exts: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in exts


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)
