"""Reduced-scale JPEG decoding: what it saves, and how close its embeddings stay to a full decode.

    .venv/bin/python bench/decode_fidelity.py [/tmp/clipdex-camera] [--factors 2] [--json out.json]

Each photo is decoded twice (or once more per --factors value): in full, and with Pillow's
draft() (libjpeg DCT scaling: 1/2, 1/4 or 1/8 of the size, chosen so that both sides stay at
least FACTOR x the model's input size), both through clipdex's own image loading (EXIF
orientation applied). Both pictures then go through the model's own preprocessing and image
tower, and the two embeddings are compared: cosine mean and minimum over the set. Issue 10's
bar for switching reduced decoding on: mean >= 0.999 and min >= 0.99.

Decode and preprocess times are medians per image, from bytes already in memory (no I/O), in
CPU time of the one thread that does both (steady on a shared machine; PIL's resize, most of
the preprocessing, runs there); `decode wall` also counts waiting for a core.

The model is ViT-B-32-256 with the seeded random weights that ../shared/peers/rclip_offline.sh
exports (the same as bench/side_by_side.py uses). Random weights react to pixel changes only
roughly as trained ones do: repeat with trained weights (--pretrained) before relying on a
figure near the bar.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from any directory

DEFAULT_FOLDER = Path("/tmp/clipdex-camera")
DEFAULT_CHECKPOINT = Path("/tmp/clipdex-peers/datadir/ViT-B-32-256-seed0.pt")
EXTENSIONS = {".jpg", ".jpeg", ".jpe"}
MEAN_REQUIRED = 0.999
MIN_REQUIRED = 0.99


def _load_image_function() -> Any:
    # retrieval is being split into subpackages; accept the loader wherever it lives.
    try:
        from retrieval.imageio import load_image
    except ImportError:
        try:
            from retrieval.core.imageio import load_image
        except ImportError:
            from retrieval.core.images import load_image
    return load_image


@dataclass
class Way:
    """One way of decoding: full (draft_size None) or reduced to at least draft_size a side."""

    label: str
    draft_size: int | None
    decode_cpu_ms: list[float] = field(default_factory=list)
    decode_wall_ms: list[float] = field(default_factory=list)
    preprocess_ms: list[float] = field(default_factory=list)
    decoded: list[tuple[int, int]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    def embeddings(self) -> np.ndarray:
        return np.concatenate(self.vectors)


def input_size(clip: Any) -> int:
    size = clip.preprocess_cfg["size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def embed_chunk(clip: Any, load_image: Any, way: Way, chunk: list[bytes]) -> None:
    import torch

    pixels = []
    for data in chunk:
        c0, w0 = time.thread_time(), time.perf_counter()
        loaded = load_image(data, draft_size=way.draft_size)
        c1, w1 = time.thread_time(), time.perf_counter()
        # Thread CPU time again: process time would also count torch's idle pool threads
        # spin-waiting after a parallel step, which dwarfs a small image's preprocessing.
        p0 = time.thread_time()
        pixels.append(clip.preprocess(loaded.image))
        p1 = time.thread_time()
        way.decode_cpu_ms.append(1000 * (c1 - c0))
        way.decode_wall_ms.append(1000 * (w1 - w0))
        way.preprocess_ms.append(1000 * (p1 - p0))
        way.decoded.append(loaded.image.size)
        del loaded  # a full 12 MP decode is 36 MB: keep one at a time, not a chunk's worth
    way.vectors.append(clip.encode_images(torch.stack(pixels)))


def compare(files: list[Path], clip: Any, ways: list[Way], batch: int) -> None:
    load_image = _load_image_function()
    for start in range(0, len(files), batch):
        chunk = [f.read_bytes() for f in files[start : start + batch]]
        for way in ways:
            embed_chunk(clip, load_image, way, chunk)
        print(f"\r{min(start + batch, len(files))}/{len(files)} photos", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def report(files: list[Path], ways: list[Way]) -> list[dict[str, Any]]:
    full = ways[0].embeddings()
    rows = []
    print(
        f"{'decoding':14} {'long x short':>17} {'decode cpu':>11} {'decode wall':>12} {'prep. cpu':>11}"
        f" {'cos mean':>9} {'cos min':>9}"
    )
    for way in ways:
        cos = np.sum(way.embeddings() * full, axis=1)  # unit vectors: the dot product is the cosine
        worst = int(np.argmin(cos))
        # Long x short side: portrait and landscape shots of one camera then read the same.
        longs, shorts = zip(*(sorted(size, reverse=True) for size in way.decoded))
        row = {
            "decoding": way.label,
            "draft_size": way.draft_size,
            "decoded_median": [int(statistics.median(longs)), int(statistics.median(shorts))],
            "decode_cpu_ms": statistics.median(way.decode_cpu_ms),
            "decode_wall_ms": statistics.median(way.decode_wall_ms),
            "preprocess_ms": statistics.median(way.preprocess_ms),
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "worst": files[worst].name,
            "cosines": [float(c) for c in cos],
        }
        rows.append(row)
        decoded = "x".join(str(v) for v in row["decoded_median"])
        print(
            f"{way.label:14} {decoded:>17} {row['decode_cpu_ms']:8.1f} ms {row['decode_wall_ms']:9.1f} ms"
            f" {row['preprocess_ms']:8.1f} ms {row['cos_mean']:9.5f} {row['cos_min']:9.5f}"
        )
    for row in rows[1:]:
        ok = row["cos_mean"] >= MEAN_REQUIRED and row["cos_min"] >= MIN_REQUIRED
        full_ms = rows[0]["decode_cpu_ms"] + rows[0]["preprocess_ms"]
        saved = full_ms - row["decode_cpu_ms"] - row["preprocess_ms"]
        print(
            f"{row['decoding']}: {'meets' if ok else 'BELOW'} the bar (mean >= {MEAN_REQUIRED},"
            f" min >= {MIN_REQUIRED}); worst {row['worst']}; saves {saved:.0f} ms of decode+preprocess"
            " per photo"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER), help="JPEG photos.")
    parser.add_argument("--model", default="ViT-B-32-256")
    parser.add_argument("--pretrained", default=str(DEFAULT_CHECKPOINT), help="Checkpoint, tag or 'random'.")
    parser.add_argument(
        "--factors", type=float, nargs="+", default=[2.0], help="draft_size = FACTOR x model input size."
    )
    parser.add_argument("--limit", type=int, help="Only the first N photos.")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path, help="Write the figures and per-photo cosines here.")
    args = parser.parse_args()

    folder = Path(args.folder)
    if not folder.is_dir():
        sys.exit(f"photo folder not found: {folder} (make one with bench/camera_photos.py)")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
    )
    files = files[: args.limit] if args.limit else files
    if not files:
        sys.exit(f"no JPEG photos in {folder}")
    if args.pretrained == str(DEFAULT_CHECKPOINT) and not DEFAULT_CHECKPOINT.is_file():
        sys.exit(
            f"checkpoint not found: {DEFAULT_CHECKPOINT} (run ../shared/peers/rclip_offline.sh"
            " /tmp/clipdex-peers .venv/bin/python, or pass --pretrained)"
        )

    from retrieval import ClipModel, ModelSpec

    clip = ClipModel(ModelSpec(arch=args.model, pretrained=args.pretrained, device="cpu", precision="fp32"))
    size = input_size(clip)
    ways = [Way("full", None)] + [Way(f"draft {f:g}x", round(f * size)) for f in args.factors]
    backend = getattr(clip, "backend", "?")
    print(f"{len(files)} photos in {folder}; model {args.model}, input {size}px, backend {backend}")
    compare(files, clip, ways, args.batch)
    rows = report(files, ways)
    if args.json:
        args.json.write_text(json.dumps({"folder": str(folder), "input_size": size, "ways": rows}, indent=1))
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
