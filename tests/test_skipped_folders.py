"""A folder that cannot be read never costs its indexed photos.

Permission denied, an I/O error on a NAS, an unmounted sub-mount: the folder is reported as
skipped and its rows stay, until it can be read again (or `clipdex forget` drops them).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_ARCH, write_scenes

from indexer import index_folders
from retrieval.storage.catalog import Catalog


def catalog_paths(index_dir: Path) -> set[str]:
    catalog = Catalog.open(index_dir)
    try:
        return {r.path for r in catalog.records().values()}
    finally:
        catalog.close()


def fail_listing(monkeypatch: pytest.MonkeyPatch, folder: Path, exc: OSError) -> None:
    """Listing `folder` raises `exc`; every other listing (the index's own too) works."""
    real = os.scandir
    target = os.fspath(folder)

    def scandir(path: object = ".") -> Iterator[os.DirEntry]:
        if isinstance(path, str | os.PathLike) and os.fspath(path) == target:
            raise exc
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture
def library(tmp_path: Path, index_dir: Path, tiny_clip_model) -> Path:
    """photos/ (3 scenes), photos/sub (3) and photos/sub/deeper (2), indexed."""
    root = tmp_path / "photos"
    write_scenes(root, 3)
    write_scenes(root / "sub", 3, seed0=10)
    write_scenes(root / "sub" / "deeper", 2, seed0=20)
    summary = index_folders([root], index_dir, model=tiny_clip_model)
    assert summary.added == 8 and summary.failed == []
    return root


def test_unlistable_nested_folder_keeps_its_rows(library, index_dir, tiny_clip_model, monkeypatch):
    root = library
    before = catalog_paths(index_dir)
    (root / "scene000.png").unlink()  # seen gone: still removed
    (new,) = write_scenes(root, 1, seed0=30, prefix="new")  # still added
    fail_listing(monkeypatch, root / "sub", OSError(errno.EIO, "Input/output error"))

    summary = index_folders([root], index_dir, model=tiny_clip_model)

    assert catalog_paths(index_dir) == (before - {str(root / "scene000.png")}) | {str(new)}
    assert (summary.added, summary.removed, summary.unchanged) == (1, 1, 2)
    assert summary.skipped == [(str(root / "sub"), "input/output error")]
    assert summary.failed == []


def test_unlistable_root_keeps_its_rows(library, index_dir, tiny_clip_model, monkeypatch):
    before = catalog_paths(index_dir)
    fail_listing(monkeypatch, library, PermissionError(errno.EACCES, "Permission denied"))

    summary = index_folders([library], index_dir, model=tiny_clip_model)

    assert catalog_paths(index_dir) == before
    assert summary.removed == 0 and summary.added == 0
    assert summary.skipped == [(str(library), "permission denied")]


def test_readable_again_picks_up_where_it_left_off(library, index_dir, tiny_clip_model, monkeypatch):
    sub = library / "sub"
    with monkeypatch.context() as mp:
        fail_listing(mp, sub, PermissionError(errno.EACCES, "Permission denied"))
        index_folders([library], index_dir, model=tiny_clip_model)
    (sub / "scene000.png").unlink()  # deleted while the folder could not be read
    summary = index_folders([library], index_dir, model=tiny_clip_model)
    assert summary.removed == 1 and summary.skipped == []
    assert str(sub / "scene000.png") not in catalog_paths(index_dir)


# -- the real thing: a folder without read permission, for an unprivileged user ---------------
SETPRIV = shutil.which("setpriv")
NOBODY = 65534
_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def as_unprivileged() -> list[str]:
    """Root reads every folder whatever its mode: the indexer must run as somebody else."""
    if os.geteuid() != 0:
        return []
    if SETPRIV is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop privileges")
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def clipdex(prefix: list[str], args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home), CLIPDEX_CACHE=str(home / "cache"), OMP_NUM_THREADS="1")
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        prefix + CLIPDEX + args, cwd=home, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder the unprivileged user can reach (pytest's tmp_path lies under a private one)."""
    work = Path(tempfile.mkdtemp(prefix="clipdex-perm-"))
    try:
        yield work
    finally:
        for folder, _, _ in os.walk(work):
            os.chmod(folder, 0o755)
        shutil.rmtree(work)


def test_folder_without_read_permission_keeps_its_rows(shared_dir):
    prefix = as_unprivileged()
    photos = shared_dir / "photos"
    write_scenes(photos, 2)
    locked = photos / "locked"
    write_scenes(locked, 3, seed0=10)
    (shared_dir / "cache").mkdir()
    if prefix:
        for folder, dirs, files in os.walk(shared_dir):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.chown(name, NOBODY, NOBODY)
    os.chmod(shared_dir, 0o755)
    index = shared_dir / "index"
    args = ["index", str(photos), "--index", str(index), "-m", TINY_ARCH, "-p", "random", "--device", "cpu"]

    first = clipdex(prefix, [*args, "--json"], shared_dir)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["added"] == 5
    before = catalog_paths(index)

    os.chmod(locked, 0)
    second = clipdex(prefix, args, shared_dir)
    third = clipdex(prefix, [*args, "--json"], shared_dir)

    assert catalog_paths(index) == before
    assert second.returncode == 0, second.stderr
    assert "0 removed" in second.stdout
    assert "1 folder could not be read and was skipped (its indexed photos are kept):" in second.stderr
    assert f"{locked}: permission denied" in second.stderr
    summary = json.loads(third.stdout)
    assert summary["removed"] == 0
    assert summary["skipped"] == [{"path": str(locked), "reason": "permission denied"}]
