"""Walk the photo folders: image files in, junk, hidden and excluded entries out, symlink loops cut.

What could not be read is reported as data, never as silence: a folder that cannot be listed
(a `SkippedFolder`) and a file that cannot be stat'ed (a `UnreadableFile`) were not seen gone, and
the plan keeps their rows. Only reads: nothing here (or anywhere in clipdex) writes inside a
scanned folder.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from retrieval.core.errors import ClipdexError
from retrieval.core.images import image_extensions

from .ignore import IGNORE_FILE, Ignore, IgnoreRules

JUNK_DIRS = {"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "lost+found"}


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class UnreadableFile:
    """A file (or link) that is there but could not be looked at."""

    path: str
    reason: str


@dataclass(frozen=True)
class SkippedFolder:
    """A folder (or root) whose content is unknown this time: it could not be listed."""

    path: str
    reason: str


ScanItem = FileInfo | UnreadableFile | SkippedFolder


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


def scan(
    roots: Iterable[str], extensions: frozenset[str] | None = None, ignore: IgnoreRules | None = None
) -> Iterator[ScanItem]:
    """`ignore`: the remembered --exclude patterns; .clipdexignore files are always obeyed, also
    those above a root. A root that they exclude yields nothing: an excluded path stays out
    whichever folder is indexed, so that indexing a parent and a subfolder never disagree."""
    exts = extensions if extensions is not None else image_extensions()
    rules = ignore if ignore is not None else IgnoreRules()
    visited: set[tuple[int, int]] = set()
    for root in roots:
        try:
            st = os.stat(root)
        except OSError as exc:
            yield SkippedFolder(root, _reason(exc))
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        try:
            above = rules.at_root(root, is_dir)
        except (OSError, ClipdexError) as exc:
            yield SkippedFolder(root, f"cannot read a {IGNORE_FILE} above it: {_reason(exc)}")
            continue
        if above is None:
            continue
        if is_dir:
            yield from _walk(root, exts, visited, ancestors=(), ignore=above)
        elif stat.S_ISREG(st.st_mode) and os.path.splitext(root)[1].lower() in exts:
            yield FileInfo(root, st.st_size, st.st_mtime_ns)


def _walk(
    directory: str,
    exts: frozenset[str],
    visited: set[tuple[int, int]],
    ancestors: tuple[tuple[int, int], ...],
    ignore: Ignore,
) -> Iterator[ScanItem]:
    try:
        dst = os.stat(directory)
    except OSError as exc:
        yield SkippedFolder(directory, _reason(exc))
        return
    key = (dst.st_dev, dst.st_ino)
    if key in ancestors:
        yield UnreadableFile(directory, "symbolic link loop: this folder contains itself")
        return
    if key in visited:  # the same folder reached through another link: scanned once already
        return
    visited.add(key)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield SkippedFolder(directory, _reason(exc))
        return
    try:
        ignore = ignore.entering(directory, look_for_file=any(e.name == IGNORE_FILE for e in entries))
    except (OSError, ClipdexError) as exc:
        # Without its patterns this folder's content cannot be told apart from what the user
        # excluded: leave it (and its rows) as they are rather than guess.
        yield SkippedFolder(directory, f"cannot read its {IGNORE_FILE}: {_reason(exc)}")
        return
    for entry in entries:
        if is_junk(entry.name):
            continue
        path = entry.path
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:
            # The type is unknown: a pattern for either a file or a folder of this name counts.
            if ignore.excluded(path) or ignore.excluded(path, is_dir=True):
                continue
            if entry.is_symlink():
                looped = exc.errno == errno.ELOOP
                yield UnreadableFile(path, "symbolic link loop" if looped else "broken symbolic link")
            elif _is_dir_entry(entry):
                yield SkippedFolder(path, _reason(exc))
            elif _has_image_ext(entry.name, exts):
                yield UnreadableFile(path, _reason(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            if not ignore.excluded(path, is_dir=True):  # an excluded folder is not even entered
                yield from _walk(path, exts, visited, ancestors + (key,), ignore)
        elif stat.S_ISREG(st.st_mode) and _has_image_ext(entry.name, exts) and not ignore.excluded(path):
            yield FileInfo(path, st.st_size, st.st_mtime_ns)


def _is_dir_entry(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)  # from the listing itself: no stat needed
    except OSError:
        return False


def _has_image_ext(name: str, exts: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in exts


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)
