"""Printing results: aligned tables for people, JSON and bare paths for programs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from retrieval.hits import Hit


def safe(text: str) -> str:
    """Escape control characters (and undecodable bytes) so a file name cannot drive the terminal."""
    out = []
    for ch in text:
        code = ord(ch)
        if code < 32 or code == 127 or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def print_hits(hits: Sequence[Hit], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([h.to_dict() for h in hits], indent=2))
    elif fmt == "jsonl":
        for h in hits:
            print(json.dumps(h.to_dict()))
    elif fmt == "paths":
        write_paths([h.path for h in hits])
    else:
        if not hits:
            print("no results", file=sys.stderr)
            return
        width = len(str(len(hits) + hits[0].rank))
        for h in hits:
            print(f"{h.rank:>{width}}  {h.score:.4f}  {safe(h.path)}")


def write_paths(paths: Sequence[str]) -> None:
    """One path a line: the exact bytes for a pipe (xargs -d '\\n'), escaped for a terminal."""
    if sys.stdout.isatty():
        for p in paths:
            print(safe(p))
        return
    sys.stdout.flush()
    out = sys.stdout.buffer
    for p in paths:
        out.write(os.fsencode(p) + b"\n")
    out.flush()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
