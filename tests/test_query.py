"""Combined queries, prompt ensembles, cut-offs and paging, against numpy on the same vectors.

`query_corpus` builds (once per session) the index the query-power tests share: PNG, JPEG and
WEBP scenes in sub-folders, JPEGs with EXIF dates and files with set modification times,
near-duplicate pairs (a scene and its resized copy) and one byte-identical copy (exact ties).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_ARCH, make_scene, set_mtime, write_scenes
from PIL import Image

from retrieval.core.errors import ClipdexError
from retrieval.index import ImageIndex
from retrieval.search.query import Query, Term, default_templates, load_templates, parse_templates
from retrieval.storage.catalog import Catalog

TOL = 1e-5
DAY = 86400.0
T0 = 1_420_070_400.0  # 2015-01-01 UTC: base of the modification times set on the files
EXIF_DATES = ["2018:03:01 10:00:00", "2019:06:15 12:00:00", "2020:01:01 00:00:00", "2021:11:30 18:45:00"]

_BUILT: dict[str, dict] = {}


# -- the shared corpus --------------------------------------------------------------------------
def build_query_corpus(model, root: Path) -> dict:
    """Write the photos, index them with `model`; returns paths, records and stored vectors."""
    from indexer import index_folders

    photos = root / "photos"
    pngs = write_scenes(photos / "png", 10)
    jpgs = write_scenes(photos / "jpg", 10, seed0=50, ext=".jpg")
    for n, p in enumerate(jpgs[::2]):  # every other JPEG gets an EXIF date
        exif = Image.Exif()
        exif[0x0132] = EXIF_DATES[n % len(EXIF_DATES)]  # DateTime
        Image.open(p).convert("RGB").save(p, "JPEG", quality=92, exif=exif.tobytes())
    webps = write_scenes(photos / "jpg" / "sub", 4, seed0=80, ext=".webp")
    dups = photos / "dups"
    dups.mkdir()
    for i in range(3):
        img = make_scene(300 + i, (160, 120))
        img.save(dups / f"dup{i}.png")
        img.resize((96, 72), Image.Resampling.LANCZOS).save(dups / f"dup{i}_small.png")
    shutil.copyfile(pngs[0], dups / "copy_of_scene000.png")  # identical vector: exact ties
    everything = sorted(p for p in photos.rglob("*") if p.is_file())
    for n, p in enumerate(everything):  # modification times spread over 2015 .. 2023
        set_mtime(p, int((T0 + n * 97 * DAY) * 1e9))
    index_dir = root / "index"
    summary = index_folders([photos], index_dir, model=model)
    assert summary.added == len(everything) == 31 and not summary.failed
    catalog = Catalog.open(index_dir)
    try:
        records = catalog.records()
        ids = sorted(records)
        vectors = catalog.embeddings(ids, 64).astype(np.float64)
    finally:
        catalog.close()
    return {
        "root": root,
        "photos": photos,
        "dir": index_dir,
        "records": records,
        "ids": np.asarray(ids, dtype=np.int64),
        "vectors": vectors,
        "by_path": {r.path: r.id for r in records.values()},
        "pngs": pngs,
        "jpgs": jpgs,
        "webps": webps,
    }


def shared_corpus(model, tmp_path_factory) -> dict:
    """The session's one query corpus (the index is only read; copy it before writing)."""
    if "corpus" not in _BUILT:
        _BUILT["corpus"] = build_query_corpus(model, tmp_path_factory.mktemp("query-corpus"))
    return _BUILT["corpus"]


def open_index(corpus: dict, model, directory: Path | None = None) -> ImageIndex:
    idx = ImageIndex.open(directory or corpus["dir"], device="cpu")
    idx.use_model(model)  # the session's model: no second load, and torch for texts
    return idx


# -- direct computations ------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def direct_texts(model, texts) -> np.ndarray:
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)  # open_clip's own tokenizer, not clipdex's
    with torch.inference_mode():
        return unit(model.model.encode_text(tokenizer(list(texts))).float().numpy())


def direct_images(model, paths) -> np.ndarray:
    with torch.inference_mode():
        pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
        return unit(model.model.encode_image(pixels).float().numpy())


def expected_scores(corpus: dict, q: np.ndarray, ids=None, exclude=()) -> dict[int, float]:
    scores = corpus["vectors"] @ unit(q)
    keep = None if ids is None else set(int(i) for i in ids)
    return {
        int(i): float(s)
        for i, s in zip(corpus["ids"], scores)
        if (keep is None or int(i) in keep) and int(i) not in exclude
    }


def assert_ranking(hits, expected: dict[int, float], k: int, offset: int = 0) -> None:
    """`hits` are places offset+1 .. offset+k of `expected` (id -> score) ranked by score,
    scores within TOL; the order is checked wherever neighbours are more than TOL apart."""
    order = sorted(expected, key=lambda i: (-expected[i], i))
    want = order[offset : offset + k]
    assert len(hits) == len(want), (len(hits), len(want))
    assert [h.rank for h in hits] == list(range(offset + 1, offset + len(want) + 1))
    got = [h.id for h in hits]
    assert len(set(got)) == len(got)
    for h in hits:
        assert h.id in expected, f"hit {h.id} is not a candidate"
        assert abs(h.score - expected[h.id]) <= TOL, (h.id, h.score, expected[h.id])
    for pos, i in enumerate(want):
        j = offset + pos
        neighbours = [expected[order[m]] for m in (j - 1, j + 1) if 0 <= m < len(order)]
        if all(abs(expected[i] - s) > TOL for s in neighbours):
            assert got[pos] == i, f"place {j + 1}: got {got[pos]}, expected {i}"


# -- fixtures -----------------------------------------------------------------------------------
# -- parsing ------------------------------------------------------------------------------------
def test_parse_compact_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_scene(1).save(tmp_path / "pool.jpg")
    q = Query.parse('"2:golden retriever" + ./pool.jpg - people')
    assert q.terms == [
        Term("text", "golden retriever", 2.0),
        Term("image", "./pool.jpg", 1.0),
        Term("text", "people", -1.0),
    ]
    assert Query.parse_argv(["2:golden", "retriever", "+", "./pool.jpg", "-", "people"]).terms == q.terms
    assert Query.parse("0.5:./pool.jpg - 1.5:dog").terms == [
        Term("image", "./pool.jpg", 0.5),
        Term("text", "dog", -1.5),
    ]
    assert Query.parse('2:"a - b" + c').terms == [Term("text", "a - b", 2.0), Term("text", "c", 1.0)]
    assert Query.parse("- people").terms == [Term("text", "people", -1.0)]
    make_scene(2).save(tmp_path / "my photo - copy.png")
    assert Query.parse("my photo - copy.png").terms == [Term("image", "my photo - copy.png")]


def test_parse_leaves_plain_texts_alone():
    for text in ["a dog on a beach", "black-and-white photo", "12:30 sunset", 'a 12" record', "x+y - z"]:
        assert Query.parse(text).terms[0].weight == 1.0
    assert Query.parse("12:30 sunset").terms == [Term("text", "12:30 sunset")]
    assert Query.parse('a 12" record').terms == [Term("text", 'a 12" record')]
    assert Query.parse("x+y - z").terms == [Term("text", "x+y"), Term("text", "z", -1.0)]


@pytest.mark.parametrize("bad", ["dog + ", "-", "dog + + cat", "+ - dog", "./missing.jpg + dog", '""'])
def test_parse_errors(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipdexError):
        Query.parse(bad)


def test_templates_files(tmp_path):
    builtin = default_templates()
    assert 25 <= len(builtin) <= 40 and all("{}" in t for t in builtin)
    assert len(set(builtin)) == len(builtin)
    f = tmp_path / "t.txt"
    f.write_text("# mine\n\na {} here\nthe {}\n")
    assert load_templates(f) == ("a {} here", "the {}")
    with pytest.raises(ClipdexError):
        parse_templates("no placeholder\n")


# -- combined queries ---------------------------------------------------------------------------
def test_single_text_equals_search_text(idx):
    a = idx.search_query("a red circle", k=8)
    b = idx.search_text("a red circle", k=8)
    assert [h.id for h in a] == [h.id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)


COMBOS = [
    [("text", "a red circle", 1.0), ("text", "blue sky", 1.0)],
    [("text", "golden retriever", 2.0), ("image", "Q0", 1.0), ("text", "people", -1.0)],
    [("image", "Q1", 1.0), ("text", "green hills", -0.5)],
    [("text", "sunset", 0.3), ("image", "INDEXED", 1.0), ("text", "a yellow square", -2.0)],
    [("image", "Q0", -1.0), ("image", "Q1", 1.5)],
]


@pytest.mark.parametrize("combo", range(len(COMBOS)))
def test_combined_query_equals_weighted_sum(corpus, idx, tiny_clip_model, tmp_path, combo):
    queries = write_scenes(tmp_path, 2, seed0=700, prefix="q")
    names = {"Q0": str(queries[0]), "Q1": str(queries[1]), "INDEXED": str(corpus["pngs"][3])}
    terms = [Term(kind, names.get(value, value), w) for kind, value, w in COMBOS[combo]]
    total = np.zeros(64)
    for t in terms:
        v = (
            direct_texts(tiny_clip_model, [t.value])
            if t.kind == "text"
            else direct_images(tiny_clip_model, [t.value])
        )
        total += t.weight * v[0]
    q = unit(total)
    np.testing.assert_allclose(idx.embed_query(Query(terms)), q, atol=TOL)
    indexed_terms = [corpus["by_path"][t.value] for t in terms if t.value in corpus["by_path"]]
    hits = idx.search_query(Query(terms), k=9)
    assert_ranking(hits, expected_scores(corpus, q, exclude=indexed_terms), 9)
    assert not set(indexed_terms) & {h.id for h in hits}  # indexed query images are left out
    kept = idx.search_query(Query(terms), k=40, exclude_self=False)
    assert_ranking(kept, expected_scores(corpus, q), 40)


def test_compact_form_and_plus_minus_agree(corpus, idx):
    img = str(corpus["pngs"][2])
    a = idx.search_query(Query.parse(f'"2:golden retriever" + {img} - people'), k=31)
    b = idx.search_query(Query.text("golden retriever").plus(Term("text", "golden retriever", 1.0)), k=1)
    assert b  # a doubled term is still a query
    c = idx.search_query(Query([Term("text", "golden retriever", 2.0)]).plus(img).minus("people"), k=31)
    assert [h.id for h in a] == [h.id for h in c]
    assert corpus["by_path"][img] not in {h.id for h in a}


def test_terms_that_cancel_are_an_error(idx):
    with pytest.raises(ClipdexError, match="cancel"):
        idx.search_query(Query.parse("a dog - a dog"))


# -- prompt ensembles ---------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["dog", "red circle"])
def test_ensemble_equals_manual_average(corpus, idx, tiny_clip_model, label):
    templates = default_templates()
    prompts = [t.replace("{}", label) for t in templates]
    manual = unit(direct_texts(tiny_clip_model, prompts).mean(axis=0))
    np.testing.assert_allclose(idx.embed_labels([label])[0], manual, atol=TOL)
    hits = idx.search_query(Query.text(label, ensemble=True), k=12)
    assert_ranking(hits, expected_scores(corpus, manual), 12)
    before = tiny_clip_model.texts_encoded
    idx.embed_labels([label])  # every prompt now comes from the query cache
    assert tiny_clip_model.texts_encoded == before


def test_ensemble_with_own_templates_and_combination(corpus, idx, tiny_clip_model):
    templates = ("a photo of {}", "{} in a painting", "a {} {}")  # a label may occur twice
    dog = unit(direct_texts(tiny_clip_model, [t.replace("{}", "dog") for t in templates]).mean(axis=0))
    sky = unit(direct_texts(tiny_clip_model, [t.replace("{}", "sky") for t in templates]).mean(axis=0))
    q = unit(1.5 * dog - 0.5 * sky)
    query = Query.parse("1.5:dog - 0.5:sky", ensemble=True, templates=templates)
    np.testing.assert_allclose(idx.embed_query(query), q, atol=TOL)
    assert_ranking(idx.search_query(query, k=10), expected_scores(corpus, q), 10)


# -- cut-offs and paging ------------------------------------------------------------------------
def test_min_score_and_within_equal_brute_force(corpus, idx, tiny_clip_model):
    q = direct_texts(tiny_clip_model, ["a blue square"])[0]
    expected = expected_scores(corpus, q)
    scores = sorted(expected.values(), reverse=True)
    gaps = [j for j in range(3, 20) if scores[j - 1] - scores[j] > 1e-4]  # cut between clear gaps
    for n in gaps[:3]:
        cut = (scores[n - 1] + scores[n]) / 2
        hits = idx.search_query("a blue square", k=31, min_score=cut)
        assert_ranking(hits, {i: s for i, s in expected.items() if s >= cut}, 31)
        assert len(hits) == n
        margin = scores[0] - cut
        hits = idx.search_query("a blue square", k=31, within=margin)
        assert_ranking(hits, {i: s for i, s in expected.items() if s >= scores[0] - margin}, 31)
        assert len(hits) == n
        page = idx.search_query("a blue square", k=3, within=margin, offset=n - 2)
        assert [h.id for h in page] == [h.id for h in hits[n - 2 :]]
        assert idx.search_query("a blue square", k=2, min_score=cut, within=1.0, offset=n) == []


@pytest.mark.parametrize("query", ["a red circle", "sunset - sky", "2:dog + a cat"])
def test_pages_concatenate_to_the_unpaged_list(corpus, idx, query):
    full = idx.search_query(query, k=100)
    assert len(full) == 31
    for size in (1, 2, 3, 7):
        pages = []
        for offset in range(0, 35, size):
            pages += idx.search_query(query, k=size, offset=offset)
        assert [(h.rank, h.id, h.score) for h in pages] == [(h.rank, h.id, h.score) for h in full]
    scores = [h.score for h in full]
    assert scores == sorted(scores, reverse=True)
    # scene000 and its byte-identical copy score exactly the same for every query: ties by id
    copies = sorted(corpus["by_path"][str(p)] for p in corpus["photos"].rglob("*scene000.png"))
    assert len(copies) == 2
    places = [n for n, h in enumerate(full) if h.id in copies]
    assert full[places[0]].score == full[places[1]].score
    assert places[1] == places[0] + 1 and [full[n].id for n in places] == copies


def test_offset_past_the_end_is_empty(idx):
    assert idx.search_query("a red circle", k=5, offset=31) == []
    assert idx.search_query("a red circle", k=5, offset=29)[-1].rank == 31


def test_paths_with_user_home_and_relative_images(corpus, idx, tiny_clip_model, monkeypatch):
    monkeypatch.chdir(corpus["photos"])
    rel = os.path.join("png", corpus["pngs"][1].name)
    q = direct_images(tiny_clip_model, [corpus["pngs"][1]])[0]
    hits = idx.search_query(Query.parse(rel), k=5)
    assert_ranking(hits, expected_scores(corpus, q, exclude=[corpus["by_path"][str(corpus["pngs"][1])]]), 5)


def test_rank_leaves_out_the_files_with_an_excluded_digest_wherever_they_rank(corpus, idx):
    """By the sha256 each row records, not by vectors: the copies go whether they would rank
    first or last, a short page is filled from further down, and pages add up to the list."""
    original = corpus["pngs"][0]
    copy = corpus["photos"] / "dups" / "copy_of_scene000.png"  # byte-identical
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    copies = {corpus["by_path"][str(original)], corpus["by_path"][str(copy)]}
    n = len(corpus["ids"])
    near = idx.embed_image(original)
    assert {h.id for h in idx.rank(near, 2)} == copies  # its top two when not excluded
    for vector in (near, -near, idx.embed_image(corpus["webps"][0])):
        every = [h.id for h in idx.rank(vector, n)]
        kept = idx.rank(vector, n, exclude_digests=[digest])
        assert [h.id for h in kept] == [i for i in every if i not in copies]
        assert [h.id for h in idx.rank(vector, 3, exclude_digests=[digest])] == [h.id for h in kept[:3]]
        assert idx.rank(vector, 3, offset=4, exclude_digests=[digest]) == kept[4:7]
