"""The query-power commands: a few real `clipdex` subprocesses (started together: each pays for
its imports), the rest in-process through Typer's runner, and the thumbnail protocols."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_query import shared_corpus
from typer.testing import CliRunner

from cli import preview
from cli.main import app
from cli.output import print_hits
from retrieval.core.filters import Filters
from retrieval.core.hits import Hit
from retrieval.index import ImageIndex
from retrieval.search.query import Query, Term, load_templates

SEARCH = "2:red circle + green hills"
_SCRIPT = Path(sys.executable).with_name("clipdex")
CLIPDEX = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)  # CLIPDEX_CACHE / CLIPDEX_INDEX point at the session's tmp dirs
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.Popen(CLIPDEX + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def cli(corpus_copy):
    at = ["--index", str(corpus_copy["dir"]), "--device", "cpu"]
    runs = {
        "search": ["search", SEARCH, "--minus", "blue", "--type", "png", "--min-width", "64", "-k", "5",
                   "--offset", "1", "--json", *at],
        "classify": ["classify", "--labels", "cat,dog,car", "--top", "2", "--store", "--json", *at],
        "table": ["search", "red circle", "--preview", "-k", "3", *at],
    }  # fmt: skip
    procs = {name: start(args, corpus_copy["root"]) for name, args in runs.items()}
    return {name: finish(p) for name, p in procs.items()}


@pytest.fixture(scope="module")
def corpus_copy(tiny_clip_model, tmp_path_factory):
    """The shared corpus with its own copy of the index (the commands here write tags)."""
    corpus = dict(shared_corpus(tiny_clip_model, tmp_path_factory))
    corpus["dir"] = tmp_path_factory.mktemp("cli-query") / "index"
    shutil.copytree(shared_corpus(tiny_clip_model, tmp_path_factory)["dir"], corpus["dir"])
    return corpus


def ok(run):
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return run.stdout.decode()


def test_cli_combined_filtered_paged_search_equals_the_library(cli, corpus_copy):
    hits = json.loads(ok(cli["search"]))
    with ImageIndex.open(corpus_copy["dir"], device="cpu") as idx:
        query = Query.parse(SEARCH).minus("blue")
        assert query.terms == [
            Term("text", "red circle", 2.0),
            Term("text", "green hills", 1.0),
            Term("text", "blue", -1.0),
        ]
        expected = idx.search_query(query, 5, filters=Filters(formats=("PNG",), min_width=64), offset=1)
    assert len(hits) == 5 and [h["rank"] for h in hits] == [2, 3, 4, 5, 6]
    assert [h["id"] for h in hits] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in expected], atol=1e-5)
    records = corpus_copy["records"]
    assert all(records[h["id"]].format == "PNG" and records[h["id"]].width >= 64 for h in hits)


def test_cli_classify_stores_tags_for_search(cli, corpus_copy, tiny_clip_model):
    results = json.loads(ok(cli["classify"]))
    assert "stored" in cli["classify"].stderr
    with ImageIndex.open(corpus_copy["dir"], device="cpu") as idx:
        idx.use_model(tiny_clip_model)
        expected = idx.classify(["cat", "dog", "car"], top=2)
        assert [r["id"] for r in results] == [r.id for r in expected]
        for got, want in zip(results, expected):
            assert [x["label"] for x in got["labels"]] == [s.label for s in want.labels] or abs(
                want.labels[0].probability - want.labels[1].probability
            ) < 1e-5
            np.testing.assert_allclose(
                [x["probability"] for x in got["labels"]], [s.probability for s in want.labels], atol=1e-5
            )
        for label in ("cat", "dog", "car"):
            tagged = {r["id"] for r in results if label in [x["label"] for x in r["labels"]]}
            assert set(idx.select_ids(Filters(tags=(label,))).tolist()) == tagged
    runner = CliRunner()
    out = runner.invoke(app, ["search", "a photo", "--tag", "cat", "--tag", "dog", "-k", "50", "--json",
                              "--index", str(corpus_copy["dir"])])  # fmt: skip
    assert out.exit_code == 0, out.output
    both = {r["id"] for r in results if {"cat", "dog"} <= {x["label"] for x in r["labels"]}}
    assert {h["id"] for h in json.loads(out.stdout)} == both


def test_cli_preview_writes_no_escape_codes_into_a_pipe(cli, corpus_copy):
    lines = ok(cli["table"]).splitlines()
    assert len(lines) == 3 and "\x1b" not in cli["table"].stdout.decode()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]


def test_cli_in_process_commands(corpus_copy, tmp_path):
    runner = CliRunner()
    at = ["--index", str(corpus_copy["dir"]), "--device", "cpu"]
    labels = tmp_path / "captions.txt"
    labels.write_text("a red circle\na dog, on the beach\ngreen hills\n")
    described = runner.invoke(app, ["describe", str(corpus_copy["pngs"][1]), "--labels", str(labels), *at])
    assert described.exit_code == 0, described.output
    rows = described.stdout.splitlines()
    assert len(rows) == 3 and {r.split(None, 3)[3] for r in rows} == set(labels.read_text().splitlines())
    dups = runner.invoke(app, ["duplicates", "--threshold", "0.999", "--index", str(corpus_copy["dir"])])
    assert dups.exit_code == 0, dups.output
    assert dups.stdout.count("group ") == 4
    query = corpus_copy["pngs"][4]
    similar = runner.invoke(
        app, ["similar", str(query), "--minus", "sunset", "--in", str(corpus_copy["photos"] / "png"),
              "--within", "1", "--json", *at],
    )  # fmt: skip
    assert similar.exit_code == 0, similar.output
    got = [h["path"] for h in json.loads(similar.stdout)]
    assert len(got) == 9 and str(query) not in got and all("/png/" in p for p in got)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of {}\n{} in a painting\n")
    ens = runner.invoke(app, ["search", "dog", "--templates", str(templates), "--json", "-k", "4", *at])
    assert ens.exit_code == 0, ens.output
    with ImageIndex.open(corpus_copy["dir"]) as idx:
        want = idx.search_query(Query.text("dog", ensemble=True, templates=load_templates(templates)), 4)
    assert [h["id"] for h in json.loads(ens.stdout)] == [h.id for h in want]
    bad = runner.invoke(app, ["search", "dog + ", *at])
    assert bad.exit_code != 0 and "empty term" in str(bad.exception)


# -- thumbnails ---------------------------------------------------------------------------------
class FakeTty(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("env", "tty", "want"),
    [
        ({"TERM": "xterm-kitty"}, True, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, True, "kitty"),
        ({"TERM_PROGRAM": "iTerm.app", "TERM": "xterm-256color"}, True, "iterm"),
        ({"TERM": "xterm-256color"}, True, None),
        ({"TERM": "xterm-kitty"}, False, None),
        ({"TERM_PROGRAM": "iTerm.app"}, False, None),
        ({"TERM": "tmux-256color", "KITTY_WINDOW_ID": "1", "TMUX": "/tmp/tmux-0/default,1,0"}, True, None),
    ],
)
def test_detect_protocol(env, tty, want):
    assert preview.detect_protocol(FakeTty(tty), env) == want


def test_kitty_and_iterm_sequences(tmp_path):
    png = bytes(range(256)) * 40  # 10 KiB: several kitty chunks
    kitty = preview.encode(png, "kitty")
    chunks = kitty.rstrip("\n").split("\x1b\\")[:-1]
    assert len(chunks) == 4 and chunks[0].startswith("\x1b_Ga=T,f=100,") and ",m=1;" in chunks[0]
    assert chunks[-1].startswith("\x1b_Gm=0;")
    payload = "".join(c.split(";", 1)[1] for c in chunks)
    assert base64.b64decode(payload) == png
    iterm = preview.encode(png, "iterm")
    assert iterm.startswith("\x1b]1337;File=inline=1;") and iterm.endswith("\x07\n")
    assert base64.b64decode(iterm.split(":", 1)[1][:-2]) == png


def test_previewer_shows_thumbnails_only_on_a_capable_tty(tmp_path, capsys):
    from conftest import make_scene

    path = tmp_path / "p.jpg"
    make_scene(3, (640, 480)).save(path)
    tty = FakeTty(True)
    shown = preview.Previewer(tty, {"TERM": "xterm-kitty"})
    assert shown.show(str(path)) and tty.getvalue().startswith("\x1b_G")
    assert not shown.show(str(tmp_path / "missing.jpg"))  # unreadable file: silently nothing
    plain = FakeTty(True)
    assert not preview.Previewer(plain, {"TERM": "dumb"}).show(str(path)) and plain.getvalue() == ""
    png = preview.thumbnail_png(str(path))
    from PIL import Image

    assert max(Image.open(io.BytesIO(png)).size) == preview.THUMB_PIXELS
    print_hits([Hit(1, 0.5, str(path), 1, 640, 480)], "table", preview=True)  # pytest's stdout: no tty
    assert "\x1b" not in capsys.readouterr().out
