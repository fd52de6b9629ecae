"""A bounded load test: a fixed number of GET requests from a few threads, then a report.

It stops by itself (every thread takes its share of a fixed list), never retries, and checks
that concurrent clients get uncorrupted answers: the same request must always get the same
bytes (searches and thumbnails are deterministic while the index does not change).

    python -m server.loadtest http://127.0.0.1:8000 "/api/search?q=a+dog" "/api/images/1/thumbnail"
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    requests: int
    errors: list[str] = field(default_factory=list)  # "PATH: reason", one per failed request
    inconsistent: list[str] = field(default_factory=list)  # paths answered with different bytes
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return _percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return _percentile(self.latencies_ms, 99)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.2f} s ({self.throughput:.0f}/s): "
            f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, {len(self.errors)} errors, "
            f"{len(self.inconsistent)} inconsistent answers"
        )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def load_test(
    url: str,
    paths: Sequence[str],
    *,
    requests: int = 200,
    threads: int = 4,
    token: str | None = None,
    timeout: float = 30.0,
) -> LoadReport:
    """`requests` GETs of `paths` (round robin) spread over `threads` threads."""
    base = url.rstrip("/")
    work = [paths[i % len(paths)] for i in range(requests)]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lock = threading.Lock()
    report = LoadReport(requests)
    digests: dict[str, set[str]] = {}

    def worker(share: list[str]) -> None:
        for path in share:
            started = time.perf_counter()
            try:
                request = urllib.request.Request(base + path, headers=headers)
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    body = response.read()
                error = None
            except (urllib.error.URLError, OSError) as exc:
                body, error = b"", f"{path}: {exc}"
            elapsed = (time.perf_counter() - started) * 1000.0
            with lock:
                report.latencies_ms.append(elapsed)
                if error:
                    report.errors.append(error)
                else:
                    digests.setdefault(path, set()).add(hashlib.sha256(body).hexdigest())

    shares = [work[i::threads] for i in range(threads)]
    pool = [threading.Thread(target=worker, args=(share,), daemon=True) for share in shares]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    report.seconds = time.perf_counter() - started
    report.inconsistent = sorted(p for p, d in digests.items() if len(d) > 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--token")
    args = parser.parse_args(argv)
    report = load_test(args.url, args.paths, requests=args.requests, threads=args.threads, token=args.token)
    print(report.summary())
    for line in report.errors[:10]:
        print(f"  error: {line}")
    return 1 if report.errors or report.inconsistent else 0


if __name__ == "__main__":
    raise SystemExit(main())
