"""The `clipdex` command: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from retrieval.errors import ClipdexError

from .output import human_bytes, print_hits, safe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Search your photos by text and by image (CLIP + FAISS + SQLite).",
    pretty_exceptions_enable=False,
)


class Fmt(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    paths = "paths"


IndexOpt = Annotated[
    Path | None,
    typer.Option("--index", "-i", help="Index folder (default: $CLIPDEX_INDEX or the per-user data folder)."),
]
KOpt = Annotated[int, typer.Option("-k", "--top", min=1, help="Number of results.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
JsonlOpt = Annotated[bool, typer.Option("--jsonl", help="Print one JSON object a line.")]
PathsOpt = Annotated[bool, typer.Option("--paths", help="Print bare paths, one a line (for xargs).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16 (CUDA).")]


def _fmt(json_: bool, jsonl: bool, paths: bool) -> str:
    return "json" if json_ else "jsonl" if jsonl else "paths" if paths else "table"


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders (or image files) to index.")],
    index_dir: IndexOpt = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip architecture or config .json.")
    ] = "ViT-B-32",
    pretrained: Annotated[
        str,
        typer.Option("--pretrained", "-p", help="Pretrained tag, local checkpoint file/folder, or 'random'."),
    ] = "laion2b_s34b_b79k",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding threads (0: automatic).")] = 0,
    reindex: Annotated[
        bool, typer.Option("--reindex", help="Embed every file again (also to switch models).")
    ] = False,
    errors: Annotated[
        Path | None, typer.Option("--errors", help="Write failed files and reasons here (TSV).")
    ] = None,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", help="Refuse images with more pixels.")
    ] = 100_000_000,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds before one file's decoding is given up.")
    ] = 60.0,
    json_: JsonOpt = False,
) -> None:
    """Index image folders (incremental: only new and changed files are embedded)."""
    from indexer import IndexOptions, index_folders
    from indexer.decode import DecodeOptions
    from retrieval.model import ModelSpec

    spec = ModelSpec(model, pretrained, device, precision)
    options = IndexOptions(
        batch_size=batch_size,
        decode_workers=workers,
        decode_timeout=timeout,
        decode=DecodeOptions(max_pixels=max_pixels),
        reindex=reindex,
    )
    stop = threading.Event()
    bar = _ProgressBar()

    def on_sigint(signum, frame):  # type: ignore[no-untyped-def]
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the batch in flight (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        summary = index_folders(folders, index_dir, spec, options, progress=bar.update, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    if errors is not None:
        with open(errors, "w", encoding="utf-8", errors="backslashreplace") as f:
            for path, reason in summary.failed:
                f.write(f"{safe(path)}\t{reason}\n")
    if json_:
        data = {k: v for k, v in vars(summary).items() if k != "failed"}
        data["failed"] = [{"path": p, "reason": r} for p, r in summary.failed]
        data["images_per_second"] = summary.images_per_second
        print(json.dumps(data, indent=2))
    else:
        state = "interrupted" if summary.interrupted else "done"
        print(
            f"{state}: {summary.added} added, {summary.updated} updated, {summary.moved} moved, "
            f"{summary.removed} removed, {summary.unchanged} unchanged, {len(summary.failed)} failed "
            f"({summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s)"
        )
        for path, reason in summary.failed[:10]:
            print(f"  failed: {safe(path)}: {reason}", file=sys.stderr)
        if len(summary.failed) > 10:
            hint = f" (all in {errors})" if errors else " (use --errors FILE for the full list)"
            print(f"  ... and {len(summary.failed) - 10} more{hint}", file=sys.stderr)
    if summary.interrupted:
        raise typer.Exit(130)


class _ProgressBar:
    """tqdm on stderr, created on the first update so that nothing shows for a no-op run."""

    def __init__(self) -> None:
        self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, disable=None, leave=False)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="What to look for.")],
    k: KOpt = 10,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
    paths: PathsOpt = False,
) -> None:
    """Find images that match a text."""
    from retrieval.store import ImageIndex

    with ImageIndex.open(index_dir, device=device) as idx:
        hits = idx.search_text(text, k)
    print_hits(hits, _fmt(json_, jsonl, paths))


@app.command()
def similar(
    image: Annotated[Path, typer.Argument(help="An image file, indexed or not.")],
    k: KOpt = 10,
    index_dir: IndexOpt = None,
    include_self: Annotated[
        bool, typer.Option("--include-self", help="Keep the query image in its results.")
    ] = False,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
    paths: PathsOpt = False,
) -> None:
    """Find images that look like IMAGE."""
    from retrieval.store import ImageIndex

    with ImageIndex.open(index_dir, device=device) as idx:
        hits = idx.search_image(image, k, exclude_self=not include_self)
    print_hits(hits, _fmt(json_, jsonl, paths))


@app.command()
def info(index_dir: IndexOpt = None, json_: JsonOpt = False) -> None:
    """What an index holds: model, image count, size on disk, last update."""
    from retrieval.store import ImageIndex

    with ImageIndex.open(index_dir) as idx:
        facts = idx.info()
    if json_:
        data = vars(facts).copy()
        data["model"] = facts.model.to_dict() if facts.model else None
        print(json.dumps(data, indent=2))
        return
    updated = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(facts.updated_at)) if facts.updated_at else "never"
    )
    model = f"{facts.model.describe()}, {facts.model.dim} dimensions" if facts.model else "none yet"
    print(f"index:    {safe(facts.directory)}")
    print(f"model:    {model}")
    print(f"images:   {facts.images}")
    print(f"on disk:  {human_bytes(facts.bytes_on_disk)}")
    print(f"updated:  {updated}")


@app.command()
def verify(
    index_dir: IndexOpt = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Restore the invariants from the catalog.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Check the index: every FAISS id is one catalog row, vectors are unit-norm, files exist."""
    from retrieval.store import ImageIndex
    from retrieval.verify import verify_index

    with ImageIndex.open(index_dir) as idx:
        report = verify_index(idx, repair=repair)
    if json_:
        data = vars(report).copy()
        data["ok"] = report.ok
        print(json.dumps(data, indent=2))
    else:
        for line in report.problems:
            print(f"problem: {line}")
        for line in report.repaired:
            print(f"repaired: {line}")
        if report.missing_files:
            print(
                f"{len(report.missing_files)} indexed files no longer exist "
                "(run 'clipdex index' to forget them):"
            )
            for path in report.missing_files[:10]:
                print(f"  {safe(path)}")
        print(f"{'ok' if report.ok else 'NOT ok'}: {report.images} images checked")
    if not report.ok:
        raise typer.Exit(1)


def run() -> None:
    """Entry point: library errors become one line on stderr, without a traceback."""
    try:
        app()
    except ClipdexError as exc:
        print(f"clipdex: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("clipdex: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
