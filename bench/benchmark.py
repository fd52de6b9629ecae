"""Indexing throughput and cold-query latency of clipdex against a naive open_clip loop.

    .venv/bin/python bench/benchmark.py ../shared/datasets/imagenet-sample

Runs, in this order and each in its own process (so peak RSS is per run):
  1. the naive loop: PIL decode, open_clip preprocess, batches of 32, encode_image, float32;
  2. `clipdex index` on the same files into a fresh index, with the given options;
  3. `clipdex search` from a cold process, 5 times with the query cache off and 5 with it on.
Then compares clipdex's stored vectors with the naive loop's (cosine per image): this is the
fidelity of every shortcut clipdex takes (reduced-scale decoding, backend, precision).
Model weights do not change speed, so `--pretrained random` is the default here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MiB) of one child process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return stdout, wall, usage.ru_maxrss / 1024


def naive_child(args: argparse.Namespace) -> None:
    """The loop everybody writes first; its embeddings are the fidelity reference."""
    import open_clip  # noqa: F401  (timed with the rest of the start-up, as clipdex's is)
    import torch
    from PIL import Image, ImageOps

    from retrieval.embedding.clip_model import ClipModel
    from retrieval.embedding.spec import ModelSpec

    files = list_files(Path(args.data), args.limit)
    clip = ClipModel(ModelSpec(args.model, args.pretrained, "cpu", "fp32"))
    t0 = time.perf_counter()
    vectors, decode_s, model_s = [], 0.0, 0.0
    for i in range(0, len(files), 32):
        d0 = time.perf_counter()
        # exif_transpose (negligible cost) so that the fidelity reference sees the same upright
        # pixels as clipdex; without it a rotated photo would count as an arithmetic difference.
        batch = torch.stack(
            [
                clip.preprocess(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))
                for f in files[i : i + 32]
            ]
        )
        m0 = time.perf_counter()
        with torch.inference_mode():
            feats = clip.model.encode_image(batch)
        m1 = time.perf_counter()
        decode_s += m0 - d0
        model_s += m1 - m0
        vectors.append(torch.nn.functional.normalize(feats, dim=-1).numpy())
    elapsed = time.perf_counter() - t0
    np.save(args.out, np.concatenate(vectors))
    print(
        json.dumps(
            {"images": len(files), "seconds": elapsed, "decode_seconds": decode_s, "model_seconds": model_s}
        )
    )


def list_files(data: Path, limit: int | None) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".webp"}
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in exts and not p.name.startswith("."))
    return files[:limit] if limit else files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "data", nargs="?", default=str(HERE.parent.parent / "shared/datasets/imagenet-sample")
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images.")
    parser.add_argument("--query", default="a photo of a dog")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--index-args", default="", help="Extra options for 'clipdex index', quoted.")
    parser.add_argument("--naive-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child:
        naive_child(args)
        return
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"dataset folder not found: {data} (pass its path as the first argument)")
    files = list_files(data, args.limit)
    work = Path(tempfile.mkdtemp(prefix="clipdex-bench-"))
    try:
        subset = data
        if args.limit:  # index exactly the files the naive loop sees
            subset = work / "subset"
            subset.mkdir()
            for f in files:
                os.symlink(f.resolve(), subset / f.name)
        py = sys.executable
        clipdex = [py, "-m", "cli.main"]
        print(
            f"dataset: {data} ({len(files)} images), model {args.model}/{args.pretrained}, "
            f"{os.cpu_count()} cores"
        )
        naive = None
        if not args.skip_naive:
            out, _, naive_rss = run_child(
                [
                    py,
                    __file__,
                    str(subset),
                    "--naive-child",
                    "--model",
                    args.model,
                    "--pretrained",
                    args.pretrained,
                    "--out",
                    str(work / "naive.npy"),
                ]
                + (["--limit", str(args.limit)] if args.limit else [])
            )
            naive = json.loads(out)
            naive["rss"] = naive_rss
        index_dir = work / "index"
        out, wall, rss = run_child(
            clipdex
            + [
                "index",
                str(subset),
                "--index",
                str(index_dir),
                "-m",
                args.model,
                "-p",
                args.pretrained,
                "--json",
            ]
            + args.index_args.split()
        )
        summary = json.loads(out)
        rows = []
        if naive:
            rows.append(
                (
                    "naive loop (fp32, batch 32)",
                    naive["images"] / naive["seconds"],
                    naive["decode_seconds"],
                    naive["model_seconds"],
                    naive["rss"],
                )
            )
        ips = summary["images_per_second"]
        rows.append(("clipdex index", ips, summary["decode_seconds"], summary["model_seconds"], rss))
        print(f"\n{'run':32} {'images/s':>9} {'decode s':>9} {'model s':>8} {'peak RSS':>9}")
        for name, rate, dec, mod, mem in rows:
            print(f"{name:32} {rate:9.2f} {dec:9.1f} {mod:8.1f} {mem:7.0f} MiB")
        print("(clipdex decodes in worker threads, overlapped with the model: its decode time is hidden)")
        if naive:
            print(f"speed-up over the naive loop: {ips / (naive['images'] / naive['seconds']):.2f}x")
            fidelity(index_dir, files, work / "naive.npy", subset, data)
        cold_queries(clipdex, index_dir, args.query)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fidelity(index_dir: Path, files: list[Path], naive_npy: Path, subset: Path, data: Path) -> None:
    from retrieval.index import ImageIndex

    reference = np.load(naive_npy)
    with ImageIndex.open(index_dir) as idx:
        by_path = {r.path: r.id for r in idx.records().values()}
        ids = [by_path.get(os.path.abspath(subset / f.name if subset != data else f)) for f in files]
        keep = [i for i, x in enumerate(ids) if x is not None]
        mine = idx.catalog.embeddings([ids[i] for i in keep], idx.dim)
    cos = np.sum(mine * reference[keep], axis=1)
    print(
        f"fidelity vs naive float32 ({len(keep)} images): mean cosine {cos.mean():.5f}, min {cos.min():.5f}"
    )


def cold_queries(clipdex: list[str], index_dir: Path, query: str, runs: int = 5) -> None:
    cache_off = dict(os.environ, CLIPDEX_QUERY_CACHE="0")
    for label, env in (("cold search, no query cache", cache_off), ("cold search, cached query", None)):
        times = []
        for i in range(runs):
            text = f"{query} {i}" if env is cache_off else query
            _, wall, _ = run_child(clipdex + ["search", text, "--index", str(index_dir), "-k", "10"], env)
            times.append(wall)
        print(
            f"{label:30} median {statistics.median(times):.2f} s  "
            f"(runs: {', '.join(f'{t:.2f}' for t in times)})"
        )


if __name__ == "__main__":
    main()
