"""Start-up and peak memory of `clipdex index` with the model's ONNX export already cached.

    .venv/bin/python bench/lean_start.py /tmp/clipdex-camera --photos 1 --rounds 2

Each run is a whole `clipdex index FOLDER --index NEW --json` process (a fresh index each time)
over the first `--photos` files of FOLDER, so with one photo the wall time is nearly all start-up:
imports, the model (or its cached export), the catalog, the text tower for the new index. One
untimed run first fills a private cache (CLIPDEX_CACHE) with the model's exports, as a user's
first run does once per model.

`--variants cli,clipmodel` alternates, round by round, the command line (whatever path it takes)
with a child that hands index_folders a ClipModel (torch and open_clip loaded, the cached ONNX
image tower used for embedding): the path every run took before the lean start.

Per run: wall seconds, CPU% (user+sys / wall), peak RSS of the child, whether it imported torch,
and index_folders' own figures (seconds in the call, of which embedding). The machine is shared:
figures are preliminary; compare the variants within one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEFAULT_MODEL = "ViT-B-32-256"
DEFAULT_CKPT = "/tmp/clipdex-peers/datadir/ViT-B-32-256-seed0.pt"

# The ClipModel child: the same index_folders call as the command line, given a loaded ClipModel.
_CLIPMODEL_CHILD = """
import json, sys
from indexer import IndexOptions, index_folders
from retrieval.embedding.clip_model import ClipModel
from retrieval.embedding.spec import ModelSpec
folder, index, arch, pretrained = sys.argv[1:5]
s = index_folders([folder], index, ClipModel(ModelSpec(arch, pretrained)), IndexOptions())
print(json.dumps({"added": s.added, "seconds": s.seconds, "embed_seconds": s.embed_seconds,
                  "torch": "torch" in sys.modules}))
"""

# Wraps the command line to report whether torch was imported by the end of the run.
_CLI_CHILD = """
import atexit, sys
atexit.register(lambda: print(f"torch imported: {'torch' in sys.modules}", file=sys.stderr))
from cli.main import run
sys.argv = ["clipdex"] + sys.argv[1:]
run()
"""


@dataclass
class Run:
    variant: str
    wall: float
    cpu_pct: float
    rss_mib: float
    torch: bool
    seconds: float
    embed_seconds: float


def child_cmd(variant: str, folder: Path, index: Path, args: argparse.Namespace) -> list[str]:
    if variant == "cli":
        model = ["--model", args.model, "--pretrained", args.pretrained]
        return [PYTHON, "-c", _CLI_CHILD, "index", str(folder), "--index", str(index), *model, "--json"]
    if variant == "clipmodel":
        return [PYTHON, "-c", _CLIPMODEL_CHILD, str(folder), str(index), args.model, args.pretrained]
    raise SystemExit(f"unknown variant {variant!r}: use cli or clipmodel")


def timed(variant: str, cmd: list[str], env: dict[str, str]) -> Run:
    """Run one child. Called in a process of its own (--one), so that RUSAGE_CHILDREN, whose
    maxrss is the largest of all children waited for, is this child's own peak."""
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    data = json.loads(done.stdout[done.stdout.index("{") :])
    torch = bool(data.get("torch", "torch imported: True" in done.stderr))
    cpu_pct = 100 * (usage.ru_utime + usage.ru_stime) / wall
    return Run(variant, wall, cpu_pct, usage.ru_maxrss / 1024, torch, data["seconds"], data["embed_seconds"])


def one(args: argparse.Namespace) -> None:
    """Measure one child in this (fresh) process and print its Run as JSON."""
    env = dict(os.environ, CLIPDEX_CACHE=args.cache)
    cmd = child_cmd(args.one, Path(args.folder), Path(args.index), args)
    print(json.dumps(timed(args.one, cmd, env).__dict__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="Folder of photos (the first --photos are used).")
    p.add_argument("--photos", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="cli,clipmodel")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--pretrained", default=DEFAULT_CKPT)
    p.add_argument("--cache", default=None, help="CLIPDEX_CACHE for the runs (default: a temporary one).")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args)
        return
    work = Path(tempfile.mkdtemp(prefix="clipdex-lean-"))
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path) -> None:
    photos = sorted(f for f in args.folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    folder = work / "photos"
    folder.mkdir()
    for f in photos[: args.photos]:
        os.symlink(f.resolve(), folder / f.name)
    cache = args.cache or str(work / "cache")
    variants = args.variants.split(",")

    def measure(variant: str, index: Path) -> subprocess.CompletedProcess[str]:
        cmd = [PYTHON, __file__, str(folder), "--one", variant, "--index", str(index), "--cache", cache]
        cmd += ["--model", args.model, "--pretrained", args.pretrained]
        return subprocess.run(cmd, check=True, capture_output=True, text=True)

    measure("cli", work / "warm")  # fills the cache: exports, manifest
    runs: list[Run] = []
    for rnd in range(args.rounds):
        for variant in variants:
            done = measure(variant, work / f"index-{variant}-{rnd}")
            run = Run(**json.loads(done.stdout))
            runs.append(run)
            print(
                f"round {rnd} {variant:9s} wall {run.wall:6.2f} s  cpu {run.cpu_pct:4.0f}%  "
                f"rss {run.rss_mib:6.0f} MiB  torch {run.torch!s:5s}  "
                f"in index_folders {run.seconds:5.2f} s (embedding {run.embed_seconds:4.2f} s)",
                flush=True,
            )
    count = len(photos[: args.photos])
    print(f"median of {args.rounds} rounds, {count} photo(s), {args.model} (preliminary):")
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        print(
            f"  {variant:9s} wall {statistics.median(r.wall for r in mine):6.2f} s  "
            f"rss {statistics.median(r.rss_mib for r in mine):6.0f} MiB"
        )


if __name__ == "__main__":
    main()
