"""Decoding in worker threads, overlapped with inference in the caller's thread.

Workers take jobs straight from the caller's iterable and hand results over through a bounded
buffer, so memory stays flat however many files there are. A file whose decoding exceeds
`timeout` is reported as failed and its worker replaced: a pathological file can cost one stuck
thread, never the run. (Pillow releases the GIL while decoding and resizing, so threads overlap
with the model without pickling tensors between processes.)

Every thread a run starts has ended when its iterator is exhausted or closed (or raises), except
a thread stuck in a decode that timed out: that one ends when its decode returns. There are no
stop markers to lose: one condition guards all the state, and closing wakes every waiter.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")

THREAD_NAME = "clipdex-decode"


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
        self.max_pending = max(1, max_pending)  # decoded results waiting for the caller
        self.timeout = timeout

    def run(self, jobs: Iterable[J]) -> Iterator[R]:
        """One result per job, in the order they finish. `jobs` is iterated under a lock by the
        workers, so it should be cheap to advance (a list, a plain generator).

        An exception raised by `fn` (a bug: decoders report bad files as results) ends the run
        and is raised here. Close the iterator (or exhaust it) to end the threads."""
        state: _Run[J, R] = _Run(self, jobs)
        try:
            for _ in range(self.workers):
                state.spawn()
            while True:
                result, late = state.next()
                for task in late:
                    state.spawn()  # the stuck thread is written off: keep the pool at full strength
                    yield self.on_timeout(task.job, time.monotonic() - task.started)
                if result is _END:
                    return
                if result is not _NOTHING:
                    yield result  # type: ignore[misc]
        finally:
            state.close()


_END = object()  # every job has its result
_NOTHING = object()  # only timed-out jobs this time


@dataclass
class _Task(Generic[J]):
    job: J
    started: float
    thread: threading.Thread


class _Run(Generic[J, R]):
    """The state of one `DecodePool.run`, all of it guarded by one condition."""

    def __init__(self, pool: DecodePool[J, R], jobs: Iterable[J]):
        self.pool = pool
        self.source = iter(jobs)
        self.cond = threading.Condition()
        self.ready: deque[R] = deque()  # results not yet taken by the caller
        self.inflight: dict[int, _Task[J]] = {}  # being decoded, by job number
        self.taken = 0  # jobs handed to workers
        self.produced = 0  # results (or timeouts) handed to the caller
        self.exhausted = False  # no job left to take
        self.closed = False  # the caller is gone: take nothing, deliver nothing
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self.abandoned: set[threading.Thread] = set()  # stuck in a decode that timed out

    # -- the workers' side -------------------------------------------------------------------
    def spawn(self) -> None:
        thread = threading.Thread(target=self._work, daemon=True, name=THREAD_NAME)
        thread.start()
        self.threads.append(thread)  # only the caller's thread spawns: no lock needed

    def _work(self) -> None:
        while (task := self._take()) is not None:
            key, job = task
            try:
                result = self.pool.fn(job)
            except BaseException as exc:
                self._fail(key, exc)
                return
            if not self._deliver(key, result):
                return

    def _take(self) -> tuple[int, J] | None:
        with self.cond:
            if self.closed or self.exhausted:
                return None
            try:
                job = next(self.source)
            except StopIteration:
                self.exhausted = True
                self.cond.notify_all()  # the caller may be waiting to learn that the run is over
                return None
            except BaseException as exc:
                self.error, self.exhausted = exc, True
                self.cond.notify_all()
                return None
            key, self.taken = self.taken, self.taken + 1
            # Registered under the same lock as the take: `close` sees every job a thread holds.
            self.inflight[key] = _Task(job, time.monotonic(), threading.current_thread())
            self.cond.notify_all()  # the caller may be waiting without a deadline: now there is one
            return key, job

    def _deliver(self, key: int, result: R) -> bool:
        """Hand `result` to the caller; False when this thread should end."""
        with self.cond:
            if self.inflight.pop(key, None) is None:
                return False  # timed out meanwhile: reported already, and replaced
            while len(self.ready) >= self.pool.max_pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return False
            self.ready.append(result)
            self.cond.notify_all()
            return True

    def _fail(self, key: int, exc: BaseException) -> None:
        with self.cond:
            self.inflight.pop(key, None)
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    # -- the caller's side -------------------------------------------------------------------
    def next(self) -> tuple[object, list[_Task[J]]]:
        """(a result, _NOTHING or _END; the jobs that timed out meanwhile)."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                late = self._expire()
                if self.ready:
                    self.produced += 1
                    result = self.ready.popleft()
                    self.cond.notify_all()  # room for a worker waiting to deliver
                    return result, late
                if late:
                    return _NOTHING, late
                if self.exhausted and self.produced >= self.taken:
                    return _END, []
                self.cond.wait(self._until_next_deadline())

    def _expire(self) -> list[_Task[J]]:
        now = time.monotonic()
        late = [(k, t) for k, t in self.inflight.items() if now - t.started > self.pool.timeout]
        for key, task in late:
            del self.inflight[key]
            self.abandoned.add(task.thread)
        self.produced += len(late)
        return [task for _, task in late]

    def _until_next_deadline(self) -> float | None:
        if not self.inflight:
            return None  # a worker's take, delivery or failure will notify
        first = min(t.started for t in self.inflight.values())
        return max(0.01, first + self.pool.timeout - time.monotonic())

    def close(self) -> None:
        """End the run: wake every waiting worker and wait for the threads to end. A thread still
        decoding is given until its own timeout; past that it is a stuck one, written off."""
        with self.cond:
            self.closed = True
            self.ready.clear()
            self.cond.notify_all()
            deadlines = {t.thread: t.started + self.pool.timeout for t in self.inflight.values()}
        for thread in self.threads:
            if thread in self.abandoned or thread is threading.current_thread():
                continue
            deadline = deadlines.get(thread)
            # A thread holding no job takes none now that the run is closed: it ends at once.
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
