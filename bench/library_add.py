"""`clipdex index` adding new photos to a library of a million: the time beyond embedding and the
bytes written. Prints JSON.

    .venv/bin/python bench/library_add.py --workdir /big/disk/scale

bench/scale.py measures adds through `clipdex import`; this runs the command people run on a
photo library: it scans every file of the library, plans, embeds what is new and commits. The
library is --images empty stand-in files in scale.py's folder layout (5,000 folders), whose
vectors come from scale.py's structured set through `clipdex import` (so no million photos are
embedded); --new small JPEGs in a new folder are the photos added, embedded for real with the
same seeded random ViT-B-32. A first `clipdex index` of a few photos into a throwaway index
makes the one-time model exports (ONNX image tower) beforehand, so they are not counted. The
run goes into a copy of the built index (deleted after), in a child whose /proc/<pid>/io is
read at exit. `beyond_embedding_s`: the run's time less the embedding pipeline's (scanning,
planning, loading the model, committing). Needs about 3 GB per million images besides
scale.py's set, and an inode per image.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scale import (
    Structured,
    index_args,
    index_copy,
    make_checkpoint,
    measured_cli,
    row_path,
    row_taken_at,
    run_import,
    write_set,
)

ROOT = Path(__file__).resolve().parents[1]


def make_library(library: Path, n: int) -> None:
    """n empty files at scale.row_path's places under `library` (made once)."""
    done = library / ".complete"
    if done.exists():
        return
    made: set[str] = set()
    for g in range(n):
        path = library_path(library, g)
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        open(path, "ab").close()
    done.write_text("")


def library_path(library: Path, g: int) -> str:
    return str(library) + row_path(g)[len("/bench") :]


def make_new_photos(folder: Path, n: int, seed: int = 0) -> None:
    """n small noise JPEGs (made once): decoding and embedding are the model's usual work."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"new{i:06d}.jpg", quality=80)
    done.write_text("")


def run_index(
    workdir: Path, folder: Path, index_dir: Path, pretrained: str, extra: Sequence[str] = ()
) -> dict:
    """`clipdex index FOLDER [extra...]` in a child (scale.measured_cli): wall time, its summary,
    the bytes it wrote."""
    wall, summary, io = measured_cli(
        workdir, ["index", str(folder), *index_args(index_dir, pretrained), *extra]
    )
    return {
        "wall_s": round(wall, 1),
        "seconds": round(summary["seconds"], 1),
        "embed_seconds": round(summary["embed_seconds"], 1),
        "beyond_embedding_s": round(summary["seconds"] - summary["embed_seconds"], 1),
        "added": summary["added"],
        "unchanged": summary["unchanged"],
        **io,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-scale"))
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--pretrained", help="ViT-B-32 checkpoint (default: scale.py's seeded random one)")
    ap.add_argument(
        "--commit-every", type=int, help="passed to clipdex index (32: a commit per model batch, as before)"
    )
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pretrained = args.pretrained or make_checkpoint(workdir)
    library = workdir / f"library-{args.images}"
    make_library(library, args.images)
    new = library / f"new-{args.new}"  # by count: a rerun with another --new makes its own
    make_new_photos(new, args.new)
    warm = workdir / "warm-up-photos"
    make_new_photos(warm, 8, seed=1)
    run_index(workdir, warm, workdir / "index-warm-up-photos", pretrained)  # the model's exports
    source = workdir / f"library-set-{args.images}"
    write_set(source, Structured(seed=1), 0, args.images, lambda g: library_path(library, g), row_taken_at)
    index_dir = workdir / f"index-library-{args.images}"
    report: dict = {"images": args.images, "new": args.new}
    if not (index_dir / ".complete").exists():
        report["import"] = run_import(workdir, source, index_dir, pretrained)
        (index_dir / ".complete").write_text(json.dumps(report["import"]))
    with index_copy(index_dir) as copy:
        extra = [] if args.commit_every is None else ["--commit-every", str(args.commit_every)]
        report["index_new"] = run_index(workdir, library, copy, pretrained, extra)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
