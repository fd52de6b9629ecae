"""Exclusions: `--exclude` patterns (remembered per folder) and `.clipdexignore` files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARCH, write_scenes

from indexer import IndexOptions, index_folders
from indexer.ignore import (
    EXCLUDES_KEY,
    BadPatternError,
    Ignore,
    IgnoreRules,
    PatternSet,
    compile_patterns,
    remember_excludes,
)
from indexer.scan import FileInfo, SkippedFolder, scan
from retrieval.storage.catalog import Catalog


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def scanned_files(*roots: Path, ignore: IgnoreRules | None = None) -> list[str]:
    items = list(scan([str(r) for r in roots], ignore=ignore))
    assert all(isinstance(i, FileInfo) for i in items), items
    return sorted(i.path for i in items)


def rel(root: Path, files: list[str]) -> list[str]:
    return sorted(os.path.relpath(f, root) for f in files)


# -- ignore.py ------------------------------------------------------------------------------
def test_patterns_follow_gitignore_rules():
    ps = PatternSet("/p", compile_patterns(["*.png", "!keep.png", "raw/", "/top.jpg", "# note", ""], "t"))
    assert ps.verdict("/p/a.png", False) is True
    assert ps.verdict("/p/sub/a.png", False) is True  # no '/' inside: any depth
    assert ps.verdict("/p/keep.png", False) is False  # brought back by '!'
    assert ps.verdict("/p/raw", True) is True and ps.verdict("/p/deep/raw", True) is True
    assert ps.verdict("/p/raw", False) is None  # 'raw/' names folders only
    assert ps.verdict("/p/top.jpg", False) is True and ps.verdict("/p/sub/top.jpg", False) is None
    assert ps.verdict("/other/a.png", False) is None  # not below its folder: no opinion
    assert ps.verdict("/pp/a.png", False) is None


def test_deeper_files_override_shallower_and_excludes_come_first(tmp_path):
    touch(tmp_path / ".clipdexignore", b"*.png\n")
    touch(tmp_path / "sub" / ".clipdexignore", b"!keep.png\n!forced.gif\n")
    top = str(tmp_path)
    rules = IgnoreRules({top: ["*.gif"]})
    ignore = rules.at_root(top).entering(top)
    sub = ignore.entering(str(tmp_path / "sub"))
    assert ignore.excluded(str(tmp_path / "keep.png"))
    assert not sub.excluded(str(tmp_path / "sub" / "keep.png"))
    assert sub.excluded(str(tmp_path / "sub" / "other.png"))
    assert sub.excluded(str(tmp_path / "sub" / "forced.gif"))  # a file cannot undo --exclude
    assert not Ignore().excluded("/anything.png")


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(BadPatternError, match="--exclude"):
        compile_patterns(["ok/", "trailing\\"], "--exclude")


class FakeMeta(dict):
    def get_meta(self, key: str) -> str | None:
        return self.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self[key] = value


def test_remember_excludes_replaces_per_root_and_clears():
    meta = FakeMeta()
    assert remember_excludes(meta, ["/a"], None).excludes == {} and meta == {}
    remember_excludes(meta, ["/a", "/b"], ["raw/", "*.gif"])
    remember_excludes(meta, ["/b"], ["*.tiff"])
    assert json.loads(meta[EXCLUDES_KEY]) == {"/a": ["raw/", "*.gif"], "/b": ["*.tiff"]}
    assert remember_excludes(meta, ["/a"], None).excludes == {"/a": ["raw/", "*.gif"], "/b": ["*.tiff"]}
    remember_excludes(meta, ["/a"], [""])  # --exclude '' forgets /a's patterns
    assert json.loads(meta[EXCLUDES_KEY]) == {"/b": ["*.tiff"]}
    with pytest.raises(BadPatternError):
        remember_excludes(meta, ["/b"], ["bad\\"])
    assert json.loads(meta[EXCLUDES_KEY]) == {"/b": ["*.tiff"]}  # a refused pattern stores nothing


# -- scan -----------------------------------------------------------------------------------
def test_scan_obeys_nested_clipdexignore_files(tmp_path):
    root = tmp_path / "root"
    touch(root / ".clipdexignore", b"*.png\n!keep.png\nraw/\n")
    touch(root / "sub" / ".clipdexignore", b"!c.png\n/only-here.jpg\n")
    for name in [
        "a.png",
        "keep.png",
        "b.jpg",
        "only-here.jpg",
        "raw/x.jpg",
        "sub/raw/y.jpg",
        "sub/c.png",
        "sub/d.png",
        "sub/only-here.jpg",
        "sub/deeper/c.png",
        "sub/deeper/e.png",
        "raw.jpg",
    ]:
        touch(root / name)
    files = scanned_files(root)
    assert rel(root, files) == sorted(
        [
            "keep.png",
            "b.jpg",
            "only-here.jpg",
            "raw.jpg",
            "sub/c.png",
            "sub/deeper/c.png",
        ]
    )


def test_excluded_folders_are_not_entered(tmp_path, monkeypatch):
    root = tmp_path / "root"
    touch(root / ".clipdexignore", b"raw/\n")
    touch(root / "raw" / "x.jpg")
    touch(root / "ok" / "y.jpg")
    listed: list[str] = []
    real = os.scandir

    def scandir(path: object = ".") -> object:
        listed.append(os.fspath(path))  # type: ignore[arg-type]
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    assert rel(root, scanned_files(root)) == ["ok/y.jpg"]
    assert str(root / "raw") not in listed and str(root / "ok") in listed


def test_a_subfolder_scan_obeys_the_patterns_above_it(tmp_path):
    top = tmp_path / "top"
    touch(top / ".clipdexignore", b"*.png\n")
    touch(top / "sub" / "a.png")
    touch(top / "sub" / "b.jpg")
    touch(top / "sub" / "deeper" / "c.jpg")
    rules = IgnoreRules({str(top): ["sub/deeper/"]})
    assert scanned_files(top / "sub", ignore=rules) == [str(top / "sub" / "b.jpg")]
    # A root excluded from above (or lying in an excluded folder) holds nothing to index.
    assert scanned_files(top / "sub" / "deeper", ignore=rules) == []
    assert scanned_files(top / "sub" / "a.png") == []
    assert scanned_files(top / "sub", ignore=IgnoreRules({str(top): ["sub"]})) == []


def test_excludes_apply_to_every_root_they_were_given_for(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        touch(root / "x.jpg")
        touch(root / "raw" / "y.jpg")
        touch(root / "z.gif")
    rules = IgnoreRules({str(a): ["raw/", "*.gif"]})
    expected = ["a/x.jpg", "b/raw/y.jpg", "b/x.jpg", "b/z.gif"]
    assert rel(tmp_path, scanned_files(a, b, ignore=rules)) == expected


def test_unreadable_clipdexignore_skips_its_folder(tmp_path):
    root = tmp_path / "root"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.jpg")
    (root / "sub" / ".clipdexignore").mkdir()  # exists, cannot be read as a file
    touch(root / "bad" / ".clipdexignore", b"trailing\\\n")  # an invalid pattern
    touch(root / "bad" / "c.jpg")
    items = list(scan([str(root)]))
    files = [i.path for i in items if isinstance(i, FileInfo)]
    skipped = {i.path: i.reason for i in items if isinstance(i, SkippedFolder)}
    assert files == [str(root / "a.jpg")]
    assert set(skipped) == {str(root / "sub"), str(root / "bad")}
    assert skipped[str(root / "sub")] == "cannot read its .clipdexignore: is a directory"
    assert "trailing" in skipped[str(root / "bad")]


# -- indexing -------------------------------------------------------------------------------
def indexed(index_dir: Path) -> list[str]:
    catalog = Catalog.open(index_dir)
    try:
        return sorted(r.path for r in catalog.records().values())
    finally:
        catalog.close()


def remembered(index_dir: Path) -> dict:
    catalog = Catalog.open(index_dir)
    try:
        return json.loads(catalog.get_meta(EXCLUDES_KEY) or "{}")
    finally:
        catalog.close()


def test_excludes_are_remembered_per_root(tmp_path, index_dir, tiny_clip_model):
    a, b = tmp_path / "a", tmp_path / "b"
    write_scenes(a, 2)
    raw = write_scenes(a / "raw", 2, seed0=10)
    write_scenes(b, 1, seed0=20)
    write_scenes(b / "raw", 1, seed0=30)
    m = tiny_clip_model

    s1 = index_folders([a], index_dir, m, IndexOptions(excludes=("raw/",)))
    assert s1.added == 2 and remembered(index_dir) == {str(a): ["raw/"]}
    s2 = index_folders([a, b], index_dir, m)  # a's patterns come back; b has none
    assert s2.added == 2 and s2.unchanged == 2
    assert not any(p.startswith(str(a / "raw")) for p in indexed(index_dir))
    assert str(b / "raw" / "scene000.png") in indexed(index_dir)
    s3 = index_folders([a / "raw"], index_dir, m)  # excluded whichever folder is indexed
    assert (s3.added, s3.skipped, s3.failed) == (0, [], [])
    s4 = index_folders([a], index_dir, m, IndexOptions(excludes=("",)))
    assert s4.added == 2 and remembered(index_dir) == {}
    assert {str(p) for p in raw} <= set(indexed(index_dir))


def test_excluding_indexed_images_removes_them(tmp_path, index_dir, tiny_clip_model):
    root = tmp_path / "photos"
    paths = write_scenes(root, 4)
    write_scenes(root / "sub", 2, seed0=10)
    index_folders([root], index_dir, tiny_clip_model)
    (root / ".clipdexignore").write_text("sub/\n")
    s1 = index_folders([root], index_dir, tiny_clip_model)
    assert (s1.removed, s1.added, s1.unchanged) == (2, 0, 4)
    s2 = index_folders([root], index_dir, tiny_clip_model, IndexOptions(excludes=("scene00[01].png",)))
    assert (s2.removed, s2.added, s2.unchanged) == (2, 0, 2)
    assert indexed(index_dir) == sorted(str(p) for p in paths[2:])


def test_index_command_takes_and_remembers_exclude(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    write_scenes(photos, 2)
    write_scenes(photos / "raw", 2, seed0=10)
    script = Path(sys.executable).with_name("clipdex")
    clipdex = [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    args = [
        "index",
        str(photos),
        "--index",
        str(tmp_path / "index"),
        "-m",
        TINY_ARCH,
        "-p",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--json",
    ]

    def run(*extra: str) -> dict:
        done = subprocess.run(
            clipdex + args + list(extra), env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert run("--exclude", "raw/", "--exclude", "scene001.png")["added"] == 1
    assert run()["added"] == 0
    assert run("--exclude", "")["added"] == 3
