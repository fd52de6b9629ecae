"""From a query to one unit vector, given how to embed texts and images.

The query vector is the normalised weighted sum of the normalised term vectors:

    q = sum_i w_i * v_i / |v_i|,    q <- q / |q|

A text term can go through a prompt ensemble: the label is put into many templates ("a photo of
a {}.", ...), each prompt is embedded and normalised, the mean is normalised again. The caller
passes the embedding functions (the front door's text embedder and model), so this module does
not know where embeddings come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from retrieval.core.errors import ClipdexError

from .query import Query, check_templates, default_templates, prompts, unit

EmbedTexts = Callable[[Sequence[str]], np.ndarray]
EmbedImage = Callable[[str], np.ndarray]


def embed_labels(
    embed_texts: EmbedTexts,
    labels: Sequence[str],
    *,
    ensemble: bool = True,
    templates: Sequence[str] | None = None,
) -> np.ndarray:
    """One unit vector per label: the text itself, or the normalised mean of its normalised
    prompt embeddings. All prompts go through `embed_texts` in one call."""
    if not labels:
        raise ClipdexError("no labels given")
    if not ensemble:
        return unit(embed_texts(list(labels)))
    tpl = check_templates(templates) if templates is not None else default_templates()
    texts = [p for label in labels for p in prompts(label, tpl)]
    unique = list(dict.fromkeys(texts))
    vecs = unit(embed_texts(unique))
    where = {t: i for i, t in enumerate(unique)}
    rows = np.asarray([where[t] for t in texts]).reshape(len(labels), len(tpl))
    return unit(vecs[rows].astype(np.float64).mean(axis=1))


def query_vector(query: Query | str, embed_texts: EmbedTexts, embed_image: EmbedImage) -> np.ndarray:
    """The unit query vector: the normalised weighted sum of the normalised term vectors."""
    if isinstance(query, str):
        query = Query.parse(query)
    texts = [t for t in query.terms if t.kind == "text"]
    vectors: dict[int, np.ndarray] = {}
    if texts:
        labels = list(dict.fromkeys(t.value for t in texts))
        embedded = embed_labels(embed_texts, labels, ensemble=query.ensemble, templates=query.templates)
        by_label = dict(zip(labels, embedded))
        for n, t in enumerate(query.terms):
            if t.kind == "text":
                vectors[n] = by_label[t.value]
    for n, t in enumerate(query.terms):
        if t.kind == "image":
            vectors[n] = unit(embed_image(os.path.expanduser(t.value)))
    total = np.zeros(len(next(iter(vectors.values()))), dtype=np.float64)
    for n, t in enumerate(query.terms):
        total += t.weight * vectors[n].astype(np.float64)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ClipdexError("the query's terms cancel out: nothing left to search for")
    return (total / norm).astype(np.float32)
