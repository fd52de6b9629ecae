"""`index_folders`: scan, plan, decode, embed and commit; returns what happened."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.core.errors import ClipdexError, IndexWriteError
from retrieval.core.locations import resolve_index_dir
from retrieval.embedding.image_models import IMAGE_MODEL_TYPES, ImageModel, load_image_model
from retrieval.embedding.spec import ModelSignature, ModelSpec, check_spec_matches
from retrieval.embedding.text_embedder import remove_text_tower, save_text_tower
from retrieval.storage.catalog import open_catalog
from retrieval.storage.records import FailureRecord, Move, NewImage
from retrieval.storage.vector_store import VectorStore
from retrieval.storage.writer import IndexWriter

from .decode import DecodeFailure, DecodeOptions, SameContent, model_input_size
from .ignore import remember_excludes
from .model_choice import resolve_model_spec
from .plan import EmbedJob, Plan, make_plan
from .scan import normalize_roots, scan, under_roots
from .stages import Embedded, LocalRunner, Runner, StageSettings, StageTimes


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # (folder, reason): could not be read this time; its indexed images were kept as they are
    skipped: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    embedded: int = 0
    model_seconds: float = 0.0  # time inside the model (the caller's thread)
    decode_seconds: float = 0.0  # reading, decoding and preprocessing, summed over worker threads
    embed_seconds: float = 0.0  # wall time of the embedding pipeline (no start-up, no model load)
    # --reindex left unfinished (some files could not be read): searches still use the old vectors
    reindex_pending: bool = False
    model: str = ""  # the weights used: "ARCH / PRETRAINED", e.g. "ViT-B-16 / openai"

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
    save_after_changes: int | None = None  # FAISS file rewrite rule: None the store's (IndexWriter)
    # --exclude: replaces the patterns remembered for these roots ('' entries dropped, so [''] clears
    # them); None uses the remembered ones.
    excludes: tuple[str, ...] | None = None
    catalog: str | None = None  # a PostgreSQL catalog for a new index (storage.catalog_location)
    # A commit when this many files wait (embedded, moved, failed), or this many seconds after
    # the last: each commit rewrites the part-filled last page of every B-tree it appends to
    # (~17 pages of 32 KB), so a commit per model batch of 32 wrote 21 KB a photo where its rows
    # and vector take 2.5 KB (README). A killed run loses what waits: re-embedded next time.
    commit_every: int = 512
    commit_seconds: float = 10.0


CHECK_SECONDS = 2.0  # at most this long between progress reports and stop checks
Progress = Callable[[int, int], None]  # (files processed, files to process)


def default_decode_workers() -> int:
    """One decoder per core (up to 8): while the model waits for a batch every core decodes, and
    while it runs the decoders soon block on the bounded queue, so a model-bound run loses
    nothing. One decoder left a core idle on camera photos (~120% CPU of 200%; README)."""
    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may use, as the model counts them
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(8, cores))


def index_folders(
    roots: Iterable[str | os.PathLike[str]],
    index_dir: str | os.PathLike[str] | None = None,
    model: ModelSpec | ImageModel | None = None,
    options: IndexOptions | None = None,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    runner: Runner | None = None,
) -> IndexSummary:
    """Bring the index at `index_dir` in line with the image files under `roots`.

    Incremental: unchanged files are skipped, moved files keep their vectors, deleted files
    leave the index. `stop` ends the run after the batch in flight has been committed (with
    those waiting for their commit: IndexOptions.commit_every).
    `runner` decodes and embeds (indexer.stages): this process's threads by default,
    indexer.ray_runner.RayRunner for a Ray cluster; the commits are this function's either way.
    """
    opts = options or IndexOptions()
    started = time.monotonic()
    root_list = normalize_roots(roots)
    # No model named: the index's own (or the default for a new index), as on the command line.
    if isinstance(model, IMAGE_MODEL_TYPES):
        spec = model.spec
    else:
        spec = model or resolve_model_spec(index_dir, catalog=opts.catalog)
    directory = _make_index_dir(index_dir)
    catalog = open_catalog(directory, create=True, url=opts.catalog)
    summary = IndexSummary(model=f"{spec.arch_name()} / {spec.pretrained}")
    try:
        raw = catalog.model_signature()
        recorded = None if raw is None else ModelSignature.from_dict(raw)
        if recorded is not None and not opts.reindex:  # cheap: before any model is loaded
            check_spec_matches(recorded, spec, f"index {directory}")
        with IndexWriter(VectorStore(directory, catalog), opts.save_after_changes) as writer:
            # The model costs seconds to load: a run with nothing to embed never loads it.
            clip = model if isinstance(model, IMAGE_MODEL_TYPES) else None
            if clip is None and (recorded is None or opts.reindex):
                clip = load_image_model(spec)  # torch-free when the model's exports are cached
            if clip is not None:
                if opts.reindex:
                    _begin_reindex(writer, recorded, clip, root_list)
                else:
                    _bind(writer, recorded, clip)
            writer.reconcile()
            existing = {r.path: r for r in catalog.records().values() if under_roots(r.path, root_list)}
            failures = {p: f for p, f in catalog.failures().items() if under_roots(p, root_list)}
            ignore = remember_excludes(catalog, root_list, opts.excludes)  # stored under the lock
            scanned = scan(root_list, ignore=ignore)
            plan = make_plan(scanned, existing, failures=failures, reindex=opts.reindex)
            if writer.reindexing:
                _skip_reindexed(plan, writer.reindexed_ids())
            summary.unchanged = plan.unchanged
            summary.failed.extend((p.path, p.reason) for p in plan.problems)
            summary.skipped.extend((s.path, s.reason) for s in plan.skipped)
            summary.failed.extend((f.path, f.reason) for f in plan.known_failures)
            if plan.moves or plan.removed or plan.forget_failures:
                writer.commit(moved=plan.moves, removed=plan.removed, forget_failures=plan.forget_failures)
            summary.moved, summary.removed = len(plan.moves), len(plan.removed)
            if plan.jobs:
                if clip is None:
                    clip = load_image_model(spec)
                    _bind(writer, recorded, clip)
                clip.warm_up()
                t0 = time.monotonic()
                _embed(writer, clip, plan.jobs, opts, summary, progress, stop, runner or LocalRunner())
                summary.embed_seconds = time.monotonic() - t0
            if writer.reindexing and not summary.interrupted:
                replaced = writer.finish_reindex()
                summary.reindex_pending = replaced is None
                if replaced is not None and clip is not None:
                    _drop_derived_files(directory, ModelSignature.from_dict(replaced), clip.signature)
            if clip is not None and not summary.interrupted and not writer.reindexing:
                save_text_tower(directory, clip)  # once per index: fast cold text queries
    finally:
        catalog.close()
    summary.seconds = time.monotonic() - started
    return summary


def _make_index_dir(index_dir: str | os.PathLike[str] | None) -> Path:
    directory = resolve_index_dir(index_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IndexWriteError(f"cannot create index folder {directory}: {exc.strerror or exc}") from None
    return directory


def _bind(writer: IndexWriter, recorded: ModelSignature | None, clip: ImageModel) -> None:
    """Index with `clip`: recorded by an empty index, refused by one built with another model."""
    if recorded is not None:
        recorded.check_compatible(clip.signature, f"index {writer.store.directory}")
    writer.bind_signature(clip.signature.to_dict())


def _same_model(a: dict, b: dict) -> bool:
    return ModelSignature.from_dict(a).matches(ModelSignature.from_dict(b))


def _drop_derived_files(directory: Path, old: ModelSignature, new: ModelSignature) -> None:
    """After a reindex swapped models: the old model's exported text tower is of no use."""
    if old.key() != new.key():
        remove_text_tower(directory, old)


def _embed(
    writer: IndexWriter,
    clip: ImageModel,
    jobs: Sequence[EmbedJob],
    opts: IndexOptions,
    summary: IndexSummary,
    progress: Progress | None,
    stop: threading.Event | None,
    runner: Runner,
) -> None:
    """The commit stage, the single writer: what `runner` makes of `jobs` (decode, embed) is
    committed here, in the driver, as it comes."""
    total = len(jobs)
    handled = 0  # files back from the runner, of every kind: the one counter progress shows
    touched: list[Move] = []
    stale: list[int] = []  # rows of changed files that can no longer be read
    failed: list[FailureRecord] = []
    embedded: list[Embedded] = []  # whole model batches, not committed yet
    # Progress and the stop check come with every model batch, and every batch_size other files
    # (or every CHECK_SECONDS): a run of touched files or of failures embeds nothing, and must
    # still keep its work as it goes and answer Ctrl-C. Commits when opts.commit_every or
    # opts.commit_seconds says, and before a stop.
    since_check, last_check = 0, time.monotonic()
    last_commit = last_check
    committing = False

    def waiting() -> int:
        return len(embedded) + len(touched) + len(stale) + len(failed)

    def commit() -> None:
        """Commit the embedded batches and the other files' outcomes that wait."""
        nonlocal last_commit, committing
        committing = True
        if waiting():
            added: list[NewImage] = []
            replaced: list[int] = list(stale)
            revectored: list[tuple[int, np.ndarray]] = []
            for d in embedded:
                if _reembeds_same_file(d.job) and d.image.content_hash == d.job.previous.content_hash:
                    revectored.append((d.job.previous.id, d.image.vector))  # keeps its row, id and tags
                    continue
                added.append(d.image)
                if d.job.previous is not None:
                    replaced.append(d.job.previous.id)
            writer.commit(
                added=added, removed=replaced, touched=touched, failed=failed, revectored=revectored
            )
            summary.embedded += len(added) + len(revectored)
            summary.updated += sum(1 for d in embedded if d.job.previous is not None)
            summary.added += sum(1 for d in embedded if d.job.previous is None)
            summary.unchanged += len(touched)
            summary.removed += len(stale)
            embedded.clear()
            touched.clear()
            stale.clear()
            failed.clear()
        last_commit, committing = time.monotonic(), False

    def note(result: SameContent | DecodeFailure) -> None:
        """A file that reached no model: pending until the next commit."""
        if isinstance(result, SameContent):
            touched.append(Move(result.job.previous.id, result.job.info.path, result.size, result.mtime_ns))
            return
        summary.failed.append((result.path, result.reason))
        if result.permanent and result.size is not None and result.mtime_ns is not None:
            failed.append(FailureRecord(result.path, result.size, result.mtime_ns, result.reason))
        job = result.job
        # A changed file that cannot be read leaves; a file that a reindex could not read this
        # time keeps its row (the reindex is finished by a later run).
        keeps_row = not result.permanent and job is not None and _reembeds_same_file(job)
        if job is not None and job.previous is not None and not keeps_row:
            stale.append(job.previous.id)

    settings = StageSettings(
        batch_size=opts.batch_size,
        decode=opts.decode.for_input_size(model_input_size(clip.preprocess_cfg)),
        workers=opts.decode_workers or default_decode_workers(),
        timeout=opts.decode_timeout,
    )
    times = StageTimes()
    try:
        # Closed on every way out (stop, an exception): the runner's workers end with the run, and
        # model batches not committed yet are left for the next run like files not decoded yet.
        with closing(runner.run(clip, jobs, settings, times)) as outputs:
            for output in outputs:
                if isinstance(output, list):
                    handled += len(output)
                    embedded.extend(output)
                else:
                    handled += 1
                    since_check += 1
                    note(output)
                    if since_check < opts.batch_size and time.monotonic() - last_check < CHECK_SECONDS:
                        continue
                now = time.monotonic()
                # The next chance to commit comes a batch from now: commit now if it would be late.
                interval, since_check, last_check = now - last_check, 0, now
                if waiting() >= opts.commit_every or now - last_commit + interval >= opts.commit_seconds:
                    commit()
                if progress:
                    progress(handled, total)
                if stop is not None and stop.is_set():
                    # Whole batches only: files of a part-filled batch never reached the model, and
                    # are left for the next run like those not decoded yet.
                    commit()
                    summary.interrupted = True
                    return
        commit()
        if progress:
            progress(handled, total)
    except BaseException:
        # The runner failed (out of memory, a lost Ray worker) or a second Ctrl-C came: what was
        # embedded is kept, as a commit per batch kept it. Not when the commit itself failed; a
        # failure of this one leaves the work to the next run and the first error stands.
        if not committing:
            with suppress(Exception):
                commit()
        raise
    finally:
        summary.decode_seconds = times.decode_seconds
        summary.model_seconds += times.model_seconds


def _reembeds_same_file(job: EmbedJob) -> bool:
    """A reindex job for a file whose size and mtime did not change since it was indexed."""
    prev = job.previous
    return job.force and prev is not None and (prev.size, prev.mtime_ns) == (job.info.size, job.info.mtime_ns)


def _begin_reindex(
    writer: IndexWriter, recorded: ModelSignature | None, clip: ImageModel, roots: list[str]
) -> None:
    """Embed everything under `roots` into a new set of vectors beside the searchable one.
    Another model cannot keep vectors of images this run does not reach: refused unless `roots`
    cover the whole index (nothing is dropped unasked)."""
    outside = [r for r in writer.catalog.records().values() if not under_roots(r.path, roots)]
    if outside and recorded is not None and not recorded.matches(clip.signature):
        raise ClipdexError(
            f"switching models re-embeds the whole index, which also holds {len(outside)} images outside "
            f"the folders given (e.g. {outside[0].path}): pass every indexed folder, or use a new --index"
        )
    writer.begin_reindex(clip.signature.to_dict(), _same_model, carry_over=[r.id for r in outside])


def _skip_reindexed(plan: Plan, done: set[int]) -> None:
    """Resuming an interrupted reindex: unchanged files that already have their new vector."""
    todo = []
    for job in plan.jobs:
        prev = job.previous
        if _reembeds_same_file(job) and prev.id in done:
            plan.unchanged += 1
        else:
            todo.append(job)
    plan.jobs = todo
