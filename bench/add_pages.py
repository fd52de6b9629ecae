"""Where the bytes of an add go: the catalog pages one `clipdex import` writes, by table and index.

    .venv/bin/python bench/add_pages.py --index INDEX --source EMBEDDINGS --pretrained CKPT

Runs `clipdex import SOURCE` into a copy of INDEX (deleted after) with SQLite's automatic
checkpoints off, keeps the write-ahead log the import wrote (copied when its last connection
closes, before SQLite checkpoints it into the file), and maps each logged page to the table or
index that owns it (SQLite's dbstat). Prints JSON: the pages and bytes logged per B-tree. Every
logged page is written once more when it is checkpointed into the catalog file, so the catalog's
share of the import's writes is about twice the log. bench/scale.py measures the writes
themselves (/proc/<pid>/io); this says which B-trees they come from.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sqlite3
import struct
import tempfile
from pathlib import Path

from scale import cli_child, import_args, index_copy, run_cli

ROOT = Path(__file__).resolve().parents[1]
_WAL_HEADER, _FRAME_HEADER = 32, 24


def import_keeping_log(log_copy: str, args: list[str]) -> None:
    """Child: the clipdex command line with the catalog's log kept aside (see the docstring)."""
    from sqlalchemy import event

    import retrieval.storage.catalog_writes as catalog_writes

    make_engine = catalog_writes.make_engine

    def keeping_log(location):  # type: ignore[no-untyped-def]
        engine = make_engine(location)

        @event.listens_for(engine, "connect")
        def _no_checkpoints(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.execute("PRAGMA wal_autocheckpoint = 0")

        @event.listens_for(engine.pool, "close")
        def _keep(_dbapi_conn, _record):  # type: ignore[no-untyped-def]
            wal = Path(f"{location.sqlite_path}-wal")
            if not Path(log_copy).exists() and wal.exists() and wal.stat().st_size > 0:
                shutil.copyfile(wal, log_copy)

        return engine

    catalog_writes.make_engine = keeping_log
    run_cli(args)


def logged_pages(wal: Path) -> tuple[int, list[int]]:
    """(page size, the page number of each frame) of a SQLite write-ahead log."""
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    pages, offset = [], _WAL_HEADER
    while offset + _FRAME_HEADER + page_size <= len(data):
        pages.append(struct.unpack(">I", data[offset : offset + 4])[0])
        offset += _FRAME_HEADER + page_size
    return page_size, pages


def by_btree(catalog: Path, page_size: int, pages: list[int]) -> dict[str, dict[str, int]]:
    """Frames and distinct pages per table or index, largest first."""
    with sqlite3.connect(catalog) as conn:
        owner = dict(conn.execute("SELECT pageno, name FROM dbstat"))
    frames = collections.Counter(owner.get(p, "(freed)") for p in pages)
    distinct = collections.Counter(owner.get(p, "(freed)") for p in set(pages))
    return {
        name: {"frames": n, "distinct_pages": distinct[name], "bytes": n * page_size}
        for name, n in frames.most_common()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, help="the index to add to (left as it is)")
    ap.add_argument("--source", type=Path, help="embeddings in clip-retrieval's layout")
    ap.add_argument("--pretrained", help="the checkpoint the index was built with")
    ap.add_argument("--keep-log", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.keep_log:
        import_keeping_log(args.keep_log, args.rest)
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with index_copy(args.index) as copy, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "catalog.wal"
        args_ = import_args(args.source, copy, args.pretrained)
        _, summary = cli_child(Path(__file__), ["--keep-log", str(log)], args_, env)
        page_size, pages = logged_pages(log)
        report = {
            "added": summary["added"],
            "page_size": page_size,
            "logged_bytes": len(pages) * page_size,
            "by_btree": by_btree(copy / "catalog.sqlite", page_size, pages),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
