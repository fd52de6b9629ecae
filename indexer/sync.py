"""`index_folders`: scan, plan, decode, embed and commit; returns what happened."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.catalog import Failure, Move, NewImage
from retrieval.errors import ClipdexError
from retrieval.model import ClipModel, ModelSpec
from retrieval.store import ImageIndex, resolve_model_spec
from retrieval.text_encoder import export_onnx_text

from .decode import Decoded, DecodeOptions, Failed, SameContent, decode_job
from .pipeline import DecodePool
from .plan import EmbedJob, make_plan
from .scan import normalize_roots, scan, under_roots


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    interrupted: bool = False
    seconds: float = 0.0
    embedded: int = 0
    model_seconds: float = 0.0  # time inside the model (the caller's thread)
    decode_seconds: float = 0.0  # reading, decoding and preprocessing, summed over worker threads
    embed_seconds: float = 0.0  # wall time of the embedding pipeline (no start-up, no model load)

    @property
    def images_per_second(self) -> float:
        """Throughput of the embedding pipeline (start-up and model loading excluded)."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


@dataclass(frozen=True)
class IndexOptions:
    batch_size: int = 32
    decode_workers: int = 0  # 0: chosen for the machine
    decode_timeout: float = 60.0
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    reindex: bool = False
    checkpoint_seconds: float = 60.0


Progress = Callable[[int, int], None]  # (files processed, files to process)


def default_decode_workers() -> int:
    # The model takes every core it is given; one or two decoders keep it fed (see README).
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def index_folders(
    roots: Iterable[str | os.PathLike[str]],
    index_dir: str | os.PathLike[str] | None = None,
    model: ModelSpec | ClipModel | None = None,
    options: IndexOptions | None = None,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> IndexSummary:
    """Bring the index at `index_dir` in line with the image files under `roots`.

    Incremental: unchanged files are skipped, moved files keep their vectors, deleted files
    leave the index. `stop` ends the run after the batch in flight has been committed.
    """
    opts = options or IndexOptions()
    started = time.monotonic()
    root_list = normalize_roots(roots)
    # No model named: the index's own (or the default for a new index), as on the command line.
    spec = model.spec if isinstance(model, ClipModel) else (model or resolve_model_spec(index_dir))
    index = ImageIndex.create(index_dir, spec) if not opts.reindex else _open_for_reindex(index_dir, spec)
    summary = IndexSummary()
    try:
        with index.writer() as writer:
            writer.checkpoint_seconds = opts.checkpoint_seconds
            # The model costs seconds to load: a run with nothing to embed never loads it.
            clip = model if isinstance(model, ClipModel) else None
            if clip is None and (index.signature is None or opts.reindex):
                clip = ClipModel(spec)
            if clip is not None:
                if (
                    opts.reindex
                    and index.signature is not None
                    and not index.signature.matches(clip.signature)
                ):
                    _forget_everything(index, root_list)
                writer.bind_model(clip)
            writer.reconcile()
            existing = {r.path: r for r in index.catalog.records().values() if under_roots(r.path, root_list)}
            failures = {p: f for p, f in index.catalog.failures().items() if under_roots(p, root_list)}
            plan = make_plan(scan(root_list), existing, failures=failures, reindex=opts.reindex)
            summary.unchanged = plan.unchanged
            summary.failed.extend((p.path, p.reason) for p in plan.problems)
            summary.failed.extend((f.path, f.reason) for f in plan.known_failures)
            if plan.moves or plan.removed or plan.forget_failures:
                writer.commit(moved=plan.moves, removed=plan.removed, forget_failures=plan.forget_failures)
            summary.moved, summary.removed = len(plan.moves), len(plan.removed)
            if plan.jobs:
                if clip is None:
                    clip = ClipModel(spec)
                    writer.bind_model(clip)
                clip.warm_up()
                t0 = time.monotonic()
                _embed(writer, clip, plan.jobs, opts, summary, progress, stop)
                summary.embed_seconds = time.monotonic() - t0
            if clip is not None and not summary.interrupted:
                export_onnx_text(index.directory, clip)  # once per index: fast cold text queries
    finally:
        index.close()
    summary.seconds = time.monotonic() - started
    return summary


def _embed(
    writer,  # type: ignore[no-untyped-def]
    clip: ClipModel,
    jobs: Sequence[EmbedJob],
    opts: IndexOptions,
    summary: IndexSummary,
    progress: Progress | None,
    stop: threading.Event | None,
) -> None:
    import torch

    total = len(jobs)
    done = 0
    batch: list[Decoded] = []
    touched: list[Move] = []
    stale: list[int] = []  # rows of changed files that can no longer be read
    failed: list[Failure] = []

    def flush() -> None:
        nonlocal done
        if not (batch or touched or stale or failed):
            return
        added: list[NewImage] = []
        replaced: list[int] = list(stale)
        if batch:
            t0 = time.perf_counter()
            vectors = clip.encode_images(torch.stack([d.pixels for d in batch]))
            summary.model_seconds += time.perf_counter() - t0
            for d, vec in zip(batch, vectors):
                added.append(
                    NewImage(
                        d.job.info.path,
                        d.size,
                        d.mtime_ns,
                        d.content_hash,
                        d.width,
                        d.height,
                        d.format,
                        d.taken_at,
                        vec,
                    )
                )
                if d.job.previous is not None:
                    replaced.append(d.job.previous.id)
        writer.commit(added=added, removed=replaced, touched=touched, failed=failed)
        summary.embedded += len(added)
        summary.updated += sum(1 for d in batch if d.job.previous is not None)
        summary.added += sum(1 for d in batch if d.job.previous is None)
        summary.unchanged += len(touched)
        summary.removed += len(stale)
        done += len(batch) + len(touched) + len(stale)
        batch.clear()
        touched.clear()
        stale.clear()
        failed.clear()

    workers = opts.decode_workers or default_decode_workers()
    decode_time = [0.0]

    def timed_decode(job: EmbedJob) -> Decoded | SameContent | Failed:
        t0 = time.perf_counter()
        try:
            return decode_job(job, clip.preprocess, opts.decode)
        finally:
            decode_time[0] += time.perf_counter() - t0  # float += under the GIL: good enough

    pool: DecodePool[EmbedJob, Decoded | SameContent | Failed] = DecodePool(
        timed_decode,
        lambda job, secs: Failed(
            job.info.path, f"decoding took over {opts.decode_timeout:g} s; skipped", job
        ),
        workers=workers,
        max_pending=max(8, 2 * opts.batch_size),
        timeout=opts.decode_timeout,
    )
    failed_since_progress = 0
    for result in pool.run(jobs):
        if isinstance(result, Decoded):
            batch.append(result)
        elif isinstance(result, SameContent):
            touched.append(Move(result.job.previous.id, result.job.info.path, result.size, result.mtime_ns))
        else:
            summary.failed.append((result.path, result.reason))
            failed_since_progress += 1
            if result.permanent and result.size is not None and result.mtime_ns is not None:
                failed.append(Failure(result.path, result.size, result.mtime_ns, result.reason))
            if result.job is not None and result.job.previous is not None:
                stale.append(result.job.previous.id)
        if len(batch) >= opts.batch_size:
            flush()
            if progress:
                progress(done + failed_since_progress, total)
            if stop is not None and stop.is_set():
                summary.interrupted = True
                summary.decode_seconds = decode_time[0]
                return
    flush()
    summary.decode_seconds = decode_time[0]
    if progress:
        progress(total, total)


def _open_for_reindex(index_dir, spec: ModelSpec) -> ImageIndex:  # type: ignore[no-untyped-def]
    """Open without the model check: --reindex may switch models on purpose."""
    from retrieval.locations import resolve_index_dir

    directory = resolve_index_dir(index_dir)
    if (Path(directory) / "catalog.sqlite").exists():
        return ImageIndex.open(directory, device=spec.device, precision=spec.precision)
    return ImageIndex.create(directory, spec)


def _forget_everything(index: ImageIndex, roots: list[str]) -> None:
    """A reindex with another model: vectors of the old model cannot be mixed with the new, so
    every row goes; refused unless `roots` cover all of them (nothing is dropped unasked)."""
    outside = [r.path for r in index.catalog.records().values() if not under_roots(r.path, roots)]
    if outside:
        raise ClipdexError(
            f"switching models re-embeds the whole index, which also holds {len(outside)} images outside "
            f"the folders given (e.g. {outside[0]}): pass every indexed folder, or use a new --index"
        )
    index.catalog.commit_changes(removed=index.catalog.ids().tolist())
    index.catalog.clear_model_signature()
    index.signature = None
    index._vectors = None
