"""Decoding in worker threads, overlapped with inference in the caller's thread.

Queues are bounded both ways, so memory stays flat however many files there are. A file whose
decoding exceeds `timeout` is reported as failed and its worker replaced: a pathological file
can cost one stuck thread, never the run. (Pillow releases the GIL while decoding and resizing,
so threads overlap with the model without pickling tensors between processes.)
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")

_STOP = object()


class DecodePool(Generic[J, R]):
    def __init__(
        self,
        fn: Callable[[J], R],
        on_timeout: Callable[[J, float], R],
        workers: int = 2,
        max_pending: int = 64,
        timeout: float = 60.0,
    ):
        self.fn = fn
        self.on_timeout = on_timeout
        self.workers = max(1, workers)
        self.timeout = timeout
        self._jobs: queue.Queue = queue.Queue(maxsize=max(2, max_pending))
        self._results: queue.Queue = queue.Queue(maxsize=max(2, max_pending))
        self._inflight: dict[int, tuple[float, J]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP or self._closed.is_set():
                return
            key, job = item
            with self._lock:
                self._inflight[key] = (time.monotonic(), job)
            result = self.fn(job)
            with self._lock:
                abandoned = self._inflight.pop(key, None) is None
            if abandoned:  # timed out meanwhile: reported already, and replaced
                return
            self._put(result)

    def _put(self, result: object) -> None:
        while not self._closed.is_set():
            try:
                self._results.put(result, timeout=0.2)
                return
            except queue.Full:
                continue

    def _feed(self, jobs: Iterable[J], counter: list[int]) -> None:
        for key, job in zip(itertools.count(), jobs):
            while not self._closed.is_set():
                try:
                    self._jobs.put((key, job), timeout=0.2)
                    break
                except queue.Full:
                    continue
            if self._closed.is_set():
                return
            counter[0] = key + 1
        counter[1] = 1  # feeding finished
        for _ in range(self.workers * 4):  # replacements may be running too
            try:
                self._jobs.put_nowait(_STOP)
            except queue.Full:
                break

    def _spawn(self) -> None:
        threading.Thread(target=self._work, daemon=True, name="clipdex-decode").start()

    def run(self, jobs: Iterable[J]) -> Iterator[R]:
        counter = [0, 0]  # jobs fed so far, feeding done
        threading.Thread(target=self._feed, args=(jobs, counter), daemon=True, name="clipdex-feed").start()
        for _ in range(self.workers):
            self._spawn()
        produced = 0
        try:
            while not (counter[1] and produced >= counter[0]):
                try:
                    result = self._results.get(timeout=0.25)
                except queue.Empty:
                    now = time.monotonic()
                    with self._lock:
                        late = [(k, v) for k, v in self._inflight.items() if now - v[0] > self.timeout]
                        for k, _ in late:
                            del self._inflight[k]
                    for _, (started, job) in late:
                        produced += 1
                        self._spawn()
                        yield self.on_timeout(job, now - started)
                    continue
                produced += 1
                yield result
        finally:
            self._closed.set()
