"""Catalog operations per second, SQLite against PostgreSQL, for the indexer's commit pattern.

    .venv/bin/python bench/catalog_ops.py                          # a throwaway PostgreSQL of its own
    .venv/bin/python bench/catalog_ops.py --images 20000 --json catalog_ops.json
    .venv/bin/python bench/catalog_ops.py --postgres postgresql+psycopg://me@dbhost/photos

Both catalogs are made afresh and driven through retrieval.storage.catalog's own API (open_catalog,
commit_changes, state, records, stored_vectors, select_ids), in one process, ALTERNATING: the
commits go in blocks (some batches to one backend, as many to the other, the first backend of
each block taking turns) and each read is measured in rounds that swap the order, so a busy spell
on a shared machine hits both. Measured:

- commit: batches of --batch new images (the indexer's default batch, 64) with their unit-norm
  float32 vectors, one commit_changes each, under the writer lock as IndexWriter holds it ->
  images/s and commits/s over --images images;
- replace: one commit that removes --batch images and adds --batch others (changed files) -> /s;
- state(), records(100 ids), stored_vectors(100 ids), select_ids(a 1% folder) -> calls/s, on
  PostgreSQL after the ANALYZE that clipdex's writer itself runs at the end of a run of 1,000
  changes or more (Catalog.refresh_statistics; --no-analyze: without). SQLite has no automatic
  ANALYZE, and the catalog runs none: it is read as clipdex leaves it.

The PostgreSQL catalog lives in a schema of its own (made here, dropped at the end), so --postgres
may name any database the user can create schemas in. Without --postgres: $CLIPDEX_TEST_POSTGRES
(scripts/test.sh's server), else a server started here with scripts/postgres.sh --durable (fsync
on, synchronous_commit off: the durability of the SQLite catalog in WAL mode with
synchronous=NORMAL), stopped at the end. The JSON names the server's durability settings: with
fsync off the comparison is not like for like. Vectors and rows are made before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_facts

ROOT = Path(__file__).resolve().parents[1]  # on sys.path through machine (runnable as a script)

from retrieval.core.errors import ClipdexError  # noqa: E402
from retrieval.core.filters import Filters  # noqa: E402
from retrieval.storage.catalog import Catalog, open_catalog  # noqa: E402
from retrieval.storage.catalog_location import CatalogLocation, connect_postgres, normalise_url  # noqa: E402
from retrieval.storage.records import NewImage  # noqa: E402

BACKENDS = ("sqlite", "postgresql")
FOLDERS = 100  # images spread evenly over this many folders: one folder is a 1% filter
READ_IDS = 100  # ids per records / stored_vectors call: an exact re-ranking's candidates


class BenchError(Exception):
    """The benchmark cannot run as asked: printed as one line, exit status 1."""


@dataclass
class Timing:
    ops: int = 0
    each: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.each)

    def add(self, seconds: float, ops: int = 1) -> None:
        self.ops += ops
        self.each.append(seconds)

    def summary(self, unit: str) -> dict[str, float]:
        out = {f"{unit}_per_s": self.ops / self.seconds if self.seconds else 0.0, "calls": len(self.each)}
        if self.each:
            out["median_ms"] = float(np.median(self.each) * 1000)
            out["p90_ms"] = float(np.percentile(self.each, 90) * 1000)
        return out


# -- data ---------------------------------------------------------------------------------
def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs


def folder_of(i: int) -> str:
    return f"/bench/photos/f{i % FOLDERS:03d}"


def new_images(start: int, count: int, dim: int, rng: np.random.Generator) -> list[NewImage]:
    """`count` images as the indexer commits them: paths in FOLDERS folders, a sha256-long hash."""
    vectors = unit_vectors(rng, count, dim)
    return [
        NewImage(
            path=f"{folder_of(i)}/IMG_{i:07d}.jpg",
            size=2_000_000 + i,
            mtime_ns=1_700_000_000_000_000_000 + i,
            content_hash=f"{i:064x}",
            width=4032,
            height=3024,
            format="JPEG",
            taken_at=1_600_000_000.0 + i,
            vector=vectors[k],
        )
        for k, i in enumerate(range(start, start + count))
    ]


# -- PostgreSQL ---------------------------------------------------------------------------
@contextmanager
def throwaway_server() -> Iterator[tuple[str, bool]]:
    """scripts/postgres.sh --durable with a state file of its own (never another run's server)."""
    state = Path(tempfile.mkdtemp(prefix="clipdex-bench-pg-")) / "state.env"
    env = {**os.environ, "CLIPDEX_PG_STATE": str(state)}
    script = str(ROOT / "scripts" / "postgres.sh")
    try:
        started = subprocess.run([script, "start", "--durable"], env=env, capture_output=True, text=True)
        if started.returncode != 0:
            raise BenchError(f"scripts/postgres.sh could not start a server: {started.stderr.strip()}")
        url = subprocess.run([script, "url"], env=env, capture_output=True, text=True, check=True).stdout
        yield url.strip(), True
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True)
        shutil.rmtree(state.parent, ignore_errors=True)


@contextmanager
def bench_schema(base_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh schema in the database of `base_url`; yields (its URL, the server's settings)."""
    from psycopg import sql

    schema = f"bench_{secrets.token_hex(6)}"
    try:
        admin = connect_postgres(CatalogLocation(ROOT, normalise_url(base_url)), connect_timeout=10)
    except ClipdexError as exc:
        raise BenchError(str(exc)) from None
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers")
        show = sql.SQL("SHOW {}")
        settings = {n: admin.execute(show.format(sql.Identifier(n))).fetchone()[0] for n in names}
        try:
            joiner = "&" if "?" in base_url else "?"
            yield f"{base_url}{joiner}options=-csearch_path%3D{schema}", settings
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# -- the measurements ---------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    catalog: Catalog
    model_id: int
    ids: list[int] = field(default_factory=list)
    timings: dict[str, Timing] = field(default_factory=dict)

    def timed(self, what: str, fn: Callable[..., Any], *args: Any, ops: int = 1, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings.setdefault(what, Timing()).add(time.perf_counter() - t0, ops)
        return out


def in_turn(backends: list[Backend], round_no: int) -> list[Backend]:
    """Who goes first swaps each round: a busy spell does not always hit the same one."""
    return backends if round_no % 2 == 0 else backends[::-1]


def commit_phase(backends: list[Backend], images: list[NewImage], batch: int, block: int) -> None:
    """All of `images` into each backend, `block` batches at a time per backend, taking turns."""
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    for b, start in enumerate(range(0, len(batches), block)):
        for backend in in_turn(backends, b):
            for chunk in batches[start : start + block]:
                new = backend.timed("commit", backend.catalog.commit_changes, added=chunk, ops=len(chunk))
                backend.ids.extend(new)


def replace_phase(backends: list[Backend], fresh: list[list[NewImage]], rng: np.random.Generator) -> None:
    """Each round: one commit removing len(chunk) existing images and adding the chunk."""
    for r, chunk in enumerate(fresh):
        for backend in in_turn(backends, r):
            picks = rng.choice(len(backend.ids), size=len(chunk), replace=False)
            gone = [backend.ids[i] for i in picks]
            commit = backend.catalog.commit_changes
            new = backend.timed("replace", commit, added=chunk, removed=gone, ops=len(chunk))
            keep = set(gone)
            backend.ids = [i for i in backend.ids if i not in keep] + list(new)


def read_phase(backends: list[Backend], dim: int, rounds: int, calls: int, rng: np.random.Generator) -> None:
    one_folder = Filters(folders=(folder_of(7),))
    for r in range(rounds):
        for backend in in_turn(backends, r):
            cat, ids = backend.catalog, np.asarray(backend.ids)
            for _ in range(calls):
                backend.timed("state", cat.state)
            for _ in range(calls):
                wanted = rng.choice(ids, size=READ_IDS, replace=False).tolist()
                if len(backend.timed("records", cat.records, wanted)) != READ_IDS:
                    raise BenchError(f"{backend.name}: records() missed some of {READ_IDS} ids")
            for _ in range(calls):
                wanted = rng.choice(ids, size=READ_IDS, replace=False).tolist()
                _, vecs = backend.timed("stored_vectors", cat.stored_vectors, wanted, dim, backend.model_id)
                if vecs.shape != (READ_IDS, dim):
                    raise BenchError(f"{backend.name}: stored_vectors() gave {vecs.shape}")
            for _ in range(max(1, calls // 10)):
                selected = backend.timed("select_folder", cat.select_ids, one_folder)
                if not 0 < len(selected) < len(ids):
                    raise BenchError(f"{backend.name}: a 1% folder selected {len(selected)} of {len(ids)}")


UNITS = {
    "commit": "images",
    "replace": "images",
    "state": "calls",
    "records": "calls",
    "stored_vectors": "calls",
    "select_folder": "calls",
}


def run(args: argparse.Namespace, pg_url: str, work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    images = new_images(0, args.images, args.dim, rng)
    first_new = args.images  # the replacements are images never seen before
    fresh = [new_images(first_new + k * args.batch, args.batch, args.dim, rng) for k in range(args.replaces)]
    signature = {"dim": args.dim, "arch": "bench", "pretrained": "none"}
    backends: list[Backend] = []
    with ExitStack() as stack:
        for name in BACKENDS:
            (work / name).mkdir()  # the index folder (the PostgreSQL one holds catalog.url)
            catalog = open_catalog(work / name, create=True, url=pg_url if name == "postgresql" else None)
            stack.callback(catalog.close)
            backends.append(Backend(name, catalog, catalog.set_model_signature(signature)))
            stack.enter_context(catalog.writer_lock())  # as IndexWriter: held for the whole run
        commit_phase(backends, images, args.batch, args.block)
        replace_phase(backends, fresh, rng)
        if args.analyze:
            for backend in backends:
                backend.catalog.refresh_statistics()  # what the writer runs (nothing in SQLite)
        read_phase(backends, args.dim, args.rounds, args.calls, rng)
        for backend in backends:
            if backend.catalog.count() != args.images:
                raise BenchError(f"{backend.name} holds {backend.catalog.count()} images, not {args.images}")
    results: dict[str, Any] = {}
    for backend in backends:
        out = {what: t.summary(UNITS[what]) for what, t in backend.timings.items()}
        commits = backend.timings["commit"]
        out["commit"]["commits_per_s"] = len(commits.each) / commits.seconds
        results[backend.name] = out
    ratios = {}
    for what, unit in UNITS.items():
        key = f"{unit}_per_s"
        ratios[what] = results["postgresql"][what][key] / results["sqlite"][what][key]
    return {"results": results, "ratio_postgresql_over_sqlite": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64, help="images a commit (the indexer's default batch)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=16, help="batches to one backend, then the other's turn")
    parser.add_argument("--replaces", type=int, default=40, help="delete+re-add commits per backend")
    parser.add_argument("--rounds", type=int, default=4, help="read rounds (the order swaps each round)")
    parser.add_argument("--calls", type=int, default=200, help="calls of each read per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-analyze",
        dest="analyze",
        action="store_false",
        help="read PostgreSQL without planner statistics (as in the first minute after a "
        "large commit, before autovacuum's ANALYZE)",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("CLIPDEX_TEST_POSTGRES") or None,
        help="postgresql+psycopg:// URL of a database (default: $CLIPDEX_TEST_POSTGRES, "
        "else a throwaway server started here)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.images < 10 * FOLDERS or args.images < READ_IDS + args.batch:
        raise BenchError(f"--images must be at least {max(10 * FOLDERS, READ_IDS + args.batch)}")
    facts = machine_facts()
    with ExitStack() as stack:
        server = throwaway_server() if args.postgres is None else _given(args.postgres)
        base_url, started = stack.enter_context(server)
        pg_url, settings = stack.enter_context(bench_schema(base_url))
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="clipdex-catalog-ops-"))
        t0 = time.perf_counter()
        report = run(args, pg_url, Path(work))
        wall = time.perf_counter() - t0
    report = {
        "machine": facts,
        "load_average_after": list(os.getloadavg()),
        "wall_s": wall,
        "params": {k: v for k, v in vars(args).items() if k not in ("postgres", "json", "analyze")},
        "postgresql": {
            "server": "started here (scripts/postgres.sh --durable)" if started else "given",
            "reads_after_analyze": args.analyze,
            **settings,
        },
        "sqlite": {"where": "a temporary folder on " + _filesystem(Path(tempfile.gettempdir()))},
        **report,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


@contextmanager
def _given(url: str) -> Iterator[tuple[str, bool]]:
    yield url, False


def _filesystem(path: Path) -> str:
    """The filesystem type of `path` (from /proc/mounts): tmpfs makes every fsync free."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and path.resolve().is_relative_to(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"catalog_ops: {exc}", file=sys.stderr)
        sys.exit(1)
