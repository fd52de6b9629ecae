"""The decode pool and the embedding loop: every thread ends, and runs that embed little still
commit, report progress and stop when asked.

Threads are told apart by name: everything clipdex starts is named `clipdex-*`. Each test
compares with the threads alive before it, so a thread another test left stuck on purpose does
not count here.
"""

from __future__ import annotations

import os
import threading
from contextlib import closing
from pathlib import Path

import pytest
from conftest import set_mtime, write_scenes

import indexer.decode as decode_mod
from indexer import IndexOptions, index_folders
from indexer.pipeline import DecodePool
from retrieval.index import ImageIndex
from retrieval.storage.catalog import Catalog
from retrieval.storage.writer import IndexWriter


def clipdex_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("clipdex-")}


def timed_out(job: int, seconds: float) -> str:
    return f"timeout {job}"


# -- the pool on its own -------------------------------------------------------------------------
def test_a_pool_with_fewer_pending_slots_than_workers_ends_every_thread():
    before = clipdex_threads()
    pool: DecodePool[int, int] = DecodePool(lambda n: n * 2, timed_out, workers=6, max_pending=1, timeout=30)
    results = list(pool.run(range(50)))
    assert sorted(results) == [2 * n for n in range(50)]
    assert clipdex_threads() - before == set()


def test_a_pool_with_no_jobs_ends_every_thread():
    before = clipdex_threads()
    pool: DecodePool[int, int] = DecodePool(lambda n: n, timed_out, workers=3, max_pending=2, timeout=30)
    assert list(pool.run([])) == []
    assert clipdex_threads() - before == set()


def test_a_consumer_that_stops_early_leaves_no_thread_behind():
    before = clipdex_threads()
    pool: DecodePool[int, int] = DecodePool(lambda n: n, timed_out, workers=4, max_pending=2, timeout=30)
    with closing(pool.run(range(1000))) as results:
        first = next(results)
    assert first in range(1000)
    assert clipdex_threads() - before == set()


def test_an_error_in_the_decoder_reaches_the_consumer_and_ends_every_thread():
    before = clipdex_threads()

    def decode(n: int) -> int:
        if n == 7:
            raise RuntimeError("decoder bug")
        return n

    # The timeout is far off: the error must not wait for it (nor pass for a timeout).
    pool: DecodePool[int, object] = DecodePool(decode, timed_out, workers=3, max_pending=2, timeout=5)
    with pytest.raises(RuntimeError, match="decoder bug"):
        for result in pool.run(range(20)):
            assert not str(result).startswith("timeout"), result
    assert clipdex_threads() - before == set()


def test_a_timed_out_decode_is_reported_and_its_thread_ends_when_the_decode_returns():
    before = clipdex_threads()
    release = threading.Event()

    def decode(n: int) -> str:
        if n == 3:
            release.wait(60)  # a pathological file: stuck until the test lets it go
        return f"ok {n}"

    pool: DecodePool[int, str] = DecodePool(decode, timed_out, workers=2, max_pending=1, timeout=0.5)
    try:
        results = list(pool.run(range(10)))
        stuck = clipdex_threads() - before
    finally:
        release.set()
    assert sorted(results) == sorted([f"ok {n}" for n in range(10) if n != 3] + ["timeout 3"])
    assert len(stuck) <= 1  # only the thread of the stuck decode, the known exception
    for thread in stuck:
        thread.join(10)
    assert clipdex_threads() - before == set()


# -- index_folders ----------------------------------------------------------------------------------
def test_index_folders_leaves_no_thread_behind(tmp_path, tiny_clip_model):
    before = clipdex_threads()
    photos = tmp_path / "photos"
    write_scenes(photos, 30)
    # Many files for few pending slots: feeding ends with the job queue full.
    options = IndexOptions(batch_size=4, decode_workers=3)
    summary = index_folders([photos], tmp_path / "index", tiny_clip_model, options)
    assert summary.added == 30
    assert clipdex_threads() - before == set()


def test_index_folders_stopped_early_leaves_no_thread_behind(tmp_path, tiny_clip_model):
    before = clipdex_threads()
    photos = tmp_path / "photos"
    write_scenes(photos, 30)
    stop = threading.Event()
    options = IndexOptions(batch_size=2, decode_workers=3)
    summary = index_folders(
        [photos], tmp_path / "index", tiny_clip_model, options, progress=lambda d, t: stop.set(), stop=stop
    )
    assert summary.interrupted and summary.added < 30
    assert clipdex_threads() - before == set()


class Bail(Exception):
    pass


def test_index_folders_failing_midway_leaves_no_thread_behind(tmp_path, tiny_clip_model):
    before = clipdex_threads()
    photos = tmp_path / "photos"
    write_scenes(photos, 30)

    def progress(done: int, total: int) -> None:
        raise Bail  # like a second Ctrl-C: an exception in the middle of the run

    with pytest.raises(Bail):
        index_folders(
            [photos], tmp_path / "index", tiny_clip_model, IndexOptions(batch_size=2), progress=progress
        )
    assert clipdex_threads() - before == set()


def test_a_failure_mid_run_keeps_the_batches_embedded_before_it(tmp_path, tiny_clip_model, monkeypatch):
    """Batches wait to be committed together; an error (out of memory, a lost worker) must not
    take the finished ones with it."""
    photos = tmp_path / "photos"
    write_scenes(photos, 20)
    real = tiny_clip_model.encode_images
    calls = [0]

    def encode_images(pixels):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 4:
            raise Bail
        return real(pixels)

    monkeypatch.setattr(tiny_clip_model, "encode_images", encode_images)
    options = IndexOptions(batch_size=2, decode_workers=1, commit_every=10**6, commit_seconds=3600.0)
    with pytest.raises(Bail):
        index_folders([photos], tmp_path / "index", tiny_clip_model, options)
    monkeypatch.undo()
    catalog = Catalog.open(tmp_path / "index")
    try:
        assert catalog.count() == 6
    finally:
        catalog.close()
    again = index_folders([photos], tmp_path / "index", tiny_clip_model, options)
    assert (again.added, again.unchanged) == (14, 6)


def test_index_folders_with_a_decode_timeout_leaves_only_the_stuck_thread(
    tmp_path, tiny_clip_model, monkeypatch
):
    before = clipdex_threads()
    photos = tmp_path / "photos"
    paths = write_scenes(photos, 12)
    stuck_bytes = paths[4].read_bytes()
    release = threading.Event()
    real_load = decode_mod.load_image

    def load_image(data, **kw):  # type: ignore[no-untyped-def]
        if data == stuck_bytes:
            release.wait(60)
        return real_load(data, **kw)

    monkeypatch.setattr(decode_mod, "load_image", load_image)
    options = IndexOptions(batch_size=2, decode_workers=2, decode_timeout=0.5)
    try:
        summary = index_folders([photos], tmp_path / "index", tiny_clip_model, options)
        stuck = clipdex_threads() - before
    finally:
        release.set()
    assert [p for p, _ in summary.failed] == [str(paths[4])]
    assert len(stuck) <= 1, stuck
    for thread in stuck:
        thread.join(10)  # ends as soon as its decode returns
    assert clipdex_threads() - before == set()


# -- runs that embed little ------------------------------------------------------------------------
def touch_with_same_bytes(paths: list[Path]) -> None:
    """Rewrite each file with its own bytes and a later mtime: changed on the face of it, the same
    content (what some sync tools and backup restores do)."""
    for p in paths:
        st = os.stat(p)
        p.write_bytes(p.read_bytes())
        set_mtime(p, st.st_mtime_ns + 5_000_000_000)


def disk_matches_catalog(index_dir: Path, paths: list[Path]) -> bool:
    with ImageIndex.open(index_dir) as index:
        known = {r.path: r.mtime_ns for r in index.records().values()}
    return known == {str(p): os.stat(p).st_mtime_ns for p in paths}


@pytest.fixture
def touched_folder(tmp_path, tiny_clip_model) -> tuple[Path, Path, list[Path]]:
    """(photos, index) where every one of 7 indexed photos was touched since."""
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = write_scenes(photos, 7)
    index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    touch_with_same_bytes(paths)
    return photos, index_dir, paths


def count_commits(monkeypatch: pytest.MonkeyPatch, kind: str = "touched") -> list[int]:
    """Files of `kind` (an IndexWriter.commit argument) in each commit of the writer from now on."""
    calls: list[int] = []
    real_commit = IndexWriter.commit

    def commit(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(kw.get(kind, ())))
        return real_commit(self, *args, **kw)

    monkeypatch.setattr(IndexWriter, "commit", commit)
    return calls


def test_a_run_of_touched_files_commits_and_reports_as_it_goes(touched_folder, tiny_clip_model, monkeypatch):
    photos, index_dir, paths = touched_folder
    commits = count_commits(monkeypatch)
    reports: list[tuple[int, int]] = []
    options = IndexOptions(batch_size=2, commit_every=2)
    summary = index_folders(
        [photos], index_dir, tiny_clip_model, options, progress=lambda d, t: reports.append((d, t))
    )
    assert summary.unchanged == 7 and summary.embedded == 0 and not summary.interrupted
    assert len(commits) >= 3 and sum(commits) == 7, commits
    done = [d for d, _ in reports]
    assert len(done) >= 3, reports
    assert done == sorted(done) and done[-1] == 7
    assert all(t == 7 and 0 <= d <= t for d, t in reports)
    assert disk_matches_catalog(index_dir, paths)


@pytest.mark.parametrize(
    ("commit_every", "commit_seconds", "expected"),
    [
        (6, 3600.0, [6, 6, 6, 2]),  # whole model batches of 2, a commit once 6 wait, the rest at the end
        (10**6, 3600.0, [20]),  # one commit at the end
        (10**6, 0.0, [2] * 10),  # the time rule: every batch, here
    ],
)
def test_embedded_batches_are_committed_together(
    tmp_path, tiny_clip_model, monkeypatch, commit_every, commit_seconds, expected
):
    """Fewer, larger commits (each rewrites the last page of every B-tree it appends to), by
    count or by time, and whole model batches only; progress still comes with every batch."""
    photos = tmp_path / "photos"
    write_scenes(photos, 20)
    commits = count_commits(monkeypatch, "added")
    reports: list[int] = []
    options = IndexOptions(
        batch_size=2, decode_workers=1, commit_every=commit_every, commit_seconds=commit_seconds
    )
    summary = index_folders(
        [photos], tmp_path / "index", tiny_clip_model, options, progress=lambda d, t: reports.append(d)
    )
    assert summary.added == 20 and commits == expected
    assert reports[:3] == [2, 4, 6] and reports[-1] == 20


def test_a_stop_commits_the_batches_that_wait(tmp_path, tiny_clip_model, monkeypatch):
    photos = tmp_path / "photos"
    write_scenes(photos, 20)
    commits = count_commits(monkeypatch, "added")
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 6:
            stop.set()

    options = IndexOptions(batch_size=2, decode_workers=1, commit_every=10**6, commit_seconds=3600.0)
    summary = index_folders(
        [photos], tmp_path / "index", tiny_clip_model, options, progress=progress, stop=stop
    )
    assert summary.interrupted and commits == [6] and summary.added == 6
    catalog = Catalog.open(tmp_path / "index")
    try:
        assert catalog.count() == 6
    finally:
        catalog.close()


def test_a_run_of_touched_files_stops_when_asked_and_the_next_run_finishes(touched_folder, tiny_clip_model):
    photos, index_dir, paths = touched_folder
    stop = threading.Event()
    reports: list[int] = []

    def progress(done: int, total: int) -> None:
        reports.append(done)
        stop.set()  # as Ctrl-C would, right after the first report

    options = IndexOptions(batch_size=2)
    first = index_folders([photos], index_dir, tiny_clip_model, options, progress=progress, stop=stop)
    assert first.interrupted
    assert reports and reports[0] < 7, reports
    assert first.unchanged < 7
    assert not disk_matches_catalog(index_dir, paths)  # the rest is left for the next run
    again = index_folders([photos], index_dir, tiny_clip_model, options)
    assert not again.interrupted and again.unchanged == 7 and again.embedded == 0
    assert disk_matches_catalog(index_dir, paths)


def test_progress_counts_every_kind_of_file_once(tmp_path, tiny_clip_model):
    """New, touched and broken files mixed: one counter of files handled, never past the total."""
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    old = write_scenes(photos, 5, prefix="old")
    index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    touch_with_same_bytes(old)
    write_scenes(photos, 4, seed0=50, prefix="new")
    for i in range(5):
        (photos / f"broken{i}.jpg").write_text("not a picture")
    reports: list[tuple[int, int]] = []
    summary = index_folders(
        [photos],
        index_dir,
        tiny_clip_model,
        IndexOptions(batch_size=3),
        progress=lambda d, t: reports.append((d, t)),
    )
    assert (summary.added, summary.unchanged, len(summary.failed)) == (4, 5, 5)
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[-1] == 14, reports
    assert all(t == 14 and d <= t for d, t in reports)
    assert len(reports) >= 4, reports


def test_a_run_of_failures_only_reports_progress_and_stops_when_asked(tmp_path, tiny_clip_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        (photos / f"broken{i}.jpg").write_text("not a picture")
    stop = threading.Event()
    reports: list[int] = []

    def progress(done: int, total: int) -> None:
        reports.append(done)
        if len(reports) == 2:
            stop.set()

    options = IndexOptions(batch_size=2)
    summary = index_folders(
        [photos], tmp_path / "index", tiny_clip_model, options, progress=progress, stop=stop
    )
    assert summary.interrupted
    assert reports == sorted(reports) and 0 < reports[0] < reports[-1] < 8, reports
    assert len(summary.failed) < 8
