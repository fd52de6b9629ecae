"""Readers alongside the writer, one writer at a time, and photo folders that are only read.

Searches run while `clipdex index` writes (SQLite WAL, FAISS replaced atomically): they see a
committed state, never more hits than catalog rows, never a hit without its row or with a vector
other than the row's. A second writer is refused with the holder's pid; the lock dies with its
holder. Indexing changes nothing at all inside the folders it reads.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, write_scenes

from indexer import IndexOptions, index_folders
from retrieval.core.errors import IndexLockedError
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME
from retrieval.storage.lock import WriterLock
from retrieval.storage.verify import verify_index

WRITER = f"""
import sys
from indexer import IndexOptions, index_folders
from retrieval.embedding.spec import ModelSpec
options = IndexOptions(batch_size=4, decode_workers=1, save_after_changes=0, commit_every=4)
summary = index_folders([sys.argv[1]], sys.argv[2], ModelSpec("{TINY_ARCH}", "random", device="cpu"), options)
print("added", summary.added)
"""


def model_recorded(db: Path) -> bool:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM models WHERE state = 'active'").fetchone()[0] == 1
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def check_hits(index: ImageIndex, query: np.ndarray, rows_before: int) -> int:
    """Search everything; the hits must be a committed state (rows only get added while the
    indexer runs, so between the row counts before and after): returns how many there were."""
    hits = index.search_vector(query, k=10_000)
    rows_after = index.catalog.count()
    assert len({h.id for h in hits}) == len(hits), sorted(h.id for h in hits)
    assert rows_before <= len(hits) <= rows_after, (rows_before, len(hits), rows_after)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    scores = np.array([h.score for h in hits])
    assert np.all(np.diff(scores) <= 1e-6)
    if hits:
        # every hit is a catalog row, and its score is the row's own vector's
        records = index.catalog.records([h.id for h in hits])
        assert all(h.id in records and records[h.id].path == h.path for h in hits)
        vectors = index.catalog.embeddings([h.id for h in hits], index.dim)
        q = query / np.linalg.norm(query)
        np.testing.assert_allclose(vectors @ q, scores, atol=1e-5)
    return len(hits)


def test_searches_while_an_indexer_writes(tmp_path):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    total = 200
    write_scenes(photos, total)
    # The writer saves vectors.faiss after every batch of 4, so readers also meet the file
    # being replaced, not only new catalog rows.
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(photos), str(index_dir)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rng = np.random.default_rng(0)
    searches = mid_run = 0
    long_lived: ImageIndex | None = None
    try:
        deadline = time.monotonic() + 180
        while not model_recorded(index_dir / CATALOG_NAME):
            if writer.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the indexer did not start: {writer.returncode} {writer.communicate()}")
            time.sleep(0.02)
        long_lived = ImageIndex.open(index_dir)
        while writer.poll() is None and time.monotonic() < deadline:
            query = rng.standard_normal(64).astype(np.float32)
            # a reader opened now ...
            with ImageIndex.open(index_dir) as fresh:
                before = fresh.catalog.count()
                seen = check_hits(fresh, query, before)
            # ... and one open since the start, catching up with refresh()
            before = long_lived.catalog.count()
            long_lived.refresh()
            check_hits(long_lived, query, before)
            searches += 2
            mid_run += 0 < seen < total
            time.sleep(0.005)
        out, err = writer.communicate(timeout=60)
    finally:
        if long_lived is not None:
            long_lived.close()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, (out, err)
    assert out.strip() == f"added {total}", out
    assert mid_run >= 3, f"only {mid_run} searches ran while the indexer was half-way"
    with ImageIndex.open(index_dir) as index:
        assert check_hits(index, rng.standard_normal(64), total) == total
        assert verify_index(index.store).ok
    print(f"\nconcurrency: {searches} searches while indexing, {mid_run} rounds saw a partial index")


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 4)
    index_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from retrieval.storage.lock import WriterLock; "
            "WriterLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(300)",
            str(index_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IndexLockedError) as caught:
            WriterLock(index_dir).acquire()
        message = str(caught.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message, message
        # the indexer itself refuses, and writes nothing
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            index_folders([photos], index_dir, tiny_clip_model)
        assert not (index_dir / CATALOG_NAME).exists()  # not even an empty catalog
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    WriterLock(index_dir).acquire().release()  # the kernel dropped the lock with its holder
    assert index_folders([photos], index_dir, tiny_clip_model).added == 4


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    first = WriterLock(tmp_path).acquire()
    try:
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()} "):
            WriterLock(tmp_path).acquire()
    finally:
        first.release()
    WriterLock(tmp_path).acquire().release()


# -- the photo folders are only read ------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (links not followed): type, mode, size, mtime, content or target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            else:
                content = None
            out[os.path.relpath(os.path.normpath(path), root)] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                content,
            )
    return out


def test_photo_folders_are_only_read(tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos / "2019", 5)
    write_scenes(photos / "2020" / "summer", 5, seed0=10, ext=".jpg")
    (photos / "notes.txt").write_text("not a photo")
    (photos / ".hidden.png").write_bytes((photos / "2019" / "scene000.png").read_bytes())
    (photos / "@eaDir").mkdir()
    (photos / "@eaDir" / "thumb.jpg").write_bytes((photos / "2020" / "summer" / "scene000.jpg").read_bytes())
    (photos / "broken.jpg").write_bytes(b"junk")
    os.symlink(photos / "2019" / "scene001.png", photos / "link.png")
    entries = [Path(d) / n for d, ds, fs in os.walk(photos) for n in [*ds, *fs]] + [photos]
    for p in entries:
        if not p.is_symlink():
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) & ~0o222)  # a-w
    try:
        before = snapshot(photos)
        first = index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
        assert first.added == 11 and [p for p, _ in first.failed] == [str(photos / "broken.jpg")]
        # a second, incremental run; a verify; a query by one of the photos
        again = index_folders([photos], index_dir, tiny_clip_model)
        assert again.unchanged == 11 and again.added == 0
        with ImageIndex.open(index_dir) as index:
            index.use_model(tiny_clip_model)
            assert verify_index(index.store).ok
            assert index.search_image(photos / "2019" / "scene002.png", k=3)
        after = snapshot(photos)
        assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        assert not changed, changed
    finally:
        for p in entries:
            if not p.is_symlink():
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o200)
