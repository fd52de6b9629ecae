"""Latency of `clipdex serve` at 100,000 images, measured through HTTP on loopback.

    .venv/bin/python bench/serve_latency.py ../shared/datasets/imagenet-sample --json /tmp/serve.json

Builds an index under /tmp (never in the repository; `--reuse` keeps one built before): the first
`--real` photos of FOLDER indexed with the real command (`clipdex index`, so the model record and
the exported ONNX text tower are real), then synthetic rows up to `--images` with random unit
float32 vectors of the model's dimension, committed through the library's own writer in batches.
Synthetic rows name files that do not exist (/synthetic/000001.jpg): they are searched, never
opened. Then it starts the server (server.app.run) in a child process on 127.0.0.1 and a free
port, and measures over one keep-alive connection:

- warm text queries: `--texts` distinct texts each asked once (the query cache and the text
  tower are then warm), then `--queries` timed `GET /api/search?q=...&k=10` cycling through them;
- cached thumbnails: `/api/images/{id}/thumbnail` for `--thumb-images` real photos, each asked
  once (the thumbnail is made and cached), then `--thumb-requests` timed requests cycling them;
- the bounded load test (server/loadtest.py: new connection a request, `--load-threads`
  threads, `--load-requests` requests over the same searches and thumbnails).

Every phase is a fixed number of requests with a timeout each; the server is stopped at the
end. The machine may be shared: the figures are labelled preliminary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine_facts  # noqa: E402

PYTHON = sys.executable
SEARCH_FACTS = ("vector_index", "nprobe", "recall_at_10")  # of `clipdex info --json`
DEFAULT_MODEL = "ViT-B-32-256"
DEFAULT_CKPT = "/tmp/clipdex-peers/datadir/ViT-B-32-256-seed0.pt"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
SYNTHETIC_ROOT = "/synthetic"
TEXTS = (
    "a dog on a beach",
    "a red car",
    "a cat sleeping on a sofa",
    "mountains at sunset",
    "a bowl of fruit",
    "people at a wedding",
    "a snowy street",
    "a bird on a branch",
    "a city skyline at night",
    "a boat on a lake",
    "a child playing football",
    "a plate of pasta",
    "an old castle",
    "a field of sunflowers",
    "a tabby kitten",
    "a yellow school bus",
    "a fish in an aquarium",
    "a forest path in autumn",
    "a lighthouse",
    "a birthday cake",
)

# The server child: prints "clipdex: serving DIR at URL" on stderr once it listens.
_SERVER_CHILD = """
import sys
from server.app import run
run(sys.argv[1], host="127.0.0.1", port=0, log_level="warning")
"""


@dataclass
class Latency:
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples: list[float]) -> Latency:
        a = np.asarray(samples, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(len(a), float(p50), float(p90), float(p99), float(a.mean()), float(a.max()))

    server_cpu_ms: float = 0.0  # the server's CPU time per request: what a busy machine cannot hide

    def line(self) -> str:
        return (
            f"p50 {self.p50_ms:6.2f} ms  p90 {self.p90_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms  "
            f"(mean {self.mean_ms:.2f}, max {self.max_ms:.2f}, {self.requests} requests; "
            f"server CPU {self.server_cpu_ms:.2f} ms a request)"
        )


@dataclass
class Results:
    machine: dict
    index: dict
    first_query_ms: float = 0.0
    text_query: Latency | None = None
    thumbnail_first_ms: list[float] = field(default_factory=list)
    thumbnail_cached: Latency | None = None
    load: dict = field(default_factory=dict)
    server_rss_mib: float = 0.0


# -- machine facts ------------------------------------------------------------------------------------
# -- the index ----------------------------------------------------------------------------------------
def index_real_photos(folder: Path, work: Path, index_dir: Path, args: argparse.Namespace) -> None:
    """Copy the first `--real` photos under /tmp and index them with the real command."""
    photos = sorted(f for f in folder.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)[: args.real]
    if len(photos) < args.thumb_images:
        raise SystemExit(f"{folder}: {len(photos)} photos, fewer than --thumb-images {args.thumb_images}")
    copies = work / "photos"
    copies.mkdir(parents=True)
    for f in photos:
        shutil.copy2(f, copies / f.name)
    cmd = [
        PYTHON,
        "-m",
        "cli.main",
        "index",
        str(copies),
        "--index",
        str(index_dir),
        "--model",
        args.model,
        "--pretrained",
        args.pretrained,
        "--json",
    ]
    print("indexing:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.build_timeout)
    if done.returncode != 0:
        raise SystemExit(f"clipdex index failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    print(f"  {summary.get('added')} photos indexed in {time.perf_counter() - started:.1f} s", flush=True)


def add_synthetic_rows(index_dir: Path, total: int, batch: int, kind: str, seed: int = 0) -> None:
    """Synthetic unit vectors through IndexWriter.commit until the catalog holds `total` rows:
    `structured` like real embeddings (clusters in a low-dimensional subspace, bench/scale.py),
    or `uniform` random (the worst case for an approximate index)."""
    from scale import Structured, Uniform

    from retrieval.storage.catalog import open_catalog
    from retrieval.storage.records import NewImage
    from retrieval.storage.vector_store import VectorStore
    from retrieval.storage.writer import IndexWriter

    catalog = open_catalog(index_dir, create=False)
    try:
        dim = int(catalog.model_signature()["dim"])
        store = VectorStore(index_dir, catalog)
        source = Structured(seed) if kind == "structured" else Uniform(seed)
        started = time.perf_counter()
        with IndexWriter(store) as writer:
            writer.reconcile()
            n = catalog.count()
            while n < total:
                count = min(batch, total - n)
                vectors = source.sample(count, stream=n)
                if vectors.shape[1] != dim:
                    raise SystemExit(f"synthetic vectors are {vectors.shape[1]}-d, the model's {dim}-d")
                rows = [
                    NewImage(
                        f"{SYNTHETIC_ROOT}/{n + i + 1:06d}.jpg",
                        100_000 + i,
                        1_600_000_000_000_000_000,
                        f"{n + i + 1:064x}",
                        500,
                        375,
                        "JPEG",
                        None,
                        vectors[i],
                    )
                    for i in range(count)
                ]
                writer.commit(added=rows)
                n += count
                print(f"\r  synthetic rows: {n:,}/{total:,}", end="", flush=True)
            writer.save()
        print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        catalog.close()


def build_index(args: argparse.Namespace, index_dir: Path) -> None:
    work = index_dir.parent
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    index_real_photos(args.folder, work, index_dir, args)
    add_synthetic_rows(index_dir, args.images, args.batch, args.vectors)
    if not args.exact:
        # What a user with this many images runs: the index type its size calls for.
        cmd = [PYTHON, "-m", "cli.main", "optimize", "--index", str(index_dir), "--json"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.build_timeout)
        if done.returncode != 0:
            raise SystemExit(f"clipdex optimize failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        print(f"  optimize: {done.stdout.strip()}", flush=True)


def index_facts(index_dir: Path) -> tuple[dict, list[int]]:
    """Row count, bytes on disk, model, and the ids of the real (non-synthetic) photos."""
    from retrieval.storage.catalog import open_catalog

    catalog = open_catalog(index_dir, create=False)
    try:
        records = catalog.records()
        signature = catalog.model_signature() or {}
    finally:
        catalog.close()
    real = sorted(i for i, r in records.items() if not r.path.startswith(SYNTHETIC_ROOT + "/"))
    on_disk = {p.name: p.stat().st_size for p in index_dir.iterdir() if p.is_file()}
    facts = {
        "directory": str(index_dir),
        "images": len(records),
        "real_photos": len(real),
        "dim": signature.get("dim"),
        "model": f"{signature.get('arch')} ({signature.get('pretrained')})",
        "bytes": on_disk,
    }
    info = subprocess.run(
        [PYTHON, "-m", "cli.main", "info", "--index", str(index_dir), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    facts["search"] = {k: v for k, v in json.loads(info.stdout).items() if k in SEARCH_FACTS}
    return facts, real


# -- the server ---------------------------------------------------------------------------------------
class Server:
    """`server.app.run` in a child process on 127.0.0.1 and a port the system picks."""

    def __init__(self, index_dir: Path, timeout: float, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _SERVER_CHILD, str(index_dir)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **(env or {})),
        )
        self.log: list[str] = []
        self.port = self._wait_for_address(timeout)
        # Keep draining stderr so that the child never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_address(self, timeout: float) -> int:
        assert self.proc.stderr is not None
        timer = threading.Timer(timeout, self.proc.kill)  # a child that never says where it listens
        timer.start()
        try:
            for line in self.proc.stderr:
                self.log.append(line)
                if line.startswith("clipdex: serving ") and " at http://" in line:
                    url = line.rsplit(" at ", 1)[1].split()[0]
                    port = urllib.parse.urlsplit(url).port
                    assert port is not None
                    return port
        finally:
            timer.cancel()
        raise SystemExit(f"the server did not start: {''.join(self.log)[-2000:]}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: uvicorn's graceful shutdown, as Ctrl-C
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """One keep-alive HTTP/1.1 connection, as a browser tab or a notebook session holds."""

    def __init__(self, port: int, timeout: float):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(self, path: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1000.0
        if response.status != 200:
            raise SystemExit(f"GET {path}: HTTP {response.status}: {body[:300]!r}")
        return elapsed, body

    def close(self) -> None:
        self.conn.close()


def search_path(text: str) -> str:
    return "/api/search?" + urllib.parse.urlencode({"q": text, "k": 10})


def thumbnail_path(image_id: int) -> str:
    return f"/api/images/{image_id}/thumbnail"


# -- the measurements ---------------------------------------------------------------------------------
def measure(server: Server, real_ids: list[int], args: argparse.Namespace, results: Results) -> None:
    from server.loadtest import load_test

    texts = list(TEXTS[: args.texts])
    thumbs = real_ids[: args.thumb_images]
    client = Client(server.port, args.request_timeout)
    try:
        first, body = client.get(search_path(texts[0]))  # loads the ONNX text tower
        results.first_query_ms = first
        hits = json.loads(body)["hits"]
        if len(hits) != 10:
            raise SystemExit(f"expected 10 hits, got {len(hits)}")
        for text in texts[1:]:
            client.get(search_path(text))  # each text once: its embedding is now in the query cache
        cpu = server.cpu_seconds()
        samples = [client.get(search_path(texts[i % len(texts)]))[0] for i in range(args.queries)]
        results.text_query = Latency.of(samples)
        results.text_query.server_cpu_ms = (server.cpu_seconds() - cpu) * 1000 / args.queries
        print(f"first text query (loads the ONNX text tower): {results.first_query_ms:.0f} ms")
        print(f"warm text query    {results.text_query.line()}", flush=True)

        results.thumbnail_first_ms = [client.get(thumbnail_path(i))[0] for i in thumbs]  # made and cached
        cpu = server.cpu_seconds()
        samples = [client.get(thumbnail_path(thumbs[i % len(thumbs)]))[0] for i in range(args.thumb_requests)]
        results.thumbnail_cached = Latency.of(samples)
        results.thumbnail_cached.server_cpu_ms = (server.cpu_seconds() - cpu) * 1000 / args.thumb_requests
        made = float(np.median(results.thumbnail_first_ms))
        print(f"cached thumbnail   {results.thumbnail_cached.line()}", flush=True)
        print(f"  first request of each (thumbnail made): median {made:.1f} ms", flush=True)
    finally:
        client.close()

    paths = [search_path(t) for t in texts] + [thumbnail_path(i) for i in thumbs]
    cpu = server.cpu_seconds()
    report = load_test(
        server.url,
        paths,
        requests=args.load_requests,
        threads=args.load_threads,
        timeout=args.request_timeout,
    )
    cpu_ms = (server.cpu_seconds() - cpu) * 1000 / args.load_requests
    results.load = {
        "requests": report.requests,
        "threads": args.load_threads,
        "paths": len(paths),
        "seconds": report.seconds,
        "throughput_per_s": report.throughput,
        "p50_ms": report.p50_ms,
        "p99_ms": report.p99_ms,
        "errors": len(report.errors),
        "inconsistent": len(report.inconsistent),
        "server_cpu_ms": cpu_ms,
    }
    print(
        f"load test          {report.summary()} ({args.load_threads} threads, new connection a request; "
        f"server CPU {cpu_ms:.2f} ms a request)",
        flush=True,
    )
    for line in report.errors[:5]:
        print(f"  error: {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="Real photos (the first --real are indexed).")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/clipdex-serve-bench"),
        help="Where the index is built (under /tmp; removed and rebuilt unless --reuse).",
    )
    p.add_argument("--reuse", action="store_true", help="Use the index built by an earlier run if complete.")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--real", type=int, default=60)
    p.add_argument("--batch", type=int, default=5000, help="Synthetic rows per commit.")
    p.add_argument("--vectors", choices=("structured", "uniform"), default="structured")
    p.add_argument("--exact", action="store_true", help="Skip `clipdex optimize`: exact flat search.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--pretrained", default=DEFAULT_CKPT)
    p.add_argument("--texts", type=int, default=20)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--thumb-images", type=int, default=30)
    p.add_argument("--thumb-requests", type=int, default=300)
    p.add_argument("--load-requests", type=int, default=1000)
    p.add_argument("--load-threads", type=int, default=4)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--build-timeout", type=float, default=900.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="An environment variable for the server only (repeatable), e.g. OMP_NUM_THREADS=1.",
    )
    p.add_argument("--json", type=Path, help="Write the raw figures here.")
    args = p.parse_args()
    work = args.work.resolve()
    if ROOT in (work, *work.parents):
        raise SystemExit(f"--work {work} is inside the repository: use a folder under /tmp")
    if not 1 <= args.texts <= len(TEXTS):
        raise SystemExit(f"--texts: 1 to {len(TEXTS)}")
    if not Path(args.pretrained).exists() and args.pretrained != "random":
        raise SystemExit(
            f"{args.pretrained} is missing: bash ../shared/peers/rclip_offline.sh /tmp/clipdex-peers {PYTHON}"
        )

    index_dir = work / "index"
    facts: tuple[dict, list[int]] | None = None
    if args.reuse and (index_dir / "catalog.sqlite").exists():
        facts = index_facts(index_dir)
        if facts[0]["images"] != args.images or facts[0]["real_photos"] < args.thumb_images:
            print(
                f"--reuse: {index_dir} holds {facts[0]['images']:,} images, not {args.images:,}: rebuilding"
            )
            facts = None
    if facts is None:
        build_index(args, index_dir)
        facts = index_facts(index_dir)
    # Thumbnails of an earlier run would make the "first request (made)" figure a cached one.
    shutil.rmtree(index_dir / "thumbnails", ignore_errors=True)
    results = Results(machine_facts(), facts[0])
    machine = results.machine
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"load average {machine['load_average']}"
    )
    size_mib = sum(results.index["bytes"].values()) / 2**20
    print(
        f"index: {results.index['images']:,} images ({results.index['real_photos']} real photos), "
        f"{results.index['dim']} dimensions, {results.index['model']}, {size_mib:.0f} MiB in {index_dir}"
    )

    started = time.perf_counter()
    if any("=" not in kv for kv in args.server_env):
        raise SystemExit("--server-env takes NAME=VALUE")
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    results.machine["server_env"] = server_env
    server = Server(index_dir, args.start_timeout, server_env)
    print(f"server: {server.url} (started in {time.perf_counter() - started:.1f} s)", flush=True)
    try:
        measure(server, facts[1], args, results)
        results.server_rss_mib = server.peak_rss_mib()
    finally:
        server.stop()
    results.machine["load_average_at_end"] = list(os.getloadavg())
    print(
        f"server peak RSS {results.server_rss_mib:.0f} MiB; load average at the end "
        f"{results.machine['load_average_at_end']} (preliminary: a shared machine)"
    )
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
