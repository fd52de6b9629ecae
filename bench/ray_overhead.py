"""The Ray path's overhead against the local path: `clipdex index FOLDER` and `clipdex index FOLDER
--ray local` on the same folder, model and machine, each a fresh process from start to exit into
a new index. Prints JSON.

    .venv/bin/python bench/ray_overhead.py ../shared/datasets/imagenet-sample --pretrained CKPT

The model's exports are cached first by a warm-up run on a few files (CLIPDEX_CACHE in the work
folder), so neither timed run pays the one-time ONNX export. `--rounds N` alternates the two
paths N times (the first path of each round taking turns), so a busy spell on a shared machine
hits both; the JSON keeps every run and the machine's other load during each (others_pct).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import machine_facts
from side_by_side import MODEL, run_child

CLIPDEX = Path(sys.executable).with_name("clipdex")
PATHS = {"local": [], "ray": ["--ray", "local"]}


def index_run(folder: Path, index: Path, model: list[str], extra: list[str], env: dict[str, str]) -> dict:
    cmd = [str(CLIPDEX), "index", str(folder), "--index", str(index), *model, "--json", *extra]
    child = run_child(cmd, env=env)
    summary = json.loads(child.stdout)
    return {
        "added": summary["added"],
        "failed": len(summary["failed"]),
        "wall_s": round(child.wall_s, 2),
        "images_per_second_wall": round(summary["added"] / child.wall_s, 2),
        "images_per_second_embedding": round(summary["images_per_second"], 2),
        "cpu_s": round(child.user_s + child.sys_s, 1),
        "peak_rss_mib": round(child.peak_rss_mib),
        "others_pct": None if child.others_pct is None else round(child.others_pct, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--pretrained", default="random", help="checkpoint file or tag (default: random)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CLIPDEX_CACHE=str(work / "cache"))
    model = ["--model", args.model, "--pretrained", args.pretrained, "--device", "cpu"]
    warm = work / "warm-up"
    warm.mkdir(exist_ok=True)
    for picture in sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:4]:
        shutil.copy(picture, warm / picture.name)
    index_run(warm, work / "warm-up-index", model, [], env)
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "ray": []}
    for rnd in range(args.rounds):
        order = list(PATHS) if rnd % 2 == 0 else list(reversed(PATHS))
        for name in order:
            index = work / f"{name}-{rnd}"
            shutil.rmtree(index, ignore_errors=True)
            runs[name].append(index_run(args.folder, index, model, PATHS[name], env))
            print(json.dumps({"path": name, "round": rnd, **runs[name][-1]}), file=sys.stderr, flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    result = {
        "machine": machine_facts(),
        "folder": str(args.folder),
        "model": args.model,
        "runs": runs,
        "ray_over_local": {
            key: round(median("ray", key) / median("local", key), 3)
            for key in ("images_per_second_wall", "images_per_second_embedding", "wall_s")
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
