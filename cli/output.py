"""Printing results: aligned tables for people, JSON and bare paths for programs."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from retrieval.core.hits import Hit

if TYPE_CHECKING:
    from retrieval.search.duplicates import DuplicateGroup
    from retrieval.search.zeroshot import ImageLabels, LabelScore


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


def print_hits(hits: Sequence[Hit], fmt: str, preview: bool = False) -> None:
    """`preview`: inline thumbnails under each line of the table, where the terminal can."""
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
        previewer = _previewer(preview)
        for h in hits:
            print(f"{h.rank:>{width}}  {h.score:.4f}  {safe(h.path)}")
            if previewer is not None:
                previewer.show(h.path)


def _previewer(wanted: bool):  # type: ignore[no-untyped-def]
    if not wanted:
        return None
    from .preview import Previewer

    sys.stdout.flush()
    previewer = Previewer(sys.stdout)
    return previewer if previewer.active else None


def print_duplicates(groups: Sequence[DuplicateGroup], fmt: str, preview: bool = False) -> None:
    if fmt == "json":
        print(json.dumps([g.to_dict() for g in groups], indent=2))
    elif fmt == "jsonl":
        for g in groups:
            print(json.dumps(g.to_dict()))
    elif fmt == "paths":  # one group a paragraph
        for n, g in enumerate(groups):
            if n:
                write_paths([""])
            write_paths(list(g.paths))
    else:
        if not groups:
            print("no near-duplicates", file=sys.stderr)
            return
        previewer = _previewer(preview)
        for n, g in enumerate(groups, start=1):
            print(f"group {n}: {len(g.ids)} images, cosine {g.min_score:.4f} to {g.max_score:.4f}")
            for path in g.paths:
                print(f"  {safe(path)}")
                if previewer is not None:
                    previewer.show(path)


def print_labels(results: Sequence[ImageLabels], fmt: str) -> None:
    """Zero-shot labels per image: `path  label prob  label prob ...`."""
    if fmt == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif fmt == "jsonl":
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        if not results:
            print("no images", file=sys.stderr)
            return
        for r in results:
            labels = "  ".join(f"{safe(s.label)} {s.probability:.3f}" for s in r.labels)
            print(f"{safe(r.path)}  {labels}".rstrip())


def print_ranked_texts(scores: Sequence[LabelScore], fmt: str) -> None:
    """Candidate texts for one image, best first: rank, cosine, probability, text."""
    if fmt == "json":
        print(json.dumps([{"rank": n, **s.to_dict()} for n, s in enumerate(scores, 1)], indent=2))
    elif fmt == "jsonl":
        for n, s in enumerate(scores, 1):
            print(json.dumps({"rank": n, **s.to_dict()}))
    else:
        width = len(str(len(scores)))
        for n, s in enumerate(scores, 1):
            print(f"{n:>{width}}  {s.score:.4f}  {s.probability:.3f}  {safe(s.label)}")


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


class ProgressBar:
    """tqdm on stderr, created on the first update so that nothing shows for a no-op run.
    `keep`: leave the finished bar on screen (tqdm's `leave`)."""

    def __init__(self, unit: str, *, keep: bool = False) -> None:
        self.unit = unit
        self.keep = keep
        self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            # disable=None: no bar where stderr is not a terminal
            options = {"unit": self.unit, "unit_scale": True, "dynamic_ncols": True, "disable": None}
            self._bar = tqdm(total=total, leave=self.keep, **options)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def interruptible(bar: ProgressBar) -> Iterator[threading.Event]:
    """A long run's Ctrl-C: the first sets the event (the run stops after the batch in flight and
    reports), a second one stops at once: exit status 130, and what was committed stays."""
    stop = threading.Event()

    def on_sigint(signum, frame):  # type: ignore[no-untyped-def]
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the batch in flight (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    except KeyboardInterrupt:
        # Typer would turn this into a silent exit; say what happened to the work.
        bar.close()
        print("clipdex: interrupted; every batch committed before is kept", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
