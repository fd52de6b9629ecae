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
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from retrieval.core.errors import ClipdexError

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
        weight, body = weighted_body(text, sign)
        return cls.guess(body, weight)


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
    """The compact form's terms; the name of an existing file (`my photo - copy.jpg`) is one
    image term."""
    if os.path.isfile(os.path.expanduser(text.strip())):
        return [Term("image", text.strip())]
    return [Term.guess(body, weight) for weight, body in compact_parts(text)]


def compact_parts(text: str) -> list[tuple[float, str]]:
    """The compact form as (signed weight, body) pairs, without deciding what a body is: split
    on ` + ` / ` - ` outside double quotes; a leading `+ `/`- ` signs the first term. With
    unbalanced quotes (`a 12" record`) quotes are ordinary characters."""
    parts = _split_compact(text, quotes=True)
    if parts is None:
        parts = _split_compact(text, quotes=False)
    assert parts is not None
    for _, body in parts:
        if not body.strip():
            raise ClipdexError(f"empty term in query {text!r}")
    return [weighted_body(body.strip(), s) for s, body in parts]


def weighted_body(text: str, sign: float = 1.0) -> tuple[float, str]:
    """`2:golden retriever` -> (2.0 * sign, 'golden retriever'); no prefix: weight 1."""
    weight = 1.0
    body = _unquote(text.strip())
    match = _WEIGHT.match(body)
    if match:
        weight = float(match.group(1))
        body = _unquote(match.group(2).strip())
    if not body.strip():
        raise ClipdexError(f"empty query term in {text!r}")
    return sign * weight, body


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


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise ClipdexError("cannot normalise a zero or non-finite vector")
    return (v / norm).astype(np.float32)
