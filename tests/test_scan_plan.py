"""Scanning folders (junk, symlinks, loops) and planning what an indexing run has to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from indexer.plan import EmbedJob, make_plan, sha256_file
from indexer.scan import FileInfo, SkippedFolder, UnreadableFile, is_junk, normalize_roots, scan, under_roots
from retrieval.core.errors import ClipdexError
from retrieval.storage.records import FailureRecord, ImageRecord, Move


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_scan(*roots) -> tuple[list[str], dict[str, str]]:
    files, problems = [], {}
    for item in scan([str(r) for r in roots]):
        if isinstance(item, UnreadableFile):
            problems[item.path] = item.reason
        else:
            assert isinstance(item, FileInfo)
            files.append(item.path)
    return files, problems


# -- scan -----------------------------------------------------------------------------------
def test_scan_finds_images_and_skips_junk(tmp_path):
    root = tmp_path / "root"
    keep = [
        touch(root / "a.jpg"),
        touch(root / "B.JPEG"),
        touch(root / "sub" / "c.png"),
        touch(root / "sub" / "deeper" / "d.webp"),
        touch(root / "e.tiff"),
    ]
    for junk in [
        ".x.jpg",
        "._a.jpg",
        "@eaDir/a.jpg",
        ".Trash-1000/files/a.jpg",
        "sub/.thumbnails/t.png",
        "#recycle/r.jpg",
        "notes.txt",
        "movie.mp4",
        "noext",
    ]:
        touch(root / junk)
    files, problems = run_scan(root)
    assert sorted(files) == sorted(str(p) for p in keep)
    assert problems == {}


def test_scan_reports_sizes_and_mtimes(tmp_path):
    p = touch(tmp_path / "a.png", b"12345")
    os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    (info,) = list(scan([str(tmp_path)]))
    assert info == FileInfo(str(p), 5, 1_600_000_000_123_456_789)


def test_is_junk():
    assert all(is_junk(n) for n in [".x", "._x", "@eaDir", ".Trash-1000", "$RECYCLE.BIN", "lost+found"])
    assert not any(is_junk(n) for n in ["x", "photo.jpg", "eaDir", "Trash"])


def test_broken_symlink_and_symlink_loops_are_reported(tmp_path):
    root = tmp_path / "root"
    touch(root / "ok.jpg")
    os.symlink(root / "missing.jpg", root / "dead.jpg")
    os.symlink(root / "self.jpg", root / "self.jpg")  # a link to itself: ELOOP
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "up")  # a folder that contains itself
    files, problems = run_scan(root)
    assert files == [str(root / "ok.jpg")]
    assert "broken" in problems.pop(str(root / "dead.jpg"))
    assert "loop" in problems.pop(str(root / "self.jpg"))
    assert "loop" in problems.pop(str(root / "sub" / "up"))
    assert problems == {}


def test_symlinked_folders_are_followed_once(tmp_path):
    outside = tmp_path / "outside"
    touch(outside / "o1.jpg")
    touch(outside / "inner" / "o2.png")
    root = tmp_path / "root"
    touch(root / "r.jpg")
    os.symlink(outside, root / "link1")
    os.symlink(outside, root / "link2")  # the same folder through a second link
    os.symlink(root / "link1", root / "zlink")  # and a link to the link
    files, problems = run_scan(root)
    assert problems == {}
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["o1.jpg", "o2.png", "r.jpg"]
    assert all(f.startswith(str(root) + os.sep) for f in files)  # paths stay under the root


def test_nested_roots_report_each_file_once(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "a" / "sub" / "y.jpg")
    files, _ = run_scan(tmp_path / "a" / "sub", tmp_path / "a")
    assert sorted(files) == sorted([str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "sub" / "y.jpg")])


def test_a_file_root_is_scanned_as_itself(tmp_path):
    img = touch(tmp_path / "one.png")
    txt = touch(tmp_path / "one.txt")
    files, problems = run_scan(img, txt)
    assert files == [str(img)] and problems == {}


def test_normalize_roots(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    assert normalize_roots(["a", str(tmp_path / "a") + "/", tmp_path / "a"]) == [str(tmp_path / "a")]
    with pytest.raises(ClipdexError, match="not found"):
        normalize_roots(["a", "missing"])


def test_under_roots_is_by_path_component():
    roots = ["/photos/a"]
    assert under_roots("/photos/a", roots)
    assert under_roots("/photos/a/x.jpg", roots)
    assert under_roots("/photos/a/sub/x.jpg", roots)
    assert not under_roots("/photos/ab/x.jpg", roots)
    assert not under_roots("/photos/x.jpg", roots)
    assert under_roots("/anything.jpg", ["/"])


# -- plan -----------------------------------------------------------------------------------
def rec(row_id: int, path: str, size: int = 10, mtime: int = 1, digest: str = "h") -> ImageRecord:
    return ImageRecord(row_id, path, size, mtime, digest, 4, 4, "PNG", None, 0.0)


def test_plan_classifies_every_file():
    existing = {
        "/r/same.jpg": rec(1, "/r/same.jpg", 10, 1, "h1"),
        "/r/changed.jpg": rec(2, "/r/changed.jpg", 10, 1, "h2"),
        "/r/gone.jpg": rec(3, "/r/gone.jpg", 11, 1, "h3"),
        "/r/old-name.jpg": rec(4, "/r/old-name.jpg", 12, 1, "h4"),
        "/r/same-size-other.jpg": rec(5, "/r/same-size-other.jpg", 13, 1, "h5"),
    }
    problem = UnreadableFile("/r/dead.jpg", "broken symbolic link")
    scanned = [
        FileInfo("/r/same.jpg", 10, 1),
        FileInfo("/r/changed.jpg", 10, 2),  # new mtime
        FileInfo("/r/new-name.jpg", 12, 9),  # old-name.jpg moved here
        FileInfo("/r/fresh.jpg", 13, 5),  # same size as a vanished row, other content
        FileInfo("/r/brand-new.jpg", 99, 5),
        problem,
    ]
    hashed = []
    digests = {"/r/new-name.jpg": "h4", "/r/fresh.jpg": "other"}

    def hash_file(path):
        hashed.append(path)
        return digests[path]

    plan = make_plan(scanned, existing, hash_file=hash_file)
    assert plan.unchanged == 1
    assert plan.problems == [problem]
    assert plan.moves == [Move(4, "/r/new-name.jpg", 12, 9)]
    jobs = {j.info.path: j for j in plan.jobs}
    assert set(jobs) == {"/r/changed.jpg", "/r/fresh.jpg", "/r/brand-new.jpg"}
    assert jobs["/r/changed.jpg"].previous.id == 2 and not jobs["/r/changed.jpg"].force
    assert jobs["/r/fresh.jpg"].previous is None
    assert jobs["/r/brand-new.jpg"].previous is None
    assert plan.removed == [3, 5]
    assert sorted(hashed) == ["/r/fresh.jpg", "/r/new-name.jpg"]  # only size matches get hashed


def test_plan_each_vanished_row_moves_at_most_once():
    existing = {"/r/a.jpg": rec(1, "/r/a.jpg", 10, 1, "same")}
    scanned = [FileInfo("/r/copy1.jpg", 10, 1), FileInfo("/r/copy2.jpg", 10, 1)]
    plan = make_plan(scanned, existing, hash_file=lambda p: "same")
    assert len(plan.moves) == 1 and plan.moves[0].id == 1
    assert [j.info.path for j in plan.jobs] == [
        p for p in ("/r/copy1.jpg", "/r/copy2.jpg") if p != plan.moves[0].path
    ]
    assert plan.removed == []


def test_plan_unreadable_candidate_is_embedded_not_moved():
    existing = {"/r/a.jpg": rec(1, "/r/a.jpg", 10)}

    def unreadable(path):
        raise PermissionError(13, "Permission denied")

    plan = make_plan([FileInfo("/r/b.jpg", 10, 1)], existing, hash_file=unreadable)
    assert plan.moves == [] and plan.removed == [1]
    assert [j.info.path for j in plan.jobs] == ["/r/b.jpg"]


def test_plan_reindex_forces_every_file_and_detects_no_moves():
    existing = {
        "/r/a.jpg": rec(1, "/r/a.jpg", 10, 1, "ha"),
        "/r/old.jpg": rec(2, "/r/old.jpg", 20, 1, "hb"),
    }
    scanned = [FileInfo("/r/a.jpg", 10, 1), FileInfo("/r/new.jpg", 20, 1)]

    def no_hashing(path):
        raise AssertionError("reindex needs no hashing")

    plan = make_plan(scanned, existing, reindex=True, hash_file=no_hashing)
    assert plan.unchanged == 0 and plan.moves == []
    assert plan.jobs[0] == EmbedJob(scanned[0], existing["/r/a.jpg"], force=True)
    assert plan.jobs[1].info.path == "/r/new.jpg" and plan.jobs[1].previous is None
    assert plan.removed == [2]


def test_plan_of_empty_scan_removes_everything_given():
    existing = {"/r/a.jpg": rec(7, "/r/a.jpg"), "/r/b.jpg": rec(3, "/r/b.jpg")}
    plan = make_plan([], existing)
    assert plan.removed == [3, 7] and plan.jobs == [] and plan.unchanged == 0


def test_sha256_file(tmp_path):
    import hashlib

    p = touch(tmp_path / "f.bin", os.urandom(3_000_000))
    assert sha256_file(str(p)) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_plan_keeps_rows_of_files_whose_stat_failed():
    """A file or link that could not be stat'ed was not seen gone (an I/O error, a link into an
    unmounted disk): its row, the rows under it and its failure record stay."""
    existing = {
        "/r/io-error.jpg": rec(1, "/r/io-error.jpg", 11, 1, "h1"),
        "/r/nas/a.jpg": rec(2, "/r/nas/a.jpg", 12, 1, "h2"),
        "/r/nas/deep/b.jpg": rec(3, "/r/nas/deep/b.jpg", 13, 1, "h3"),
        "/r/nas2/c.jpg": rec(4, "/r/nas2/c.jpg", 14, 1, "h4"),  # a sibling, not under /r/nas
        "/r/gone.jpg": rec(5, "/r/gone.jpg", 15, 1, "h5"),
    }
    failures = {
        "/r/nas/bad.jpg": FailureRecord("/r/nas/bad.jpg", 1, 1, "not an image"),
        "/r/gone-bad.jpg": FailureRecord("/r/gone-bad.jpg", 1, 1, "not an image"),
    }
    scanned = [
        UnreadableFile("/r/io-error.jpg", "input/output error"),
        UnreadableFile("/r/nas", "broken symbolic link"),
        FileInfo("/r/copy.jpg", 12, 5),  # same size and content as /r/nas/a.jpg: yet not a move
    ]
    plan = make_plan(scanned, existing, failures=failures, hash_file=lambda path: "h2")
    assert plan.removed == [4, 5]
    assert plan.moves == [] and [j.info.path for j in plan.jobs] == ["/r/copy.jpg"]
    assert plan.forget_failures == ["/r/gone-bad.jpg"]


def test_plan_keeps_rows_under_folders_that_could_not_be_listed():
    existing = {
        "/r/locked/a.jpg": rec(1, "/r/locked/a.jpg", 11),
        "/r/locked/sub/b.jpg": rec(2, "/r/locked/sub/b.jpg", 12),
        "/r/lockedness/c.jpg": rec(3, "/r/lockedness/c.jpg", 13),
        "/other-root/d.jpg": rec(4, "/other-root/d.jpg", 14),  # a root that could not be listed
        "/r/gone.jpg": rec(5, "/r/gone.jpg", 15),
    }
    failures = {"/r/locked/bad.jpg": FailureRecord("/r/locked/bad.jpg", 1, 1, "not an image")}
    skipped = [SkippedFolder("/r/locked", "permission denied"), SkippedFolder("/other-root", "i/o error")]
    plan = make_plan(
        [skipped[0], FileInfo("/r/new.jpg", 11, 1), skipped[1]],
        existing,
        failures=failures,
        hash_file=lambda path: "h",
    )
    assert plan.removed == [3, 5]
    assert plan.moves == []  # /r/new.jpg has the bytes of /r/locked/a.jpg, which was not seen gone
    assert plan.forget_failures == []
    assert plan.skipped == skipped and plan.problems == []
