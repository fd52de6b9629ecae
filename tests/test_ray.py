"""`clipdex index --ray`: the same stages on a local Ray instance (2 CPUs) as on the local runner.

The module shares one Ray instance (started once: seconds). Equal results: the Ray path gives the
catalog and the vectors of a local run. Faults with real kills: an embed actor that kills its own
process on its first batch (Ray restarts it and retries the batch), and the real `clipdex index
--ray local` SIGKILLed after its first commit, then resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARCH, committed_rows, wait_for_rows, write_scenes

from indexer import IndexOptions, index_folders
from indexer.ray_runner import ActorPlan, EmbedActor, RayRunner, RayUnavailable, plan_actors
from retrieval.index import ImageIndex
from retrieval.storage.catalog import CATALOG_NAME
from retrieval.storage.verify import verify_index

_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
OPTIONS = IndexOptions(batch_size=4)


@pytest.fixture(scope="module")
def ray_instance():
    pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    # Loopback only (read when ray is imported: see indexer.ray_runner), no usage report.
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield ray
    ray.shutdown()
    mp.undo()


def catalog_state(index_dir: Path) -> tuple[dict[str, tuple], dict[str, np.ndarray], dict[str, str]]:
    """({path: (size, sha256, width, height)}, {path: vector}, {path: failure reason})."""
    with ImageIndex.open(index_dir) as index:
        records = sorted(index.catalog.records().values(), key=lambda r: r.path)
        rows = {r.path: (r.size, r.content_hash, r.width, r.height) for r in records}
        dim = index.catalog.dim_of(index.catalog.active_model().id)
        vectors = index.catalog.embeddings([r.id for r in records], dim)
        failures = {p: f.reason for p, f in index.catalog.failures().items()}
        assert verify_index(index.store).ok
    return rows, dict(zip((r.path for r in records), vectors)), failures


def test_actors_one_per_gpu_else_cpu_actors_beside_the_decoders():
    assert plan_actors({"CPU": 32, "GPU": 4}) == ActorPlan(actors=4, num_cpus=1, num_gpus=1)
    assert plan_actors({"CPU": 32, "GPU": 4}, device="cpu") == ActorPlan(actors=4, num_cpus=4, num_gpus=0)
    assert plan_actors({"CPU": 2}) == ActorPlan(actors=1, num_cpus=1, num_gpus=0)
    assert plan_actors({"CPU": 16}) == ActorPlan(actors=2, num_cpus=4, num_gpus=0)


def test_without_ray_the_command_says_which_extra_in_one_line(tmp_path, monkeypatch, capsys):
    # First in the module: Ray is hidden from imports here, before the module's instance starts.
    from cli.main import run

    photos = tmp_path / "photos"
    write_scenes(photos, 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: find_spec gives None
    with pytest.raises(RayUnavailable):
        RayRunner()
    argv = ["clipdex", "index", str(photos), "--index", str(tmp_path / "i"), "--ray", "local"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.count("\n") == 1 and "clipdex[ray]" in err and "Traceback" not in err, err
    assert not (tmp_path / "i").exists()  # refused before any work


def test_the_ray_path_builds_the_catalog_and_vectors_of_a_local_run(
    ray_instance, tmp_path, tiny_clip_model, broken_files
):
    photos = tmp_path / "photos"
    write_scenes(photos, 14)
    for path in broken_files.values():
        (photos / path.name).write_bytes(path.read_bytes())
    local = index_folders([photos], tmp_path / "local", tiny_clip_model, OPTIONS)
    on_ray = index_folders([photos], tmp_path / "ray", tiny_clip_model, OPTIONS, runner=RayRunner())

    assert (on_ray.added, on_ray.embedded, on_ray.interrupted) == (14, 14, False)
    assert sorted(on_ray.failed) == sorted(local.failed) and len(local.failed) == 3
    rows, vectors, failures = catalog_state(tmp_path / "ray")
    local_rows, local_vectors, local_failures = catalog_state(tmp_path / "local")
    assert rows == local_rows
    assert failures == local_failures  # broken files recorded the same way (not tried again)
    for path, vec in local_vectors.items():
        np.testing.assert_allclose(vectors[path], vec, atol=1e-5)

    again = index_folders([photos], tmp_path / "ray", tiny_clip_model, OPTIONS, runner=RayRunner())
    assert (again.added, again.unchanged, again.embedded) == (0, 14, 0)


def test_an_embed_actor_killed_mid_run_is_restarted_and_nothing_is_lost_or_duplicated(
    ray_instance, tmp_path, tiny_clip_model
):
    photos, marker = tmp_path / "photos", tmp_path / "killed-once"
    paths = write_scenes(photos, 16)

    class KilledOnce(EmbedActor):  # made here: pickled by value, with the marker's path in it
        def __call__(self, batch):  # type: ignore[no-untyped-def]
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)  # the actor's process, mid-batch
            return super().__call__(batch)

    runner = RayRunner(embedder=KilledOnce)
    summary = index_folders([photos], tmp_path / "index", tiny_clip_model, OPTIONS, runner=runner)
    assert marker.exists(), "the actor was never killed"
    assert (summary.added, summary.embedded, summary.failed) == (16, 16, [])
    rows, vectors, _ = catalog_state(tmp_path / "index")
    assert sorted(rows) == sorted(str(p) for p in paths)  # each once: a path is one row
    index_folders([photos], tmp_path / "local", tiny_clip_model, OPTIONS)
    local_rows, local_vectors, _ = catalog_state(tmp_path / "local")
    assert rows == local_rows
    for path, vec in local_vectors.items():
        np.testing.assert_allclose(vectors[path], vec, atol=1e-5)


def test_a_killed_ray_driver_resumes_like_a_local_run(ray_instance, tmp_path, tiny_clip_model):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
    total = 120
    write_scenes(photos, total)
    args = ["index", str(photos), "--index", str(index_dir), "-m", TINY_ARCH, "-p", "random"]
    proc = subprocess.Popen(
        CLIPDEX + args + ["--device", "cpu", "-b", "4", "--ray", "local"],
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: whatever the driver started is killed after it
    )
    try:
        wait_for_rows(proc, index_dir / CATALOG_NAME, 4, timeout=150)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray instance's processes, if any outlived it
        proc.communicate()
    done = committed_rows(index_dir / CATALOG_NAME)
    assert 4 <= done < total, done

    rest = index_folders([photos], index_dir, tiny_clip_model, OPTIONS, runner=RayRunner())
    assert (rest.added, rest.unchanged, rest.updated, rest.failed) == (total - done, done, 0, [])
    rows, _, _ = catalog_state(index_dir)
    assert sorted(rows) == sorted(str(p) for p in photos.iterdir())
