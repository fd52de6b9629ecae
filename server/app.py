"""`clipdex serve`: the index over HTTP. A JSON API mirroring the Python API, a web page, /docs.

`create_app(index_dir, token)` opens the index once (catalog, FAISS, and the model on first
use) on its own worker thread; `run(index_dir, host, port, token)` serves it with uvicorn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request, Response
from fastapi import Query as Param
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from retrieval import ClipdexError
from retrieval.core.errors import ImageLoadError
from retrieval.core.filters import Filters
from retrieval.core.images import load_image
from retrieval.search.zeroshot import parse_labels

from . import files
from .auth import AccessGuard, check_bind, check_token
from .errors import PayloadTooLargeError, install_error_handlers
from .params import (
    MAX_BODY,
    MAX_K,
    MAX_OFFSET,
    MAX_UPLOAD,
    SearchBody,
    SearchSpec,
    TermSpec,
    compact_terms,
    id_term,
    make_filters,
)
from .search import record_of, run_search
from .worker import IndexWorker

if TYPE_CHECKING:
    from retrieval import ClipModel, Hit, ImageIndex

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("clipdex.server")

# The page loads nothing from elsewhere: scripts, styles and images from this server only.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


# -- response shapes (for /docs) -----------------------------------------------------------------
class HitOut(BaseModel):
    rank: int
    score: float
    path: str
    id: int
    width: int
    height: int


class SearchOut(BaseModel):
    hits: list[HitOut]
    k: int
    offset: int
    more: bool  # a full page came back: there may be more hits after it


# -- request parameters shared by the search endpoints --------------------------------------------
Strings = list[str] | None


def filter_params(
    folder: Annotated[Strings, Param(description="only images under this folder (repeatable)")] = None,
    glob: Annotated[Strings, Param(description="file name (or path, with '/') pattern")] = None,
    after: Annotated[str | None, Param(description="taken on or after: YYYY-MM-DD[THH:MM]")] = None,
    before: Annotated[str | None, Param(description="taken before: YYYY-MM-DD[THH:MM]")] = None,
    type: Annotated[str | None, Param(description="file types, comma-separated: jpeg,png,...")] = None,
    min_width: Annotated[int | None, Param(ge=0)] = None,
    min_height: Annotated[int | None, Param(ge=0)] = None,
    tag: Annotated[Strings, Param(description="stored by classify --store (repeatable)")] = None,
) -> Filters:
    return make_filters(folder, glob, after, before, type, min_width, min_height, tag)


class SearchOptions:
    """The query string of GET /api/search (and of POST /api/search/image)."""

    def __init__(
        self,
        q: Annotated[str | None, Param(description="compact form: '\"2:dog\" + beach - people'")] = None,
        text: Annotated[Strings, Param(description="a text term taken literally (repeatable)")] = None,
        like: Annotated[Strings, Param(description="an indexed image id, or WEIGHT:ID (repeatable)")] = None,
        unlike: Annotated[Strings, Param(description="an indexed image id to subtract")] = None,
        ensemble: Annotated[bool, Param(description="embed texts through prompt templates")] = False,
        k: Annotated[int, Param(ge=1, le=MAX_K)] = 10,
        offset: Annotated[int, Param(ge=0, le=MAX_OFFSET)] = 0,
        min_score: Annotated[float | None, Param(description="drop hits below this cosine")] = None,
        within: Annotated[float | None, Param(ge=0, description="keep hits within this of the best")] = None,
        include_self: Annotated[bool, Param(description="keep query images in their results")] = False,
        filters: Filters = Depends(filter_params),
    ):
        terms: list[TermSpec] = compact_terms(q) if q and q.strip() else []
        terms += [TermSpec("text", t) for t in text or ()]
        terms += [id_term(v) for v in like or ()]
        terms += [id_term(v, -1.0) for v in unlike or ()]
        self.terms = terms
        self.options: dict[str, Any] = {
            "ensemble": ensemble,
            "filters": filters,
            "k": k,
            "offset": offset,
            "min_score": min_score,
            "within": within,
            "include_self": include_self,
        }

    def spec(self, extra: tuple[TermSpec, ...] = ()) -> SearchSpec:
        return SearchSpec((*self.terms, *extra), **self.options)


def _search_out(hits: list[Hit], spec: SearchSpec) -> dict:
    hits_out = [h.to_dict() for h in hits]
    return {"hits": hits_out, "k": spec.k, "offset": spec.offset, "more": len(hits) == spec.k}


# -- the app --------------------------------------------------------------------------------------
def create_app(
    index_dir: str | os.PathLike[str] | None,
    token: str | None = None,
    *,
    model: ClipModel | None = None,
    device: str = "auto",
) -> FastAPI:
    """The server for the index at `index_dir` (the default index when None). `model`: an already
    loaded model to adopt instead of loading the index's own (tests, notebooks)."""
    if token is not None:
        check_token(token)
    worker = IndexWorker(index_dir, model, device)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(
        title="clipdex",
        summary="Search photos by text and by image (CLIP + FAISS + SQLite).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.worker = worker
    install_error_handlers(app)
    app.add_middleware(AccessGuard, token=token, max_body=MAX_BODY)
    _add_api(app, worker)
    _add_image_routes(app, worker)
    _add_page(app)
    return app


def _add_api(app: FastAPI, worker: IndexWorker) -> None:
    folder_counts = FolderCounts()

    @app.get("/api/info", tags=["index"])
    async def info() -> dict:
        """What the index holds: model, image count, bytes on disk, last update."""
        facts = await worker.run(lambda ix: ix.info())
        data = dict(vars(facts))
        data["model"] = facts.model.to_dict() if facts.model else None
        data.pop("catalog", None)  # a PostgreSQL URL names the database server and user: not for clients
        return data

    @app.get("/api/search", tags=["search"], response_model=SearchOut)
    async def search(options: SearchOptions = Depends()) -> dict:
        """Text, combined and similar-image queries, with exact filters, cut-offs and paging."""
        spec = options.spec()
        return _search_out(await worker.run(lambda ix: run_search(ix, spec)), spec)

    @app.post("/api/search", tags=["search"], response_model=SearchOut)
    async def search_json(body: SearchBody) -> dict:
        """The same as GET, as JSON: terms are texts, indexed image ids, or base64 image files."""
        spec = body.spec()
        await _check_uploads(spec)
        return _search_out(await worker.run(lambda ix: run_search(ix, spec)), spec)

    @app.post(
        "/api/search/image",
        tags=["search"],
        response_model=SearchOut,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": f"the image file's bytes (at most {MAX_UPLOAD >> 20} MB)",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def search_image(request: Request, options: SearchOptions = Depends()) -> dict:
        """Images similar to the uploaded one (plus any terms of the query string)."""
        data = await request.body()
        if len(data) > MAX_UPLOAD:
            raise PayloadTooLargeError(f"uploaded image over the {MAX_UPLOAD >> 20} MB limit")
        if not data:
            raise ClipdexError("send the image file as the request body")
        spec = options.spec((TermSpec("upload", data),))
        await _check_uploads(spec)
        return _search_out(await worker.run(lambda ix: run_search(ix, spec)), spec)

    @app.get("/api/duplicates", tags=["index"])
    async def duplicates(threshold: Annotated[float, Param(ge=-1.0, le=1.0)] = 0.95) -> dict:
        """Groups of near-duplicates (cosine above `threshold`), largest first."""
        groups = await worker.run(lambda ix: ix.duplicates(threshold))
        return {"threshold": threshold, "groups": [g.to_dict() for g in groups]}

    @app.get("/api/classify", tags=["labels"])
    async def classify(
        labels: Annotated[Strings, Param(description="label(s), comma-separated")] = None,
        label: Annotated[Strings, Param(description="one label (may hold commas)")] = None,
        top: Annotated[int, Param(ge=1)] = 1,
        min_prob: Annotated[float, Param(ge=0.0, le=1.0)] = 0.0,
        ensemble: bool = True,
        k: Annotated[int, Param(ge=1, le=MAX_K)] = 100,
        offset: Annotated[int, Param(ge=0)] = 0,
        filters: Filters = Depends(filter_params),
    ) -> dict:
        """Zero-shot labels for the indexed images meeting the filters (by id, paged)."""
        names = _labels(labels, label)

        def job(ix: ImageIndex) -> list:
            return ix.classify(names, ensemble=ensemble, filters=filters, top=top, min_probability=min_prob)

        results = await worker.run(job)
        page = results[offset : offset + k]
        return {"labels": names, "total": len(results), "results": [r.to_dict() for r in page]}

    @app.get("/api/folders", tags=["index"])
    async def folders() -> dict:
        """The folders holding indexed images, with their counts (for the page's folder filter)."""
        return {"folders": await worker.run(folder_counts)}


def _labels(labels: list[str] | None, label: list[str] | None) -> list[str]:
    names = [n for text in labels or () for n in parse_labels(text)]
    names += [n.strip() for n in label or () if n.strip()]
    names = list(dict.fromkeys(names))
    if not names:
        raise ClipdexError("no labels: give labels=cat,dog or label=...")
    return names


async def _check_uploads(spec: SearchSpec) -> None:
    """Decode each uploaded image once with the indexer's guards (decompression bombs, broken
    files) before it reaches the index's thread, so a bad upload gets its own message."""
    for term in spec.terms:
        if term.kind == "upload":
            assert isinstance(term.value, bytes)
            try:
                await run_in_threadpool(load_image, term.value, draft_size=256)
            except ImageLoadError as exc:
                raise ImageLoadError(f"uploaded image: {exc}") from None


class FolderCounts:
    """Indexed images per folder, computed again only after a writer commits."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: list[dict] = []

    def __call__(self, index: ImageIndex) -> list[dict]:
        key = index.catalog.state()  # changes whenever a writer commits
        if key != self._key:
            counts: dict[str, int] = {}
            for record in index.records().values():
                folder = os.path.dirname(record.path)
                counts[folder] = counts.get(folder, 0) + 1
            self._value = [{"path": p, "images": n} for p, n in sorted(counts.items())]
            self._key = key
        return self._value


def _add_image_routes(app: FastAPI, worker: IndexWorker) -> None:
    @app.get("/api/images/{image_id}", tags=["images"])
    async def image(image_id: int) -> dict:
        """What the catalog knows of one image."""
        record = await worker.run(lambda ix: record_of(ix, image_id))
        data = dict(vars(record))
        data.pop("content_hash", None)
        return data

    @app.get("/api/images/{image_id}/thumbnail", tags=["images"], response_class=Response)
    async def thumbnail(
        request: Request,
        image_id: int,
        size: Annotated[int, Param(description=f"one of {files.THUMBNAIL_SIZES}")] = 256,
    ) -> Response:
        """An upright JPEG, at most `size` pixels a side (cached in the index folder)."""
        record = await worker.run(lambda ix: record_of(ix, image_id))
        thumb = await run_in_threadpool(files.thumbnail, record, size, worker.directory)
        etag = f'"{thumb.etag}"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(thumb.data, media_type="image/jpeg", headers=headers)

    @app.get("/api/images/{image_id}/original", tags=["images"], response_class=StreamingResponse)
    async def original(image_id: int) -> StreamingResponse:
        """The indexed file itself."""
        record = await worker.run(lambda ix: record_of(ix, image_id))
        opened = await run_in_threadpool(files.open_indexed, record)
        name = quote(os.path.basename(os.fsencode(record.path)))
        headers = {
            "Content-Length": str(opened.stat.st_size),
            "Content-Disposition": f"inline; filename*=UTF-8''{name}",
            "Cache-Control": "private, no-cache",
        }
        return StreamingResponse(files.stream(opened), media_type=files.media_type(record), headers=headers)

    @app.get("/api/images/{image_id}/labels", tags=["labels"])
    async def labels(
        image_id: int,
        labels: Annotated[Strings, Param(description="candidate texts, comma-separated")] = None,
        label: Annotated[Strings, Param(description="one candidate text (may hold commas)")] = None,
        k: Annotated[int | None, Param(ge=1)] = None,
        ensemble: bool = False,
    ) -> dict:
        """Candidate texts ranked for one indexed image (zero-shot, like `clipdex describe`)."""
        names = _labels(labels, label)

        def job(ix: ImageIndex) -> list:
            record = record_of(ix, image_id)
            files.check_indexed(record)
            return ix.describe(record.path, names, ensemble=ensemble, k=k)

        ranked = await worker.run(job)
        return {"id": image_id, "labels": [s.to_dict() for s in ranked]}


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


# -- running it ------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear line (port taken, address not here)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ClipdexError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ClipdexError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run(
    index_dir: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    log_level: str = "info",
) -> None:
    """Serve until Ctrl-C. A non-loopback `host` needs a `token`."""
    import uvicorn

    check_bind(host, token)
    sock = listen(host, port)
    try:
        app = create_app(index_dir, token)
        where = f"[{host}]" if ":" in host else host
        url = f"http://{where}:{sock.getsockname()[1]}/"
        hint = f" (open {url}?token=TOKEN once in a browser)" if token else ""
        print(f"clipdex: serving {app.state.worker.directory} at {url}{hint}", file=sys.stderr)
        config = uvicorn.Config(
            app, log_level=log_level, server_header=False, proxy_headers=False, lifespan="on"
        )
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: stopping is what was asked.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
        print("clipdex: server stopped", file=sys.stderr)
    finally:
        sock.close()
