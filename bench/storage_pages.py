"""Bytes per stored 512-d vector, and the cost of fetching 100 random vectors by id, by SQLite page size.

    nice .venv/bin/python bench/storage_pages.py [--vectors 20000] [--dim 512]

Builds one throwaway database per page size under a temporary folder, with the catalog's own
`vectors` table shape (rowid table, primary key (image_id, model_id), index on (model_id,
generation)), in WAL mode as the catalog is, and prints JSON: file bytes per vector, and the
median time of 100 point look-ups by random id (the exact re-ranking of an ANN search does
this), warm (pages in the OS cache, as in a running server). Preliminary figures: the machine
may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PAGE_SIZES = (4096, 16384, 32768, 65536)
_DDL = (
    "CREATE TABLE vectors (image_id INTEGER NOT NULL, model_id INTEGER NOT NULL, "
    "generation INTEGER NOT NULL DEFAULT 0, vector BLOB NOT NULL, PRIMARY KEY (image_id, model_id))",
    "CREATE INDEX ix_vectors_generation ON vectors (model_id, generation)",
)


def measure(folder: Path, page_size: int, n: int, dim: int, rng: np.random.Generator) -> dict:
    path = folder / f"pages-{page_size}.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    for ddl in _DDL:
        conn.execute(ddl)
    batch = 2000
    for start in range(0, n, batch):
        vecs = rng.standard_normal((min(batch, n - start), dim)).astype(np.float32)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO vectors (image_id, model_id, generation, vector) VALUES (?, 1, ?, ?)",
            [(start + i + 1, start // batch + 1, v.tobytes()) for i, v in enumerate(vecs)],
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = os.path.getsize(path)
    times = []
    for _ in range(30):
        ids = rng.choice(n, 100, replace=False) + 1
        marks = ",".join("?" * len(ids))
        t0 = time.perf_counter()
        rows = conn.execute(
            f"SELECT image_id, vector FROM vectors WHERE model_id = 1 AND image_id IN ({marks})",
            [int(i) for i in ids],
        ).fetchall()
        times.append(time.perf_counter() - t0)
        assert len(rows) == 100
    conn.close()
    return {
        "page_size": page_size,
        "bytes_per_vector": round(size / n),
        "fetch_100_random_ms_p50": round(statistics.median(times) * 1000, 2),
        "fetch_100_random_ms_max": round(max(times) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="clipdex-pages-") as tmp:
        results = [measure(Path(tmp), p, args.vectors, args.dim, rng) for p in PAGE_SIZES]
    print(
        json.dumps(
            {"preliminary": True, "vectors": args.vectors, "dim": args.dim, "results": results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
