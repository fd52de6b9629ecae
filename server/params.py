"""What a search request asks for, read from a query string or a JSON body.

Over HTTP a query term is a text, an indexed image named by catalog id, or an uploaded image:
never a path on the server. So the compact form (`"2:golden retriever" + beach - people`) is read
here with the same rules as `Query.parse` (terms split on ` + ` / ` - ` outside double quotes,
a `W:` weight prefix, quotes around a term dropped), except that every term is a text: the
server never looks whether a term names one of its own files.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from retrieval import ClipdexError
from retrieval.core.filters import Filters, parse_date, parse_formats
from retrieval.search.query import compact_parts

from .errors import PayloadTooLargeError

MAX_K = 10_000
MAX_OFFSET = 1_000_000
MAX_UPLOAD = 20 << 20  # bytes of one uploaded image
MAX_BODY = MAX_UPLOAD * 4 // 3 + (1 << 20)  # one such image in base64 inside a JSON body, and slack
MAX_TERMS = 32


@dataclass(frozen=True)
class TermSpec:
    kind: Literal["text", "id", "upload"]
    value: str | int | bytes
    weight: float = 1.0


@dataclass(frozen=True)
class SearchSpec:
    terms: tuple[TermSpec, ...]
    ensemble: bool = False
    templates: tuple[str, ...] | None = None
    filters: Filters = field(default_factory=Filters)
    k: int = 10
    offset: int = 0
    min_score: float | None = None
    within: float | None = None
    include_self: bool = False

    def __post_init__(self) -> None:
        if not self.terms:
            raise ClipdexError("nothing to search for: give q, text, like or an image")
        if len(self.terms) > MAX_TERMS:
            raise ClipdexError(f"at most {MAX_TERMS} query terms")


# -- the compact form, texts only ----------------------------------------------------------------
def compact_terms(text: str) -> list[TermSpec]:
    """The compact form read as the library reads it, every term a text: over HTTP an image is
    an id or an upload, never a path on the server's disk."""
    return [TermSpec("text", body, weight) for weight, body in compact_parts(text)]


def id_term(text: str, sign: float = 1.0) -> TermSpec:
    """`17` or `0.5:17`: an indexed image by catalog id, with an optional weight."""
    weight, _, body = text.strip().rpartition(":")
    try:
        image_id = int(body)
        w = float(weight) if weight else 1.0
    except ValueError:
        raise ClipdexError(f"like/unlike: {text!r} is not an image id (ID or WEIGHT:ID)") from None
    return TermSpec("id", image_id, sign * w)


# -- filters ---------------------------------------------------------------------------------------
def make_filters(
    folders: list[str] | None = None,
    globs: list[str] | None = None,
    after: str | float | None = None,
    before: str | float | None = None,
    types: str | list[str] | None = None,
    min_width: int | None = None,
    min_height: int | None = None,
    tags: list[str] | None = None,
) -> Filters:
    """The CLI's filters (cli/main.py `_filters`), from request fields; blank fields do not filter."""
    type_list = [t for t in ([types] if isinstance(types, str) else types or []) if t.strip()]
    return Filters(
        folders=tuple(f for f in folders or () if f.strip()),
        globs=tuple(g for g in globs or () if g.strip()),
        after=_date(after, "after"),
        before=_date(before, "before"),
        formats=parse_formats(type_list) if type_list else (),
        min_width=min_width,
        min_height=min_height,
        tags=tuple(t for t in tags or () if t.strip()),
    )


def _date(value: str | float | None, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return float(value) if isinstance(value, (int, float)) else parse_date(value, name)


# -- the JSON body -----------------------------------------------------------------------------------
class TermBody(BaseModel):
    """One term: exactly one of `text`, `id` (an indexed image) or `image` (base64 file bytes)."""

    text: str | None = None
    id: int | None = None
    image: str | None = None
    weight: float = 1.0


class FiltersBody(BaseModel):
    folders: list[str] = []
    globs: list[str] = []
    after: float | str | None = Field(None, description="unix time, or YYYY-MM-DD[THH:MM] local time")
    before: float | str | None = Field(None, description="exclusive; like after")
    formats: list[str] = Field([], description="jpeg, png, ... or Pillow format names")
    min_width: int | None = Field(None, ge=0)
    min_height: int | None = Field(None, ge=0)
    tags: list[str] = []


class SearchBody(BaseModel):
    q: str | None = Field(None, description="compact form: texts joined by ' + ' / ' - ', 'W:' weights")
    terms: list[TermBody] = []
    ensemble: bool = False
    templates: list[str] | None = None
    filters: FiltersBody | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    min_score: float | None = None
    within: float | None = Field(None, ge=0)
    include_self: bool = False

    def spec(self) -> SearchSpec:
        terms = compact_terms(self.q) if self.q and self.q.strip() else []
        terms += [_body_term(n, t) for n, t in enumerate(self.terms)]
        f = self.filters or FiltersBody()
        filters = make_filters(
            f.folders, f.globs, f.after, f.before, f.formats, f.min_width, f.min_height, f.tags
        )
        return SearchSpec(
            tuple(terms),
            ensemble=self.ensemble or self.templates is not None,
            templates=None if self.templates is None else tuple(self.templates),
            filters=filters,
            k=self.k,
            offset=self.offset,
            min_score=self.min_score,
            within=self.within,
            include_self=self.include_self,
        )


def _body_term(n: int, term: TermBody) -> TermSpec:
    given = [name for name in ("text", "id", "image") if getattr(term, name) is not None]
    if len(given) != 1:
        raise ClipdexError(f"terms[{n}]: give exactly one of text, id or image")
    if term.text is not None:
        return TermSpec("text", term.text, term.weight)
    if term.id is not None:
        return TermSpec("id", term.id, term.weight)
    assert term.image is not None
    try:
        data = base64.b64decode(term.image, validate=True)
    except (binascii.Error, ValueError):
        raise ClipdexError(f"terms[{n}].image: not base64") from None
    check_upload_size(data)
    return TermSpec("upload", data, term.weight)


def check_upload_size(data: bytes) -> None:
    if not data:
        raise ClipdexError("the uploaded image is empty")
    if len(data) > MAX_UPLOAD:
        raise PayloadTooLargeError(f"uploaded image over the {MAX_UPLOAD >> 20} MB limit")
