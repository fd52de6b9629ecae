"""What only a PostgreSQL catalog does: chosen by `--catalog`/CLIPDEX_CATALOG and recorded in
the index folder, shared by several index folders (machines), one writer among all of them
through an advisory lock, and searched and served as a SQLite index is. The catalog's behaviour
itself runs on both backends in test_catalog.py, test_storage_changes.py, test_incremental.py,
test_reindex.py and test_filters_scale.py (the `catalog_backend` fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, write_scenes
from fastapi.testclient import TestClient

from indexer import index_folders
from retrieval.core.errors import ClipdexError, IndexLockedError
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME, Catalog, open_catalog
from retrieval.storage.catalog_location import URL_NAME, resolve_catalog
from server.app import create_app

pytest.importorskip("psycopg")

_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def clipdex(*args: str, env_catalog: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    env.pop("CLIPDEX_CATALOG", None)
    if env_catalog is not None:
        env["CLIPDEX_CATALOG"] = env_catalog
    return subprocess.run(CLIPDEX + list(args), capture_output=True, text=True, timeout=180, env=env)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipdex: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


def test_the_cli_indexes_into_postgresql_and_later_commands_find_it(tmp_path, postgres_url, tiny_checkpoint):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 6)
    # A password in the URL (trust authentication ignores it) must not be written to the folder.
    url = with_password(postgres_url, "s3cret")
    model = ["-m", TINY_ARCH, "-p", str(tiny_checkpoint), "--device", "cpu"]
    built = clipdex("index", str(photos), "--index", str(index_dir), "--catalog", url, *model, "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["added"] == 6
    assert not (index_dir / CATALOG_NAME).exists()
    recorded = (index_dir / URL_NAME).read_text()
    assert "s3cret" not in recorded and recorded.strip().startswith("postgresql+psycopg://")
    # No option any more: the folder names its catalog, for searches and for the next index run.
    found = clipdex("search", "a picture", "--index", str(index_dir), "-k", "3", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert len(hits) == 3 and all(Path(h["path"]).parent == photos for h in hits)
    write_scenes(photos, 2, seed0=50, prefix="more")
    again = clipdex("index", str(photos), "--index", str(index_dir), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["added"] == 2
    info = clipdex("info", "--index", str(index_dir), "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["images"] == 8
    assert json.loads(info.stdout)["catalog"] == recorded.strip()  # where it is, without the password
    # Asking for another catalog than the recorded one is refused, in one line.
    other = postgres_url.replace("search_path%3D", "search_path%3Dx")
    refused = clipdex("index", str(photos), "--index", str(index_dir), "--catalog", other)
    one_line_error(refused, "keeps its catalog in")


def test_a_sqlite_index_refuses_a_postgresql_catalog_and_bad_urls_are_one_line(tmp_path, postgres_url):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / CATALOG_NAME).write_bytes(b"")
    with pytest.raises(ClipdexError, match="keeps its catalog in catalog.sqlite"):
        resolve_catalog(tmp_path / "index", postgres_url)
    for bad in ("sqlite:///x.db", "mysql://u@h/db", "postgresql://"):
        with pytest.raises(ClipdexError, match="must be a PostgreSQL URL"):
            resolve_catalog(tmp_path / "other", bad)
    result = clipdex("search", "x", "--index", str(tmp_path / "index2"), env_catalog="nonsense")
    one_line_error(result, "must be a PostgreSQL URL")


def test_an_unreachable_server_is_a_one_line_error(tmp_path):
    # Port 1 on loopback: nothing listens there.
    result = clipdex(
        "index", str(tmp_path), "--index", str(tmp_path / "index"),
        "--catalog", "postgresql+psycopg://nobody@127.0.0.1:1/none", "-m", TINY_ARCH, "-p", "random",
    )  # fmt: skip
    one_line_error(result, "cannot reach the catalog postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_two_index_folders_share_one_catalog(tmp_path, postgres_url, tiny_clip_model):
    """Two machines, each with its own index folder (its own FAISS cache) on one catalog: what
    one indexes, the other finds, with equal scores."""
    photos_a, photos_b = tmp_path / "a", tmp_path / "b"
    write_scenes(photos_a, 4)
    write_scenes(photos_b, 3, seed0=40, prefix="b")
    first, second = tmp_path / "machine-1", tmp_path / "machine-2"
    from indexer import IndexOptions

    index_folders([photos_a], first, tiny_clip_model, IndexOptions(catalog=postgres_url))
    index_folders([photos_b], second, tiny_clip_model, IndexOptions(catalog=postgres_url))
    query = tiny_clip_model.encode_texts(["a picture"])[0]
    results = []
    for folder in (first, second):
        with ImageIndex.open(folder) as index:
            assert index.catalog.count() == 7
            results.append([(h.path, round(h.score, 5)) for h in index.search_vector(query, 7)])
    assert results[0] == results[1]
    assert {Path(p).parent for p, _ in results[0]} == {photos_a, photos_b}


def test_one_writer_among_all_folders_and_a_killed_writer_frees_the_lock(tmp_path, postgres_url):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    catalog = open_catalog(index_dir, create=True, url=postgres_url)
    other_folder = tmp_path / "elsewhere"
    other_folder.mkdir()
    other = Catalog.open(other_folder, create=True, url=postgres_url)
    try:
        locked = pytest.raises(IndexLockedError, match=r"another clipdex process \(pid \d+ on ")
        with catalog.writer_lock(), locked:
            other.writer_lock().acquire()
        other.writer_lock().acquire().release()  # released with the block
        # A process holding the lock is killed: the server ends its session, and with it the lock.
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(index_dir)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            with pytest.raises(IndexLockedError):
                other.writer_lock().acquire()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
        lock = other.writer_lock()
        for _ in range(100):  # the server notices the closed connection within moments
            try:
                lock.acquire()
                break
            except IndexLockedError:
                time.sleep(0.05)
        else:
            pytest.fail("the lock of a killed writer was never released")
        lock.release()
    finally:
        catalog.close()
        other.close()


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from retrieval.storage.catalog import Catalog
lock = Catalog.open(Path(sys.argv[1])).writer_lock().acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_server_serves_a_postgresql_index(tmp_path, postgres_url, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 5)
    from indexer import IndexOptions

    index_folders([photos], index_dir, tiny_clip_model, IndexOptions(catalog=postgres_url))
    with ImageIndex.open(index_dir) as index:
        expected = index.search_vector(tiny_clip_model.encode_texts(["red"])[0], 3)
    app = create_app(index_dir, model=tiny_clip_model)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.get("/api/search", params={"q": "red", "k": 3})
        assert response.status_code == 200, response.text
        hits = response.json()["hits"]
        assert [h["id"] for h in hits] == [h.id for h in expected]
        assert np.allclose([h["score"] for h in hits], [h.score for h in expected], atol=1e-4)
        thumb = client.get(f"/api/images/{hits[0]['id']}/thumbnail")
        info = client.get("/api/info").json()
        assert info["images"] == 5 and "catalog" not in info  # the database's address stays private
        assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")


def test_a_writer_whose_lock_session_ended_commits_nothing_more(tmp_path, postgres_url):
    """The network drops or an administrator ends the lock's session: the server has released
    the lock, another writer may hold it now, so this writer's next commit is refused, whole."""
    from conftest import postgres_connect

    from retrieval.storage.records import NewImage

    index_dir = tmp_path / "index"
    index_dir.mkdir()
    catalog = open_catalog(index_dir, create=True, url=postgres_url)
    catalog.set_model_signature({"arch": "test", "dim": 4})
    vector = np.full(4, 0.5, dtype=np.float32)

    def image(name: str) -> NewImage:
        return NewImage(f"/p/{name}.jpg", 1, 1, "", 1, 1, "JPEG", None, vector)

    try:
        with catalog.writer_lock() as lock:
            catalog.commit_changes(added=[image("a")])  # held: written
            with postgres_connect(postgres_url) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (lock._backend_pid,))
                # The backend ends after the call returns: wait for it, or the commit below may
                # still find its session alive (seen once, in a loaded run of the suite).
                deadline = time.monotonic() + 10
                while (
                    time.monotonic() < deadline
                    and admin.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (lock._backend_pid,)
                    ).fetchone()
                ):
                    time.sleep(0.02)
            with pytest.raises(IndexLockedError, match="lost its lock"):
                catalog.commit_changes(added=[image("b")])
        assert sorted(r.path for r in catalog.records().values()) == ["/p/a.jpg"]
        catalog.commit_changes(added=[image("c")])  # no lock taken now: unguarded, as before
    finally:
        catalog.close()
