"""What the user does not want indexed: `--exclude` patterns and `.clipdexignore` files.

Both follow .gitignore rules (matched by the `pathspec` library): `--exclude` patterns are
relative to the folder they were given for, a `.clipdexignore`'s to the folder it lies in, and
both apply to that folder and everything below it, whichever folder is indexed, so that
indexing a parent or a subfolder never disagrees about a file.

Precedence, as in git: within one set of patterns the last matching line wins, and a deeper
.clipdexignore overrides a shallower one. `--exclude` patterns come before every
.clipdexignore: they are what the user asked of this index, so a `!name` in some folder's file
cannot bring back what --exclude left out. An excluded folder is not entered, so nothing inside
it can be brought back either (git's rule too).

`--exclude` patterns are remembered per folder in the catalog's meta table; only reading
happens here otherwise: nothing is written inside a photo folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from pathspec import GitIgnoreSpec

from retrieval.core.errors import ClipdexError

IGNORE_FILE = ".clipdexignore"
EXCLUDES_KEY = "excludes"  # catalog meta: JSON {folder: [pattern, ...]}


class BadPatternError(ClipdexError):
    pass


@dataclass(frozen=True)
class PatternSet:
    base: str  # the folder the patterns are relative to
    spec: GitIgnoreSpec

    def verdict(self, path: str, is_dir: bool) -> bool | None:
        """True: excluded; False: brought back by a '!' line; None: no line matches."""
        prefix = self.base.rstrip(os.sep) + os.sep
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :].replace(os.sep, "/")
        # The trailing '/' is how gitignore tells folders: 'raw/' matches only a folder.
        return self.spec.check_file(rel + "/" if is_dir else rel).include


def compile_patterns(lines: Sequence[str], source: str) -> GitIgnoreSpec:
    try:
        return GitIgnoreSpec.from_lines(lines)
    except ValueError as exc:
        raise BadPatternError(f"{source}: {exc}") from None


def read_ignore_file(folder: str) -> PatternSet | None:
    """The .clipdexignore of `folder`, or None if it has none. OSError: it cannot be read."""
    path = os.path.join(folder, IGNORE_FILE)
    try:
        # surrogateescape: a pattern may name a file whose name is not UTF-8, as paths are.
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return PatternSet(folder, compile_patterns(lines, path))


@dataclass(frozen=True)
class Ignore:
    """The patterns in force in one folder of a scan."""

    remembered: Mapping[str, PatternSet] = field(default_factory=dict)  # --exclude, by folder
    excludes: tuple[PatternSet, ...] = ()  # in force here, innermost folder first
    files: tuple[PatternSet, ...] = ()  # .clipdexignore files in force here, deepest first

    def excluded(self, path: str, is_dir: bool = False) -> bool:
        for patterns in (*self.excludes, *self.files):
            verdict = patterns.verdict(path, is_dir)
            if verdict is not None:
                return verdict
        return False

    def entering(self, folder: str, look_for_file: bool = True) -> Ignore:
        """The patterns in force inside `folder`. Raises OSError or BadPatternError when its
        .clipdexignore cannot be used (the caller must then leave the folder alone)."""
        own = self.remembered.get(folder)
        found = read_ignore_file(folder) if look_for_file else None
        if own is None and found is None:
            return self
        return Ignore(
            self.remembered,
            self.excludes if own is None else (own, *self.excludes),
            self.files if found is None else (found, *self.files),
        )


@dataclass
class IgnoreRules:
    """What a scan is told: the remembered --exclude patterns, by folder (absolute paths)."""

    excludes: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @cached_property
    def _compiled(self) -> dict[str, PatternSet]:
        return {
            folder: PatternSet(folder, compile_patterns(list(patterns), f"--exclude for {folder}"))
            for folder, patterns in self.excludes.items()
        }

    def at_root(self, root: str, is_dir: bool = True) -> Ignore | None:
        """The patterns in force in `root` before its own .clipdexignore is read: those of the
        folders above it; None if they exclude `root` or a folder above it (a path is left out
        whichever folder is indexed). Raises like `Ignore.entering`."""
        ignore = Ignore(self._compiled)
        for folder in _folders_above(root):
            if ignore.excluded(folder, is_dir=True):
                return None
            ignore = ignore.entering(folder)
        return None if ignore.excluded(root, is_dir) else ignore


def _folders_above(path: str) -> list[str]:
    """Outermost first: /a/b/c -> ['/', '/a', '/a/b']."""
    out: list[str] = []
    parent = os.path.dirname(path)
    while parent and parent != path:
        out.append(parent)
        path, parent = parent, os.path.dirname(parent)
    return out[::-1]


class Meta(Protocol):
    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


def load_excludes(meta: Meta) -> dict[str, list[str]]:
    raw = meta.get_meta(EXCLUDES_KEY)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in value.values()
    ):
        raise ClipdexError("the index's remembered --exclude patterns are unreadable")
    return value


def remember_excludes(meta: Meta, roots: Sequence[str], patterns: Sequence[str] | None) -> IgnoreRules:
    """The rules for a run over `roots`. `patterns` (from --exclude) replace the ones remembered
    for each root; None keeps them. Empty patterns are dropped, so `--exclude ''` clears a
    root's list. Writes the catalog when `patterns` is given: call it inside the writer."""
    excludes = load_excludes(meta)
    if patterns is not None:
        kept = [p for p in patterns if p.strip()]
        compile_patterns(kept, "--exclude")  # a bad pattern is refused before anything is stored
        for root in roots:
            if kept:
                excludes[root] = kept
            else:
                excludes.pop(root, None)
        meta.set_meta(EXCLUDES_KEY, json.dumps(excludes, sort_keys=True))
    return IgnoreRules(excludes)
