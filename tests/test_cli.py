"""The real `clipdex` command, end to end, in subprocesses.

Every run imports torch (seconds), so the module indexes once and then starts all the query
commands at the same time; each test checks one of their results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARCH, write_scenes

from retrieval.core.images import image_extensions
from retrieval.index import ImageIndex

_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
TIMEOUT = 180
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"  # the project's sample pictures


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)  # CLIPDEX_CACHE / CLIPDEX_INDEX point at the session's tmp dirs
    env["PYTHONIOENCODING"] = "utf-8"
    env["OMP_NUM_THREADS"] = "1"  # several run at once on few cores; the tiny model needs no threads
    return subprocess.Popen(CLIPDEX + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err.decode("utf-8", "replace"))


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("clipdex: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_checkpoint, other_checkpoint):
    work = tmp_path_factory.mktemp("cli")
    photos = work / "photos"
    good = write_scenes(photos, 8)
    broken = photos / "broken.jpg"
    broken.write_text("not a jpeg")
    errors_file = work / "errors.tsv"
    index_dir = work / "index"
    model = ["-m", TINY_ARCH, "-p", str(tiny_checkpoint), "--device", "cpu"]

    missing = start(["search", "anything", "--index", str(work / "no-index-here")], work)  # needs no index
    data_index = work / "data-index"
    data_before = sorted(DATA.iterdir())
    samples = start(["index", str(DATA), "--index", str(data_index), *model, "--json"], work)
    indexed = finish(
        start(
            ["index", str(photos), "--index", str(index_dir), *model, "--errors", str(errors_file), "--json"],
            work,
        )
    )
    samples_indexed = finish(samples)
    query = str(good[2])
    at = ["--index", str(index_dir)]
    cpu = ["--device", "cpu"]
    runs = {
        "search_json": ["search", "a red circle", *at, "-k", "3", "--json", *cpu],
        "search_paths": ["search", "green hills", *at, "-k", "4", "--paths", *cpu],
        "similar": ["similar", query, *at, "-k", "50", "--json", *cpu],
        "similar_self": ["similar", query, *at, "-k", "3", "--include-self", "--json", *cpu],
        "info": ["info", *at, "--json"],
        "again_without_model": ["index", str(photos), *at, *cpu, "--json"],
        "mismatch": [
            "index",
            str(photos),
            "--index",
            str(index_dir),
            "-m",
            TINY_ARCH,
            "-p",
            str(other_checkpoint),
        ],
        "data_similar": [
            "similar",
            str(DATA / "sun_over_field.jpg"),
            "--index",
            str(data_index),
            "-k",
            "3",
            "--json",
            *cpu,
        ],
    }
    procs = {name: start(args, work) for name, args in runs.items()} if indexed.returncode == 0 else {}
    procs["missing_index"] = missing
    results = {name: finish(p) for name, p in procs.items()}
    return {
        "indexed": indexed,
        "samples_indexed": samples_indexed,
        "data_before": data_before,
        "results": results,
        "index_dir": index_dir,
        "good": [str(p) for p in good],
        "broken": str(broken),
        "errors_file": errors_file,
        "query": query,
    }


def result(cli, name: str) -> subprocess.CompletedProcess:
    assert cli["indexed"].returncode == 0, cli["indexed"].stderr
    return cli["results"][name]


def test_index_reports_broken_files_and_succeeds(cli):
    run = cli["indexed"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    summary = json.loads(run.stdout)
    assert summary["added"] == 8 and summary["updated"] == 0
    assert [f["path"] for f in summary["failed"]] == [cli["broken"]]
    lines = cli["errors_file"].read_text().splitlines()
    assert len(lines) == 1
    path, reason = lines[0].split("\t")
    assert path == cli["broken"] and reason.strip()


def test_search_json_gives_k_results(cli):
    run = result(cli, "search_json")
    assert run.returncode == 0, run.stderr
    hits = json.loads(run.stdout)
    assert len(hits) == 3
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) >= {"rank", "score", "path", "id", "width", "height"}
    assert all(h["path"] in cli["good"] for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_search_json_equals_the_library(cli, tiny_checkpoint):
    hits = json.loads(result(cli, "search_json").stdout)
    with ImageIndex.open(cli["index_dir"], device="cpu") as idx:
        expected = idx.search_text("a red circle", k=3)
    assert [h["id"] for h in hits] == [h.id for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)


def test_search_paths_prints_k_paths(cli):
    run = result(cli, "search_paths")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.decode().splitlines()
    assert len(lines) == 4
    assert all(line in cli["good"] for line in lines)
    assert len(set(lines)) == 4


def test_similar_excludes_the_query_image_by_default(cli):
    run = result(cli, "similar")
    assert run.returncode == 0, run.stderr
    hits = json.loads(run.stdout)
    paths = [h["path"] for h in hits]
    assert cli["query"] not in paths
    assert sorted(paths) == sorted(p for p in cli["good"] if p != cli["query"])


def test_similar_include_self_keeps_it_first(cli):
    run = result(cli, "similar_self")
    assert run.returncode == 0, run.stderr
    hits = json.loads(run.stdout)
    assert len(hits) == 3
    assert hits[0]["path"] == cli["query"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_info_json(cli, tiny_checkpoint):
    run = result(cli, "info")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["images"] == 8
    assert Path(info["directory"]) == cli["index_dir"]
    assert info["model"]["arch"] == TINY_ARCH and info["model"]["dim"] == 64
    assert info["model"]["weights_id"].startswith("sha256:")
    assert info["model"]["pretrained"] == str(tiny_checkpoint.resolve())
    assert info["bytes_on_disk"] > 0 and info["updated_at"] > 0


def test_mismatched_model_is_a_one_line_error(cli):
    assert_one_line_error(result(cli, "mismatch"), "--reindex")
    with ImageIndex.open(cli["index_dir"]) as idx:
        assert idx.catalog.count() == 8


def test_index_again_without_model_options_uses_the_index_model(cli):
    run = result(cli, "again_without_model")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["unchanged"] == 8


def test_missing_index_is_a_one_line_error(cli, tmp_path):
    run = result(cli, "missing_index")
    assert_one_line_error(run, "no index")
    assert run.stdout == b""


# -- the project's sample pictures (data/) and the quickstart ----------------------------------------
def test_the_samples_index_without_a_failure_and_similar_finds_samples(cli):
    run = cli["samples_indexed"]
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    samples = [p for p in cli["data_before"] if p.suffix.lower() in image_extensions()]
    assert summary["failed"] == [] and summary["added"] == len(samples) >= 6
    similar = result(cli, "data_similar")
    assert similar.returncode == 0, similar.stderr
    hits = json.loads(similar.stdout)
    assert len(hits) == 3
    assert all(Path(h["path"]).parent == DATA for h in hits)
    assert str(DATA / "sun_over_field.jpg") not in [h["path"] for h in hits]
    assert sorted(DATA.iterdir()) == cli["data_before"]  # nothing written into data/


def quickstart(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "quickstart.sh"
    if not (ROOT / ".venv" / "bin" / "clipdex").exists():
        pytest.skip("quickstart runs the .venv beside the repository, which is not there")
    env = dict(os.environ)
    env.update(
        QUICKSTART_SETUP="0",  # the .venv is there already; no install from a test
        CLIPDEX_CACHE=str(tmp_path / "cache"),
        CLIPDEX_INDEX=str(tmp_path / "default-index"),
        OMP_NUM_THREADS="1",
        PYTHONIOENCODING="utf-8",
    )
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=2 * TIMEOUT
    )


TINY_RANDOM = ["-m", TINY_ARCH, "-p", "random", "--device", "cpu"]


def test_quickstart_alone_indexes_and_searches_the_samples(tmp_path):
    before = sorted(DATA.iterdir())
    samples = [p for p in before if p.suffix.lower() in image_extensions()]
    run = quickstart(TINY_RANDOM, tmp_path)
    assert run.returncode == 0, run.stderr
    hits = [line for line in run.stdout.splitlines() if str(DATA) in line]
    assert len(hits) == len(samples), run.stdout
    assert (tmp_path / "cache" / "quickstart-index").is_dir()
    assert not (tmp_path / "default-index").exists()  # the user's own index is not touched
    assert sorted(DATA.iterdir()) == before
    again = quickstart(TINY_RANDOM, tmp_path)  # afresh each time: no model clash, no leftovers
    assert again.returncode == 0, again.stderr
    assert f"{len(samples)} added" in again.stdout


def test_quickstart_with_a_folder_indexes_it_into_the_default_index(tmp_path):
    write_scenes(tmp_path / "photos", 3)
    run = quickstart([str(tmp_path / "photos"), "a red circle", *TINY_RANDOM], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "3 added" in run.stdout
    assert sum(str(tmp_path / "photos") in line for line in run.stdout.splitlines()) == 3
    assert (tmp_path / "default-index").is_dir()


def test_quickstart_with_a_folder_but_no_query_prints_its_usage(tmp_path):
    run = quickstart([str(tmp_path)], tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("usage:"), run.stderr


def test_index_commits_as_the_library_does_by_default():
    import inspect

    from cli.main import index
    from indexer import IndexOptions

    assert inspect.signature(index).parameters["commit_every"].default == IndexOptions.commit_every


def test_import_commits_as_the_library_does_by_default():
    import inspect

    from cli.import_commands import import_command
    from indexer.import_embeddings import ImportOptions

    batch = inspect.signature(import_command).parameters["batch_size"].default
    assert batch == ImportOptions.batch_size
