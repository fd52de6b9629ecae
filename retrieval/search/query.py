"""Combined queries: texts and images, each with a weight, added or subtracted.

The query vector is the normalised weighted sum of the normalised term vectors:

    q = sum_i w_i * v_i / |v_i|,    q <- q / |q|

A text term can go through a prompt ensemble: the label is put into many templates ("a photo of
a {}.", ...), each prompt is embedded and normalised, the mean is normalised again.

`Query.parse('"2:golden retriever" + ./pool.jpg - people')` reads the compact form: terms
separated by ` + ` or ` - ` (spaces around the sign), an optional `W:` weight prefix, double
quotes to keep a separator inside a term. A term naming an existing file is an image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from retrieval.core.errors import ClipdexError

if TYPE_CHECKING:
    from retrieval.core.hits import Hit
    from retrieval.index import ImageIndex
    from retrieval.search.filters import Filters

TermKind = Literal["text", "image"]
# `W:` before a term; not when a digit follows the colon, so "12:30 sunset" stays a text.
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*:(?!\d)(.*)$", re.DOTALL)


def _image_suffixes() -> frozenset[str]:
    # The indexer's own list, so that a query image is any file the index could hold; imported
    # here, not at the top, because text queries start without Pillow.
    from retrieval.core.images import image_extensions

    return image_extensions()


@dataclass(frozen=True)
class Term:
    """One part of a query: a text or an image path, with a signed weight."""

    kind: TermKind
    value: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("text", "image"):
            raise ClipdexError(f"a query term is 'text' or 'image', not {self.kind!r}")
        if not self.value.strip():
            raise ClipdexError("empty query term")
        if not np.isfinite(self.weight):
            raise ClipdexError(f"query term weight must be a finite number, not {self.weight}")

    @classmethod
    def guess(cls, value: str, weight: float = 1.0) -> Term:
        """An image if `value` names an existing file, else a text.

        A value that looks like an image file name (`./pool.jpg`) but does not exist is an error
        rather than a text query about a file name."""
        if os.path.isfile(os.path.expanduser(value)):
            return cls("image", value, weight)
        stripped = value.strip()
        if not any(c.isspace() for c in stripped) and Path(stripped).suffix.lower() in _image_suffixes():
            raise ClipdexError(f"image not found: {stripped}")
        return cls("text", value, weight)

    @classmethod
    def parse(cls, text: str, sign: float = 1.0) -> Term:
        """One term with an optional `W:` weight prefix (`2:golden retriever`, `0.5:./a.jpg`)."""
        weight = 1.0
        body = _unquote(text.strip())
        match = _WEIGHT.match(body)
        if match:
            weight = float(match.group(1))
            body = _unquote(match.group(2).strip())
        if not body.strip():
            raise ClipdexError(f"empty query term in {text!r}")
        return cls.guess(body, sign * weight)


@dataclass
class Query:
    """Terms to add up, and how to embed the text ones.

    `ensemble`: embed each text term through `templates` (the built-in set when None).
    `plus` and `minus` return a new query; the one they are called on is left as it was.
    """

    terms: list[Term]
    ensemble: bool = False
    templates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.terms = list(self.terms)
        if not self.terms:
            raise ClipdexError("empty query")
        if self.templates is not None:
            self.templates = check_templates(self.templates)

    @classmethod
    def parse(cls, text: str, *, ensemble: bool = False, templates: Sequence[str] | None = None) -> Query:
        """The compact form: `"2:golden retriever" + ./pool.jpg - people`."""
        return cls(_parse_compact(text), ensemble, None if templates is None else tuple(templates))

    @classmethod
    def parse_argv(
        cls, args: Sequence[str], *, ensemble: bool = False, templates: Sequence[str] | None = None
    ) -> Query:
        """The compact form as separate shell words: `2:golden retriever + ./pool.jpg - people`.

        One word is parsed like `parse`; otherwise the words `+` and `-` separate the terms and
        the other words of a term are joined with spaces."""
        if len(args) == 1:
            return cls.parse(args[0], ensemble=ensemble, templates=templates)
        terms: list[Term] = []
        sign, words = 1.0, []
        for word in [*args, "+"]:
            if word in ("+", "-"):
                if words:
                    terms.append(Term.parse(" ".join(words), sign))
                elif terms:
                    raise ClipdexError(f"misplaced operator in query {' '.join(args)!r}")
                sign, words = (1.0 if word == "+" else -1.0), []
            else:
                words.append(word)
        return cls(terms, ensemble, None if templates is None else tuple(templates))

    @classmethod
    def text(cls, text: str, *, ensemble: bool = False, templates: Sequence[str] | None = None) -> Query:
        return cls([Term("text", text)], ensemble, None if templates is None else tuple(templates))

    @classmethod
    def image(cls, path: str | os.PathLike[str]) -> Query:
        return cls([Term("image", os.fspath(path))])

    def plus(self, value: str | Term, weight: float = 1.0) -> Query:
        term = value if isinstance(value, Term) else Term.guess(value, weight)
        return Query([*self.terms, term], self.ensemble, self.templates)

    def minus(self, value: str | Term, weight: float = 1.0) -> Query:
        term = value if isinstance(value, Term) else Term.guess(value, weight)
        return Query([*self.terms, Term(term.kind, term.value, -term.weight)], self.ensemble, self.templates)

    def image_paths(self) -> list[str]:
        return [t.value for t in self.terms if t.kind == "image"]


# -- the compact form -------------------------------------------------------------------------
def _parse_compact(text: str) -> list[Term]:
    """Split on ` + ` / ` - ` outside double quotes; a leading `+ `/`- ` signs the first term.
    With unbalanced quotes (`a 12" record`) quotes are ordinary characters; the name of an
    existing file (`my photo - copy.jpg`) is one image term."""
    if os.path.isfile(os.path.expanduser(text.strip())):
        return [Term("image", text.strip())]
    parts = _split_compact(text, quotes=True)
    if parts is None:
        parts = _split_compact(text, quotes=False)
    assert parts is not None
    for _, body in parts:
        if not body.strip():
            raise ClipdexError(f"empty term in query {text!r}")
    return [Term.parse(body.strip(), s) for s, body in parts]


def _split_compact(text: str, quotes: bool) -> list[tuple[float, str]] | None:
    """(sign, body) parts; None when `quotes` and a double quote is left open. A `+`/`-` is
    an operator when whitespace (or the start or end of the text) is on both sides of it."""
    stripped = text.strip()
    parts: list[tuple[float, str]] = []
    sign, start, quoted = 1.0, 0, False
    n = len(stripped)
    for i, ch in enumerate(stripped):
        if ch == '"' and quotes:
            quoted = not quoted
        elif (
            not quoted
            and ch in "+-"
            and (i == 0 or stripped[i - 1].isspace())
            and (i == n - 1 or stripped[i + 1].isspace())
        ):
            if i > 0:
                parts.append((sign, stripped[start:i]))
            sign, start = (1.0 if ch == "+" else -1.0), i + 1
    if quoted:
        return None
    parts.append((sign, stripped[start:]))
    return parts


def _unquote(text: str) -> str:
    """Drop double quotes around the whole term (and only those)."""
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        return text[1:-1]
    return text


# -- templates ---------------------------------------------------------------------------------
def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    out = tuple(t for t in templates if t.strip())
    if not out:
        raise ClipdexError("no prompt templates given")
    for t in out:
        if "{}" not in t:
            raise ClipdexError(f"prompt template {t!r} has no '{{}}' for the label")
    return out


def parse_templates(text: str, source: str = "templates") -> tuple[str, ...]:
    """One template a line; blank lines and lines starting with '#' are skipped."""
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not line.startswith("#")]
    if not kept:
        raise ClipdexError(f"{source} holds no prompt templates")
    for line in kept:
        if "{}" not in line:
            raise ClipdexError(f"{source}: template {line!r} has no '{{}}' for the label")
    return tuple(kept)


@lru_cache(maxsize=1)
def default_templates() -> tuple[str, ...]:
    """The built-in prompt templates (retrieval/templates/default.txt)."""
    text = resources.files("retrieval").joinpath("templates/default.txt").read_text(encoding="utf-8")
    return parse_templates(text, "built-in templates")


def load_templates(path: str | os.PathLike[str]) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClipdexError(f"cannot read templates file {os.fspath(path)}: {exc.strerror or exc}") from None
    return parse_templates(text, os.fspath(path))


def prompts(label: str, templates: Sequence[str]) -> list[str]:
    # str.replace, not str.format: a label or a template may hold other braces.
    return [t.replace("{}", label) for t in templates]


# -- embedding ---------------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise ClipdexError("cannot normalise a zero or non-finite vector")
    return (v / norm).astype(np.float32)


def embed_labels(
    index: ImageIndex,
    labels: Sequence[str],
    *,
    ensemble: bool = True,
    templates: Sequence[str] | None = None,
) -> np.ndarray:
    """One unit vector per label: the text itself, or the normalised mean of its normalised
    prompt embeddings. All prompts go through `index.embed_texts` in one call (cached)."""
    if not labels:
        raise ClipdexError("no labels given")
    if not ensemble:
        return unit(index.embed_texts(list(labels)))
    tpl = check_templates(templates) if templates is not None else default_templates()
    texts = [p for label in labels for p in prompts(label, tpl)]
    unique = list(dict.fromkeys(texts))
    vecs = unit(index.embed_texts(unique))
    where = {t: i for i, t in enumerate(unique)}
    rows = np.asarray([where[t] for t in texts]).reshape(len(labels), len(tpl))
    return unit(vecs[rows].astype(np.float64).mean(axis=1))


def query_vector(index: ImageIndex, query: Query | str) -> np.ndarray:
    """The unit query vector: the normalised weighted sum of the normalised term vectors."""
    if isinstance(query, str):
        query = Query.parse(query)
    texts = [t for t in query.terms if t.kind == "text"]
    vectors: dict[int, np.ndarray] = {}
    if texts:
        labels = list(dict.fromkeys(t.value for t in texts))
        embedded = embed_labels(index, labels, ensemble=query.ensemble, templates=query.templates)
        by_label = dict(zip(labels, embedded))
        for n, t in enumerate(query.terms):
            if t.kind == "text":
                vectors[n] = by_label[t.value]
    for n, t in enumerate(query.terms):
        if t.kind == "image":
            vectors[n] = unit(index.embed_image(os.path.expanduser(t.value)))
    total = np.zeros(index.dim, dtype=np.float64)
    for n, t in enumerate(query.terms):
        total += t.weight * vectors[n].astype(np.float64)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ClipdexError("the query's terms cancel out: nothing left to search for")
    return (total / norm).astype(np.float32)


# -- searching ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cutoffs:
    """Which part of the ranked list to return.

    `min_score`: drop hits below this cosine. `within`: keep hits within this margin of the best
    score (of the whole list, not of the page). `offset`: skip that many hits (paging).
    """

    min_score: float | None = None
    within: float | None = None
    offset: int = 0
    exclude_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ClipdexError("offset must be 0 or more")
        if self.within is not None and self.within < 0:
            raise ClipdexError("--within must be 0 or more")


def search_page(
    index: ImageIndex,
    vector: np.ndarray,
    k: int,
    *,
    allowed_ids: np.ndarray | None = None,
    cutoffs: Cutoffs = Cutoffs(),
) -> list[Hit]:
    """Hits offset+1 .. offset+k of the full ranking (score descending, ties by id), after the
    score cut-offs. Pages concatenate to the unpaged list: the tie group at the page's end is
    always fetched whole, so FAISS never picks among equal scores for us."""
    if k <= 0:
        return []
    end = cutoffs.offset + k
    want = end + 1
    while True:
        hits = index.search_vector(vector, want, allowed_ids=allowed_ids, exclude_ids=cutoffs.exclude_ids)
        if len(hits) < want or hits[-1].score < hits[end - 1].score:
            break
        want *= 2
    if not hits:
        return []
    best = hits[0].score
    if cutoffs.min_score is not None:
        hits = [h for h in hits if h.score >= cutoffs.min_score]
    if cutoffs.within is not None:
        hits = [h for h in hits if h.score >= best - cutoffs.within]
    return hits[cutoffs.offset : end]


def run_query(
    index: ImageIndex,
    query: Query | str,
    k: int = 10,
    *,
    filters: Filters | None = None,
    min_score: float | None = None,
    within: float | None = None,
    offset: int = 0,
    exclude_self: bool = True,
) -> list[Hit]:
    """Search with a combined query, exact filters and cut-offs (see ImageIndex.search_query)."""
    from retrieval.search.filters import select_ids

    if isinstance(query, str):
        query = Query.parse(query)
    vector = query_vector(index, query)
    exclude: list[int] = []
    if exclude_self:
        for path in query.image_paths():
            record = index.catalog.record_by_path(os.path.abspath(os.path.expanduser(path)))
            if record is not None:
                exclude.append(record.id)
    allowed = select_ids(index, filters) if filters is not None and not filters.empty else None
    if allowed is not None and len(allowed) == 0:
        return []
    cut = Cutoffs(min_score=min_score, within=within, offset=offset, exclude_ids=tuple(exclude))
    return search_page(index, vector, k, allowed_ids=allowed, cutoffs=cut)
