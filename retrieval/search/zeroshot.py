"""Zero-shot tagging: label probabilities for every indexed image, and image-to-text ranking.

For an image vector v and label vectors l_1..l_L (unit norm, ensembled prompts by default):

    p = softmax(logit_scale * [v . l_1, ..., v . l_L])            (CLIP: labels compete)
    p_i = sigmoid(logit_scale * v . l_i + logit_bias), each label    (SigLIP: labels independent)

`logit_scale` is the model's own learned temperature (exp of its `logit_scale` parameter),
`logit_bias` the learned bias of sigmoid-loss models; both are recorded in the index's model
signature, so scoring needs no model load (older indexes without them load the model once).
Stored tags live in the catalog's table `tags` (image_id, label, probability), which cascades
with the image rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.search.query import embed_labels, unit

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.index import ImageIndex
    from retrieval.search.filters import Filters
    from retrieval.storage.catalog import Catalog

@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # softmax over the candidate labels (CLIP), or per-label sigmoid (SigLIP)
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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z) without overflow for large |z|


@dataclass(frozen=True)
class Calibration:
    """How cosines become probabilities: the model's learned temperature, and its bias when it
    was trained with the sigmoid loss (SigLIP), None when with the softmax one (CLIP)."""

    scale: float
    bias: float | None = None

    def probabilities(self, cosines: np.ndarray) -> np.ndarray:
        """Over the last axis: a softmax (CLIP), or an independent sigmoid per label (SigLIP),
        as each model was trained; a softmax would turn SigLIP's scores into a competition."""
        logits = self.scale * np.asarray(cosines, dtype=np.float64)
        return softmax(logits) if self.bias is None else sigmoid(logits + self.bias)


def calibration(index: ImageIndex) -> Calibration:
    """From the index's record; an index written before it was recorded loads the model."""
    sig = index.signature
    if sig is not None and sig.logit_scale is not None:
        return Calibration(float(sig.logit_scale), None if sig.logit_bias is None else float(sig.logit_bias))
    model = index.model
    return Calibration(float(model.logit_scale), model.logit_bias)


def logit_scale(index: ImageIndex) -> float:
    return calibration(index).scale


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
    calib = calibration(index)
    vectors = index.vectors()
    ids = vectors.ids()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    keep = np.ones(len(ids), dtype=bool)
    if filters is not None and not filters.empty:
        from retrieval.search.filters import select_ids

        keep = np.isin(ids, select_ids(index, filters))
    all_vecs = vectors.vectors()[order][keep]
    ids = ids[keep]
    records = index.records(ids.tolist())
    n_top = len(labels) if top is None else max(0, min(int(top), len(labels)))
    out: list[ImageLabels] = []
    for start in range(0, len(ids), batch):
        chunk_ids = ids[start : start + batch]
        scores = all_vecs[start : start + batch].astype(np.float64) @ label_vecs.T.astype(np.float64)
        probs = calib.probabilities(scores)
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
    probs = calibration(index).probabilities(scores)
    ranked = sorted(range(len(texts)), key=lambda j: (-scores[j], j))
    if k is not None:
        ranked = ranked[: max(0, k)]
    return [LabelScore(texts[j], float(probs[j]), float(scores[j])) for j in ranked]


# -- stored tags -------------------------------------------------------------------------------
def store_tags(catalog: Catalog, results: Sequence[ImageLabels], labels: Sequence[str]) -> int:
    """Save `results` as tags in the catalog (the caller holds the index's writer lock). Earlier
    tags from these `labels` on these images are replaced (tags of other label sets stay).
    Returns the number of tag rows written."""
    rows = [
        {"image_id": r.id, "label": s.label, "probability": s.probability} for r in results for s in r.labels
    ]
    return catalog.replace_tags([r.id for r in results], _unique(labels), rows)


def tags_of(catalog: Catalog, ids: Sequence[int] | None = None) -> dict[int, list[tuple[str, float]]]:
    """Stored tags by image id, most probable first."""
    return catalog.tags_of(ids)


def _chunks(items: list, size: int):  # type: ignore[no-untyped-def]
    for i in range(0, len(items), size):
        yield items[i : i + size]
