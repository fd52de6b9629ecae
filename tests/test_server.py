"""`clipdex serve`'s JSON API through the ASGI test client: every answer equals ImageIndex's own
for the same query (texts, combined terms, similar images, uploads, filters, cut-offs, paging),
errors are one-line JSON with a 4xx status, thumbnails are upright, cached in the index folder
and never written beside the photos, and the server sees what an indexer commits meanwhile.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import quadrant_image, write_scenes
from fastapi.testclient import TestClient
from live_server import copy_index
from PIL import Image

from retrieval import ImageIndex
from retrieval.core.filters import Filters, parse_date, parse_formats
from retrieval.search.query import Query, Term
from server.app import create_app
from server.params import compact_terms

TOL = 1e-6
JSON = "application/json"


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(corpus, tmp_path_factory) -> Path:
    return copy_index(corpus["dir"], tmp_path_factory.mktemp("served") / "index")


@pytest.fixture(scope="module")
def client(served, tiny_clip_model):
    # base_url: without a token the server only answers to loopback Host names.
    with TestClient(create_app(served, model=tiny_clip_model), base_url="http://127.0.0.1") as c:
        yield c


def get_hits(client: TestClient, url: str, **params) -> list[dict]:
    response = client.get(url, params=params or None)  # params={} would drop the url's own query
    assert response.status_code == 200, response.text
    return response.json()["hits"]


def assert_same(json_hits: list[dict], hits) -> None:
    """The server's hits are ImageIndex's: same images, ranks and paths, same scores."""
    assert [(h["id"], h["rank"], h["path"], h["width"], h["height"]) for h in json_hits] == [
        (h.id, h.rank, h.path, h.width, h.height) for h in hits
    ]
    for got, want in zip(json_hits, hits):
        assert abs(got["score"] - want.score) <= TOL


def assert_json_error(response, status: int, contains: str = "") -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"]
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message and 'File "' not in message
    assert contains.lower() in message.lower(), message
    return message


# -- queries equal the Python API's --------------------------------------------------------------
@pytest.mark.parametrize(
    "q",
    ["red circle", '"2:golden retriever" + beach - people', "a photo - 0.5:blue sky", "12:30 sunset"],
)
def test_text_and_combined_queries_equal_the_python_api(client, local, q, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # Query.parse looks for files named like the terms: none here
    assert_same(get_hits(client, "/api/search", q=q, k=10), local.search_query(Query.parse(q), k=10))


def test_literal_text_term_is_search_text(client, local):
    text = "a + b - c"  # `text=` is taken as it is, like ImageIndex.search_text
    assert_same(get_hits(client, "/api/search", text=text, k=7), local.search_text(text, k=7))


def test_ensemble_equals_the_python_api(client, local, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    want = local.search_query(Query.parse("red circle", ensemble=True), k=6)
    assert_same(get_hits(client, "/api/search", q="red circle", ensemble="true", k=6), want)


def _filters_cases(corpus) -> list[tuple[dict, Filters]]:
    photos = corpus["photos"]
    return [
        ({"folder": str(photos / "jpg")}, Filters(folders=(str(photos / "jpg"),))),
        ({"glob": "*.webp"}, Filters(globs=("*.webp",))),
        (
            {"after": "2019-01-01", "before": "2021-01-01"},
            Filters(after=parse_date("2019-01-01"), before=parse_date("2021-01-01")),
        ),
        ({"type": "png,webp"}, Filters(formats=parse_formats("png,webp"))),
        ({"min_width": 100, "min_height": 70}, Filters(min_width=100, min_height=70)),
        (
            {"folder": str(photos), "type": "jpeg", "after": "2016-06-01"},
            Filters(folders=(str(photos),), formats=parse_formats("jpeg"), after=parse_date("2016-06-01")),
        ),
    ]


def test_filters_equal_the_python_api(client, local, corpus):
    for params, filters in _filters_cases(corpus):
        want = local.search_query(Query.text("red circle"), k=8, filters=filters)
        assert want, params  # each case keeps some images
        assert_same(get_hits(client, "/api/search", q="red circle", k=8, **params), want)


def test_cutoffs_and_offset_equal_the_python_api(client, local):
    query = Query.text("blue sky")
    for options in ({"offset": 5}, {"min_score": 0.05}, {"within": 0.02}, {"offset": 2, "within": 0.05}):
        want = local.search_query(query, k=6, **options)
        assert_same(get_hits(client, "/api/search", q="blue sky", k=6, **options), want)


def test_pages_concatenate_to_the_unpaged_list(client, corpus):
    total = len(corpus["ids"])
    whole = get_hits(client, "/api/search", q="a cat", k=total)
    pages = []
    for offset in range(0, total, 7):
        response = client.get("/api/search", params={"q": "a cat", "k": 7, "offset": offset}).json()
        assert response["more"] == (len(response["hits"]) == 7)
        pages += response["hits"]
    assert [(h["id"], h["rank"]) for h in pages] == [(h["id"], h["rank"]) for h in whole]
    assert len(whole) == total


def test_similar_to_an_indexed_image_by_id(client, local, corpus):
    path = str(corpus["jpgs"][1])
    image_id = corpus["by_path"][path]
    want = local.search_query(Query.image(path), k=10)
    assert image_id not in [h.id for h in want]
    assert_same(get_hits(client, "/api/search", like=image_id, k=10), want)
    with_self = local.search_query(Query.image(path), k=10, exclude_self=False)
    assert_same(get_hits(client, "/api/search", like=image_id, k=10, include_self="true"), with_self)
    other = str(corpus["pngs"][3])
    combined = Query([Term("image", path), Term("image", other, -0.5)])
    got = get_hits(client, f"/api/search?like={image_id}&unlike=0.5:{corpus['by_path'][other]}&k=10")
    assert_same(got, local.search_query(combined, k=10))


def test_uploaded_image_equals_search_image(client, local, corpus):
    path = corpus["webps"][0]  # no other indexed file has its bytes
    response = client.post("/api/search/image?k=10", content=path.read_bytes())
    assert response.status_code == 200, response.text
    assert_same(response.json()["hits"], local.search_image(path, k=10))


def test_uploaded_image_leaves_out_every_indexed_copy_of_itself(client, local, corpus):
    original = corpus["pngs"][0]
    copy = corpus["photos"] / "dups" / "copy_of_scene000.png"  # byte-identical
    ids = {corpus["by_path"][str(original)], corpus["by_path"][str(copy)]}
    data = original.read_bytes()
    hits = client.post("/api/search/image?k=31", content=data).json()["hits"]
    assert ids.isdisjoint(h["id"] for h in hits) and len(hits) == len(corpus["ids"]) - 2
    kept = client.post("/api/search/image?k=5&include_self=true", content=data).json()["hits"]
    assert_same(kept, local.search_image(original, k=5, exclude_self=False))
    assert {h["id"] for h in kept[:2]} == ids


def test_json_search_with_texts_ids_uploads_and_filters(client, local, corpus, tmp_path):
    liked = str(corpus["pngs"][2])
    upload = tmp_path / "query.png"
    shutil.copyfile(corpus["webps"][1], upload)  # an upload is any file's bytes
    import base64

    body = {
        "terms": [
            {"text": "red circle", "weight": 2},
            {"id": corpus["by_path"][liked], "weight": -0.5},
            {"image": base64.b64encode(upload.read_bytes()).decode(), "weight": 0.7},
        ],
        "filters": {"formats": ["jpeg", "png"], "after": "2015-03-01"},
        "k": 6,
        "offset": 1,
    }
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    terms = [Term("text", "red circle", 2), Term("image", liked, -0.5), Term("image", str(upload), 0.7)]
    query = Query(terms)
    filters = Filters(formats=parse_formats("jpeg,png"), after=parse_date("2015-03-01"))
    want = local.search_query(query, k=6, offset=1, filters=filters)
    assert_same(response.json()["hits"], want)


def test_compact_form_reads_like_query_parse(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    examples = [
        "red car",
        '"2:golden retriever" + beach - people',
        "a + b - c",
        "- sky",
        "+ sky + sea",
        "0.5:dog",
        "12:30 sunset",
        'a 12" record',
        '"x + y"',
        "2.5e-1:cat + dog",
        "cats -dogs",
        "a - b + 3:c",
    ]
    for text in examples:
        want = [(t.kind, t.value, t.weight) for t in Query.parse(text).terms]
        assert [(t.kind, t.value, t.weight) for t in compact_terms(text)] == want, text


def test_query_terms_never_name_server_files(client, local, corpus, tmp_path, monkeypatch):
    """A path in q is a text: the server reads files by catalog id only."""
    monkeypatch.chdir(tmp_path)
    path = str(corpus["pngs"][1])  # an existing image: Query.parse would read it
    assert Query.parse(path).terms[0].kind == "image"
    as_text = local.search_query(Query([Term("text", path)]), k=5)
    assert_same(get_hits(client, "/api/search", q=path, k=5), as_text)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(corpus["jpgs"][0].read_bytes())  # readable, not indexed
    response = client.get("/api/search", params={"q": str(secret), "k": 3})
    assert response.status_code == 200  # a text query, not a similar-image search of that file
    want = local.search_query(Query([Term("text", str(secret))]), k=3)
    assert_same(response.json()["hits"], want)
    assert_json_error(client.post("/api/search", json={"terms": [{"path": str(secret)}]}), 400, "exactly one")


# -- the other endpoints -------------------------------------------------------------------------
def test_info_equals_the_python_api(client, local):
    data = client.get("/api/info").json()
    facts = local.info()
    assert data["images"] == facts.images and data["directory"] == facts.directory
    assert data["index_id"] == facts.index_id and data["model"] == facts.model.to_dict()


def test_duplicates_equal_the_python_api(client, local):
    data = client.get("/api/duplicates", params={"threshold": 0.9}).json()
    assert data["groups"] == [g.to_dict() for g in local.duplicates(0.9)]
    assert data["groups"], "the corpus holds near-duplicates"


def test_classify_and_describe_equal_the_python_api(client, local, corpus):
    labels = ["red", "blue", "green"]
    got = client.get("/api/classify", params={"labels": "red,blue,green", "top": 2, "type": "png"}).json()
    want = local.classify(labels, top=2, filters=Filters(formats=("PNG",)))
    assert got["total"] == len(want) and got["results"] == [r.to_dict() for r in want]
    paged = client.get("/api/classify", params={"label": labels, "k": 3, "offset": 2}).json()
    assert paged["results"] == [r.to_dict() for r in local.classify(labels)[2:5]]
    path = corpus["pngs"][4]
    texts = ["a red circle", "a blue square", "a green triangle"]
    got = client.get(f"/api/images/{corpus['by_path'][str(path)]}/labels", params={"label": texts, "k": 2})
    assert got.json()["labels"] == [s.to_dict() for s in local.describe(path, texts, k=2)]


def test_image_record_and_original(client, corpus):
    path = corpus["jpgs"][3]
    image_id = corpus["by_path"][str(path)]
    record = client.get(f"/api/images/{image_id}").json()
    assert record["path"] == str(path) and record["format"] == "JPEG" and "content_hash" not in record
    response = client.get(f"/api/images/{image_id}/original")
    assert response.status_code == 200 and response.content == path.read_bytes()
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["content-length"] == str(path.stat().st_size)


def test_folders_lists_indexed_folders(client, corpus):
    folders = {f["path"]: f["images"] for f in client.get("/api/folders").json()["folders"]}
    assert folders[str(corpus["photos"] / "png")] == 10
    assert sum(folders.values()) == len(corpus["ids"])


def test_openapi_docs_and_the_page(client):
    schema = client.get("/openapi.json").json()
    for path in ("/api/search", "/api/search/image", "/api/images/{image_id}/thumbnail", "/api/info"):
        assert path in schema["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_the_page_loads_nothing_from_elsewhere():
    """Offline: no CDN, no external font or script in the shipped files."""
    static = Path(__file__).resolve().parent.parent / "server" / "static"
    files = sorted(static.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "style.css"}
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "contains"),
    [
        ("GET", "/api/search?q=x&k=0", {}, 400, "k:"),
        ("GET", "/api/search?q=x&k=lots", {}, 400, "k:"),
        ("GET", "/api/search?q=x&offset=-1", {}, 400, "offset"),
        ("GET", "/api/search?q=x&within=-1", {}, 400, "within"),
        ("GET", "/api/search", {}, 400, "nothing to search for"),
        ("GET", "/api/search?q=%20%20", {}, 400, "nothing to search for"),
        ("GET", "/api/search?q=a+-+a", {}, 400, "cancel out"),
        ("GET", "/api/search?q=x&after=yesterday", {}, 400, "not a date"),
        ("GET", "/api/search?like=abc", {}, 400, "not an image id"),
        ("GET", "/api/search?like=999999", {}, 404, "no image with id 999999"),
        ("GET", "/api/images/999999", {}, 404, "no image with id"),
        ("GET", "/api/images/abc", {}, 400, "image_id"),
        ("GET", "/api/images/1/thumbnail?size=300", {}, 400, "size"),
        ("GET", "/api/duplicates?threshold=2", {}, 400, "threshold"),
        ("GET", "/api/classify", {}, 400, "no labels"),
        ("POST", "/api/search/image", {"content": b"not an image at all"}, 400, "uploaded image"),
        ("POST", "/api/search/image", {"content": b""}, 400, "request body"),
        ("POST", "/api/search", {"content": b"{not json", "headers": {"content-type": JSON}}, 400, ""),
        ("POST", "/api/search", {"json": {"terms": [{"text": "a", "id": 1}]}}, 400, "exactly one"),
        ("POST", "/api/search", {"json": {"terms": [{"image": "***"}]}}, 400, "base64"),
        ("POST", "/api/search", {"json": {"q": "dog", "k": 0}}, 400, "k:"),
        ("GET", "/nowhere", {}, 404, "not found"),
        ("DELETE", "/api/info", {}, 405, ""),
    ],
)
def test_errors_are_one_line_json_4xx(client, method, url, kwargs, status, contains):
    assert_json_error(client.request(method, url, **kwargs), status, contains)


# -- thumbnails, and what the server writes -------------------------------------------------------
@pytest.fixture(scope="module")
def small(tiny_clip_model, tmp_path_factory):
    """A small index of its own: an EXIF-rotated JPEG, a large PNG, a few scenes."""
    from indexer import index_folders

    root = tmp_path_factory.mktemp("thumbs")
    photos = root / "photos"
    write_scenes(photos, 3)
    upright = quadrant_image(80, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns the stored picture 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(photos / "rotated.jpg", quality=95, exif=exif.tobytes())
    upright.resize((800, 480)).save(photos / "big.png")
    index_dir = root / "index"
    summary = index_folders([photos], index_dir, model=tiny_clip_model)
    assert summary.added == 5 and not summary.failed
    with ImageIndex.open(index_dir) as index:
        ids = {os.path.basename(r.path): r.id for r in index.records().values()}
    return {"photos": photos, "dir": index_dir, "ids": ids}


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_thumbnails_upright_small_cached_in_the_index_folder(small, tiny_clip_model):
    before = _tree(small["photos"])
    with TestClient(create_app(small["dir"], model=tiny_clip_model), base_url="http://127.0.0.1") as client:
        rotated = client.get(f"/api/images/{small['ids']['rotated.jpg']}/thumbnail")
        assert rotated.status_code == 200 and rotated.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(rotated.content)).convert("RGB")
        assert image.size == (80, 48)  # upright: wider than tall, as the viewer shows it
        red, green, blue, _yellow = (image.getpixel(p) for p in [(10, 10), (70, 10), (10, 40), (70, 40)])
        assert red[0] > 180 and green[1] > 150 and blue[2] > 180

        big = client.get(f"/api/images/{small['ids']['big.png']}/thumbnail")
        assert Image.open(io.BytesIO(big.content)).size == (256, 154)
        large = client.get(f"/api/images/{small['ids']['big.png']}/thumbnail", params={"size": 512})
        assert Image.open(io.BytesIO(large.content)).size == (512, 307)

        cache = small["dir"] / "thumbnails"
        cached = sorted(cache.glob(f"{small['ids']['big.png']}-256-*.jpg"))
        assert len(cached) == 1 and cached[0].read_bytes() == big.content
        etag = big.headers["etag"]
        assert client.get(big.url, headers={"If-None-Match": etag}).status_code == 304
        cached[0].write_bytes(b"marker")  # the next answer comes from the cache, not a new thumbnail
        assert client.get(big.url).content == b"marker"

        photo = small["photos"] / "big.png"
        st = photo.stat()
        os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # edited: a new thumbnail
        fresh = client.get(big.url)
        assert fresh.content != b"marker" and fresh.headers["etag"] != etag
        assert len(list(cache.glob(f"{small['ids']['big.png']}-256-*.jpg"))) == 1  # the stale one is gone
        os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))

        client.post("/api/search/image", content=(small["photos"] / "scene000.png").read_bytes())
        client.get("/api/search", params={"q": "red", "like": small["ids"]["scene001.png"]})
    assert _tree(small["photos"]) == before  # nothing was written beside the photos


def test_sees_what_an_indexer_commits_meanwhile(tiny_clip_model, tmp_path):
    from indexer import index_folders

    photos = tmp_path / "photos"
    write_scenes(photos, 3)
    index_dir = tmp_path / "index"
    index_folders([photos], index_dir, model=tiny_clip_model)
    with TestClient(create_app(index_dir, model=tiny_clip_model), base_url="http://127.0.0.1") as client:
        assert client.get("/api/info").json()["images"] == 3
        assert len(get_hits(client, "/api/search", q="red", k=10)) == 3
        write_scenes(photos, 2, seed0=20, prefix="new")
        index_folders([photos], index_dir, model=tiny_clip_model)  # a writer, while the server runs
        assert client.get("/api/info").json()["images"] == 5
        hits = get_hits(client, "/api/search", q="red", k=10)
        assert {os.path.basename(h["path"]) for h in hits} >= {"new000.png", "new001.png"}
        new_id = next(h["id"] for h in hits if h["path"].endswith("new001.png"))
        assert client.get(f"/api/images/{new_id}/thumbnail").status_code == 200


def test_clipdex_serve_serves_until_interrupted(served):
    """The command itself: binds the port it names, answers, stops cleanly on Ctrl-C."""
    command = [sys.executable, "-m", "cli.main", "serve", "--index", str(served), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()  # printed once listening (and the index is open)
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert line.startswith("clipdex: serving ") and match, line
        with urllib.request.urlopen(match.group(1) + "api/info", timeout=60) as response:
            assert json.loads(response.read())["images"] == 31
    finally:
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 0, rest
