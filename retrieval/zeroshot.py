"""Zero-shot tagging: label probabilities for every indexed image, and image-to-text ranking.

For an image vector v and label vectors l_1..l_L (unit norm, ensembled prompts by default):

    p = softmax(logit_scale * [v . l_1, ..., v . l_L])

`logit_scale` is the model's own learned temperature (exp of its `logit_scale` parameter).
Stored tags live in the table `tags` (image_id, label, probability) of the catalog's SQLite
file; this module owns that table (created on first store), the catalog does not know it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Column, Float, Index, Integer, MetaData, Table, Text, delete, insert, inspect, select
from sqlalchemy.exc import OperationalError

from .errors import ClipdexError
from .query import embed_labels, unit

if TYPE_CHECKING:
    from PIL import Image
    from sqlalchemy.engine import Engine

    from .catalog import Catalog
    from .filters import Filters
    from .store import ImageIndex

TAGS_TABLE = "tags"
_metadata = MetaData()
tags_table = Table(
    TAGS_TABLE,
    _metadata,
    Column("image_id", Integer, primary_key=True),
    Column("label", Text, primary_key=True),
    Column("probability", Float, nullable=False),
    Index("ix_tags_label", "label"),
)


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # softmax over the candidate labels
    score: float  # cosine between the image and the label's (ensembled) text vector

    def to_dict(self) -> dict:
        return {"label": self.label, "probability": self.probability, "score": self.score}


@dataclass(frozen=True)
class ImageLabels:
    id: int
    path: str
    labels: tuple[LabelScore, ...]  # most probable first

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "labels": [s.to_dict() for s in self.labels]}


# -- labels ------------------------------------------------------------------------------------
def parse_labels(text: str) -> list[str]:
    """`cat,dog,car` -> ['cat', 'dog', 'car'] (blanks dropped, order kept, duplicates dropped)."""
    return _unique(p.strip() for p in text.split(","))


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """One label (or caption) a line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClipdexError(f"cannot read labels file {os.fspath(path)}: {exc.strerror or exc}") from None
    labels = _unique(line.strip() for line in text.splitlines() if not line.strip().startswith("#"))
    if not labels:
        raise ClipdexError(f"labels file {os.fspath(path)} holds no labels")
    return labels


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def logit_scale(index: ImageIndex) -> float:
    return float(index.model.logit_scale)


# -- classify ----------------------------------------------------------------------------------
def classify(
    index: ImageIndex,
    labels: Sequence[str],
    *,
    ensemble: bool = True,
    templates: Sequence[str] | None = None,
    filters: Filters | None = None,
    top: int | None = 1,
    min_probability: float = 0.0,
    batch: int = 8192,
) -> list[ImageLabels]:
    """Label probabilities for every indexed image (or those meeting `filters`), by id.

    Each image keeps its `top` most probable labels (all with None) at or above
    `min_probability`."""
    labels = _unique(labels)
    if not labels:
        raise ClipdexError("no labels given")
    label_vecs = embed_labels(index, labels, ensemble=ensemble, templates=templates)
    scale = logit_scale(index)
    vectors = index.vectors()
    ids = vectors.ids()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    keep = np.ones(len(ids), dtype=bool)
    if filters is not None and not filters.empty:
        from .filters import select_ids

        keep = np.isin(ids, select_ids(index, filters))
    all_vecs = vectors.vectors()[order][keep]
    ids = ids[keep]
    records = index.records(ids.tolist())
    n_top = len(labels) if top is None else max(0, min(int(top), len(labels)))
    out: list[ImageLabels] = []
    for start in range(0, len(ids), batch):
        chunk_ids = ids[start : start + batch]
        scores = all_vecs[start : start + batch].astype(np.float64) @ label_vecs.T.astype(np.float64)
        probs = softmax(scale * scores)
        best = np.argsort(-probs, axis=1, kind="stable")[:, :n_top]  # ties: the order given
        for row, image_id in enumerate(chunk_ids.tolist()):
            record = records.get(image_id)
            if record is None:  # deleted since this reader loaded
                continue
            ranked = best[row].tolist()
            out.append(
                ImageLabels(
                    image_id,
                    record.path,
                    tuple(
                        LabelScore(labels[j], float(probs[row, j]), float(scores[row, j]))
                        for j in ranked
                        if probs[row, j] >= min_probability
                    ),
                )
            )
    return out


def describe_image(
    index: ImageIndex,
    image: str | os.PathLike[str] | Image.Image,
    texts: Sequence[str],
    *,
    ensemble: bool = False,
    templates: Sequence[str] | None = None,
    k: int | None = None,
) -> list[LabelScore]:
    """Candidate texts ranked for one image (image-to-text), best first, ties in given order."""
    texts = _unique(texts)
    if not texts:
        raise ClipdexError("no candidate texts given")
    text_vecs = embed_labels(index, texts, ensemble=ensemble, templates=templates)
    image_vec = unit(index.embed_image(image))
    scores = text_vecs.astype(np.float64) @ image_vec.astype(np.float64)
    probs = softmax(logit_scale(index) * scores)
    ranked = sorted(range(len(texts)), key=lambda j: (-scores[j], j))
    if k is not None:
        ranked = ranked[: max(0, k)]
    return [LabelScore(texts[j], float(probs[j]), float(scores[j])) for j in ranked]


# -- stored tags -------------------------------------------------------------------------------
def store_tags(index: ImageIndex, results: Sequence[ImageLabels], labels: Sequence[str]) -> int:
    """Save `results` as tags. Earlier tags from these `labels` on these images are replaced
    (tags of other label sets stay). Returns the number of tag rows written."""
    engine = index.catalog.engine
    labels = _unique(labels)
    ids = [r.id for r in results]
    rows = [
        {"image_id": r.id, "label": s.label, "probability": s.probability} for r in results for s in r.labels
    ]
    try:
        _metadata.create_all(engine)
        with engine.begin() as conn:
            for chunk in _chunks(ids, 500):
                conn.execute(
                    delete(tags_table).where(tags_table.c.image_id.in_(chunk), tags_table.c.label.in_(labels))
                )
            if rows:
                conn.execute(insert(tags_table), rows)
    except OperationalError as exc:
        reason = str(exc.orig) if exc.orig is not None else str(exc)
        raise ClipdexError(f"cannot store tags in {index.catalog.path}: {reason}") from None
    return len(rows)


def _has_tags(engine: Engine) -> bool:
    return inspect(engine).has_table(TAGS_TABLE)


def tagged_ids(catalog: Catalog, labels: Sequence[str]) -> np.ndarray:
    """Sorted ids of the images tagged with every one of `labels`."""
    engine = catalog.engine
    if not _has_tags(engine):
        raise ClipdexError("no tags stored in this index: run 'clipdex classify --labels ... --store' first")
    result: np.ndarray | None = None
    with engine.connect() as conn:
        for label in _unique(labels):
            found = conn.execute(select(tags_table.c.image_id).where(tags_table.c.label == label)).scalars()
            ids = np.unique(np.asarray(list(found), dtype=np.int64))
            result = ids if result is None else np.intersect1d(result, ids, assume_unique=True)
    return np.empty(0, np.int64) if result is None else result


def tags_of(catalog: Catalog, ids: Sequence[int] | None = None) -> dict[int, list[tuple[str, float]]]:
    """Stored tags by image id, most probable first."""
    if not _has_tags(catalog.engine):
        return {}
    out: dict[int, list[tuple[str, float]]] = {}
    stmt = select(tags_table.c.image_id, tags_table.c.label, tags_table.c.probability)
    with catalog.engine.connect() as conn:
        if ids is None:
            rows = list(conn.execute(stmt))
        else:
            rows = []
            for chunk in _chunks(list(ids), 500):
                rows.extend(conn.execute(stmt.where(tags_table.c.image_id.in_(chunk))))
    for image_id, label, prob in rows:
        out.setdefault(image_id, []).append((label, prob))
    for tags in out.values():
        tags.sort(key=lambda t: (-t[1], t[0]))
    return out


def _chunks(items: list, size: int):  # type: ignore[no-untyped-def]
    for i in range(0, len(items), size):
        yield items[i : i + size]
