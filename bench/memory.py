"""Peak memory of `clipdex index` as the number of files grows.

    .venv/bin/python bench/memory.py --counts 1000 10000

For each count, generates that many small distinct JPEGs (in a temporary folder), indexes them
with the tiny test model in a child process and prints the child's peak RSS. The indexer
streams (bounded queues, batched commits), so peak RSS should grow only with what the catalog
itself holds per file, not with decoded images or pending work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.randrange(80), rng.randrange(60)
            draw.rectangle([x, y, x + 16, y + 12], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(sub / f"img{i:06d}.jpg", quality=85)


def index_child(folder: Path, index_dir: Path) -> tuple[dict, float, float]:
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "index",
        str(folder),
        "--index",
        str(index_dir),
        "-m",
        "clipdex-tiny",
        "-p",
        "random",
        "--device",
        "cpu",
        "--json",
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(err.read().decode(errors="replace")[-2000:])
        return json.loads(out.read()), wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    print(f"{'files':>7} {'added':>7} {'seconds':>8} {'peak RSS':>10} {'catalog':>10}")
    for count in args.counts:
        work = Path(tempfile.mkdtemp(prefix="clipdex-mem-"))
        try:
            make_images(work / "photos", count)
            summary, wall, rss = index_child(work / "photos", work / "index")
            catalog = (work / "index" / "catalog.sqlite").stat().st_size / 2**20
            print(f"{count:7d} {summary['added']:7d} {wall:8.1f} {rss:7.0f} MiB {catalog:6.1f} MiB")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
