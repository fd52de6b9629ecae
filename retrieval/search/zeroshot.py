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

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.core.filters import Filters
from retrieval.storage.catalog import Catalog
from retrieval.storage.vector_store import VectorStore

from .query import unit


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
    return unique(p.strip() for p in text.split(","))


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """One label (or caption) a line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClipdexError(f"cannot read labels file {os.fspath(path)}: {exc.strerror or exc}") from None
    labels = unique(line.strip() for line in text.splitlines() if not line.strip().startswith("#"))
    if not labels:
        raise ClipdexError(f"labels file {os.fspath(path)} holds no labels")
    return labels


def unique(items: Iterable[str]) -> list[str]:
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


# -- classify ----------------------------------------------------------------------------------
def classify(
    store: VectorStore,
    labels: Sequence[str],
    label_vectors: np.ndarray,
    calibration: Calibration,
    *,
    filters: Filters | None = None,
    top: int | None = 1,
    min_probability: float = 0.0,
    batch: int = 8192,
) -> list[ImageLabels]:
    """Label probabilities for every indexed image (or those meeting `filters`), by id;
    `label_vectors` holds one unit vector per label.

    Each image keeps its `top` most probable labels (all with None) at or above
    `min_probability`."""
    ids, all_vecs = store.exact_vectors()  # exact whether the index is flat or approximate
    keep = np.ones(len(ids), dtype=bool)
    if filters is not None and not filters.empty:
        keep = np.isin(ids, store.catalog.select_ids(filters))
    all_vecs = all_vecs[keep]
    ids = ids[keep]
    records = store.catalog.records(ids.tolist())
    n_top = len(labels) if top is None else max(0, min(int(top), len(labels)))
    out: list[ImageLabels] = []
    for start in range(0, len(ids), batch):
        chunk_ids = ids[start : start + batch]
        scores = all_vecs[start : start + batch].astype(np.float64) @ label_vectors.T.astype(np.float64)
        probs = calibration.probabilities(scores)
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


def rank_texts(
    texts: Sequence[str],
    text_vectors: np.ndarray,
    image_vector: np.ndarray,
    calibration: Calibration,
    k: int | None = None,
) -> list[LabelScore]:
    """Candidate texts ranked for one image (image-to-text), best first, ties in given order."""
    scores = text_vectors.astype(np.float64) @ unit(image_vector).astype(np.float64)
    probs = calibration.probabilities(scores)
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
    return catalog.replace_tags([r.id for r in results], unique(labels), rows)
