"""Diff a scan against the catalog: what to embed, what moved, what was deleted.

A file is known by (path, size, mtime). A new path whose size equals a vanished row's size is
hashed at once: equal content means the file moved, and its row (and vector) follow it.

Only a file positively seen gone vanishes: rows at or under a path the scan could not read (a
folder it could not list, a file or link it could not stat) stay as they are.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from retrieval.storage.records import FailureRecord, ImageRecord, Move

from .scan import FileInfo, ScanItem, SkippedFolder, UnreadableFile


@dataclass(frozen=True)
class EmbedJob:
    info: FileInfo
    previous: ImageRecord | None = None  # the row this file's new vector replaces
    force: bool = False  # embed even if the bytes did not change (--reindex)
    content_hash: str | None = None  # sha256 the plan already computed (a move candidate): not done twice


@dataclass
class Plan:
    jobs: list[EmbedJob] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    unchanged: int = 0
    problems: list[UnreadableFile] = field(default_factory=list)
    skipped: list[SkippedFolder] = field(default_factory=list)  # their rows were kept as they are
    known_failures: list[FailureRecord] = field(default_factory=list)  # unchanged since they last failed
    forget_failures: list[str] = field(default_factory=list)  # failure records of vanished files


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_plan(
    scanned: Iterable[ScanItem],
    existing: dict[str, ImageRecord],
    *,
    failures: dict[str, FailureRecord] | None = None,
    reindex: bool = False,
    hash_file: Callable[[str], str] = sha256_file,
) -> Plan:
    """`existing`: the catalog rows under the scanned roots, by path; `failures`: the recorded
    failures under those roots (an unchanged file that failed is not tried again, unless reindex)."""
    failures = failures or {}
    plan = Plan()
    seen: set[str] = set()
    new_files: list[FileInfo] = []
    for item in scanned:
        if isinstance(item, UnreadableFile):
            plan.problems.append(item)
            continue
        if isinstance(item, SkippedFolder):
            plan.skipped.append(item)
            continue
        seen.add(item.path)
        record = existing.get(item.path)
        failure = failures.get(item.path)
        if (
            record is None
            and failure is not None
            and not reindex
            and (failure.size, failure.mtime_ns)
            == (
                item.size,
                item.mtime_ns,
            )
        ):
            plan.known_failures.append(failure)
        elif record is None:
            new_files.append(item)
        elif reindex or (record.size, record.mtime_ns) != (item.size, item.mtime_ns):
            plan.jobs.append(EmbedJob(item, record, force=reindex))
        else:
            plan.unchanged += 1

    unknown = {item.path for item in (*plan.problems, *plan.skipped)}

    def gone(path: str) -> bool:
        return path not in seen and not _at_or_under(path, unknown)

    # Rows under an unreadable path are not move candidates either: their file may still be
    # there, and would come back as a second row once it can be read again.
    vanished: dict[int, list[ImageRecord]] = defaultdict(list)
    for path, record in existing.items():
        if gone(path):
            vanished[record.size].append(record)
    for info in new_files:
        candidates = vanished.get(info.size) if not reindex else None
        digest = None
        if candidates:
            try:
                digest = hash_file(info.path)
            except OSError:
                digest = None  # unreadable now: the decode stage reports it
            match = next((r for r in candidates if r.content_hash == digest), None)
            if match is not None:
                candidates.remove(match)
                plan.moves.append(Move(match.id, info.path, info.size, info.mtime_ns))
                continue
        plan.jobs.append(EmbedJob(info, content_hash=digest))
    plan.removed = sorted(r.id for rows in vanished.values() for r in rows)
    plan.forget_failures = [path for path in failures if gone(path)]
    return plan


def _at_or_under(path: str, folders: set[str]) -> bool:
    """`path` is one of `folders` or lies below one; by ancestor lookups, so that many unreadable
    paths cost no more than a few."""
    if not folders:
        return False
    while True:
        if path in folders:
            return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
