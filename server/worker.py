"""One thread owns the index.

ImageIndex is not thread-safe: its query cache is a stdlib sqlite3 connection bound to the
thread that made it, FAISS searches share scratch state, and `refresh()` swaps vectors in place.
So every use of the index runs on a single worker thread, one job at a time; the web server's
own threads only parse requests and move bytes. Each job first calls `index.refresh()`, so that
every request sees what a concurrent indexer committed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from retrieval import ImageIndex

if TYPE_CHECKING:
    from retrieval import ClipModel

T = TypeVar("T")


class IndexWorker:
    def __init__(
        self, index_dir: str | os.PathLike[str] | None, model: ClipModel | None = None, device: str = "auto"
    ):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipdex-index")
        self._model = model
        self._device = device
        self._index: ImageIndex | None = None
        self._closed = False
        # Opened on the worker thread (its SQLite connections belong there); errors surface now.
        self._pool.submit(self._open, index_dir).result()

    @property
    def directory(self) -> Path:
        assert self._index is not None
        return self._index.directory

    def _open(self, index_dir: str | os.PathLike[str] | None) -> None:
        index = ImageIndex.open(index_dir, device=self._device)
        try:
            if self._model is not None and index.signature is not None:
                index.use_model(self._model)
            if index.signature is not None:
                _ = index.store.faiss  # not on the first request
        except BaseException:
            index.close()
            raise
        self._index = index

    def _fresh(self) -> ImageIndex:
        index = self._index
        assert index is not None
        if index.signature is None and index.catalog.model_signature() is not None:
            # Opened while still empty: `refresh` only follows an index that has a model, so
            # open it again now that an indexer has recorded one.
            directory = index.directory
            index.close()
            self._index = None
            self._open(directory)
            index = self._index
            assert index is not None
        index.refresh()
        return index

    def _job(self, fn: Callable[[ImageIndex], T]) -> T:
        return fn(self._fresh())

    def call(self, fn: Callable[[ImageIndex], T]) -> T:
        """Run `fn(index)` on the worker thread and wait for it (from a plain thread)."""
        return self._pool.submit(self._job, fn).result()

    async def run(self, fn: Callable[[ImageIndex], T]) -> T:
        """Run `fn(index)` on the worker thread without blocking the event loop."""
        return await asyncio.wrap_future(self._pool.submit(self._job, fn))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._index is not None:
                self._index.close()
                self._index = None

        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)
