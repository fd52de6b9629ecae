"""Open cost and bytes written at 200k vectors: the catalog as the one durable copy (schema 3).

    nice .venv/bin/python bench/storage_scale.py [--images 200000] [--code DIR] [--json OUT]

Builds an index under a temporary folder through the library's own IndexWriter: random unit
float32 vectors (512-d) with fake NewImage rows (files that do not exist), in batches of 1000.
Then, each step in a fresh child process (the imports excluded from the timings):

- open + first search with the FAISS file's stamp current (nothing to catch up);
- a writer process adds 1,000 images; then open + first search (catching up, or a file the
  writer rewrote);
- a writer process adds 10,000 images; its bytes written (/proc/self/io write_bytes: the catalog,
  its WAL and any FAISS file), its time, and whether vectors.faiss was rewritten; then open +
  first search again.

`--code DIR` runs the same against another checkout (e.g. `git archive HEAD retrieval | tar -x -C
DIR` for the code before this change); `--add-batch` sets the images per commit of the adds (the
indexer commits one embedding batch, 32, at a time); `--page-size` the new catalog's SQLite page
size. Prints JSON. Preliminary: a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM = 512

_COMMON = """
import os, sys, time, resource
sys.path.insert(0, {code!r})
import numpy as np
from pathlib import Path
from retrieval.storage.catalog import open_catalog
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.writer import IndexWriter
from retrieval.storage.records import NewImage
import retrieval.storage.catalog as catalog_module
if os.environ.get("BENCH_PAGE_SIZE"):  # new catalogs only (schema 3 code)
    catalog_module.PAGE_SIZE = int(os.environ["BENCH_PAGE_SIZE"])

def write_bytes():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes")).split()[1])
"""

_WRITE = (
    _COMMON
    + """
index_dir, start, count, seed, batch = Path(sys.argv[1]), *map(int, sys.argv[2:6])
rng = np.random.default_rng(seed)
t0, w0 = time.perf_counter(), write_bytes()
catalog = open_catalog(index_dir, create=True)
with IndexWriter(VectorStore(index_dir, catalog)) as writer:
    writer.bind_signature({{"arch": "synthetic", "pretrained": "none", "dim": {dim}}})
    writer.reconcile()
    for at in range(start, start + count, batch):
        n = min(batch, start + count - at)
        v = rng.standard_normal((n, {dim}), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        writer.commit(added=[
            NewImage(f"/synthetic/{{at + i:07d}}.jpg", 100_000, 1_600_000_000 * 10**9, f"{{at + i:064x}}",
                     500, 375, "JPEG", 1_500_000_000.0 + at + i, v[i])
            for i in range(n)
        ])
catalog.close()
print({{"seconds": round(time.perf_counter() - t0, 2), "write_bytes": write_bytes() - w0}})
"""
)

_OPEN = (
    _COMMON
    + """
index_dir = Path(sys.argv[1])
q = np.random.default_rng(7).standard_normal({dim}).astype(np.float32)
q /= np.linalg.norm(q)
t0 = time.perf_counter()
catalog = open_catalog(index_dir, create=False)
store = VectorStore(index_dir, catalog)
scores, ids = store.faiss.search(q[None], 10)
t1 = time.perf_counter()
assert store.faiss.ntotal == catalog.count()
print({{"open_first_search_s": round(t1 - t0, 3), "ntotal": int(store.faiss.ntotal),
       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}})
"""
)


def child(script: str, code: str, *args: object, page_size: int | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if page_size:
        env["BENCH_PAGE_SIZE"] = str(page_size)
    done = subprocess.run(
        [sys.executable, "-c", script.format(code=code, dim=DIM), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr[-3000:]}")
    return eval(done.stdout.strip().splitlines()[-1])  # a dict literal printed by our own child


def file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def run(code: str, images: int, work: Path, add_batch: int, page_size: int | None) -> dict:
    index_dir = work / "index"
    index_dir.mkdir()
    out: dict = {"code": code, "images": images, "add_batch": add_batch, "page_size": page_size or "default"}
    out["build"] = child(_WRITE, code, index_dir, 0, images, 0, 1000, page_size=page_size)
    out["catalog_bytes"] = os.path.getsize(index_dir / "catalog.sqlite")
    out["faiss_bytes"] = os.path.getsize(index_dir / "vectors.faiss")
    out["open_current"] = child(_OPEN, code, index_dir)
    for added, seed in ((1_000, 1), (10_000, 2)):
        before = file_id(index_dir / "vectors.faiss")
        n = child(_OPEN, code, index_dir)["ntotal"]
        step = child(_WRITE, code, index_dir, 10_000_000 + n, added, seed, add_batch)
        step["faiss_rewritten"] = file_id(index_dir / "vectors.faiss") != before
        step["open_after"] = child(_OPEN, code, index_dir)
        out[f"add_{added}"] = step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose retrieval package runs")
    parser.add_argument("--add-batch", type=int, default=1000, help="images per commit when adding")
    parser.add_argument("--page-size", type=int, help="SQLite page size of the new catalog")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipdex-scale-") as tmp:
        code = str(Path(args.code).resolve())
        result = {"preliminary": True, **run(code, args.images, Path(tmp), args.add_batch, args.page_size)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
