"""Zero-shot labels equal a manual softmax over the same vectors; stored tags filter searches;
image-to-text ranking equals a direct computation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_query import (
    assert_ranking,
    direct_images,
    direct_texts,
    expected_scores,
    open_index,
    unit,
)

from retrieval.core.errors import ClipdexError
from retrieval.core.filters import Filters
from retrieval.embedding.clip_model import ClipModel
from retrieval.embedding.spec import CONFIG_DIR, ModelSpec
from retrieval.index import ImageIndex
from retrieval.search.query import default_templates
from retrieval.search.zeroshot import parse_labels, read_labels

LABELS = ["cat", "dog", "car", "a red circle", "blue sky"]
TOL = 1e-5


@pytest.fixture
def writable(corpus, tiny_clip_model, tmp_path):
    """A copy of the shared index that a test may write tags into."""
    directory = tmp_path / "index"
    shutil.copytree(corpus["dir"], directory)
    index = open_index(corpus, tiny_clip_model, directory)
    yield index
    index.close()


def scale_of(model) -> float:
    return float(model.model.logit_scale.exp().item())


_MANUAL: dict[tuple, np.ndarray] = {}


def manual_label_vectors(model, labels, ensemble: bool) -> np.ndarray:
    key = (tuple(labels), ensemble)
    if key not in _MANUAL:
        if not ensemble:
            _MANUAL[key] = direct_texts(model, labels)
        else:
            templates = default_templates()
            prompts = [t.replace("{}", x) for x in labels for t in templates]
            _MANUAL[key] = unit(direct_texts(model, prompts).reshape(len(labels), len(templates), -1).mean(1))
    return _MANUAL[key]


def manual_probabilities(corpus, model, labels, ensemble: bool) -> np.ndarray:
    logits = scale_of(model) * corpus["vectors"] @ manual_label_vectors(model, labels, ensemble).T
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("ensemble", [True, False])
def test_classify_equals_manual_softmax(corpus, idx, tiny_clip_model, ensemble):
    probs = manual_probabilities(corpus, tiny_clip_model, LABELS, ensemble)
    label_vecs = manual_label_vectors(tiny_clip_model, LABELS, ensemble)
    results = idx.classify(LABELS, ensemble=ensemble, top=None)
    assert [r.id for r in results] == corpus["ids"].tolist()
    for row, r in enumerate(results):
        assert r.path == corpus["records"][r.id].path
        got = {s.label: s.probability for s in r.labels}
        assert sorted(got) == sorted(LABELS)
        np.testing.assert_allclose([got[x] for x in LABELS], probs[row], atol=TOL)
        cos = {s.label: s.score for s in r.labels}
        np.testing.assert_allclose([cos[x] for x in LABELS], corpus["vectors"][row] @ label_vecs.T, atol=TOL)
        assert [s.probability for s in r.labels] == sorted((s.probability for s in r.labels), reverse=True)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)


def test_classify_top_min_probability_and_filters(corpus, idx, tiny_clip_model):
    probs = manual_probabilities(corpus, tiny_clip_model, LABELS, True)
    results = idx.classify(LABELS, top=2)
    for row, r in enumerate(results):
        order = np.argsort(-probs[row], kind="stable")[:2]
        if probs[row, order[0]] - probs[row, order[1]] > 1e-4:
            assert [s.label for s in r.labels] == [LABELS[j] for j in order]
    cut = float(np.median(probs.max(axis=1)))
    for row, r in enumerate(idx.classify(LABELS, top=3, min_probability=cut)):
        assert all(s.probability >= cut for s in r.labels)
        assert len(r.labels) == min(3, int((probs[row] >= cut + 1e-6).sum())) or any(
            abs(p - cut) < 1e-6 for p in probs[row]
        )
    subset = idx.classify(LABELS, filters=Filters(formats=("PNG",)))
    assert [r.id for r in subset] == sorted(i for i, rec in corpus["records"].items() if rec.format == "PNG")


def test_stored_tags_filter_searches(corpus, writable, tiny_clip_model):
    with pytest.raises(ClipdexError, match="classify"):
        writable.select_ids(Filters(tags=("cat",)))
    probs = manual_probabilities(corpus, tiny_clip_model, LABELS, True)
    results = writable.classify(LABELS, top=1)
    assert writable.store_tags(results, LABELS) == len(corpus["ids"])
    top1 = {int(i): LABELS[int(np.argmax(p))] for i, p in zip(corpus["ids"], probs)}
    q = direct_texts(tiny_clip_model, ["a photo"])[0]
    for label in LABELS:
        want = sorted(i for i, x in top1.items() if x == label)
        assert writable.select_ids(Filters(tags=(label,))).tolist() == want
        hits = writable.search_query("a photo", k=40, filters=Filters(tags=(label,)))
        assert_ranking(hits, expected_scores(corpus, q, ids=want), 40)
    # another label set adds its tags; storing the same set again replaces its own
    writable.store_tags(writable.classify(["indoor", "outdoor"], top=1), ["indoor", "outdoor"])
    writable.store_tags(writable.classify(LABELS, top=2), LABELS)
    tags = writable.catalog.tags_of()
    assert all(len(t) == 3 for t in tags.values())
    both = writable.select_ids(Filters(tags=("indoor", "cat"))).tolist()
    assert both == sorted(i for i, t in tags.items() if {"indoor", "cat"} <= {x for x, _ in t})


def test_describe_ranks_texts_for_an_image(corpus, idx, tiny_clip_model):
    texts = ["a red circle", "a dog on the beach", "green hills", "a yellow square", "sunset"]
    path = corpus["jpgs"][3]
    v = direct_images(tiny_clip_model, [path])[0]
    cos = direct_texts(tiny_clip_model, texts) @ v
    logits = scale_of(tiny_clip_model) * cos
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    ranked = idx.describe(path, texts)
    assert [s.label for s in ranked] == [texts[j] for j in np.argsort(-cos, kind="stable")]
    for s in ranked:
        j = texts.index(s.label)
        assert s.score == pytest.approx(cos[j], abs=TOL)
        assert s.probability == pytest.approx(probs[j], abs=TOL)
    assert [s.label for s in idx.describe(path, texts, k=2)] == [s.label for s in ranked[:2]]


def test_label_lists(tmp_path):
    assert parse_labels(" cat, dog,,cat , a red car ") == ["cat", "dog", "a red car"]
    f = tmp_path / "labels.txt"
    f.write_text("# animals\ncat\n\ndog, sitting\n")
    assert read_labels(f) == ["cat", "dog, sitting"]
    with pytest.raises(ClipdexError):
        read_labels(tmp_path / "missing.txt")


# -- the recorded logit scale / bias: no torch model for scoring, sigmoid for SigLIP -------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Building a ClipModel fails the test: scoring must come from the index's record."""
    import retrieval.embedding.clip_model

    def refuse(*args, **kwargs):
        pytest.fail("the torch model was loaded")

    monkeypatch.setattr(retrieval.embedding.clip_model.ClipModel, "__init__", refuse)


def test_classify_uses_the_recorded_scale_without_loading_the_model(corpus, tiny_clip_model, no_model_load):
    with ImageIndex.open(corpus["dir"], device="cpu") as index:
        assert index.signature.logit_scale == pytest.approx(scale_of(tiny_clip_model), rel=1e-6)
        results = index.classify(LABELS, ensemble=False, top=None)  # texts: the exported ONNX tower
        assert index._model is None
    probs = manual_probabilities(corpus, tiny_clip_model, LABELS, False)
    for row, r in enumerate(results):
        got = {s.label: s.probability for s in r.labels}
        np.testing.assert_allclose([got[x] for x in LABELS], probs[row], atol=1e-4)


def test_an_index_without_a_recorded_scale_falls_back_to_the_model(corpus, tiny_clip_model, tmp_path):
    directory = tmp_path / "old-index"
    shutil.copytree(corpus["dir"], directory)
    with ImageIndex.open(directory) as index:  # as written before the scale was recorded
        old = {k: v for k, v in index.signature.to_dict().items() if k not in ("logit_scale", "logit_bias")}
        index.catalog.set_model_signature(old)
    with ImageIndex.open(directory, device="cpu") as index:
        assert index.signature.logit_scale is None
        results = index.classify(LABELS, ensemble=False, top=None)
        assert index._model is not None  # loaded for its scale
    probs = manual_probabilities(corpus, tiny_clip_model, LABELS, False)
    for row, r in enumerate(results):
        got = {s.label: s.probability for s in r.labels}
        np.testing.assert_allclose([got[x] for x in LABELS], probs[row], atol=1e-4)


@pytest.fixture(scope="module")
def sigmoid_index(tmp_path_factory):
    """A tiny SigLIP-like model (a CLIP with a learned logit bias) and an index built with it."""
    from conftest import write_scenes

    from indexer import index_folders

    root = tmp_path_factory.mktemp("sigmoid")
    cfg = json.loads((CONFIG_DIR / "clipdex-tiny.json").read_text())
    # A bias and a scale that put sigmoid(scale * cos + bias) in mid-range for a random model,
    # so that a wrong formula shows (SigLIP's own -10 would make every probability ~0).
    cfg["init_logit_bias"] = -0.5
    cfg["init_logit_scale"] = float(np.log(20.0))
    config = root / "clipdex-sigmoid-tiny.json"  # no "siglip" in the name: open_clip would want T5
    config.write_text(json.dumps(cfg))
    model = ClipModel(ModelSpec(str(config), "random", "cpu"))
    write_scenes(root / "photos", 6)
    index_folders([root / "photos"], root / "index", model=model)
    return model, root / "index"


def test_sigmoid_model_scores_each_label_independently(sigmoid_index, no_model_load):
    model, directory = sigmoid_index
    labels = ["cat", "dog", "a red circle"]
    with ImageIndex.open(directory, device="cpu") as index:
        sig = index.signature
        assert sig.logit_bias == pytest.approx(-0.5) and sig.logit_scale == pytest.approx(20.0, rel=1e-5)
        results = index.classify(labels, ensemble=False, top=None)
        vectors = index.store.faiss
        ids = np.sort(vectors.ids())
        stored = index.catalog.embeddings(ids.tolist(), index.dim).astype(np.float64)
        assert index._model is None
    cos = stored @ model.encode_texts(labels).astype(np.float64).T
    want = 1.0 / (1.0 + np.exp(-(sig.logit_scale * cos + sig.logit_bias)))
    assert [r.id for r in results] == ids.tolist()
    for row, r in enumerate(results):
        got = {s.label: s.probability for s in r.labels}
        np.testing.assert_allclose([got[x] for x in labels], want[row], rtol=1e-4)
        np.testing.assert_allclose([s.score for s in r.labels], sorted(cos[row], reverse=True), atol=1e-5)
    assert 0.05 < want.mean() < 0.95  # mid-range: the check above tells sigmoid from softmax


def test_sigmoid_model_describe(sigmoid_index, scene, tmp_path):
    model, directory = sigmoid_index
    texts = ["a red circle", "green hills", "sunset"]
    path = tmp_path / "query.png"
    scene(77).save(path)
    cos = model.encode_texts(texts).astype(np.float64) @ model.encode_pil([scene(77)])[0].astype(np.float64)
    with ImageIndex.open(directory, device="cpu") as index:
        index.use_model(model)
        ranked = index.describe(path, texts)
        sig = index.signature
    want = 1.0 / (1.0 + np.exp(-(sig.logit_scale * cos + sig.logit_bias)))
    assert [s.label for s in ranked] == [texts[j] for j in np.argsort(-cos, kind="stable")]
    for s in ranked:
        assert s.probability == pytest.approx(want[texts.index(s.label)], rel=1e-4)
