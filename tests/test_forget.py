"""`clipdex forget`: drop the rows of a folder or file that is gone (an unplugged disk)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_scenes

from indexer import index_folders
from indexer.forget import ForgetSummary, forget_paths
from retrieval.core.errors import ClipdexError
from retrieval.index import ImageIndex
from retrieval.storage.verify import verify_index


@pytest.fixture
def library(tmp_path: Path, index_dir: Path, tiny_clip_model) -> dict[str, Path]:
    """Three indexed roots: disk (3 images), disk2 (2; its name starts like disk's) and
    usb (3 images and a broken file, which leaves a failure record)."""
    roots = {"disk": tmp_path / "disk", "disk2": tmp_path / "disk2", "usb": tmp_path / "usb"}
    write_scenes(roots["disk"], 3)
    write_scenes(roots["disk2"], 2, seed0=10)
    write_scenes(roots["usb"] / "2020", 3, seed0=20)
    (roots["usb"] / "broken.jpg").write_text("not a picture")
    summary = index_folders(list(roots.values()), index_dir, model=tiny_clip_model)
    assert summary.added == 8 and len(summary.failed) == 1
    return roots


def paths_and_failures(index_dir: Path) -> tuple[set[str], set[str]]:
    with ImageIndex.open(index_dir) as index:
        return {r.path for r in index.records().values()}, set(index.catalog.failures())


def assert_sound(index_dir: Path) -> None:
    """FAISS holds exactly the catalog's rows, and every row's file exists."""
    with ImageIndex.open(index_dir) as index:
        report = verify_index(index.store)
        assert report.ok and report.missing_files == [], (report.problems, report.missing_files)
        assert index.store.faiss.ntotal == len(index.records())


def under(folder: Path, paths: set[str]) -> set[str]:
    return {p for p in paths if p.startswith(str(folder) + os.sep)}


def test_forget_drops_rows_and_failures_of_a_vanished_folder(library, index_dir):
    before, _ = paths_and_failures(index_dir)
    shutil.rmtree(library["disk"])
    shutil.rmtree(library["usb"])

    summary = forget_paths(index_dir, [library["disk"], library["usb"]])

    assert summary == ForgetSummary([(str(library["disk"]), 3), (str(library["usb"]), 3)], 1)
    assert summary.images == 6
    rows, failures = paths_and_failures(index_dir)
    assert rows == under(library["disk2"], before)  # disk2 is not under disk
    assert failures == set()
    assert_sound(index_dir)


def test_forget_refuses_a_path_that_still_exists(library, index_dir):
    before = paths_and_failures(index_dir)
    with pytest.raises(ClipdexError, match=r"still exists.*--force"):
        forget_paths(index_dir, [library["disk2"], library["disk"] / "gone"])
    assert paths_and_failures(index_dir) == before  # nothing dropped, not even the missing path's
    summary = forget_paths(index_dir, [library["disk"]], allow_existing=True)
    assert summary.forgotten == [(str(library["disk"]), 3)]


def test_forget_refuses_a_path_whose_existence_cannot_be_told(library, index_dir, monkeypatch):
    target = str(library["disk"])
    real = os.stat

    def stat(path, *args, **kw):  # type: ignore[no-untyped-def]
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(ClipdexError, match=r"cannot tell whether .* \(permission denied\)"):
        forget_paths(index_dir, [target])
    monkeypatch.undo()
    assert len(paths_and_failures(index_dir)[0]) == 8


def test_forget_a_file_a_relative_path_and_a_path_with_no_rows(library, index_dir, monkeypatch):
    (library["usb"] / "2020" / "scene001.png").unlink()
    shutil.rmtree(library["disk"])
    monkeypatch.chdir(library["usb"])
    summary = forget_paths(index_dir, ["2020/scene001.png", "./nothing-here", f"{library['disk']}/"])
    assert summary.forgotten == [
        (str(library["usb"] / "2020" / "scene001.png"), 1),
        (str(library["usb"] / "nothing-here"), 0),  # reported, not an error
        (str(library["disk"]), 3),
    ]
    assert_sound(index_dir)


# -- the real command ------------------------------------------------------------------------
_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def clipdex(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(CLIPDEX + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_forget_command(library, index_dir, tmp_path):
    at = ["--index", str(index_dir)]
    shutil.rmtree(library["usb"])

    live = clipdex("forget", str(library["disk"]), *at, cwd=tmp_path)
    assert live.returncode == 1 and live.stdout == ""
    (line,) = live.stderr.strip().splitlines()
    assert line.startswith("clipdex: error:") and "still exists" in line and "--force" in line

    gone = clipdex("forget", str(library["usb"]), "nowhere", *at, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines() == [
        f"forgot 3 images under {library['usb']}",
        f"nothing indexed under {tmp_path / 'nowhere'}",
    ]

    forced = clipdex("forget", str(library["disk2"]), "--force", "--json", *at, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout) == {
        "forgotten": [{"path": str(library["disk2"]), "images": 2}],
        "images": 2,
        "failures_forgotten": 0,
    }
    assert_sound(index_dir)

    (library["disk"] / "scene000.png").unlink()
    verify = clipdex("verify", *at, cwd=tmp_path)
    assert "1 indexed files no longer exist" in verify.stdout
    assert "clipdex forget" in verify.stdout
