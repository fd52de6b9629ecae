"""`clipdex index --ray`: the decode and embed stages (indexer.stages) as a Ray Data pipeline.

    from_items(jobs) -> map(decode_row): tasks -> map_batches(EmbedActor): actor pool -> driver

The scan and the plan stay in the driver, and so does the single writer: `RayRunner.run` yields
what the actors return, and `indexer.sync` commits it exactly as it commits a local run's. Only
the model spec travels to the actors; each loads its own model (the lean ONNX one where the
exports are cached) and checks it against the driver's signature. Rows carry pickled jobs and
results (bytes columns), so Ray Data never has to infer a schema for a mix of decoded files and
failures.

Faults: an actor that dies is restarted and its batch retried (Ray Data's actor pools default to
max_restarts=-1, max_task_retries=-1), a decode task that dies is retried; both stages are pure,
so a retry gives the same result and each file comes back once. A driver that dies loses only
what it had not committed: the next run (local or Ray) plans it again.

Ray is an optional extra: nothing here imports it before a run needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import pickle
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.core.errors import ClipdexError
from retrieval.embedding.image_models import ImageModel, load_image_model
from retrieval.embedding.spec import ModelSignature, ModelSpec

from .decode import Decoded
from .pipeline import DecodePool
from .plan import EmbedJob
from .stages import (
    DecodeResult,
    DecodeStage,
    Embedded,
    StageOutput,
    StageSettings,
    StageTimes,
    decode_timeout_failure,
    embed_batch,
)

LOCAL = "local"  # a Ray instance started in this process, on loopback only
AUTO = "auto"  # the cluster this machine belongs to (RAY_ADDRESS, or the one `ray start` began)
EXTRA = "pip install 'clipdex[ray]'"
MAX_BLOCKS = 100_000  # decode tasks: a block of about batch_size files each, up to this many
DECODE_TASK_MEMORY = 512 << 20  # bytes: 100 MP (DEFAULT_MAX_PIXELS) of RGB is 300 MB, plus the file


class RayUnavailable(ClipdexError):
    pass


class RayRunError(ClipdexError):
    pass


def require_ray() -> None:
    """A one-line error, before any work, where Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise RayUnavailable(f"--ray needs Ray, which is not installed: {EXTRA} (the 'ray' extra)")


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    num_cpus: float  # per actor
    num_gpus: float  # per actor: 1 where GPUs embed, else 0


def plan_actors(resources: Mapping[str, float], device: str = "auto") -> ActorPlan:
    """One actor per GPU of the cluster (a CPU each for feeding it, the rest decode); without GPUs
    (or with --device cpu) CPU actors that take half the CPUs together, the other half decoding:
    a model on 4 threads gains little from more, so several actors beat one wide one."""
    gpus = int(resources.get("GPU", 0))
    if gpus > 0 and not device.startswith("cpu"):
        return ActorPlan(actors=gpus, num_cpus=1, num_gpus=1)
    cpus = max(1, int(resources.get("CPU", 1)))
    actors = max(1, cpus // 8)
    return ActorPlan(actors=actors, num_cpus=max(1, cpus // (2 * actors)), num_gpus=0)


@dataclass(frozen=True)
class RayRunner:
    """Runs the stages on Ray. `address`: "local" (an instance started here, loopback only),
    "auto", or a cluster's address (ray://host:10001, host:6379). In a process already connected
    to Ray (ray.init called before), that connection is used and left open."""

    address: str = LOCAL
    embedder: type[EmbedActor] | None = None  # None: EmbedActor (tests pass a subclass)

    def __post_init__(self) -> None:
        require_ray()

    def run(
        self, model: ImageModel, jobs: Sequence[EmbedJob], settings: StageSettings, times: StageTimes
    ) -> Iterator[StageOutput]:
        with _connected(self.address) as ray:
            try:
                yield from self._pipeline(ray, model, jobs, settings, times)
            except ClipdexError:
                raise
            except Exception as exc:  # Ray's wrappers around an actor's or a task's error
                raise _run_error(exc) from exc

    def _pipeline(
        self,
        ray: Any,
        model: ImageModel,
        jobs: Sequence[EmbedJob],
        settings: StageSettings,
        times: StageTimes,
    ) -> Iterator[StageOutput]:
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # the command shows its own progress
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-run chatter on stderr
        plan = plan_actors(ray.cluster_resources(), model.spec.device)
        blocks = max(1, min(MAX_BLOCKS, math.ceil(len(jobs) / settings.batch_size)))
        data = ray.data.from_items([{"job": pickle.dumps(job)} for job in jobs], override_num_blocks=blocks)
        data = data.map(
            decode_row,
            fn_kwargs={"stage": DecodeStage(model.preprocess, settings.decode), "timeout": settings.timeout},
            num_cpus=1,
            # The most one decode holds: a file and its pixels up to the bomb guard's limit. Also
            # keeps the decode tasks an operator of their own: Ray Data fuses a map into the next
            # one when their resources are equal, and decoding would then run inside the embed
            # actors, one file after another in front of the model.
            memory=DECODE_TASK_MEMORY,
        )
        data = data.map_batches(
            self.embedder or EmbedActor,
            fn_constructor_kwargs={"spec": model.spec, "signature": model.signature.to_dict()},
            batch_size=settings.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
        )
        for batch in data.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            times.decode_seconds += float(np.sum(batch["decode_seconds"]))
            times.model_seconds += float(np.sum(batch["model_seconds"]))
            embedded: list[Embedded] = []
            for blob in batch["result"]:
                result = pickle.loads(blob)
                if isinstance(result, Embedded):
                    embedded.append(result)
                else:
                    yield result
            if embedded:
                yield embedded


def decode_row(row: dict[str, Any], stage: DecodeStage, timeout: float) -> dict[str, Any]:
    """The decode stage in a Ray task: one pickled job in, one pickled result out. The file is
    decoded in a thread of a one-worker DecodePool, so that a file whose decoding hangs is given
    up after `timeout` as in a local run (its thread is written off, the task goes on)."""
    job: EmbedJob = pickle.loads(row["job"])
    t0 = time.perf_counter()
    pool: DecodePool[EmbedJob, DecodeResult] = DecodePool(
        stage, lambda j, secs: decode_timeout_failure(j, timeout), workers=1, max_pending=1, timeout=timeout
    )
    with closing(pool.run([job])) as results:
        result = next(results)
    seconds = time.perf_counter() - t0
    if isinstance(result, Decoded) and not isinstance(result.pixels, np.ndarray):
        # open_clip's transform makes torch tensors: sent as numpy (the same numbers), so that a
        # lean actor needs no torch to read them.
        result.pixels = np.asarray(result.pixels)
    return {"result": pickle.dumps(result, protocol=5), "decode_seconds": seconds}


class EmbedActor:
    """The embed stage in a Ray actor: one model per actor, loaded from the spec."""

    def __init__(self, spec: ModelSpec, signature: dict[str, Any]) -> None:
        self.model = load_image_model(spec)  # lean (no torch) where the exports are cached
        expected = ModelSignature.from_dict(signature)
        expected.check_compatible(self.model.signature, "the driver's model")
        self.model.warm_up()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [pickle.loads(blob) for blob in batch["result"]]
        times = StageTimes()
        vectors = iter(embed_batch(self.model, [r for r in results if isinstance(r, Decoded)], times))
        out = [next(vectors) if isinstance(r, Decoded) else r for r in results]
        return {
            "result": np.array([pickle.dumps(o, protocol=5) for o in out], dtype=object),
            "decode_seconds": np.asarray(batch["decode_seconds"], dtype=np.float64),
            "model_seconds": np.full(len(out), times.model_seconds / max(1, len(out))),
        }


@contextmanager
def _connected(address: str) -> Iterator[Any]:
    """Ray, connected as `address` says; a connection made here is closed on the way out."""
    if address == LOCAL and "ray" not in sys.modules:
        # Read when Ray is imported: on Linux it makes a local instance bind every port to
        # 127.0.0.1 (as Ray does on macOS and Windows) instead of every interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        yield ray
        return
    try:
        if address == LOCAL:
            ray.init(
                address=LOCAL,
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:
        raise RayRunError(f"cannot start or reach Ray at '{address}': {_first_line(exc)}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _run_error(exc: BaseException) -> ClipdexError:
    """A one-line error for a failed pipeline: the library's own error where a worker raised one
    (a model that cannot be loaded there), else Ray's first line."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ClipdexError):
            return cause
        inner = getattr(cause, "cause", None)  # RayTaskError keeps the worker's exception here
        cause = inner if isinstance(inner, BaseException) else (cause.__cause__ or cause.__context__)
    return RayRunError(f"the Ray pipeline failed: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
