"""RemoteIndex against a real uvicorn server on a free loopback port: the same hits, infos and
duplicate groups as ImageIndex for the same calls, the server's errors as ClipdexError, and a
bounded load test (a fixed number of requests from a few threads) with no errors and no
corrupted answers.
"""

from __future__ import annotations

import socket

import pytest
from live_server import LiveServer, copy_index
from PIL import Image

from retrieval import ClipdexError
from retrieval.core.filters import Filters, parse_date, parse_formats
from server import RemoteIndex
from server.app import create_app
from server.client import RemoteError
from server.loadtest import load_test

TOKEN = "remote-test-token"
TOL = 1e-6


@pytest.fixture(scope="module")
def served(corpus, tmp_path_factory):
    return copy_index(corpus["dir"], tmp_path_factory.mktemp("remote") / "index")


@pytest.fixture(scope="module")
def url(served, tiny_clip_model):
    with LiveServer(create_app(served, token=TOKEN, model=tiny_clip_model)) as address:
        yield address


@pytest.fixture(scope="module")
def remote(url):
    with RemoteIndex(url, token=TOKEN) as index:
        yield index


def assert_same(got, want) -> None:
    assert [(h.rank, h.id, h.path, h.width, h.height) for h in got] == [
        (h.rank, h.id, h.path, h.width, h.height) for h in want
    ]
    assert all(abs(a.score - b.score) <= TOL for a, b in zip(got, want))
    assert all(type(h).__name__ == "Hit" for h in got)


def test_search_text(remote, local):
    for text in ("red circle", "a + b", "2:x"):  # taken as it is, like ImageIndex.search_text
        assert_same(remote.search_text(text, k=7), local.search_text(text, k=7))


def test_search_image_by_path_uploads_it(remote, local, corpus):
    path = corpus["jpgs"][2]
    assert_same(remote.search_image(path, k=8), local.search_image(path, k=8))
    want = local.search_image(path, k=8, exclude_self=False)
    assert_same(remote.search_image(str(path), k=8, exclude_self=False), want)


def test_search_image_with_a_pil_image_keeps_its_orientation(remote, local, exif_rotated):
    rotated, _upright = exif_rotated
    with Image.open(rotated) as image:
        assert_same(remote.search_image(image, k=6), local.search_image(image, k=6))


def test_search_query_with_local_images_filters_and_paging(remote, local, corpus, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    image = corpus["jpgs"][4]  # indexed: left out of its own results on both sides
    text = f'"2:red circle" + {image} - 0.5:blue'
    filters = Filters(formats=parse_formats("jpeg,png"), after=parse_date("2015-02-01"))
    for options in ({}, {"filters": filters}, {"offset": 3, "within": 0.2}, {"min_score": 0.0}):
        assert_same(remote.search_query(text, k=6, **options), local.search_query(text, k=6, **options))
    assert_same(
        remote.search_query(text, k=4, exclude_self=False), local.search_query(text, k=4, exclude_self=False)
    )


def test_info_and_duplicates(remote, local):
    got, want = remote.info(), local.info()
    for name in ("directory", "model", "images", "updated_at", "index_id"):
        assert getattr(got, name) == getattr(want, name), name
    assert remote.duplicates(0.9) == local.duplicates(0.9)


def test_errors_are_clipdex_errors_with_the_servers_message(url, remote, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipdexError, match="cancel out") as local_error:
        local.search_query("a - a")
    with pytest.raises(RemoteError, match="cancel out") as caught:
        remote.search_query("a - a")
    assert str(caught.value) == str(local_error.value)
    assert caught.value.status == 400
    with pytest.raises(RemoteError, match="needs a token") as caught:
        RemoteIndex(url, token="not-the-token").info()
    assert caught.value.status == 401
    with pytest.raises(ClipdexError, match="cannot read"):
        remote.search_image(tmp_path / "missing.jpg")
    with pytest.raises(ClipdexError, match="not a server address"):
        RemoteIndex("127.0.0.1:8000")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClipdexError, match="cannot reach"):
        RemoteIndex(f"http://127.0.0.1:{port}").info()


def test_bounded_load_has_no_errors_and_no_corrupted_answers(url, corpus, capsys):
    image = int(corpus["ids"][3])
    paths = [
        "/api/search?q=red+circle&k=20",
        f"/api/search?like={image}&k=10",
        "/api/search?q=blue&type=png&k=5&offset=2",
        f"/api/images/{image}/thumbnail",
        f"/api/images/{image}",  # not /api/info: its bytes_on_disk grows as the query cache fills
    ]
    report = load_test(url, paths, requests=200, threads=4, token=TOKEN)
    with capsys.disabled():
        print(f"\nload test: {report.summary()}")
    assert report.errors == [] and report.inconsistent == []
    assert len(report.latencies_ms) == 200
