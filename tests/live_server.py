"""Helpers for the server tests: a copy of an index to serve, and a real uvicorn server on a free
loopback port, run in a thread of the test process (so it can share the session's tiny model).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from server.app import listen


def copy_index(source: Path, target: Path) -> Path:
    """A private copy of an index folder: the server writes thumbnails into its index folder,
    and the query corpus is shared read-only by the whole session."""
    shutil.copytree(source, target)
    return target


class LiveServer:
    """`with LiveServer(app) as url:` serves `app` on 127.0.0.1 until the block ends.

    The socket listens before the thread starts, so a request made at once waits in the
    kernel's queue for uvicorn to accept it: no polling or sleeping to know it is up."""

    def __init__(self, app: FastAPI):
        self.app = app
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        sock = listen("127.0.0.1", 0)
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
        )
        self.thread.start()
        self._sock = sock
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self._sock.close()
        assert not self.thread.is_alive(), "the server did not stop"
