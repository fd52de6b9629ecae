"""Bad input never stops a run, and hostile input is never trusted.

Every broken, foreign, oversized or unreachable file of the corpus (tests/corpus.py) is reported
in `summary.failed` with a reason that says what is wrong; every good file, whatever its pixel
mode, format, orientation or name, is indexed; the run finishes. File names are escaped before
they reach a terminal; a checkpoint that carries a pickled object is refused without running
it; the index folder itself holds no pickle.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, make_scene, write_scenes
from corpus import MAX_BYTES, MAX_PIXELS, build_corpus, encode, restore_permissions, sha256, write

import indexer.decode as decode_mod
import indexer.sync as sync_mod
from indexer import IndexOptions, index_folders
from indexer.decode import DecodeOptions
from retrieval.core.errors import ModelLoadError
from retrieval.embedding.clip_model import ClipModel
from retrieval.embedding.spec import ModelSpec
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME
from retrieval.storage.faiss_index import FAISS_FILE
from retrieval.storage.verify import verify_index

IS_ROOT = os.geteuid() == 0
CORPUS_OPTIONS = IndexOptions(
    batch_size=8, decode_workers=2, decode=DecodeOptions(max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)
)


class OsWithHooks:
    """Stands in for `os` inside one module: the given functions replaced, the rest the real os."""

    def __init__(self, **hooks: object):
        self.__dict__.update(hooks)

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)


class _GrowsWhenRead:
    """A file object whose file grows by a byte each time it is read, like a photo that a
    camera app or a sync client is still writing."""

    def __init__(self, f, path: str):  # type: ignore[no-untyped-def]
        self.f, self.path = f, path

    def __enter__(self) -> _GrowsWhenRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def read(self, *args: int) -> bytes:
        data = self.f.read(*args)
        with open(os.fsencode(self.path), "ab") as w:
            w.write(b"\0")
        return data


def rewrite_while_reading(monkeypatch: pytest.MonkeyPatch, always: str, once: str) -> None:
    """The decoder's reads of `always` all see the file change under them; of `once`, only the
    first read does. Everything else in indexer.decode.read_stable is the real code."""
    watched = {os.stat(os.fsencode(p)).st_ino: p for p in (always, once)}
    grown: set[str] = set()

    def fdopen(fd: int, *args, **kw):  # type: ignore[no-untyped-def]
        f = os.fdopen(fd, *args, **kw)
        path = watched.get(os.fstat(fd).st_ino)
        if path is None or (path == once and path in grown):
            return f
        grown.add(path)
        return _GrowsWhenRead(f, path)

    monkeypatch.setattr(decode_mod, "os", OsWithHooks(fdopen=fdopen))


def delete_after_scan(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """`path` disappears once the scan has listed it, before any worker reads it."""
    real_scan = sync_mod.scan

    def scan(*args, **kw):  # type: ignore[no-untyped-def]
        yield from real_scan(*args, **kw)
        os.unlink(os.fsencode(path))

    monkeypatch.setattr(sync_mod, "scan", scan)


def catalog_paths(index_dir: Path) -> set[str]:
    with ImageIndex.open(index_dir) as index:
        return {r.path for r in index.records().values()}


# -- the corpus ---------------------------------------------------------------------------------
def test_every_bad_file_is_reported_every_good_one_indexed(tmp_path, tiny_clip_model, monkeypatch):
    corpus = build_corpus(tmp_path / "photos", tmp_path / "elsewhere")
    index_dir = tmp_path / "index"
    good = dict(corpus.good)
    bad = dict(corpus.bad)
    if IS_ROOT:  # chmod 000 keeps nobody out when we are root: those files are simply good
        good["unreadable_file"] = corpus.unreadable["file"]
        good["file_in_unreadable_folder"] = corpus.unreadable["file_in_folder"]
    else:
        bad["unreadable_file"] = (corpus.unreadable["file"], r"^permission denied$")
    try:
        delete_after_scan(monkeypatch, bad["deleted_after_scan"][0])
        rewrite_while_reading(monkeypatch, always=bad["changes_while_read"][0], once=good["rewritten_once"])
        before = tiny_clip_model.images_encoded
        summary = index_folders([corpus.root], index_dir, tiny_clip_model, CORPUS_OPTIONS)
        encoded = tiny_clip_model.images_encoded - before
        monkeypatch.undo()

        # Every bad file reported once, with a reason that says what is wrong; nothing else.
        failed = dict(summary.failed)
        assert len(failed) == len(summary.failed), "a file was reported twice"
        label_of = {path: label for label, (path, _) in bad.items()}
        wrong = [
            f"{label}: not reported" if path not in failed else f"{label}: {failed[path]!r} !~ {pattern!r}"
            for label, (path, pattern) in bad.items()
            if path not in failed or not re.search(pattern, failed[path])
        ]
        assert not wrong, wrong
        unexpected = {p: r for p, r in failed.items() if p not in label_of}
        assert not unexpected, f"good files reported as failed: {unexpected}"
        assert not summary.interrupted
        # A folder that cannot be listed is skipped (its rows would be kept), not a failed file.
        expected_skipped = [] if IS_ROOT else [(corpus.unreadable["folder"], "permission denied")]
        assert summary.skipped == expected_skipped

        # Every good file indexed, with the bytes it has now, its upright size, and nothing else.
        with ImageIndex.open(index_dir) as index:
            records = {r.path: r for r in index.records().values()}
            by_label = {label: records.get(path) for label, path in good.items()}
            missing = sorted(label for label, rec in by_label.items() if rec is None)
            assert not missing, f"good files not indexed: {missing}"
            assert set(records) == set(good.values())
            assert summary.added == len(good) == encoded
            for label, rec in by_label.items():
                path = good[label]
                assert rec.content_hash == sha256(path), label
                assert rec.size == os.stat(os.fsencode(path)).st_size, label
                if label in corpus.sizes:
                    assert (rec.width, rec.height) == corpus.sizes[label], label
            # EXIF orientations: the model saw the upright picture, exactly.
            labels = sorted(corpus.expected_pixels)
            stored = index.catalog.embeddings([by_label[k].id for k in labels], index.dim)
            direct = tiny_clip_model.encode_pil([corpus.expected_pixels[k] for k in labels])
            gaps = {k: float(np.abs(s - d).max()) for k, s, d in zip(labels, stored, direct)}
            assert max(gaps.values()) < 1e-5, gaps
            report = verify_index(index.store)
            assert report.ok and not report.missing_files, (report.problems, report.missing_files)

        # The next run: the file that was changing is still now and gets indexed; the rest of
        # the bad files are reported again; nothing good is embedded a second time.
        before = tiny_clip_model.images_encoded
        again = index_folders([corpus.root], index_dir, tiny_clip_model, CORPUS_OPTIONS)
        assert (again.added, again.updated, again.removed) == (1, 0, 0)
        assert again.unchanged == len(good)
        assert tiny_clip_model.images_encoded - before == 1
        still_bad = {
            p for label, (p, _) in bad.items() if label not in ("deleted_after_scan", "changes_while_read")
        }
        assert set(dict(again.failed)) == still_bad
        assert bad["changes_while_read"][0] in catalog_paths(index_dir)
        print(
            f"\nrobustness corpus: {len(bad)} bad kinds reported, {len(good)} good files indexed, "
            f"{len(corpus.ignored)} passed over"
        )
    finally:
        restore_permissions(corpus.root)


def test_a_file_that_decodes_forever_is_given_up_after_the_timeout(tmp_path, tiny_clip_model, monkeypatch):
    photos = tmp_path / "photos"
    paths = write_scenes(photos, 6)
    stuck = paths[2]
    stuck_bytes = stuck.read_bytes()
    entered, release = threading.Event(), threading.Event()
    real_load = decode_mod.load_image

    def load_image(data, **kw):  # type: ignore[no-untyped-def]
        if data == stuck_bytes:  # a pathological file: the decoder never comes back (on its own)
            entered.set()
            release.wait(60)
        return real_load(data, **kw)

    monkeypatch.setattr(decode_mod, "load_image", load_image)
    options = IndexOptions(batch_size=2, decode_workers=2, decode_timeout=1.0)
    started = time.monotonic()
    try:
        summary = index_folders([photos], tmp_path / "index", tiny_clip_model, options)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert entered.is_set()
    assert [path for path, _ in summary.failed] == [str(stuck)]
    assert re.search(r"took over 1 s", summary.failed[0][1]), summary.failed
    assert summary.added == 5 and not summary.interrupted
    assert 1.0 <= elapsed < 30, elapsed  # gave up on the file, did not wait for it
    assert catalog_paths(tmp_path / "index") == {str(p) for p in paths if p != stuck}


@pytest.mark.parametrize("cause", ["permission_denied", "decode_timeout"])
def test_a_file_that_failed_for_a_passing_reason_is_tried_again(
    cause, tmp_path, tiny_clip_model, monkeypatch
):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = write_scenes(photos, 4)
    victim = paths[1]
    options = IndexOptions(batch_size=2, decode_workers=2, decode_timeout=1.0)
    release = threading.Event()
    if cause == "permission_denied" and not IS_ROOT:
        os.chmod(victim, 0)
    elif cause == "permission_denied":  # root reads anything: refuse the open the way the kernel would

        def refuse(path, *args, **kw):  # type: ignore[no-untyped-def]
            if os.fsdecode(path) == str(victim):
                raise PermissionError(13, "Permission denied")
            return os.open(path, *args, **kw)

        monkeypatch.setattr(decode_mod, "os", OsWithHooks(open=refuse))
    else:
        real_load, stuck = decode_mod.load_image, victim.read_bytes()

        def load_image(data, **kw):  # type: ignore[no-untyped-def]
            if data == stuck:
                release.wait(60)
            return real_load(data, **kw)

        monkeypatch.setattr(decode_mod, "load_image", load_image)
    try:
        first = index_folders([photos], index_dir, tiny_clip_model, options)
    finally:
        release.set()
        monkeypatch.undo()
        os.chmod(victim, 0o644)
    if [p for p, _ in first.failed] != [str(victim)]:
        pytest.fail(f"precondition: only the victim should fail the first time: {first.failed}")
    # The cause is gone (permissions fixed, machine idle); the file itself never changed.
    again = index_folders([photos], index_dir, tiny_clip_model, options)
    assert again.failed == [] and again.added == 1, again.failed
    assert str(victim) in catalog_paths(index_dir)


# -- the command line ---------------------------------------------------------------------------
# name on disk -> how a terminal must see it (written out by hand, not by cli.output.safe)
BAD_NAMES = {
    "ring\x07bell.jpg": "ring\\x07bell.jpg",
    "esc\x1b[2Jclear.jpg": "esc\\x1b[2Jclear.jpg",
    "tab\there.jpg": "tab\\x09here.jpg",
    "car\rriage.jpg": "car\\x0driage.jpg",
    "new\nline.jpg": "new\\x0aline.jpg",
    "del\x7f.jpg": "del\\x7f.jpg",
    "c1\u009bcsi.jpg": "c1\\x9bcsi.jpg",
    b"bytes-\xff\xfe.jpg": "bytes-\\xff\\xfe.jpg",
}
GOOD_NAMES = {
    "title\x1b]0;pwned\x07.png": "title\\x1b]0;pwned\\x07.png",
    "two\nlines.png": "two\\x0alines.png",
    b"latin1-\xe9t\xe9.png": "latin1-\\xe9t\\xe9.png",
    "été.png": "été.png",
}


def _raw_controls(text: str) -> list[str]:
    return [
        repr(ch)
        for ch in text
        if (ord(ch) < 32 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 or 0xDC80 <= ord(ch) <= 0xDCFF
    ]


def test_cli_writes_every_failure_to_the_errors_file_and_escapes_names(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    photos = tmp_path / "photos"
    write_scenes(photos, 3)
    for i, name in enumerate(GOOD_NAMES):
        write(photos, name, encode(make_scene(60 + i, (64, 48)), "PNG"))
    for name in BAD_NAMES:
        write(photos, name, b"this is not a picture")
    errors_file = tmp_path / "errors.tsv"
    index_dir = tmp_path / "index"
    runner = CliRunner()
    model = ["-m", TINY_ARCH, "-p", "random", "--device", "cpu"]
    result = runner.invoke(
        app, ["index", str(photos), "--index", str(index_dir), *model, "--errors", str(errors_file)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    n_good, n_bad = 3 + len(GOOD_NAMES), len(BAD_NAMES)
    assert result.stdout.startswith(
        f"done: {n_good} added, 0 updated, 0 moved, 0 removed, 0 unchanged, {n_bad} failed"
    )
    assert not _raw_controls(result.stdout + result.stderr), _raw_controls(result.stdout + result.stderr)
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("  failed: ")]
    assert len(failed_lines) == n_bad, result.stderr  # a raw newline in a name would add a line
    for shown in BAD_NAMES.values():
        assert any(f"{photos}/{shown}: " in line for line in failed_lines), (shown, failed_lines)

    # --errors: every failure, one per line, path TAB reason, escaped the same way.
    text = errors_file.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    rows = [line.split("\t") for line in text.splitlines()]
    assert all(len(row) == 2 and row[1].strip() for row in rows), rows
    assert sorted(path for path, _ in rows) == sorted(f"{photos}/{shown}" for shown in BAD_NAMES.values())
    assert all(re.search(r"not an image file", reason) for _, reason in rows), rows

    # Search results print the indexed names escaped too.
    found = runner.invoke(
        app, ["search", "anything", "--index", str(index_dir), "-k", "50", "--device", "cpu"]
    )
    assert found.exit_code == 0, (found.output, found.exception)
    assert not _raw_controls(found.stdout), _raw_controls(found.stdout)
    assert len(found.stdout.splitlines()) == n_good
    for shown in GOOD_NAMES.values():
        assert f"{photos}/{shown}" in found.stdout, (shown, found.stdout)


# -- hostile checkpoints and the index folder ---------------------------------------------------
class _Opaque:
    """A plain object: a weights-only loader has no business building it."""

    def __init__(self) -> None:
        self.note = "not a tensor"


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): proof that the checkpoint ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("payload", ["runs_code", "custom_object"])
def test_a_checkpoint_holding_a_pickled_object_is_refused(payload, tmp_path, tiny_clip_model):
    import torch

    marker = tmp_path / "code-ran"
    extra = _RunsCode(str(marker)) if payload == "runs_code" else _Opaque()
    state = tiny_clip_model.model.state_dict()
    evil = tmp_path / "evil" / "open_clip_pytorch_model.bin"
    evil.parent.mkdir()
    torch.save({"state_dict": state, "extra": extra}, evil)
    with pytest.raises(ModelLoadError, match="cannot load checkpoint"):
        ClipModel(ModelSpec(TINY_ARCH, str(evil), device="cpu"))
    assert not marker.exists(), "loading the checkpoint executed code"
    # Control: the same weights without the object load, and give the same model.
    clean = tmp_path / "clean.pt"
    torch.save({"state_dict": state}, clean)
    model = ClipModel(ModelSpec(TINY_ARCH, str(clean), device="cpu"))
    probe = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(
        model.encode_images(torch.from_numpy(probe)),
        tiny_clip_model.encode_images(torch.from_numpy(probe)),
        atol=1e-6,
    )


PICKLE_OR_TORCH_ZIP = re.compile(rb"^(\x80[\x02-\x05]|PK\x03\x04)")  # pickle protocol 2-5, torch.save zip


def _check_sqlite_values(db_path: Path) -> list[str]:
    """Every value in the database is a number, text, JSON, a path, or raw float32s; the tables."""
    assert db_path.read_bytes()[:16] == b"SQLite format 3\x00"
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in db.execute(f"PRAGMA table_info('{table}')")]
            for row in db.execute(f"SELECT * FROM '{table}'"):
                for column, value in zip(columns, row):
                    where = (db_path.name, table, column)
                    if isinstance(value, bytes):
                        if column == "vector":
                            vec = np.frombuffer(value, dtype=np.float32)
                            assert len(value) == 64 * 4 and np.all(np.isfinite(vec)), where
                        else:
                            assert column == "path" and value.startswith(b"/"), where
                    elif column == "signature":
                        assert isinstance(json.loads(value), dict), where
                    else:
                        assert value is None or isinstance(value, (int, float, str)), where
        return tables
    finally:
        db.close()


def test_the_index_folder_holds_no_pickle(tmp_path, tiny_clip_model):
    import faiss
    import onnx

    write_scenes(tmp_path / "photos", 6)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a picture")  # a failure record too
    index_dir = tmp_path / "index"
    index_folders([tmp_path / "photos"], index_dir, tiny_clip_model)
    with ImageIndex.open(index_dir) as index:
        assert len(index.search_text("a red square", k=3)) == 3  # query cache, ONNX text tower
    files = {p.name: p for p in index_dir.iterdir()}
    known = re.compile(
        r"^(catalog\.sqlite|query-cache\.sqlite)(-wal|-shm|-journal)?$"
        r"|^vectors\.faiss$|^writer\.lock$|^text-[0-9a-f]{16}\.onnx(\.[0-9a-f]+\.data)?$"
    )
    assert all(known.match(name) for name in files), sorted(files)
    for name, path in files.items():
        if not name.endswith(".data"):  # raw tensor bytes, checked through their graph below
            assert not PICKLE_OR_TORCH_ZIP.match(path.read_bytes()[:4]), name
    # vectors.faiss is FAISS's own format (IndexIDMap2 over IndexFlatIP)
    raw = files[FAISS_FILE].read_bytes()
    assert raw[:4] == b"IxM2" and b"IxFI" in raw[:64]
    assert faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8)).ntotal == 6
    lock = files["writer.lock"].read_bytes()
    assert lock == b"" or isinstance(json.loads(lock), dict)
    # the catalog and the query cache: SQLite holding plain values
    tables = set(_check_sqlite_values(files[CATALOG_NAME]))
    assert {"images", "models", "vectors", "tags", "commits", "meta"} <= tables
    if "query-cache.sqlite" in files:
        _check_sqlite_values(files["query-cache.sqlite"])
    # the text tower: an ONNX protobuf whose weights file is raw tensor data it points to
    for name, path in files.items():
        if name.endswith(".onnx"):
            graph = onnx.load(str(path), load_external_data=False)
            locations = {
                entry.value
                for tensor in graph.graph.initializer
                for entry in tensor.external_data
                if entry.key == "location"
            }
            weights = {n for n in files if n.startswith(name + ".") and n.endswith(".data")}
            assert weights <= locations, (weights, locations)


# -- formats: one list for the indexer and for query images ---------------------------------------
def test_query_images_and_the_indexer_accept_the_same_file_names():
    from retrieval.core.errors import ClipdexError
    from retrieval.core.images import image_extensions
    from retrieval.search.query import Term

    known = image_extensions()
    candidates = set(known) | {".jpe", ".jfif", ".avif", ".heic", ".heif", ".txt", ".raw", ".svg"}
    for ext in sorted(candidates):
        # A missing file named like an image is refused as such; any other name is a text.
        name = f"no-such-photo{ext}"
        if ext in known:
            with pytest.raises(ClipdexError, match="image not found"):
                Term.guess(name)
        else:
            assert Term.guess(name).kind == "text", ext


def test_jpe_files_are_indexed(tmp_path, tiny_clip_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    make_scene(11, (96, 72)).save(photos / "camera.jpe", "JPEG", quality=90)
    summary = index_folders([photos], tmp_path / "index", tiny_clip_model)
    assert summary.added == 1 and summary.failed == []


def test_avif_files_are_indexed_when_pillow_reads_them(tmp_path, tiny_clip_model):
    from PIL import features

    from retrieval.core.images import image_extensions

    if not features.check("avif"):
        assert ".avif" not in image_extensions()  # not listed where it cannot be read
        pytest.skip("this Pillow has no AVIF support")
    photos = tmp_path / "photos"
    photos.mkdir()
    make_scene(12, (96, 72)).save(photos / "phone.avif", "AVIF", quality=90)
    summary = index_folders([photos], tmp_path / "index", tiny_clip_model)
    assert summary.added == 1 and summary.failed == []
