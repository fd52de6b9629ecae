"""Evaluate a model on a captioned or labelled set, given how to embed images and texts.

The caller passes the embedding functions (the command line builds them from the model and the
indexer's decode pool; `clipdex tune` from the model being trained), so this module does not
know where embeddings come from, and every figure comes from `metrics` on those embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.search.query import unit
from retrieval.search.query_vectors import embed_labels

from .datasets import CaptionSet, Dataset, DatasetError, LabelledSet
from .metrics import DEFAULT_KS, ZERO_SHOT_KS, RankFigures, image_to_text, text_to_image, zero_shot

# Unit image vectors for the paths, and the reason for each path that could not be used (by
# position in `paths`); the vectors are the rows of the readable ones, in order.
EmbedImages = Callable[[Sequence[str]], tuple[np.ndarray, dict[int, str]]]
EmbedTexts = Callable[[Sequence[str]], np.ndarray]
TEXT_BATCH = 256


@dataclass
class CaptionReport:
    source: str
    images: int
    captions: int
    text_to_image: RankFigures
    image_to_text: RankFigures
    missing: int = 0  # named in the set, not found
    failed: list[tuple[str, str]] = field(default_factory=list)  # unreadable: (path, reason)
    embed_seconds: float = 0.0
    metric_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "kind": "captions",
            "source": self.source,
            "images": self.images,
            "captions": self.captions,
            "missing": self.missing,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "text_to_image": self.text_to_image.to_dict(),
            "image_to_text": self.image_to_text.to_dict(),
            "embed_seconds": round(self.embed_seconds, 3),
            "metric_seconds": round(self.metric_seconds, 3),
        }


@dataclass
class LabelReport:
    source: str
    images: int
    classes: int
    plain: RankFigures  # the class names as they are
    ensemble: RankFigures  # each class through the prompt templates, averaged
    missing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    embed_seconds: float = 0.0
    metric_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "kind": "labels",
            "source": self.source,
            "images": self.images,
            "classes": self.classes,
            "missing": self.missing,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "zero_shot": self.plain.to_dict(),
            "zero_shot_ensemble": self.ensemble.to_dict(),
            "embed_seconds": round(self.embed_seconds, 3),
            "metric_seconds": round(self.metric_seconds, 3),
        }


Report = CaptionReport | LabelReport


def batched_texts(embed_texts: EmbedTexts, batch: int = TEXT_BATCH) -> EmbedTexts:
    """`embed_texts` fed a batch at a time: thousands of captions at once would hold every
    activation of the text tower in memory together."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        parts = [embed_texts(list(texts[i : i + batch])) for i in range(0, len(texts), batch)]
        return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)

    return embed


def evaluate(
    dataset: Dataset,
    embed_images: EmbedImages,
    embed_texts: EmbedTexts,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    templates: Sequence[str] | None = None,
) -> Report:
    if isinstance(dataset, CaptionSet):
        return evaluate_captions(dataset, embed_images, embed_texts, ks=ks)
    return evaluate_labels(dataset, embed_images, embed_texts, templates=templates)


def evaluate_captions(
    dataset: CaptionSet, embed_images: EmbedImages, embed_texts: EmbedTexts, *, ks: Sequence[int] = DEFAULT_KS
) -> CaptionReport:
    t0 = time.perf_counter()
    image_vectors, failed = embed_images(dataset.images)
    kept = dataset.without_images(failed)
    _check_left(kept.images, dataset)
    text_vectors = unit(batched_texts(embed_texts)(kept.captions))
    t1 = time.perf_counter()
    report = caption_figures(unit(image_vectors), text_vectors, kept, ks=ks)
    report.missing = len(dataset.missing)
    report.failed = [(dataset.images[i], reason) for i, reason in sorted(failed.items())]
    report.embed_seconds = t1 - t0
    return report


def caption_figures(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    dataset: CaptionSet,
    *,
    ks: Sequence[int] = DEFAULT_KS,
) -> CaptionReport:
    """Both directions from embeddings already made (rows in the dataset's order)."""
    t0 = time.perf_counter()
    t2i = text_to_image(image_vectors, text_vectors, dataset.caption_image, ks)
    i2t = image_to_text(image_vectors, text_vectors, dataset.caption_image, ks)
    return CaptionReport(
        dataset.source,
        len(dataset.images),
        len(dataset.captions),
        t2i,
        i2t,
        metric_seconds=time.perf_counter() - t0,
    )


def evaluate_labels(
    dataset: LabelledSet,
    embed_images: EmbedImages,
    embed_texts: EmbedTexts,
    *,
    templates: Sequence[str] | None = None,
) -> LabelReport:
    t0 = time.perf_counter()
    image_vectors, failed = embed_images(dataset.images)
    kept = dataset.without_images(failed)
    _check_left(kept.images, dataset)
    texts = batched_texts(embed_texts)
    plain_vectors = embed_labels(texts, list(kept.classes), ensemble=False)
    ensemble_vectors = embed_labels(texts, list(kept.classes), ensemble=True, templates=templates)
    t1 = time.perf_counter()
    images = unit(image_vectors)
    report = LabelReport(
        dataset.source,
        len(kept.images),
        len(kept.classes),
        zero_shot(images, plain_vectors, kept.image_class, ZERO_SHOT_KS),
        zero_shot(images, ensemble_vectors, kept.image_class, ZERO_SHOT_KS),
        missing=len(dataset.missing),
        failed=[(dataset.images[i], reason) for i, reason in sorted(failed.items())],
        embed_seconds=t1 - t0,
        metric_seconds=time.perf_counter() - t1,
    )
    return report


def _check_left(images: Sequence[str], dataset: Dataset) -> None:
    if not images:
        raise DatasetError(f"{dataset.source}: none of its images could be read")
