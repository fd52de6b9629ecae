"""`import_embeddings`: build or extend an index from image embeddings computed elsewhere.

The input is clip-retrieval's output layout (its `clip_inference` writer): `img_emb/img_emb_N.npy`
(one row per image, float16 from clip-retrieval, any float dtype accepted) paired by its number N
with `metadata/metadata_N.parquet`, whose rows are the same images in the same order, with
`image_path` (a file path, or the sample key of a webdataset) and, when metadata was enabled, the
sample's own fields such as `url`, `caption`, `width`, `height`, `original_width`,
`original_height` and `sha256` (img2dataset's). `text_emb/` is not read.

What an imported row holds (the catalog has no NULLs for these columns):
- path: the sample's `url` when that column has a value, else its `image_path` (`--path-column`
  chooses); a relative file path is made absolute against the current folder. This is the key:
  a path the index already holds is skipped, so importing the same set again (or resuming an
  interrupted import) adds nothing twice.
- size and mtime: those of the local file when the path is an existing file (the embeddings are
  taken to describe it as it is now: `clipdex index` on its folder then finds it unchanged and
  does not embed it again); 0 for a URL or a path that does not exist here.
- content_hash: the `sha256` column when it holds a sha256 hex digest, else '' (unknown: never
  equal to a real file's hash, so no move or same-content shortcut is ever taken on it).
- width and height: `original_width`/`original_height`, else `width`/`height`, else 0 (unknown:
  a --min-width filter leaves such images out).
- format: from the file extension (jpg -> JPEG, ...), else unknown (no --type filter keeps it).
- taken_at: the optional `taken_at` column (unix seconds), else unknown (date filters then use
  the mtime: 0 for a URL). Captions are not stored.

Vectors are checked: the model's dimension (else the whole shard is skipped), finite and
non-zero (else the row is skipped), then normalised. One shard that cannot be read, has the
wrong shape or a row count that differs from its parquet is reported and skipped: the run goes
on. Each batch is one transaction through IndexWriter (rows and vectors together).
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.core.locations import is_url
from retrieval.embedding.image_models import IMAGE_MODEL_TYPES, ImageModel, load_image_model
from retrieval.embedding.spec import ModelSignature, ModelSpec, check_spec_matches
from retrieval.embedding.text_embedder import save_text_tower
from retrieval.storage.catalog import Catalog, open_catalog
from retrieval.storage.records import NewImage
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.writer import IndexWriter

from .sync import _make_index_dir

PATH_COLUMNS = ("auto", "image_path", "url")
_SHARD_NAME = re.compile(r"^img_emb_(\d+)\.npy$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXT_FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "jpe": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "heic": "HEIF",
    "heif": "HEIF",
}
# Rows rejected for their own reasons are counted; this many examples are kept for the report.
_EXAMPLES = 10


class ImportSourceError(ClipdexError):
    """The embeddings folder cannot be imported at all (not a shard in it, pyarrow missing)."""


@dataclass(frozen=True)
class Shard:
    number: int
    embeddings: Path
    metadata: Path


@dataclass(frozen=True)
class ImportOptions:
    # Rows per transaction. Each commit rewrites the leaves its rows land in across the path and
    # date indexes (every leaf, for keys spread like URLs): a 1M import wrote 13.0 GB in 83 s with
    # 10k rows a commit, 8.1 GB in 77 s with 50k (bench/scale.py's 1M set, no ANN build).
    batch_size: int = 50_000
    path_column: str = "auto"  # auto: url when the row has one, else image_path
    optimize: bool = True  # build the ANN index after a large import
    catalog: str | None = None  # a PostgreSQL catalog for a new index (storage.catalog_location)


@dataclass
class ImportSummary:
    shards: int = 0
    rows: int = 0  # rows read from the shards that could be read
    added: int = 0
    already: int = 0  # paths the index held already (a repeated or resumed import), or twice in the set
    rejected: int = 0  # rows without a path, or with a vector that is not finite or is zero
    rejected_examples: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    bad_shards: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): skipped
    interrupted: bool = False
    seconds: float = 0.0
    model: str = ""
    optimized: dict | None = None  # what the ANN optimisation reported, if it ran


Progress = Callable[[int, int], None]  # (rows handled, rows in all readable shards)


class _BadShard(Exception):
    """This shard is skipped, for the reason given."""


def find_shards(folder: Path) -> tuple[list[Shard], list[tuple[str, str]]]:
    """The shards of a clip-retrieval output folder, by number, and the embedding files that have
    no metadata to pair with (reported, skipped)."""
    emb_dir, meta_dir = folder / "img_emb", folder / "metadata"
    if not emb_dir.is_dir():
        raise ImportSourceError(
            f"{folder} is not a clip-retrieval output folder: it has no img_emb/ (expected "
            "img_emb/img_emb_N.npy and metadata/metadata_N.parquet)"
        )
    metadata = {}
    if meta_dir.is_dir():
        for p in meta_dir.glob("metadata_*.parquet"):
            number = p.name[len("metadata_") : -len(".parquet")]
            if number.isdigit():
                metadata[int(number)] = p
    shards, orphans = [], []
    for p in sorted(emb_dir.glob("img_emb_*.npy")):
        match = _SHARD_NAME.match(p.name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in metadata:
            shards.append(Shard(number, p, metadata[number]))
        else:
            orphans.append((str(p), f"no metadata/metadata_{match.group(1)}.parquet to pair it with"))
    shards.sort(key=lambda s: s.number)
    return shards, orphans


def import_embeddings(
    folder: str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None,
    model: ModelSpec | ImageModel,
    options: ImportOptions | None = None,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ImportSummary:
    """Add the embeddings under `folder` (clip-retrieval's layout) to the index at `index_dir`,
    made by `model` (its signature is recorded, so text queries work; an index of another model
    is refused). `stop` ends the run after the batch in flight has been committed."""
    opts = options or ImportOptions()
    if opts.path_column not in PATH_COLUMNS:
        choices = ", ".join(PATH_COLUMNS)
        raise ClipdexError(f"--path-column must be one of {choices}, not {opts.path_column!r}")
    started = time.monotonic()
    source = Path(folder).expanduser()
    shards, orphans = find_shards(source)
    if not shards and not orphans:
        raise ImportSourceError(f"no img_emb/img_emb_N.npy files in {source}")
    _require_pyarrow()
    spec = model.spec if isinstance(model, IMAGE_MODEL_TYPES) else model
    summary = ImportSummary(shards=len(shards), model=f"{spec.arch_name()} / {spec.pretrained}")
    summary.bad_shards.extend(orphans)
    directory = _make_index_dir(index_dir)
    catalog = open_catalog(directory, create=True, url=opts.catalog)
    try:
        raw = catalog.model_signature()
        recorded = None if raw is None else ModelSignature.from_dict(raw)
        if recorded is not None:  # cheap: before any model is loaded
            check_spec_matches(recorded, spec, f"index {directory}")
        if catalog.pending_model() is not None:
            # Finishing it drops every image the new model has no vector for: these included.
            raise ClipdexError(
                f"index {directory} has an unfinished 'clipdex index --reindex': finish it before importing"
            )
        # The model is loaded for its signature (dimension, preprocessing, temperature) and its
        # text tower: text queries against the imported vectors need both.
        clip = model if isinstance(model, IMAGE_MODEL_TYPES) else load_image_model(spec)
        with IndexWriter(VectorStore(directory, catalog), defer_saves=True) as writer:
            if recorded is not None:
                recorded.check_compatible(clip.signature, f"index {directory}")
            writer.bind_signature(clip.signature.to_dict())
            writer.reconcile()
            dim = clip.signature.dim
            known = _KnownPaths(catalog, check_catalog=catalog.count() > 0)
            _import_shards(shards, dim, opts, writer, known, summary, progress, stop)
            if opts.optimize and summary.added and not summary.interrupted:
                summary.optimized = _optimize(writer)
        if not summary.interrupted:
            save_text_tower(directory, clip)  # once per index: fast cold text queries
    finally:
        catalog.close()
    summary.seconds = time.monotonic() - started
    return summary


def _optimize(writer: IndexWriter) -> dict | None:
    """After a large import, build the vector index the storage rules choose for this size
    (retrieval.storage.optimize), still holding the writer lock; its report (plan, nprobe,
    measured recall@10), or None when nothing needed building."""
    from retrieval.storage.optimize import optimize_if_needed

    report = optimize_if_needed(writer)
    return None if report is None else report.to_dict()


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportSourceError(
            "reading clip-retrieval's metadata needs pyarrow: pip install 'clipdex[parquet]'"
        ) from None


class _KnownPaths:
    """Which paths are taken: by the index (asked per batch, only when it held rows at the start)
    and by this run (a set: a path twice in the set is imported once)."""

    def __init__(self, catalog: Catalog, check_catalog: bool):
        self.catalog = catalog
        self.check_catalog = check_catalog
        self.seen: set[str] = set()

    def new_ones(self, paths: Sequence[str]) -> list[bool]:
        in_index = self.catalog.known_paths(paths) if self.check_catalog else set()
        out = []
        for p in paths:
            fresh = p not in in_index and p not in self.seen
            self.seen.add(p)
            out.append(fresh)
        return out


def _import_shards(
    shards: Sequence[Shard],
    dim: int,
    opts: ImportOptions,
    writer: IndexWriter,
    known: _KnownPaths,
    summary: ImportSummary,
    progress: Progress | None,
    stop: threading.Event | None,
) -> None:
    opened = []
    for shard in shards:
        try:
            opened.append((shard, _open_embeddings(shard.embeddings, dim)))
        except _BadShard as exc:
            summary.bad_shards.append((str(shard.embeddings), str(exc)))
    total = sum(len(emb) for _, emb in opened)
    done = 0
    for shard, emb in opened:
        try:
            meta = _read_metadata(shard.metadata, len(emb), opts.path_column)
        except _BadShard as exc:
            summary.bad_shards.append((str(shard.metadata), str(exc)))
            total -= len(emb)
            continue
        summary.rows += len(emb)
        for start in range(0, len(emb), opts.batch_size):
            end = min(start + opts.batch_size, len(emb))
            try:
                added = _batch(shard, emb, meta, start, end, dim, known, summary)
            except (OSError, ValueError) as exc:  # a truncated .npy shows only when its rows are read
                summary.bad_shards.append((str(shard.embeddings), f"unreadable from row {start}: {exc}"))
                break
            writer.commit(added=added)  # a failure here is the index's, not the shard's: raised
            summary.added += len(added)
            done += end - start
            if progress:
                progress(done, total)
            if stop is not None and stop.is_set():
                summary.interrupted = True
                return


def _open_embeddings(path: Path, dim: int) -> np.ndarray:
    """The shard's matrix, memory-mapped (read a batch at a time), after checking its shape."""
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _BadShard(f"unreadable: {exc}") from None
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise _BadShard(f"shape {emb.shape}: the model makes {dim}-dimensional vectors")
    if emb.dtype.kind != "f":
        raise _BadShard(f"dtype {emb.dtype}: expected floating-point embeddings")
    return emb


@dataclass
class _Metadata:
    paths: list[str | None]
    facts: dict[str, list[Any]]  # optional columns present in the file


_OPTIONAL = ("original_width", "original_height", "width", "height", "sha256", "taken_at")


def _read_metadata(path: Path, rows: int, path_column: str) -> _Metadata:
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
        wanted = [c for c in ("image_path", "url") if c in names and path_column in ("auto", c)]
        if not wanted:
            need = "image_path or url" if path_column == "auto" else path_column
            raise _BadShard(f"no {need} column (has {', '.join(sorted(names)) or 'none'})")
        table = pq.read_table(path, columns=wanted + [c for c in _OPTIONAL if c in names])
    except _BadShard:
        raise
    except Exception as exc:  # pyarrow raises its own errors (ArrowInvalid, OSError) for a bad file
        raise _BadShard(f"unreadable: {exc}") from None
    if table.num_rows != rows:
        raise _BadShard(f"{table.num_rows} metadata rows for {rows} embeddings")
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    urls = columns.pop("url", None)
    image_paths = columns.pop("image_path", None)
    if urls is not None and image_paths is not None:
        paths = [u if u else p for u, p in zip(urls, image_paths)]
    else:
        paths = urls if urls is not None else image_paths  # type: ignore[assignment]
    return _Metadata(paths, columns)


def _batch(
    shard: Shard,
    emb: np.ndarray,
    meta: _Metadata,
    start: int,
    end: int,
    dim: int,
    known: _KnownPaths,
    summary: ImportSummary,
) -> list[NewImage]:
    """Rows start..end of a shard as NewImages: checked, normalised, new to the index."""
    vectors = np.asarray(emb[start:end], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    paths: list[str | None] = [_catalog_path(p) for p in meta.paths[start:end]]
    rows = []
    for i, path in enumerate(paths):
        if path is None:
            _reject(summary, f"{shard.metadata}:{start + i}", "no path")
        elif not usable[i]:
            _reject(summary, path, "vector is zero or not finite")
        else:
            rows.append(i)
    fresh = known.new_ones([paths[i] for i in rows])  # type: ignore[misc]
    summary.already += fresh.count(False)
    rows = [i for i, f in zip(rows, fresh) if f]
    if not rows:
        return []
    unit = vectors[rows] / norms[rows, None]
    return [_new_image(paths[i], meta, start + i, unit[j]) for j, i in enumerate(rows)]  # type: ignore[arg-type]


def _reject(summary: ImportSummary, where: str, reason: str) -> None:
    summary.rejected += 1
    if len(summary.rejected_examples) < _EXAMPLES:
        summary.rejected_examples.append((where, reason))


def _catalog_path(raw: object) -> str | None:
    """The catalog path of a metadata value: a URL as it is, a file path made absolute."""
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    if is_url(text):
        return text
    return os.path.abspath(os.path.expanduser(text))


def _new_image(path: str, meta: _Metadata, row: int, vector: np.ndarray) -> NewImage:
    size, mtime_ns = _file_facts(path)
    facts = meta.facts
    width = _int(facts, "original_width", row) or _int(facts, "width", row)
    height = _int(facts, "original_height", row) or _int(facts, "height", row)
    digest = facts["sha256"][row] if "sha256" in facts else None
    content_hash = digest.lower() if isinstance(digest, str) and _SHA256.match(digest.lower()) else ""
    taken = facts["taken_at"][row] if "taken_at" in facts else None
    taken_at = float(taken) if isinstance(taken, (int, float)) and np.isfinite(taken) else None
    return NewImage(path, size, mtime_ns, content_hash, width, height, _format_of(path), taken_at, vector)


def _file_facts(path: str) -> tuple[int, int]:
    if is_url(path):
        return 0, 0
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return 0, 0
    return (int(st.st_size), int(st.st_mtime_ns)) if stat.S_ISREG(st.st_mode) else (0, 0)


def _int(facts: dict[str, list[Any]], name: str, row: int) -> int:
    value = facts[name][row] if name in facts else None
    try:
        return max(0, int(value)) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _format_of(path: str) -> str | None:
    name = path.split("?", 1)[0].split("#", 1)[0] if is_url(path) else path
    ext = name.rsplit(".", 1)[-1].lower() if "." in os.path.basename(name) else ""
    return _EXT_FORMATS.get(ext)
