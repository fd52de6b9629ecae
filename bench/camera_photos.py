"""Camera-size test photos: what a phone writes, made from a folder of small real photos.

    .venv/bin/python bench/camera_photos.py [SOURCE] [--out /tmp/clipdex-camera] [-n 150]

Each output is a 4032x3024 JPEG (12 MP, a phone's main camera) at quality 92 with 4:2:0 chroma
subsampling, made from one source photo (default: ../shared/datasets/imagenet-sample):
  - cropped to 4:3 (3:4 for portrait shots) and upscaled with Lanczos;
  - given film grain / sensor noise (luma grain plus blotchy chroma noise). An upscaled
    500x375 photo is so smooth that it compresses to a fraction of a real photo and decodes
    faster; the grain brings the entropy, hence the file size (about 3.5 MB) and the Huffman
    decoding cost, up to a phone's;
  - on most files, an EXIF block with Make/Model, DateTimeOriginal and Orientation. Portrait
    shots are stored sideways with Orientation 6 or 8 (as phones do), a few upside down (3),
    so that readers must apply the orientation. The rest carry no EXIF (stripped by a
    messaging app, say).
Everything is seeded: the same arguments give the same files. The source photos only carry
detail up to their own resolution, so fine-detail-dependent measurements (reduced-scale
decoding fidelity) are somewhat kinder here than on real 12 MP photos.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "imagenet-sample"
DEFAULT_OUT = Path("/tmp/clipdex-camera")
MARKER = ".camera_photos.json"  # hidden: neither clipdex nor rclip indexes it
SOURCE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}

# Luma grain sigma (8-bit levels) measured to give a median of about 3.5 MB per 4032x3024 file at
# quality 92, 4:2:0; chroma noise is weaker, as after a phone's denoiser.
DEFAULT_GRAIN = 4.5
CHROMA_SHARE = 0.45

_EXIF_ORIENTATION = 0x0112
_EXIF_MAKE = 0x010F
_EXIF_MODEL = 0x0110
_EXIF_IFD = 0x8769
_EXIF_DATETIME_ORIGINAL = 0x9003
_DATE_START = 1672531200  # 2023-01-01 UTC: a year of plausible capture dates from there


@dataclass(frozen=True)
class PhotoPlan:
    """Everything that decides one output file, so that a worker process can make it alone."""

    index: int
    source: str
    name: str
    seed: int
    width: int
    height: int
    grain: float
    orientation: int | None  # None: no EXIF block at all
    taken: str | None  # EXIF DateTimeOriginal, "YYYY:MM:DD HH:MM:SS"


def list_sources(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in SOURCE_EXTENSIONS and not p.name.startswith(".")
    )


def plan_photos(
    sources: list[Path], count: int, seed: int, size: tuple[int, int], grain: float
) -> list[PhotoPlan]:
    # Photo i depends only on the seed and i, never on --count: a 10-photo smoke set is the
    # first 10 of the 150. Distinct sources while they last, then they repeat with other grain.
    order = list(sources)
    random.Random(seed).shuffle(order)
    plans = []
    for i in range(count):
        source = order[i % len(order)]
        rng = random.Random(seed * 1_000_003 + i)
        has_exif = rng.random() < 0.7
        orientation = rng.choices([1, 6, 8, 3], weights=[70, 20, 5, 5])[0] if has_exif else None
        taken = None
        if has_exif:
            taken = time.strftime("%Y:%m:%d %H:%M:%S", time.gmtime(_DATE_START + rng.randrange(365 * 86400)))
        name = f"IMG_{i + 1:04d}.jpg"
        plans.append(PhotoPlan(i, str(source), name, seed * 1_000_003 + i, *size, grain, orientation, taken))
    return plans


def _crop_box(width: int, height: int, aspect: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The largest box of the given aspect (w/h) in the source, placed a little off centre."""
    if width / height > aspect:
        w, h = round(height * aspect), height
    else:
        w, h = width, round(width / aspect)
    left = int((width - w) * rng.uniform(0.3, 0.7))
    top = int((height - h) * rng.uniform(0.3, 0.7))
    return left, top, left + w, top + h


def _add_grain(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(img, dtype=np.float32)
    h, w = pixels.shape[:2]
    pixels += (rng.standard_normal((h, w), dtype=np.float32) * sigma)[..., None]
    # Chroma noise on a half-resolution grid: sensor colour noise is blotchy, not per pixel.
    chroma = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32) * (sigma * CHROMA_SHARE)
    pixels += chroma.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    np.clip(pixels + 0.5, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# The transpose that turns an upright picture into what the camera stores for each orientation
# (the viewer undoes it): 6 means "rotate 90 degrees clockwise to display".
_STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def _exif_bytes(plan: PhotoPlan) -> bytes:
    exif = Image.Exif()
    exif[_EXIF_MAKE] = "clipdex-bench"
    exif[_EXIF_MODEL] = "synthetic 12MP"
    exif[_EXIF_ORIENTATION] = plan.orientation or 1
    if plan.taken:
        exif.get_ifd(_EXIF_IFD)[_EXIF_DATETIME_ORIGINAL] = plan.taken
    return exif.tobytes()


def make_photo(plan: PhotoPlan, out: Path) -> int:
    """Write one photo; returns its size in bytes."""
    rng = np.random.default_rng(plan.seed)
    sideways = plan.orientation in (6, 8)
    upright = (plan.height, plan.width) if sideways else (plan.width, plan.height)
    with Image.open(plan.source) as src:
        src = src.convert("RGB")
        box = _crop_box(src.width, src.height, upright[0] / upright[1], rng)
        img = src.resize(upright, Image.Resampling.LANCZOS, box=box)
    img = _add_grain(img, plan.grain, rng)
    if plan.orientation in _STORED:
        img = img.transpose(_STORED[plan.orientation])
    buf = io.BytesIO()
    extra = {"exif": _exif_bytes(plan)} if plan.orientation is not None else {}
    img.save(buf, "JPEG", quality=92, subsampling=2, **extra)  # subsampling=2 is 4:2:0
    # Written under a hidden name, then renamed: an interrupted run never leaves a cut-off JPEG
    # that a benchmark would count as a photo.
    part = out / f".{plan.name}.part"
    part.write_bytes(buf.getbuffer())
    os.replace(part, out / plan.name)
    return buf.tell()


def _settings(args: argparse.Namespace, plans: list[PhotoPlan]) -> dict:
    return {
        "source": str(Path(args.source).resolve()),
        "count": args.count,
        "seed": args.seed,
        "size": args.size,
        "grain": args.grain,
        "plans": [asdict(p) for p in plans],
    }


def _check_out(out: Path, source: Path) -> None:
    resolved = out.resolve()
    for forbidden, what in ((ROOT, "the repository"), (source.resolve(), "the source folder")):
        if resolved == forbidden or forbidden in resolved.parents:
            sys.exit(f"refusing to write into {what}: choose an output folder elsewhere (e.g. {DEFAULT_OUT})")
    if resolved.is_dir() and any(resolved.iterdir()) and not (resolved / MARKER).is_file():
        sys.exit(f"{out} is not empty and was not made by this script: choose an empty or new folder")


def _existing(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(out: Path, previous: dict | None, settings: dict) -> list[int] | None:
    """Sizes of the files already there when an earlier run made exactly these; else None."""
    if not previous or {k: v for k, v in previous.items() if k != "sizes"} != settings:
        return None
    sizes = previous.get("sizes", [])
    files = [out / p["name"] for p in settings["plans"]]
    if len(sizes) != len(files):
        return None
    if any(not f.is_file() or f.stat().st_size != s for f, s in zip(files, sizes)):
        return None
    return sizes


def report(sizes: list[int], out: Path) -> None:
    median = statistics.median(sizes) / 1e6
    print(
        f"{len(sizes)} photos in {out}: total {sum(sizes) / 1e6:.1f} MB, median {median:.2f} MB"
        f" (min {min(sizes) / 1e6:.2f}, max {max(sizes) / 1e6:.2f})"
    )
    if not 3.0 <= median <= 4.0:
        print(f"note: a 12 MP phone JPEG is about 3-4 MB; adjust --grain (now gives {median:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE), help="Folder of source photos.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="Output folder, outside the repository.")
    parser.add_argument("-n", "--count", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="4032x3024", help="WIDTHxHEIGHT of a landscape shot.")
    parser.add_argument("--grain", type=float, default=DEFAULT_GRAIN, help="Luma noise sigma, 8-bit levels.")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Worker processes.")
    parser.add_argument("--force", action="store_true", help="Make the files again even if up to date.")
    args = parser.parse_args()

    source, out = Path(args.source), Path(args.out)
    if not source.is_dir():
        sys.exit(f"source folder not found: {source} (pass a folder of photos as the first argument)")
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        sys.exit(f"--size must look like 4032x3024, not {args.size!r}")
    if args.count < 1:
        sys.exit("--count must be at least 1")
    sources = list_sources(source)
    if not sources:
        sys.exit(f"no photos (jpg, jpeg, png, webp) in {source}")
    _check_out(out, source)

    plans = plan_photos(sources, args.count, args.seed, (width, height), args.grain)
    settings = _settings(args, plans)
    previous = _existing(out)
    sizes = None if args.force else _up_to_date(out, previous, settings)
    if sizes is not None:
        print("already made with these settings (use --force to make them again)")
        report(sizes, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    # Files from an earlier run with other settings go first: a smaller --count must not leave
    # extra photos behind for the benchmark to count.
    for plan in (previous or {}).get("plans", []):
        (out / plan["name"]).unlink(missing_ok=True)
    (out / MARKER).unlink(missing_ok=True)

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        sizes = list(pool.map(make_photo, plans, [out] * len(plans)))
    (out / MARKER).write_text(json.dumps({**settings, "sizes": sizes}, indent=1))
    print(f"made in {time.perf_counter() - t0:.0f} s")
    report(sizes, out)


if __name__ == "__main__":
    main()
