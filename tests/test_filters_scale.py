"""Filters at scale, on the SQL side: Catalog.select_ids, count_matches and filter_ids equal a
brute-force Python evaluation of the same filters on random catalogs (folders whose names share
a prefix, bytes that are not UTF-8, LIKE/GLOB metacharacters in names), and the folder and type
filters are answered through an index (SQLite's query plan), not by scanning every row."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import postgres_base_url, postgres_schema, sqlite_plans

from retrieval.core.filters import Filters, folder_prefixes, glob_matches
from retrieval.storage.catalog import Catalog, open_catalog
from retrieval.storage.records import ImageRecord, NewImage

DIM = 4
FOLDERS = [
    "/a/b",
    "/a/bc",
    "/a/b/c",
    "/a/b c",
    "/a/b%",
    "/a/b_",
    "/a/b[1]",
    "/a/b*",
    "/a/b.",
    "/x/" + os.fsdecode(b"\xff\xfe"),  # a name that is not UTF-8
    "/x/é",
    "/",
]
NAMES = ["img1.jpg", "IMG_2.JPG", "scene03.png", "s.webp", "copy of x.png", "a", "b*.gif", "z[1].tif"]
FORMATS = ["JPEG", "PNG", "MPO", "WEBP", "GIF", None]
LABELS = ["dog", "cat", "beach"]
GLOBS = ["*.png", "*.jpg", "scene0[0-4]*", "/a/b/*", "/a/b*/img*", "/a/bc/*", "*/c/*", "[!s]*", "*\\*"]
T0 = 1_600_000_000.0


def _random_catalog(
    directory: Path, rng: np.random.Generator, n: int, url: str | None = None
) -> tuple[Catalog, dict]:
    catalog = open_catalog(directory, create=True, url=url)
    catalog.set_model_signature({"arch": "test", "weights_id": "test", "pretrained": "random", "dim": DIM})
    images, seen = [], set()
    while len(images) < n:
        folder = FOLDERS[int(rng.integers(len(FOLDERS)))]
        sub = "" if rng.random() < 0.6 else f"sub{int(rng.integers(3))}/"
        path = folder.rstrip("/") + "/" + sub + NAMES[int(rng.integers(len(NAMES)))]
        path = path if rng.random() < 0.8 else path.replace(".", f"{int(rng.integers(100))}.", 1)
        if path in seen:
            continue
        seen.add(path)
        vec = rng.standard_normal(DIM).astype(np.float32)
        images.append(
            NewImage(
                path=path,
                size=int(rng.integers(0, 1000)),
                mtime_ns=int((T0 + rng.uniform(0, 1000)) * 1e9),
                content_hash="",
                width=int(rng.integers(0, 400)),
                height=int(rng.integers(0, 400)),
                format=FORMATS[int(rng.integers(len(FORMATS)))],
                taken_at=None if rng.random() < 0.4 else T0 + float(rng.uniform(0, 1000)),
                vector=vec / np.linalg.norm(vec),
            )
        )
    ids = catalog.commit_changes(added=images)
    tags = [
        {"image_id": i, "label": label, "probability": 0.5}
        for i in ids
        for label in LABELS
        if rng.random() < 0.3
    ]
    catalog.replace_tags(ids, LABELS, tags)
    by_id: dict[int, list[str]] = {}
    for t in tags:
        by_id.setdefault(t["image_id"], []).append(t["label"])
    return catalog, {"records": catalog.records(), "tags": by_id}


def _brute_force(corpus: dict, f: Filters) -> list[int]:
    prefixes = folder_prefixes(f.folders)
    out = []
    for i, r in sorted(corpus["records"].items()):
        r: ImageRecord
        if f.folders and not any(os.fsencode(r.path).startswith(p) for p in prefixes):
            continue
        if f.globs and not any(glob_matches(g, r.path) for g in f.globs):
            continue
        taken = r.taken_at if r.taken_at is not None else r.mtime_ns / 1e9
        if f.after is not None and not taken >= f.after:
            continue
        if f.before is not None and not taken < f.before:
            continue
        if f.formats and (r.format is None or r.format.upper() not in {x.upper() for x in f.formats}):
            continue
        if f.min_width is not None and r.width < f.min_width:
            continue
        if f.min_height is not None and r.height < f.min_height:
            continue
        if f.tags and not set(f.tags) <= set(corpus["tags"].get(i, [])):
            continue
        out.append(i)
    return out


def _random_filters(rng: np.random.Generator) -> Filters:
    def some(items: list, most: int) -> tuple:
        k = int(rng.integers(1, most + 1))
        return tuple(items[j] for j in rng.choice(len(items), size=k, replace=False))

    kw: dict = {}
    if rng.random() < 0.6:
        kw["folders"] = some(FOLDERS[:-1] + ["/a", "/a/b/sub1", "/nowhere"], 2)
    if rng.random() < 0.3:
        kw["globs"] = some(GLOBS, 2)
    if rng.random() < 0.3:
        kw["after"] = T0 + float(rng.uniform(0, 1000))
    if rng.random() < 0.3:
        kw["before"] = T0 + float(rng.uniform(0, 1000))
    if rng.random() < 0.3:
        kw["formats"] = some([f for f in FORMATS if f], 2)
    if rng.random() < 0.2:
        kw["min_width"] = int(rng.integers(0, 400))
    if rng.random() < 0.2:
        kw["min_height"] = int(rng.integers(0, 400))
    if rng.random() < 0.2:
        kw["tags"] = some(LABELS, 2)
    return Filters(**kw)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def random_catalog(request, tmp_path_factory):
    """The same random catalog in SQLite and in PostgreSQL (a schema of its own, made once for
    the module; skipped without a server)."""
    rng = np.random.default_rng(11)
    directory = tmp_path_factory.mktemp("filters-scale")
    with contextlib.ExitStack() as stack:
        url = None
        if request.param == "postgresql":
            url = stack.enter_context(postgres_schema(postgres_base_url()))
        catalog, corpus = _random_catalog(directory, rng, 600, url)
        yield catalog, corpus
        catalog.close()


def test_select_ids_equals_brute_force(random_catalog):
    catalog, corpus = random_catalog
    rng = np.random.default_rng(1)
    for _ in range(300):
        f = _random_filters(rng)
        assert catalog.select_ids(f).tolist() == _brute_force(corpus, f), f


def test_folders_sharing_a_prefix_stay_apart(random_catalog):
    catalog, corpus = random_catalog
    for folder in FOLDERS:
        f = Filters(folders=(folder,))
        expected = _brute_force(corpus, f)
        assert catalog.select_ids(f).tolist() == expected, folder
        if folder == "/a/b":  # /a/bc, /a/b c, /a/b% ... are not under /a/b
            paths = [corpus["records"][i].path for i in expected]
            assert paths and all(p.startswith("/a/b/") for p in paths)


def test_count_matches_equals_brute_force_and_stops_at_limit(random_catalog):
    catalog, corpus = random_catalog
    rng = np.random.default_rng(2)
    for _ in range(200):
        f = _random_filters(rng)
        matches = len(_brute_force(corpus, f))
        limit = int(rng.integers(0, 700))
        assert catalog.count_matches(f, limit) == min(matches, limit), (f, limit)
        assert catalog.count_matches(f) == matches


def test_filter_ids_equals_brute_force_on_candidates(random_catalog):
    catalog, corpus = random_catalog
    rng = np.random.default_rng(3)
    all_ids = np.asarray(sorted(corpus["records"]), dtype=np.int64)
    for _ in range(200):
        f = _random_filters(rng)
        candidates = rng.choice(all_ids, size=int(rng.integers(0, 300)), replace=False)
        # ids that no longer exist are simply not matches
        candidates = np.concatenate([candidates, [all_ids[-1] + 5, 10**9]]).astype(np.int64)
        rng.shuffle(candidates)
        expected = sorted(set(_brute_force(corpus, f)) & set(candidates.tolist()))
        assert catalog.filter_ids(candidates, f).tolist() == expected, f


@pytest.mark.parametrize(
    "filters",
    [
        Filters(folders=("/a/b",)),
        Filters(folders=("/a/b", "/x/é")),
        Filters(formats=("PNG", "WEBP")),
        Filters(globs=("/a/bc/*.jpg",)),
        Filters(after=T0 + 500, before=T0 + 510),
    ],
    ids=["one-folder", "two-folders", "types", "glob-with-a-folder", "dates"],
)
@pytest.mark.parametrize("method", ["select_ids", "count_matches"])
def test_folder_type_and_date_filters_use_an_index(random_catalog, filters, method):
    catalog, corpus = random_catalog
    if catalog.location.is_postgres:
        pytest.skip("SQLite's query plans")
    plans = sqlite_plans(catalog, lambda: getattr(catalog, method)(filters), "images")
    assert plans
    for plan in plans:
        assert "SCAN images" not in plan and "USING" in plan, plan
    assert catalog.select_ids(filters).tolist() == _brute_force(corpus, filters)


@pytest.mark.parametrize("filters", [Filters(), Filters(globs=("*.png",)), Filters(after=T0 + 500)])
def test_filter_ids_looks_candidates_up_by_key(random_catalog, filters):
    """Post-filtering a few candidates never scans the table, whatever the filter."""
    catalog, corpus = random_catalog
    if catalog.location.is_postgres:
        pytest.skip("SQLite's query plans")
    candidates = np.asarray(sorted(corpus["records"]))[::7]
    plans = sqlite_plans(catalog, lambda: catalog.filter_ids(candidates, filters), "images")
    assert plans
    for plan in plans:
        assert "SCAN images" not in plan, plan
    expected = sorted(set(_brute_force(corpus, filters)) & set(candidates.tolist()))
    assert catalog.filter_ids(candidates, filters).tolist() == expected
