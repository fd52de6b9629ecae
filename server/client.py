"""RemoteIndex: `ImageIndex`'s search methods over HTTP, so notebook code switches between a
local index and a `clipdex serve` by one line:

    index = ImageIndex.open("my-index")                   # local
    index = RemoteIndex("http://127.0.0.1:8000")          # the same searches, on a server

    index.search_text("a dog on a beach", k=5)            # [Hit(rank, score, path, id, width, height)]
    index.search_image("photo.jpg", k=5)                  # a path or a PIL image: uploaded
    index.search_query('"2:dog" + pool.jpg - people', filters=Filters(...), offset=10)
    index.info(); index.duplicates(0.95)

Image terms are files on *this* machine: their bytes are uploaded (20 MB each at most). Paths
in hits are paths on the server's machine. One difference from the local API: an uploaded query
image is left out of its results when the index holds a file with exactly its bytes (content,
not path: every byte-identical copy is left out); `exclude_self=False` keeps them.
Standard library only (urllib): no extra dependency.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from retrieval import ClipdexError, Hit, IndexInfo, ModelSignature
from retrieval.search.duplicates import DuplicateGroup
from retrieval.search.query import Query

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.core.filters import Filters


class RemoteError(ClipdexError):
    """The server refused a request; the message is the server's own, `status` its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RemoteIndex:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 120.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ClipdexError(f"not a server address: {url!r} (e.g. http://127.0.0.1:8000)")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"

    def __enter__(self) -> RemoteIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (one connection a request); for symmetry with ImageIndex."""

    # -- searches ---------------------------------------------------------------------------------
    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        return self._search({"terms": [{"text": text}], "k": k})

    def search_image(
        self, image: str | os.PathLike[str] | Image.Image, k: int = 10, *, exclude_self: bool = True
    ) -> list[Hit]:
        """Images similar to `image` (a path on this machine, or a PIL image), uploaded."""
        # A PIL image is never "itself" locally either: only a path can name an indexed file.
        keep_self = not exclude_self or not isinstance(image, (str, os.PathLike))
        query = urllib.parse.urlencode({"k": k, "include_self": str(keep_self).lower()})
        upload = _image_bytes(image)
        return _hits(self._request("POST", f"/api/search/image?{query}", upload, "application/octet-stream"))

    def search_query(
        self,
        query: Query | str,
        k: int = 10,
        *,
        filters: Filters | None = None,
        min_score: float | None = None,
        within: float | None = None,
        offset: int = 0,
        exclude_self: bool = True,
    ) -> list[Hit]:
        """A combined query (a `Query`, or its compact text form read on this machine, so that
        image terms are local files), exact filters, cut-offs and paging, as ImageIndex's."""
        if isinstance(query, str):
            query = Query.parse(query)
        body: dict[str, Any] = {
            "terms": [_term(t) for t in query.terms],
            "ensemble": bool(query.ensemble),
            "templates": None if query.templates is None else list(query.templates),
            "k": k,
            "offset": offset,
            "min_score": min_score,
            "within": within,
            "include_self": not exclude_self,
        }
        if filters is not None:
            body["filters"] = _filters(filters)
        return self._search(body)

    # -- facts --------------------------------------------------------------------------------------
    def info(self) -> IndexInfo:
        data = self._request("GET", "/api/info")
        data["model"] = None if data.get("model") is None else ModelSignature.from_dict(data["model"])
        names = {f.name for f in dataclasses.fields(IndexInfo)}
        return IndexInfo(**{k: v for k, v in data.items() if k in names})

    def duplicates(self, threshold: float = 0.95) -> list[DuplicateGroup]:
        data = self._request("GET", "/api/duplicates?" + urllib.parse.urlencode({"threshold": threshold}))
        return [_group(g) for g in data["groups"]]

    # -- plumbing ---------------------------------------------------------------------------------
    def _search(self, body: dict[str, Any]) -> list[Hit]:
        payload = json.dumps(body).encode()
        return _hits(self._request("POST", "/api/search", payload, "application/json"))

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> Any:
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RemoteError(_server_message(exc), exc.code) from None
        except urllib.error.URLError as exc:
            raise ClipdexError(f"cannot reach the clipdex server at {self.url}: {exc.reason}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise ClipdexError(f"the clipdex server at {self.url} did not answer: {exc}") from None


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read()).get("error")
    except (ValueError, AttributeError, OSError):
        message = None
    return str(message) if message else f"HTTP {exc.code} {exc.reason}"


def _hits(data: dict) -> list[Hit]:
    names = [f.name for f in dataclasses.fields(Hit)]
    return [Hit(**{n: h[n] for n in names}) for h in data["hits"]]


def _group(g: dict) -> DuplicateGroup:
    return DuplicateGroup(
        ids=tuple(m["id"] for m in g["members"]),
        paths=tuple(m["path"] for m in g["members"]),
        pairs=tuple((p["a"], p["b"], p["score"]) for p in g["pairs"]),
        min_score=g["min_score"],
        max_score=g["max_score"],
    )


def _term(term: Any) -> dict[str, Any]:
    if term.kind == "text":
        return {"text": term.value, "weight": term.weight}
    data = _image_bytes(os.path.expanduser(term.value))
    return {"image": base64.b64encode(data).decode(), "weight": term.weight}


def _filters(filters: Filters) -> dict[str, Any]:
    data = {f.name: getattr(filters, f.name) for f in dataclasses.fields(filters)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _image_bytes(image: str | os.PathLike[str] | Image.Image) -> bytes:
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ClipdexError(f"cannot read {os.fspath(image)}: {exc.strerror or exc}") from None
    # A PIL image goes as PNG (lossless), with its EXIF so the server turns it upright the same way.
    buffer = io.BytesIO()
    exif = image.getexif()
    options = {"exif": exif} if len(exif) else {}
    image.save(buffer, "PNG" if image.mode in _PNG_MODES else "TIFF", **options)
    return buffer.getvalue()


_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


__all__: Sequence[str] = ["RemoteError", "RemoteIndex"]
