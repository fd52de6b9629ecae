"""Shared fixtures: a tiny seeded CLIP model (and checkpoints of it), generated images, tmp dirs.

Nothing here touches the network, the user's cache or data folders, or /work/shared: the
session points CLIPDEX_CACHE and CLIPDEX_INDEX at temporary folders, and every image is drawn
with Pillow from a fixed seed.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

TINY_ARCH = "clipdex-tiny"
SIZES = [(96, 72), (64, 64), (120, 80), (72, 128), (200, 150), (48, 96), (160, 160), (90, 60)]


# -- images -------------------------------------------------------------------------------
def make_scene(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A random RGB picture: a two-colour gradient with a few filled shapes on it."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0 = rng.integers(0, 256, 3).astype(np.float64)
    c1 = rng.integers(0, 256, 3).astype(np.float64)
    if rng.random() < 0.5:
        t = np.linspace(0.0, 1.0, w)[None, :, None].repeat(h, axis=0)
    else:
        t = np.linspace(0.0, 1.0, h)[:, None, None].repeat(w, axis=1)
    arr = c0 * (1.0 - t) + c1 * t
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        x1, y1 = max(x1, x0 + 4), max(y1, y0 + 4)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
    return img


def write_scenes(
    folder: Path, count: int, *, seed0: int = 0, prefix: str = "scene", ext: str = ".png"
) -> list[Path]:
    """`count` distinct scenes of various sizes under `folder`; returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"{prefix}{i:03d}{ext}"
        make_scene(seed0 + i, SIZES[(seed0 + i) % len(SIZES)]).save(p)
        paths.append(p)
    return paths


def jpeg_bytes(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def quadrant_image(w: int = 80, h: int = 48) -> Image.Image:
    """Four flat quadrants of distinct colours: any rotation or flip changes the picture."""
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w // 2 - 1, h // 2 - 1), fill=(230, 20, 20))
    draw.rectangle((w // 2, 0, w - 1, h // 2 - 1), fill=(20, 200, 20))
    draw.rectangle((0, h // 2, w // 2 - 1, h - 1), fill=(20, 20, 230))
    draw.rectangle((w // 2, h // 2, w - 1, h - 1), fill=(240, 240, 30))
    return img


# -- environment --------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Caches and the default index location go to temporary folders for the whole session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CLIPDEX_CACHE", str(tmp_path_factory.mktemp("clipdex-cache")))
    mp.setenv("CLIPDEX_INDEX", str(tmp_path_factory.mktemp("default-index") / "index"))
    # Equality with a direct open_clip computation holds for float32 only; on CPUs where "auto"
    # means bf16 (OpenVINO installed, native bf16) tests/test_precision.py checks its fidelity.
    mp.setenv("CLIPDEX_PRECISION", "fp32")
    yield
    mp.undo()


# -- the model ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_clip_model():
    """The seeded random tiny model (64-d). Shared: tests read `images_encoded` as deltas."""
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSpec

    return ClipModel(ModelSpec(TINY_ARCH, "random", device="cpu"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_clip_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights as a local checkpoint file (checkpoint 'A')."""
    import torch

    path = tmp_path_factory.mktemp("ckpt-a") / "tiny-a.pt"
    torch.save(tiny_clip_model.model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def other_clip_model():
    """Same architecture, other weights (seed 1)."""
    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSpec

    return ClipModel(ModelSpec(TINY_ARCH, "random", device="cpu", seed=1))


@pytest.fixture(scope="session")
def other_checkpoint(other_clip_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint 'B': same architecture as 'A', different weights."""
    import torch

    path = tmp_path_factory.mktemp("ckpt-b") / "tiny-b.pt"
    torch.save(other_clip_model.model.state_dict(), path)
    return path


# -- folders ------------------------------------------------------------------------------
@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    """A fresh index location for this test (not created yet)."""
    return tmp_path / "index"


@pytest.fixture
def scene_folder(tmp_path: Path) -> Path:
    """A folder of 12 distinct PNG scenes of various sizes."""
    folder = tmp_path / "photos"
    write_scenes(folder, 12)
    return folder


@pytest.fixture
def scenes() -> Callable[..., list[Path]]:
    return write_scenes


@pytest.fixture
def scene() -> Callable[..., Image.Image]:
    return make_scene


@pytest.fixture
def near_duplicates(tmp_path: Path) -> list[tuple[Path, Path]]:
    """Pairs (scene, the same scene resized to 60%)."""
    folder = tmp_path / "dups"
    folder.mkdir()
    pairs = []
    for i in range(4):
        img = make_scene(100 + i, (160, 120))
        a, b = folder / f"dup{i}.png", folder / f"dup{i}_small.png"
        img.save(a)
        img.resize((96, 72), Image.Resampling.LANCZOS).save(b)
        pairs.append((a, b))
    return pairs


@pytest.fixture
def format_files(tmp_path: Path) -> dict[str, Path]:
    """One scene saved in each base format, by Pillow format name."""
    folder = tmp_path / "formats"
    folder.mkdir()
    img = make_scene(7, (120, 80))
    out = {}
    for fmt, ext, kw in [
        ("JPEG", ".jpg", {"quality": 95}),
        ("PNG", ".png", {}),
        ("WEBP", ".webp", {"quality": 95}),
        ("GIF", ".gif", {}),
        ("BMP", ".bmp", {}),
        ("TIFF", ".tiff", {}),
    ]:
        p = folder / f"scene{ext}"
        img.save(p, fmt, **kw)
        out[fmt] = p
    return out


@pytest.fixture
def exif_rotated(tmp_path: Path) -> tuple[Path, Path]:
    """(JPEG stored sideways with EXIF orientation 6, the same picture stored upright)."""
    upright = quadrant_image(80, 48)
    # Orientation 6: the viewer turns the stored picture 90 degrees clockwise, so store it
    # turned 90 degrees counter-clockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_path, upright_path = tmp_path / "rotated.jpg", tmp_path / "upright.jpg"
    stored.save(rotated_path, "JPEG", quality=95, exif=exif.tobytes())
    upright.save(upright_path, "JPEG", quality=95)
    return rotated_path, upright_path


@pytest.fixture
def broken_files(tmp_path: Path) -> dict[str, Path]:
    """A zero-byte file, a truncated JPEG and a text file, all named .jpg."""
    folder = tmp_path / "broken"
    folder.mkdir()
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    data = jpeg_bytes(make_scene(3, (200, 150)), quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = folder / "notes.jpg"
    text.write_text("this is not a picture\n")
    return {"empty": empty, "truncated": truncated, "text": text}


def committed_rows(db: Path) -> int:
    """Rows in the catalog, read with plain sqlite3 (works while the catalog is being created)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def wait_for_rows(proc: subprocess.Popen, db: Path, rows: int, timeout: float) -> None:
    """Until the indexer `proc` has committed `rows` rows to the catalog `db`; the test fails if
    it exits or takes longer than `timeout` seconds first."""
    deadline = time.monotonic() + timeout
    while committed_rows(db) < rows:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"indexing did not get going: {proc.returncode} {proc.communicate()}")
        time.sleep(0.01)


@dataclass(frozen=True)
class ChangesRead:
    state: object
    removed: np.ndarray
    added: np.ndarray  # sorted
    vectors: np.ndarray

    @property
    def count(self) -> int:
        return len(self.removed) + len(self.added)


def changes_since(catalog, generation: int, model_id: int, dim: int) -> ChangesRead | None:  # type: ignore[no-untyped-def]
    """The catalog's change stream after `generation`, read whole in one snapshot, added ids in
    order (what an opener applies batch by batch); None when the log does not reach back that far."""
    with catalog.snapshot() as snap:
        stream = snap.change_stream(generation, model_id, dim)
        if stream is None:
            return None
        parts = list(stream.batches)
    added = np.concatenate([ids for ids, _ in parts]) if parts else np.empty(0, np.int64)
    vectors = np.concatenate([v for _, v in parts]) if parts else np.empty((0, dim), np.float32)
    order = np.argsort(added)
    return ChangesRead(stream.state, stream.removed, added[order], vectors[order])


def sqlite_plans(catalog, run: Callable[[], object], table: str) -> list[str]:  # type: ignore[no-untyped-def]
    """SQLite's query plan of every SELECT naming `table` that `run()` executes: SQLite's own
    trace (the statement with its values inlined) on every read connection made meanwhile (the
    catalog's reads all go through its driver pool, here one of traced connections)."""
    from retrieval.storage import catalog as catalog_module

    statements: list[str] = []

    def trace(statement: str) -> None:
        if statement.lstrip().upper().startswith("SELECT") and table in statement:
            statements.append(statement)

    def traced_connection() -> sqlite3.Connection:
        conn = catalog_module._sqlite_reader(catalog.path)()
        conn.set_trace_callback(trace)
        return conn

    untraced, catalog._reads = catalog._reads, catalog_module._DriverPool(traced_connection)
    try:
        run()
    finally:
        catalog._reads.close()
        catalog._reads = untraced
    with sqlite3.connect(catalog.path) as conn:
        return [
            " | ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + statement).fetchall())
            for statement in statements
        ]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_mtime(path: Path | str, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


# The query-power tests (query, filters, duplicates, zero-shot) share one index per module,
# built once per session by tests/test_query.py's shared_corpus.
@pytest.fixture(scope="module")
def corpus(tiny_clip_model, tmp_path_factory):
    from test_query import shared_corpus

    return shared_corpus(tiny_clip_model, tmp_path_factory)


@pytest.fixture(scope="module")
def idx(corpus, tiny_clip_model):
    from test_query import open_index

    index = open_index(corpus, tiny_clip_model)
    yield index
    index.close()


@pytest.fixture(scope="module")
def local(served, tiny_clip_model):
    """The index a server test module serves (its `served` fixture), opened in-process with the
    session's model: what the server's answers are compared with."""
    from retrieval.index import ImageIndex

    index = ImageIndex.open(served, device="cpu")
    index.use_model(tiny_clip_model)
    yield index
    index.close()


# -- PostgreSQL ---------------------------------------------------------------------------
# scripts/test.sh starts a throwaway server on loopback (scripts/postgres.sh) and exports its URL
# as CLIPDEX_TEST_POSTGRES. Each test that asks gets a schema of its own in that database,
# selected by the URL itself (libpq's `options`), so subprocesses given the URL use it too.
POSTGRES_ENV = "CLIPDEX_TEST_POSTGRES"
CATALOG_ENV = "CLIPDEX_CATALOG"  # retrieval.storage.catalog_location: where a new index keeps its catalog
# Sessions opened through a test's URL carry this name (plus the schema) in pg_stat_activity:
# how the teardown finds the ones a test left open.
POSTGRES_APP_PREFIX = "clipdex-test-"


@pytest.fixture(scope="session", autouse=True)
def _no_catalog_url_from_outside():
    """A CLIPDEX_CATALOG in the developer's shell must never reach the tests (they would write
    into that catalog): only `catalog_backend` sets it."""
    mp = pytest.MonkeyPatch()
    mp.delenv(CATALOG_ENV, raising=False)
    yield
    mp.undo()


def postgres_base_url() -> str:
    """The test server's URL (postgresql+psycopg://...), or a skip saying how to get one."""
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if not url:
        pytest.skip(
            f"no PostgreSQL server: {POSTGRES_ENV} is unset (scripts/test.sh starts a throwaway one "
            f"and sets it; or set it to a postgresql+psycopg:// URL of a database you can drop schemas in)"
        )
    return url


def postgres_connect(url: str):  # -> psycopg.Connection
    """A direct autocommit psycopg connection for a SQLAlchemy-form URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(conninfo, autocommit=True, connect_timeout=10)


def schema_url(base_url: str, schema: str) -> str:
    """`base_url` with its sessions in `schema` (search_path) and named for the teardown."""
    joiner = "&" if "?" in base_url else "?"
    name = POSTGRES_APP_PREFIX + schema
    return f"{base_url}{joiner}options=-csearch_path%3D{schema}&application_name={name}"


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A fresh empty schema `t_<16 hex>` in `base_url`'s database for the duration; yields its URL."""
    from psycopg import sql

    schema = f"t_{secrets.token_hex(8)}"
    with postgres_connect(base_url) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema_url(base_url, schema)
    finally:
        drop_postgres_schema(base_url, schema)


def drop_postgres_schema(base_url: str, schema: str) -> None:
    """DROP SCHEMA ... CASCADE, after ending the sessions a test left open in it (an engine never
    disposed, a killed subprocess's backend): one idle in a transaction holds locks the drop
    would wait for forever."""
    import psycopg
    from psycopg import sql

    with postgres_connect(base_url) as admin:
        # Recognised by name (the URL's application_name), or by the locks they hold on the
        # schema or on a relation in it (a session that named itself otherwise, as the catalog's
        # writer lock does).
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM ("
            " SELECT pid FROM pg_stat_activity WHERE application_name = %(app)s"
            " UNION SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %(schema)s AND l.database = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
            " UNION SELECT l.pid FROM pg_locks l JOIN pg_namespace n ON n.oid = l.objid"
            " WHERE l.classid = 'pg_namespace'::regclass AND n.nspname = %(schema)s"
            ") held WHERE pid <> pg_backend_pid()",
            {"app": POSTGRES_APP_PREFIX + schema, "schema": schema},
        )
        # Terminated backends release their locks as they exit, within moments; one that took a
        # lock after the query above would hold it until the timeout.
        admin.execute("SET lock_timeout = '10s'")
        try:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        except psycopg.errors.LockNotAvailable:
            warnings.warn(
                f"PostgreSQL schema {schema} left behind: a session still holds locks in it", stacklevel=2
            )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh, empty schema of its own on the test server (dropped after
    the test); skips without a server (see postgres_base_url)."""
    pytest.importorskip("psycopg")
    with postgres_schema(postgres_base_url()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def catalog_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test once per catalog backend: a new index's catalog is SQLite in its folder, or
    PostgreSQL in a fresh schema (CLIPDEX_CATALOG, inherited by subprocesses: the CLI too)."""
    if request.param == "postgresql":
        # Asked for here, not as a parameter: the sqlite runs never need a server.
        monkeypatch.setenv(CATALOG_ENV, request.getfixturevalue("postgres_url"))
    else:
        monkeypatch.delenv(CATALOG_ENV, raising=False)
    yield request.param
