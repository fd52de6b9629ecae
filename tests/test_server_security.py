"""What `clipdex serve` refuses: paths instead of catalog ids (`..`, absolute paths, encoded
slashes), files swapped for symbolic links after indexing, requests without the token, Host
names that are not loopback (DNS rebinding), oversized uploads and decompression bombs, a
public address without a token. Refusals are one-line JSON and never carry file content or a
stack trace.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import write_scenes
from corpus import blank_bilevel_png
from fastapi.testclient import TestClient
from live_server import LiveServer

from retrieval import ClipdexError, ImageIndex
from server.app import create_app, run
from server.auth import check_bind
from server.params import MAX_BODY, MAX_UPLOAD

SECRET = b"TOP SECRET: not a photo\n"
TOKEN = "s3cret-token-for-tests"


def build(root: Path, model) -> dict:
    """photos/ (three scenes, a sub-folder, and `linked.png`, a link the indexer follows to a
    photo outside), and outside/ (that photo, a secret text, a secret picture)."""
    from indexer import index_folders

    photos, outside = root / "photos", root / "outside"
    write_scenes(photos, 3)
    write_scenes(photos / "sub", 1, seed0=10, prefix="inner")
    write_scenes(outside, 1, seed0=20, prefix="target")
    write_scenes(outside, 1, seed0=30, prefix="private")  # an image the index must never show
    (outside / "secret.txt").write_bytes(SECRET)
    os.symlink(outside / "target000.png", photos / "linked.png")
    index_dir = root / "index"
    summary = index_folders([photos], index_dir, model=model)
    assert summary.added == 5 and not summary.failed
    with ImageIndex.open(index_dir) as index:
        ids = {os.path.relpath(r.path, photos): r.id for r in index.records().values()}
    return {"photos": photos, "outside": outside, "dir": index_dir, "ids": ids}


@pytest.fixture(scope="module")
def shared(tiny_clip_model, tmp_path_factory) -> dict:
    """Read-only for the tests that use it."""
    return build(tmp_path_factory.mktemp("guarded"), tiny_clip_model)


@pytest.fixture
def own(tiny_clip_model, tmp_path) -> dict:
    """A fresh one, for tests that swap files."""
    return build(tmp_path, tiny_clip_model)


def client_for(index_dir: Path, model, **kw) -> TestClient:
    return TestClient(create_app(index_dir, model=model, **kw), base_url="http://127.0.0.1")


def assert_refused(status: int, body: bytes, expected: tuple[int, ...] = (400, 403, 404, 405)) -> None:
    assert status in expected, (status, body[:200])
    assert SECRET not in body and b"root:" not in body and b"def create_app" not in body
    message = json.loads(body)["error"]
    assert "\n" not in message and "Traceback" not in message


# -- files by catalog id only ---------------------------------------------------------------------
def test_traversal_attempts_never_reach_a_file(shared, tiny_clip_model):
    """Sent byte for byte over a real socket, as an attacker would (clients normalise `..`)."""
    secret = str(shared["outside"] / "secret.txt")
    attempts = [
        "/api/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd/original",
        "/api/images/%2Fetc%2Fpasswd/original",
        f"/api/images/{quote(secret, safe='')}/original",
        f"/api/images/{quote(secret, safe='')}/thumbnail",
        "/api/images/../../../../etc/passwd",
        "/api/images/1/../../../../../etc/passwd",
        "/api/images/1/original/../../../../../etc/passwd",
        "/api/images/1%2F..%2F2/original",
        "/api/images/-1/original",
        "/api/images/1.5/original",
        "/api/images/0x1/original",
        "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/%2e%2e%2fapp.py",
        "/static/..%5capp.py",
        f"/static/{quote(secret)}",
        f"/static/..{quote(secret)}",
    ]
    with LiveServer(create_app(shared["dir"], model=tiny_clip_model)) as url:
        host, port = url.removeprefix("http://").split(":")
        for path in attempts:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert_refused(response.status, body)


def test_a_symlink_swapped_in_after_indexing_is_refused(own, tiny_clip_model):
    photos, outside, ids = own["photos"], own["outside"], own["ids"]
    victim = photos / "scene000.png"
    victim.unlink()
    os.symlink(outside / "private000.png", victim)  # an image, so a thumbnail could be made of it
    (photos / "scene001.png").unlink()
    os.symlink(outside / "secret.txt", photos / "scene001.png")
    moved = photos.parent / "sub-moved"
    os.rename(photos / "sub", moved)
    write_scenes(own["outside"] / "elsewhere", 1, seed0=40, prefix="inner")
    os.symlink(outside / "elsewhere", photos / "sub")  # a parent folder swapped for a link
    with client_for(own["dir"], tiny_clip_model) as client:
        for name in ("scene000.png", "scene001.png", "sub/inner000.png"):
            for url in (f"/api/images/{ids[name]}/original", f"/api/images/{ids[name]}/thumbnail"):
                response = client.get(url)
                assert_refused(response.status_code, response.content, (403,))
                assert "symbolic link" in response.json()["error"]
            response = client.get("/api/search", params={"like": ids[name]})
            assert_refused(response.status_code, response.content, (403,))
            response = client.get(f"/api/images/{ids[name]}/labels", params={"labels": "a,b"})
            assert_refused(response.status_code, response.content, (403,))
        assert not (own["dir"] / "thumbnails").exists() or not any(
            p.name.startswith(f"{ids['scene000.png']}-") for p in (own["dir"] / "thumbnails").iterdir()
        )


def test_a_fifo_or_a_deleted_file_is_refused_without_hanging(own, tiny_clip_model):
    ids = own["ids"]
    fifo = own["photos"] / "scene002.png"
    fifo.unlink()
    os.mkfifo(fifo)  # a plain open() of a FIFO waits for a writer
    # Should the server open it after all, this writer lets that open return (and the test fail
    # on the answer) instead of hanging the suite.
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
    writer.start()
    (own["photos"] / "scene001.png").unlink()
    try:
        with client_for(own["dir"], tiny_clip_model) as client:
            response = client.get(f"/api/images/{ids['scene002.png']}/original")
            assert_refused(response.status_code, response.content, (403,))
            response = client.get(f"/api/images/{ids['scene001.png']}/thumbnail")
            assert_refused(response.status_code, response.content, (404,))
            assert "no longer exists" in response.json()["error"]
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # releases the writer's open()
        writer.join()
        os.close(reader)


def test_a_link_the_indexer_followed_is_served_until_its_target_changes(own, tiny_clip_model):
    target = own["outside"] / "target000.png"
    with client_for(own["dir"], tiny_clip_model) as client:
        url = f"/api/images/{own['ids']['linked.png']}/original"
        response = client.get(url)
        assert response.status_code == 200 and response.content == target.read_bytes()
        target.write_bytes(SECRET)  # the link now reaches other content than was indexed
        response = client.get(url)
        assert_refused(response.status_code, response.content, (403,))


# -- who may ask ------------------------------------------------------------------------------------
GUARDED = ["/", "/static/app.js", "/api/info", "/api/search?q=red", "/docs", "/openapi.json"]


def test_with_a_token_every_request_needs_it(shared, tiny_clip_model):
    image = shared["ids"]["scene000.png"]
    paths = [*GUARDED, f"/api/images/{image}/thumbnail", f"/api/images/{image}/original"]
    with client_for(shared["dir"], tiny_clip_model, token=TOKEN) as client:
        for path in paths:
            response = client.get(path)
            assert_refused(response.status_code, response.content, (401,))
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = client.get(path, headers={"Authorization": "Bearer not-the-token"})
            assert_refused(wrong.status_code, wrong.content, (401,))
            right = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert right.status_code == 200, (path, right.text)
        # Tokens in addresses end up in logs and history: only the page takes one, once.
        assert client.get(f"/api/info?token={TOKEN}").status_code == 401
        # With a token the server may be shared: any Host name is fine.
        shared_host = {"Authorization": f"Bearer {TOKEN}", "Host": "photos.lan"}
        assert client.get("/api/info", headers=shared_host).is_success


def test_the_page_trades_the_token_for_a_session_cookie(shared, tiny_clip_model):
    with client_for(shared["dir"], tiny_clip_model, token=TOKEN) as client:
        response = client.get(f"/?q=red+car&token={TOKEN}", follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/?q=red+car"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and TOKEN not in cookie
        image = shared["ids"]["scene000.png"]
        for path in ("/?q=red+car", "/api/info", f"/api/images/{image}/thumbnail"):
            assert client.get(path).status_code == 200, path  # the cookie jar sends it
        client.cookies.clear()
        assert client.get("/api/info").status_code == 401
        assert client.get("/?token=wrong-token-value", follow_redirects=False).status_code == 401


def test_without_a_token_only_loopback_host_names_are_answered(shared, tiny_clip_model):
    with client_for(shared["dir"], tiny_clip_model) as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.0.0.2"):
            assert client.get("/api/info", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "192.168.1.10:8000", "127.0.0.1.evil.example", ""):
            response = client.get("/api/info", headers={"Host": host})
            assert_refused(response.status_code, response.content, (403,))


def test_a_public_address_needs_a_token():
    for host in ("127.0.0.1", "localhost", "::1", "127.8.9.10"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "photos.example"):
        with pytest.raises(ClipdexError, match="without --token"):
            check_bind(host, None)
        check_bind(host, TOKEN)
    with pytest.raises(ClipdexError, match="at least 8"):
        check_bind("0.0.0.0", "short")
    with pytest.raises(ClipdexError, match="without --token"):
        run("/nonexistent/index", host="0.0.0.0", port=0)  # refused before anything is opened


def test_the_cli_refuses_a_public_address_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--host", "0.0.0.0", "--index", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CLIPDEX_TOKEN": ""},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("clipdex: error: refusing to listen on 0.0.0.0 without --token")
    assert result.stderr.count("\n") == 1


# -- uploads --------------------------------------------------------------------------------------
def test_uploads_are_size_capped(shared, tiny_clip_model):
    with client_for(shared["dir"], tiny_clip_model) as client:
        response = client.post("/api/search/image", content=b"\0" * (MAX_UPLOAD + 1))
        assert_refused(response.status_code, response.content, (413,))
        response = client.post(
            "/api/search", content=b" " * (MAX_BODY + 1), headers={"content-type": "application/json"}
        )
        assert_refused(response.status_code, response.content, (413,))


def test_uploads_go_through_the_decompression_bomb_guard(shared, tiny_clip_model):
    with client_for(shared["dir"], tiny_clip_model) as client:
        for data, reason in [
            (blank_bilevel_png(20_000, 20_000), "decompression bomb"),  # Pillow's own guard
            (blank_bilevel_png(12_000, 10_000), "over the 100,000,000-pixel cap"),  # clipdex's cap
        ]:
            response = client.post("/api/search/image", content=data)
            assert_refused(response.status_code, response.content, (400,))
            message = response.json()["error"]
            assert message.startswith("uploaded image: refused") and reason in message, message


def test_an_unexpected_error_is_a_plain_500(shared, tiny_clip_model, monkeypatch):
    def boom(*_args, **_kw):
        raise RuntimeError(f"internal detail {shared['photos']}")

    monkeypatch.setattr("server.app.run_search", boom)
    app = create_app(shared["dir"], model=tiny_clip_model)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        response = client.get("/api/search", params={"q": "red"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (the server's log has the details)"}
