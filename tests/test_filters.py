"""Exact filters: the ids selected equal a brute-force pass over the catalog records, and a
filtered search equals brute force over the filtered subset (k larger than the matches too)."""

from __future__ import annotations

import fnmatch
import os
from datetime import datetime

import numpy as np
import pytest
from test_query import (
    DAY,
    T0,
    assert_ranking,
    direct_texts,
    expected_scores,
)

from retrieval.core.errors import ClipdexError
from retrieval.core.filters import Filters, parse_date, parse_formats

TEXTS = ["a red circle", "blue sky over green hills", "a yellow square", "sunset", "a dog"]
GLOBS = ["*.png", "scene00[0-4]*", "*/jpg/*", "dup?_small.png", "*copy*", "*.webp", "scene*", "*/sub/*"]


@pytest.fixture(scope="module")
def text_vectors(tiny_clip_model):
    return dict(zip(TEXTS, direct_texts(tiny_clip_model, TEXTS)))


# -- brute force ------------------------------------------------------------------------------
def brute_force_ids(corpus: dict, f: Filters) -> list[int]:
    out = []
    for i, r in sorted(corpus["records"].items()):
        if f.folders and not any(
            r.path.startswith(os.path.realpath(d).rstrip("/") + "/")
            or r.path.startswith(os.path.abspath(d).rstrip("/") + "/")
            for d in f.folders
        ):
            continue
        name = os.path.basename(r.path)
        if f.globs and not any(fnmatch.fnmatchcase(r.path if "/" in g else name, g) for g in f.globs):
            continue
        taken = r.taken_at if r.taken_at is not None else r.mtime_ns / 1e9
        if f.after is not None and not taken >= f.after:
            continue
        if f.before is not None and not taken < f.before:
            continue
        if f.formats and r.format not in f.formats:
            continue
        if f.min_width is not None and r.width < f.min_width:
            continue
        if f.min_height is not None and r.height < f.min_height:
            continue
        out.append(i)
    return out


def random_filters(corpus: dict, rng: np.random.Generator) -> Filters:
    photos = corpus["photos"]
    folders = [photos / "png", photos / "jpg", photos / "jpg" / "sub", photos / "dups", photos / "jp"]
    kw: dict = {}
    while not kw:
        if rng.random() < 0.35:
            kw["folders"] = tuple(
                str(folders[j]) for j in rng.choice(len(folders), rng.integers(1, 3), False)
            )
        if rng.random() < 0.3:
            kw["globs"] = tuple(GLOBS[j] for j in rng.choice(len(GLOBS), rng.integers(1, 3), False))
        if rng.random() < 0.35:
            start = T0 + float(rng.uniform(-400, 3300)) * DAY
            if rng.random() < 0.7:
                kw["after"] = start
            if rng.random() < 0.7:
                kw["before"] = start + float(rng.uniform(30, 2500)) * DAY
        if rng.random() < 0.3:
            kw["formats"] = parse_formats(",".join(rng.choice(["jpeg", "png", "webp", "gif"], 2, False)))
        if rng.random() < 0.3:
            kw["min_width"] = int(rng.choice([48, 64, 90, 100, 121, 160, 500]))
        if rng.random() < 0.3:
            kw["min_height"] = int(rng.choice([60, 72, 96, 120, 500]))
    return Filters(**kw)


# -- tests --------------------------------------------------------------------------------------
def test_the_corpus_has_exif_dates_and_several_formats(corpus):
    records = corpus["records"].values()
    assert sum(r.taken_at is not None for r in records) == 5
    assert {r.format for r in records} == {"PNG", "JPEG", "WEBP"}


@pytest.mark.parametrize("seed", range(50))
def test_random_filters_equal_brute_force(corpus, idx, text_vectors, seed):
    rng = np.random.default_rng(seed)
    f = random_filters(corpus, rng)
    matching = brute_force_ids(corpus, f)
    assert idx.select_ids(f).tolist() == matching
    text = TEXTS[seed % len(TEXTS)]
    k = int(rng.choice([1, 3, 10, 40]))
    hits = idx.search_query(text, k=k, filters=f)
    assert len(hits) == min(k, len(matching))  # exact: never fewer hits than matches allow
    assert_ranking(hits, expected_scores(corpus, text_vectors[text], ids=matching), k)
    if len(matching) > 2:  # paging inside the filtered subset
        offset = int(rng.integers(1, len(matching)))
        page = idx.search_query(text, k=3, filters=f, offset=offset)
        assert_ranking(page, expected_scores(corpus, text_vectors[text], ids=matching), 3, offset)


def test_exif_date_wins_over_the_file_time(corpus, idx):
    f = Filters(after=parse_date("2019-06-15"), before=parse_date("2019-06-16"))
    got = idx.select_ids(f).tolist()
    dated = [
        i
        for i, r in corpus["records"].items()
        if r.taken_at is not None and datetime.fromtimestamp(r.taken_at).date().isoformat() == "2019-06-15"
    ]
    assert got == sorted(dated) and len(got) >= 1
    # ... and a file without EXIF is filtered by its modification time
    r = next(r for r in corpus["records"].values() if r.taken_at is None)
    t = r.mtime_ns / 1e9
    assert r.id in idx.select_ids(Filters(after=t - 1, before=t + 1)).tolist()
    assert r.id not in idx.select_ids(Filters(after=t + 1)).tolist()


def test_folder_through_a_symlink_and_relative(corpus, idx, tmp_path, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(corpus["photos"] / "jpg")
    want = brute_force_ids(corpus, Filters(folders=(str(corpus["photos"] / "jpg"),)))
    assert len(want) == 14
    assert idx.select_ids(Filters(folders=(str(link),))).tolist() == want
    monkeypatch.chdir(corpus["photos"])
    assert idx.select_ids(Filters(folders=("jpg",))).tolist() == want
    assert idx.select_ids(Filters(folders=("jp",))).tolist() == []


def test_nothing_matches_gives_no_hits(idx):
    assert idx.search_query("a red circle", k=5, filters=Filters(min_width=10_000)) == []


def test_type_aliases_and_dates():
    assert parse_formats("jpg,PNG, .webp") == ("JPEG", "MPO", "PNG", "WEBP")
    assert parse_formats(["tif", "heic"]) == ("TIFF", "HEIF")
    assert parse_date("2020-01-01") == datetime(2020, 1, 1).timestamp()
    assert parse_date("2020-01-01T12:30") == datetime(2020, 1, 1, 12, 30).timestamp()
    assert parse_date("1577836800") == 1577836800.0
    with pytest.raises(ClipdexError):
        parse_date("yesterday")
    with pytest.raises(ClipdexError):
        parse_formats(" , ")
    assert Filters().empty and not Filters(min_width=1).empty
