"""Crashes, Ctrl-C, full disks and damaged files never cost what was committed.

What the engine guarantees (retrieval/store.py, retrieval/vectors.py, retrieval/catalog.py):
every batch is one SQLite transaction holding rows and vectors, so the catalog is always
complete; vectors.faiss is a cache of it, replaced atomically, and may lag behind the catalog
(by design, or after a crash: ids only in the catalog, or only in FAISS for rows deleted since),
never contradict it (an id in both has the same vector). Readers and the next writer catch up
through the catalog's change log; `verify` checks the file caught up that way (and reports the
lag only for a file older than the log). After a resume `verify` is clean and the index
equals the one a single clean run builds.

The SIGKILL tests run the indexer in a forked child of this process, which has imported
torch and built the tiny model already: a real separate process, killed as abruptly as any,
without paying seconds of imports per kill. Ctrl-C goes to the real `clipdex` command in a
subprocess (a second Ctrl-C to its entry point, cli.main.run, in a forked child).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, committed_rows, make_scene, set_mtime, wait_for_rows, write_scenes
from sqlalchemy import event

import retrieval.storage.catalog as catalog_mod
import retrieval.storage.catalog_writes as catalog_writes_mod
import retrieval.storage.faiss_index as vectors_mod
from indexer import IndexOptions, index_folders
from retrieval.core.errors import IndexWriteError
from retrieval.core.images import load_image
from retrieval.embedding.clip_model import ClipModel
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME, Catalog
from retrieval.storage.faiss_index import FAISS_FILE, FaissIndex
from retrieval.storage.lock import WriterLock
from retrieval.storage.verify import verify_index

_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
# Commits and saves as often as possible, so that kills land in and around them.
CHILD_OPTIONS = IndexOptions(batch_size=4, decode_workers=1, save_after_changes=0, commit_every=4)
MIN_KILLS = 20
# What `verify` may report between a crash and the resume: the FAISS cache lagging behind.
LAG_PROBLEMS = ("FAISS and catalog differ: ", f"{FAISS_FILE} is missing or unreadable")


class OsWithHooks:
    """Stands in for `os` inside one module: the given functions replaced, the rest the real os."""

    def __init__(self, **hooks: object):
        self.__dict__.update(hooks)

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)


# -- helpers ------------------------------------------------------------------------------------
def fork_indexer(photos: Path, index_dir: Path, clip: ClipModel, arm=None, options=CHILD_OPTIONS) -> int:  # type: ignore[no-untyped-def]
    """`index_folders` in a forked child; `arm()` runs in the child first, to plant a fault.

    The parent's garbage is collected before the fork and the rest frozen for the child: an
    ONNX Runtime session an earlier test left for the garbage collector, collected in the child,
    waits forever for its thread pool, whose threads a fork does not copy (seen after
    test_tags.py: the child hung in pthread_cond_destroy)."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    gc.freeze()
    pid = os.fork()
    if pid != 0:
        gc.unfreeze()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            import torch

            torch.set_num_threads(1)
            if arm is not None:
                arm()
            index_folders([photos], index_dir, clip, options)
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = 120.0) -> int:
    """Wait for the child; its wait status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"indexer child {pid} hung for {timeout} s")


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def by_path(index_dir: Path) -> dict[str, tuple[tuple, np.ndarray]]:
    """path -> ((size, mtime_ns, sha256, width, height), vector) of every catalog row."""
    catalog = Catalog.open(index_dir)
    try:
        records = catalog.records()
        ids = sorted(records)
        vectors = catalog.embeddings(ids, 64)
        return {
            records[i].path: (
                (
                    records[i].size,
                    records[i].mtime_ns,
                    records[i].content_hash,
                    records[i].width,
                    records[i].height,
                ),
                vec,
            )
            for i, vec in zip(ids, vectors)
        }
    finally:
        catalog.close()


def faiss_ids(index_dir: Path) -> np.ndarray | None:
    stored = FaissIndex.load(index_dir / FAISS_FILE, 64)
    return None if stored is None else np.sort(stored.ids())


def temp_files(index_dir: Path) -> list[str]:
    return sorted(p.name for p in index_dir.iterdir() if p.name.startswith(f".{FAISS_FILE}."))


def check_crashed_index(index_dir: Path, rng: np.random.Generator) -> list[str]:
    """What must hold right after a kill, whatever it interrupted; returns verify's problems."""
    if not (index_dir / CATALOG_NAME).exists():
        return []  # killed before the catalog was created
    WriterLock(index_dir).acquire().release()  # the lock died with its holder
    with ImageIndex.open(index_dir) as index:
        report = verify_index(index.store, check_files=False)
        assert all(p.startswith(LAG_PROBLEMS) for p in report.problems), report.problems
        if index.signature is None:  # killed before the model was recorded
            assert index.catalog.count() == 0
            return report.problems
        catalog_ids = index.catalog.ids()
        # The cache on disk may lag, never contradict: an id in both holds the same vector.
        stored = FaissIndex.load(index_dir / FAISS_FILE, 64)
        if stored is not None:
            ids = stored.ids()
            assert len(np.unique(ids)) == len(ids)
            common = np.intersect1d(ids, catalog_ids)
            position = {int(i): k for k, i in enumerate(ids)}
            np.testing.assert_array_equal(
                stored.reconstruct_all()[[position[int(i)] for i in common]],
                index.catalog.embeddings(common.tolist(), 64),
            )
        # A reader sees exactly the committed rows.
        hits = index.search_vector(rng.standard_normal(64), k=100_000)
        assert sorted(h.id for h in hits) == catalog_ids.tolist()
        return report.problems


def change_folder(photos: Path, step: int) -> None:
    """New, deleted, moved and rewritten files: the next runs have work of every kind."""
    files = sorted(photos.iterdir())
    write_scenes(photos, 30, seed0=1000 + 100 * step, prefix=f"new{step}-")
    files[0].unlink()
    files[1].unlink()
    files[2].rename(photos / f"moved{step}-{files[2].name}")
    make_scene(5000 + step, (80, 60)).save(files[3])
    set_mtime(files[3], os.stat(files[3]).st_mtime_ns + 10**10)


# -- SIGKILL at random moments ------------------------------------------------------------------
def test_sigkill_at_random_moments_loses_nothing(tmp_path, tiny_clip_model):
    photos, index_dir, reference = tmp_path / "photos", tmp_path / "index", tmp_path / "reference"
    write_scenes(photos, 150)
    # Warm up here, once: a child that paid torch's first-call set-up would mostly be killed
    # before it commits anything.
    scenes = sorted(photos.iterdir())[:4]
    tiny_clip_model.encode_pil([load_image(str(p)).image for p in scenes])
    # The catalog exists before the first kill: a kill while it is being created is a known bug
    # of its own (test_a_kill_while_the_catalog_is_created_does_not_brick_the_index).
    index_dir.mkdir()
    Catalog.open(index_dir, create=True).close()
    seed = int(os.environ.get("CLIPDEX_CRASH_SEED", "20240601"))
    delays = random.Random(seed)
    rng = np.random.default_rng(seed)
    # Kill after a random time in [0, window]. The window adapts to this machine's speed: it
    # widens when a kill found the child still starting up, narrows when the child finished.
    # When everything is indexed, the folder changes (new, deleted, moved, rewritten files).
    window = 0.25
    kills = advanced = lagging = completed = changes = 0
    for _round in range(120):
        before = committed_rows(index_dir / CATALOG_NAME)
        if before == len(list(photos.iterdir())):  # all done: give the next kills work to interrupt
            change_folder(photos, changes)
            changes += 1
        pid = fork_indexer(photos, index_dir, tiny_clip_model)
        time.sleep(delays.uniform(0.0, window))
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            status = reap(pid)
        if killed_by_sigkill(status):
            kills += 1
            lagging += bool(check_crashed_index(index_dir, rng))
            if committed_rows(index_dir / CATALOG_NAME) == before:
                window *= 1.2
            else:
                advanced += 1
            if kills >= MIN_KILLS:
                break
            continue
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"indexer child failed ({status})"
        completed += 1
        window *= 0.7
        with ImageIndex.open(index_dir) as index:
            report = verify_index(index.store)
            assert report.ok and not report.missing_files, (report.problems, report.missing_files)
    else:
        pytest.fail(f"only {kills} kills in 120 rounds")
    # The last resume, uninterrupted.
    status = reap(fork_indexer(photos, index_dir, tiny_clip_model))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"indexer child failed ({status})"
    with ImageIndex.open(index_dir) as index:
        report = verify_index(index.store)
        assert report.ok and not report.missing_files, (report.problems, report.missing_files)

    # The crashed-and-resumed index equals one clean run over the same folder.
    index_folders([photos], reference, tiny_clip_model, IndexOptions(batch_size=32))
    crashed, clean = by_path(index_dir), by_path(reference)
    assert sorted(crashed) == sorted(clean) == sorted(str(p) for p in photos.iterdir())
    assert {p: meta for p, (meta, _) in crashed.items()} == {p: meta for p, (meta, _) in clean.items()}
    gap = max(float(np.abs(crashed[p][1] - clean[p][1]).max()) for p in clean)
    assert gap <= 1e-6, gap
    print(
        f"\ncrash test (seed {seed}): {kills} SIGKILLs survived ({advanced} after new commits), "
        f"{lagging} left FAISS behind the catalog, {completed} runs completed, {changes} folder changes, "
        f"final kill window {window:.2f} s, "
        f"max vector gap {gap:.1e}"
    )


# -- SIGKILL at chosen points -------------------------------------------------------------------
def _kill_me() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant_kill(point: str, nth: int = 3) -> None:
    """In the child: die at the `nth` occurrence of `point` (saves: #1 is the first reconcile,
    #2 follows batch 1, #3 batch 2; commits: #3 is batch 3)."""
    calls = [0]
    if point == "inside_the_catalog_transaction":
        real_commit, real_exit = catalog_mod.Catalog.commit_changes, catalog_writes_mod.WriteTxn.__exit__
        armed = [False]

        def commit_changes(self, *args, **kw):  # type: ignore[no-untyped-def]
            calls[0] += 1
            armed[0] = calls[0] == nth
            return real_commit(self, *args, **kw)

        def exit_(self, exc_type, exc, tb):  # type: ignore[no-untyped-def]
            if armed[0] and exc_type is None:
                _kill_me()  # the rows are inserted, COMMIT has not run
            return real_exit(self, exc_type, exc, tb)

        catalog_mod.Catalog.commit_changes = commit_changes
        catalog_writes_mod.WriteTxn.__exit__ = exit_
    elif point == "before_the_faiss_save":
        real_save = vectors_mod.FaissIndex.save

        def save(self, path, stamp=None):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == nth:
                _kill_me()
            return real_save(self, path, stamp)

        vectors_mod.FaissIndex.save = save
    else:

        def replace(src, dst):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == nth and point == "temp_written_before_rename":
                _kill_me()
            os.replace(src, dst)
            if calls[0] == nth:
                _kill_me()  # renamed, directory not fsynced yet

        vectors_mod.os = OsWithHooks(replace=replace)


# point -> (catalog rows, ids in vectors.faiss, verify clean right away, temp file left behind)
# (a file left behind by a kill is caught up through the change log: verify is clean)
KILL_POINTS = {
    "inside_the_catalog_transaction": (8, 8, True, False),
    "before_the_faiss_save": (8, 4, True, False),
    "temp_written_before_rename": (8, 4, True, True),
    "renamed_before_directory_fsync": (8, 8, True, False),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_each_step_of_a_commit(point, tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 16)
    status = reap(fork_indexer(photos, index_dir, tiny_clip_model, arm=lambda: plant_kill(point)))
    assert killed_by_sigkill(status), f"the child was not killed at {point} ({status})"
    rows, on_disk, clean, temp_left = KILL_POINTS[point]
    problems = check_crashed_index(index_dir, np.random.default_rng(0))
    with ImageIndex.open(index_dir) as index:
        assert index.catalog.count() == rows
        assert np.array_equal(faiss_ids(index_dir), index.catalog.ids()[:on_disk])
    assert (not problems) == clean, problems
    assert bool(temp_files(index_dir)) == temp_left, temp_files(index_dir)

    before = tiny_clip_model.images_encoded
    summary = index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    assert (summary.added, summary.unchanged) == (16 - rows, rows)
    assert tiny_clip_model.images_encoded - before == 16 - rows  # committed rows are not embedded again
    with ImageIndex.open(index_dir) as index:
        report = verify_index(index.store)
        assert report.ok and index.catalog.count() == 16, report.problems
        assert np.array_equal(faiss_ids(index_dir), index.catalog.ids())


def test_a_temp_file_orphaned_by_a_crash_is_cleaned_up_by_the_next_writer(tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 16)
    status = reap(
        fork_indexer(photos, index_dir, tiny_clip_model, arm=lambda: plant_kill("temp_written_before_rename"))
    )
    if not killed_by_sigkill(status) or not temp_files(index_dir):
        pytest.fail("precondition: the child should have died with its temp file written")
    index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    with ImageIndex.open(index_dir) as index:
        if not verify_index(index.store).ok:
            pytest.fail("precondition: the resumed index should verify")
    assert temp_files(index_dir) == []


def test_a_kill_while_the_catalog_is_created_does_not_brick_the_index(tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 4)

    def arm() -> None:  # die on the catalog's first connection: SQLite made the file, no table yet
        real = catalog_writes_mod.make_engine

        def make_engine(location):  # type: ignore[no-untyped-def]
            engine = real(location)
            event.listen(engine, "connect", lambda *args: _kill_me())
            return engine

        catalog_writes_mod.make_engine = make_engine

    status = reap(fork_indexer(photos, index_dir, tiny_clip_model, arm=arm))
    if not killed_by_sigkill(status) or not (index_dir / CATALOG_NAME).exists():
        pytest.fail(f"precondition: the child should have died creating the catalog ({status})")
    summary = index_folders([photos], index_dir, tiny_clip_model)
    assert summary.added == 4
    with ImageIndex.open(index_dir) as index:
        assert verify_index(index.store).ok


# -- Ctrl-C on the real command -----------------------------------------------------------------
def test_ctrl_c_commits_the_batch_in_flight_and_the_next_run_does_the_rest(tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    total = 80
    write_scenes(photos, total)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    args = ["index", str(photos), "--index", str(index_dir), "-m", TINY_ARCH, "-p", "random"]
    proc = subprocess.Popen(
        CLIPDEX + args + ["--device", "cpu", "-b", "4", "--workers", "1", "--commit-every", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_rows(proc, index_dir / CATALOG_NAME, 8, timeout=120)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "stopping after the batch in flight" in err and "Traceback" not in err, err
    summary = re.match(r"interrupted: (\d+) added, 0 updated, 0 moved, 0 removed, 0 unchanged, 0 failed", out)
    assert summary, out
    done = int(summary.group(1))
    assert 8 <= done < total and done % 4 == 0, done  # whole batches only
    with ImageIndex.open(index_dir) as index:
        assert index.catalog.count() == done
        report = verify_index(index.store)  # a clean stop saves FAISS on its way out
        assert report.ok, report.problems

    before = tiny_clip_model.images_encoded
    rest = index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    assert (rest.added, rest.unchanged, rest.updated, rest.failed) == (total - done, done, 0, [])
    assert tiny_clip_model.images_encoded - before == total - done
    with ImageIndex.open(index_dir) as index:
        assert index.catalog.count() == total
        assert verify_index(index.store).ok


def test_a_second_ctrl_c_stops_at_once_and_loses_nothing(tmp_path, tiny_clip_model):
    """The CLI's own entry point in a forked child (real signal handling, no import cost);
    inference is slowed down there so that the second Ctrl-C lands while a batch is in flight."""
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    total = 40
    write_scenes(photos, total)
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    argv = ["clipdex", "index", str(photos), "--index", str(index_dir), "-m", TINY_ARCH, "-p", "random"]
    argv += ["--device", "cpu", "-b", "4", "--workers", "1", "--commit-every", "4"]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sys.stdout = open(out_file, "w", buffering=1)  # noqa: SIM115
            sys.stderr = open(err_file, "w", buffering=1)  # noqa: SIM115
            import torch

            from cli.main import run
            from retrieval.embedding.onnx_image_model import OnnxImageModel

            torch.set_num_threads(1)

            def slowed(real_encode):  # type: ignore[no-untyped-def]
                def slow_encode(self, pixels):  # type: ignore[no-untyped-def]
                    time.sleep(0.3)
                    return real_encode(self, pixels)

                return slow_encode

            # Whichever model the command picks: the lean one once the model's exports are cached.
            for model_class in (ClipModel, OnnxImageModel):
                model_class.encode_images = slowed(model_class.encode_images)
            sys.argv = argv
            run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        deadline = time.monotonic() + 120
        while committed_rows(index_dir / CATALOG_NAME) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGINT)
        while (
            "stopping after the batch in flight" not in err_file.read_text() and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        os.kill(pid, signal.SIGINT)
    finally:
        status = reap(pid)
    out, err = out_file.read_text(), err_file.read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (status, out, err)
    # (typer turns KeyboardInterrupt into a silent exit 130 itself, so the "clipdex: interrupted"
    # line of cli.main.run is never printed: not asserted)
    assert "stopping after the batch in flight" in err and "Traceback" not in err, (out, err)
    assert out == "", out  # stopped at once: no summary of a finished batch
    done = committed_rows(index_dir / CATALOG_NAME)
    assert 8 <= done < total and done % 4 == 0, done
    with ImageIndex.open(index_dir) as index:
        report = verify_index(index.store)  # a file left behind is caught up from the log; lock released
        assert report.ok, report.problems
    WriterLock(index_dir).acquire().release()
    before = tiny_clip_model.images_encoded
    rest = index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    assert (rest.added, rest.unchanged) == (total - done, done)
    assert tiny_clip_model.images_encoded - before == total - done
    with ImageIndex.open(index_dir) as index:
        assert verify_index(index.store).ok and index.catalog.count() == total


# -- the disk refuses writes --------------------------------------------------------------------
def test_a_failed_faiss_write_is_a_clear_error_and_costs_nothing(tmp_path, tiny_clip_model, monkeypatch):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 8)
    index_folders([photos], index_dir, tiny_clip_model)
    saved = (index_dir / FAISS_FILE).read_bytes()
    write_scenes(photos, 8, seed0=100, prefix="more")

    def replace(src, dst):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vectors_mod, "os", OsWithHooks(replace=replace))
    with pytest.raises(IndexWriteError) as caught:
        options = IndexOptions(batch_size=4, save_after_changes=0, commit_every=4)
        index_folders([photos], index_dir, tiny_clip_model, options)
    monkeypatch.undo()
    message = str(caught.value)
    assert str(index_dir / FAISS_FILE) in message and "No space left on device" in message, message
    assert "previous file is intact" in message
    assert (index_dir / FAISS_FILE).read_bytes() == saved
    assert temp_files(index_dir) == []
    WriterLock(index_dir).acquire().release()
    # The batch committed before the save failed is in the catalog; FAISS lags, readers catch up
    # from the change log (verify checks the file caught up: clean).
    assert np.array_equal(faiss_ids(index_dir), np.arange(1, 9))
    problems = check_crashed_index(index_dir, np.random.default_rng(1))
    assert problems == [], problems

    before = tiny_clip_model.images_encoded
    summary = index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    assert (summary.added, summary.unchanged) == (4, 12)
    assert tiny_clip_model.images_encoded - before == 4
    with ImageIndex.open(index_dir) as index:
        assert verify_index(index.store).ok and index.catalog.count() == 16


def _catalog_fault(kind: str):  # type: ignore[no-untyped-def]
    """A `make_engine` whose connections cannot write: read-only, or a full disk."""
    real = catalog_writes_mod.make_engine

    def make_engine(location):  # type: ignore[no-untyped-def]
        engine = real(location)

        @event.listens_for(engine, "connect")
        def _fault(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            if kind == "read_only":
                dbapi_conn.execute("PRAGMA query_only = ON")
            else:
                pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
                dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

        return engine

    return make_engine


@pytest.mark.parametrize("kind", ["read_only", "disk_full"])
def test_a_catalog_that_cannot_be_written_is_a_clear_error(kind, tmp_path, tiny_clip_model, monkeypatch):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    write_scenes(photos, 8)
    # Small pages, so that 40 more rows need new pages, which the "full disk" refuses.
    monkeypatch.setattr(catalog_writes_mod, "PAGE_SIZE", 4096)
    index_folders([photos], index_dir, tiny_clip_model)
    write_scenes(photos, 40, seed0=100, prefix="more")
    monkeypatch.setattr(catalog_writes_mod, "make_engine", _catalog_fault(kind))
    with pytest.raises(IndexWriteError, match=r"cannot write the catalog .*catalog\.sqlite"):
        index_folders([photos], index_dir, tiny_clip_model, IndexOptions(batch_size=4))
    monkeypatch.undo()
    with ImageIndex.open(index_dir) as index:
        assert verify_index(index.store).ok


# -- verify --repair ----------------------------------------------------------------------------
def _damage(index_dir: Path, how: str) -> str:
    """Damage vectors.faiss; returns the problem `verify` must report."""
    path = index_dir / FAISS_FILE
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "vector_bytes_flipped":
        catalog = Catalog.open(index_dir)
        try:
            first = catalog.embeddings([int(catalog.ids()[0])], 64)[0].tobytes()
        finally:
            catalog.close()
        at = data.find(first)
        assert at > 0
        path.write_bytes(data[: at + 9] + bytes([data[at + 9] ^ 0x40]) + data[at + 10 :])
        return "FAISS vectors differ from the catalog's"
    elif how == "stale":  # saved at an earlier commit, older than the change log (before an upgrade)
        stored = FaissIndex.load(path, 64)
        stored.remove(stored.ids()[-1:])
        with sqlite3.connect(index_dir / CATALOG_NAME) as conn:
            history = conn.execute("SELECT generation, nonce FROM commits ORDER BY generation DESC")
            latest, earlier = history.fetchall()[:2]
            conn.execute("UPDATE meta SET value = ? WHERE key = 'changes_from'", (str(latest[0]),))
        stored.save(path, dataclasses.replace(stored.stamp, generation=earlier[0], nonce=earlier[1]))
        return "(none: an opener mends it by the id diff)"
    return f"{FAISS_FILE} is missing or unreadable"


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, tiny_clip_model) -> Path:
    work = tmp_path_factory.mktemp("repair")
    write_scenes(work / "photos", 12)
    index_folders([work / "photos"], work / "index", tiny_clip_model)
    return work / "index"


def test_verify_accepts_a_file_older_than_the_log_that_openers_mend(built_index, tmp_path):
    """A stale file from before the change log starts is brought up by the id diff when opened:
    not a problem for verify, and nothing for --repair to do."""
    from typer.testing import CliRunner

    from cli.main import app

    index_dir = tmp_path / "index"
    shutil.copytree(built_index, index_dir)
    _damage(index_dir, "stale")
    checked = CliRunner().invoke(app, ["verify", "--index", str(index_dir)])
    assert checked.exit_code == 0 and "ok: 12 images checked" in checked.stdout, checked.stdout


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage", "vector_bytes_flipped"])
def test_verify_repair_rebuilds_vectors_without_embedding_anything(how, built_index, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    index_dir = tmp_path / "index"
    shutil.copytree(built_index, index_dir)
    rows = by_path(index_dir)
    problem = _damage(index_dir, how)
    calls = []
    real_init, real_encode = ClipModel.__init__, ClipModel.encode_images

    def counting_init(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append("load")
        real_init(self, *args, **kw)

    def counting_encode(self, pixels):  # type: ignore[no-untyped-def]
        calls.append(len(pixels))
        return real_encode(self, pixels)

    monkeypatch.setattr(ClipModel, "__init__", counting_init)
    monkeypatch.setattr(ClipModel, "encode_images", counting_encode)
    runner = CliRunner()
    checked = runner.invoke(app, ["verify", "--index", str(index_dir)])
    assert checked.exit_code == 1 and f"problem: {problem}" in checked.stdout, checked.stdout
    repaired = runner.invoke(app, ["verify", "--repair", "--index", str(index_dir)])
    assert repaired.exit_code == 0, (repaired.stdout, repaired.exception)
    assert f"repaired: rebuilt {FAISS_FILE} from the catalog (12 vectors)" in repaired.stdout
    again = runner.invoke(app, ["verify", "--index", str(index_dir)])
    assert again.exit_code == 0 and "ok: 12 images checked" in again.stdout, again.stdout
    assert calls == [], "verify --repair loaded a model or embedded images"
    # Nothing was dropped or changed in the catalog, and FAISS holds exactly its vectors.
    after = by_path(index_dir)
    assert sorted(after) == sorted(rows)
    assert all(np.array_equal(after[p][1], rows[p][1]) for p in rows)
    stored = FaissIndex.load(index_dir / FAISS_FILE, 64)
    catalog = Catalog.open(index_dir)
    try:
        np.testing.assert_array_equal(stored.reconstruct_all(), catalog.embeddings(stored.ids().tolist(), 64))
        assert np.array_equal(np.sort(stored.ids()), catalog.ids())
    finally:
        catalog.close()
