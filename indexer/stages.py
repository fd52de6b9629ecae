"""The stages of an index run's embedding, and the local runner that composes them.

Three stages, as in a reader -> mapper -> writer pipeline:

- decode (`DecodeStage`): one file -> its preprocessed pixels, or why not (`indexer.decode`);
- embed (`embed_batch`): a batch of decoded files -> unit vectors, one model per worker;
- commit: the single writer in the driver (`indexer.sync`), which folds what comes back into
  `IndexWriter.commit` calls.

A runner moves the jobs through decode and embed and yields what the writer commits: a list of
`Embedded` files (one model batch: committed whole) or one file that reached no model
(`SameContent`, `DecodeFailure`). `LocalRunner` runs the stages in this process (decoding in the
decode pool's threads, the model in the caller's thread); `indexer.ray_runner.RayRunner` runs the
very same functions as a Ray Data pipeline. Neither holds any logic of the other stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from retrieval.embedding.clip_model import ClipModel
from retrieval.embedding.image_models import ImageModel
from retrieval.storage.records import NewImage

from .decode import Decoded, DecodeFailure, DecodeOptions, SameContent, decode_job
from .pipeline import DecodePool
from .plan import EmbedJob


@dataclass
class Embedded:
    """A decoded file and its vector: the catalog row the writer commits (the pixels dropped),
    with the job it came from (a changed file's previous row)."""

    job: EmbedJob
    image: NewImage

    @classmethod
    def of(cls, d: Decoded, vector: np.ndarray) -> Embedded:
        facts = (d.size, d.mtime_ns, d.content_hash, d.width, d.height, d.format, d.taken_at)
        return cls(d.job, NewImage(d.job.info.path, *facts, vector))


# What a runner yields: one model batch (committed whole), or one file that reached no model.
StageOutput = list[Embedded] | SameContent | DecodeFailure
DecodeResult = Decoded | SameContent | DecodeFailure


@dataclass
class StageTimes:
    decode_seconds: float = 0.0  # reading, decoding and preprocessing, summed over workers
    model_seconds: float = 0.0  # inside the model, summed over workers


@dataclass(frozen=True)
class StageSettings:
    batch_size: int
    decode: DecodeOptions  # already sized for the model (DecodeOptions.for_input_size)
    workers: int  # decoding threads of the local runner
    timeout: float  # seconds before one file's decoding is given up (local runner)


@dataclass(frozen=True)
class DecodeStage:
    """Decode one file with the model's preprocessing. Picklable when `preprocess` is (open_clip's
    torchvision transform and the lean model's ImagePreprocess both are): Ray ships it to tasks."""

    preprocess: Callable[[Any], Any]
    options: DecodeOptions

    def __call__(self, job: EmbedJob) -> DecodeResult:
        return decode_job(job, self.preprocess, self.options)


def stack_pixels(pixels: Sequence[Any]) -> Any:
    """One batch of preprocessed images: numpy from the lean model's preprocessing (no torch
    import), torch tensors from open_clip's."""
    if isinstance(pixels[0], np.ndarray):
        return np.stack(pixels)
    import torch  # only when the model's preprocessing made tensors: torch is loaded already

    return torch.stack(list(pixels))


def model_input(model: ImageModel, pixels: Sequence[Any]) -> Any:
    """`pixels` stacked as `model` takes them. The same numbers either way: a worker's model may
    differ in kind from the driver's whose preprocessing made the pixels (a GPU worker's ClipModel
    fed by the driver's lean numpy preprocessing, bit-equal to open_clip's)."""
    batch = stack_pixels(pixels)
    if isinstance(model, ClipModel) and isinstance(batch, np.ndarray):
        import torch

        return torch.from_numpy(batch)
    return batch


def embed_batch(model: ImageModel, decoded: Sequence[Decoded], times: StageTimes) -> list[Embedded]:
    """The embed stage: one model call for the whole batch."""
    if not decoded:
        return []
    t0 = time.perf_counter()
    vectors = model.encode_images(model_input(model, [d.pixels for d in decoded]))
    times.model_seconds += time.perf_counter() - t0
    return [Embedded.of(d, vec) for d, vec in zip(decoded, vectors)]


class Runner(Protocol):
    def run(
        self, model: ImageModel, jobs: Sequence[EmbedJob], settings: StageSettings, times: StageTimes
    ) -> Iterator[StageOutput]:
        """Every job's outcome, once, in any order. Closing the iterator ends the run: model
        batches not yet yielded are dropped (their files are left for the next run)."""
        ...


@dataclass(frozen=True)
class LocalRunner:
    """Decoding in the decode pool's threads, full batches through `model` in the caller's thread."""

    def run(
        self, model: ImageModel, jobs: Sequence[EmbedJob], settings: StageSettings, times: StageTimes
    ) -> Iterator[StageOutput]:
        decode = DecodeStage(model.preprocess, settings.decode)

        def timed_decode(job: EmbedJob) -> DecodeResult:
            t0 = time.perf_counter()
            try:
                return decode(job)
            finally:
                times.decode_seconds += time.perf_counter() - t0  # float += under the GIL: good enough

        pool: DecodePool[EmbedJob, DecodeResult] = DecodePool(
            timed_decode,
            lambda job, secs: decode_timeout_failure(job, settings.timeout),
            workers=settings.workers,
            max_pending=max(8, 2 * settings.batch_size),
            timeout=settings.timeout,
        )
        batch: list[Decoded] = []
        # Closed on every way out (the caller closing us, an exception): no decoder thread outlives the run.
        with closing(pool.run(jobs)) as results:
            for result in results:
                if not isinstance(result, Decoded):
                    yield result
                    continue
                batch.append(result)
                if len(batch) >= settings.batch_size:
                    yield embed_batch(model, batch, times)
                    batch = []
        if batch:
            yield embed_batch(model, batch, times)


def decode_timeout_failure(job: EmbedJob, timeout: float) -> DecodeFailure:
    return DecodeFailure(job.info.path, f"decoding took over {timeout:g} s; skipped", job)
