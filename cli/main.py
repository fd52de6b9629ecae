"""The `clipdex` command: parses arguments, calls the library, prints. No logic of its own.

Each command imports the library modules it uses when it runs: `clipdex --help` stays instant,
and `search` starts loading the text tower in a background thread before SQLAlchemy and FAISS
are imported, so that the two overlap.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from retrieval.core.errors import ClipdexError

from .options import CatalogOpt, IndexOpt, JsonOpt
from .output import ProgressBar, human_bytes, interruptible, print_hits, safe

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


KOpt = Annotated[int, typer.Option("-k", "--top", min=1, help="Number of results.")]
JsonlOpt = Annotated[bool, typer.Option("--jsonl", help="Print one JSON object a line.")]
PathsOpt = Annotated[bool, typer.Option("--paths", help="Print bare paths, one a line (for xargs).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto, fp32, bf16, fp16 (CUDA) or int8 (CPU, opt-in, lossy).")
]


def _fmt(json_: bool, jsonl: bool, paths: bool) -> str:
    return "json" if json_ else "jsonl" if jsonl else "paths" if paths else "table"


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders (or image files) to index.")],
    index_dir: IndexOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="open_clip architecture or .json config [default: the index's or ViT-B-32]"
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            "--pretrained",
            "-p",
            help="Pretrained tag, local checkpoint file/folder, or 'random' "
            "[default: the index's, else the model's first open_clip tag; laion2b_s34b_b79k for "
            "ViT-B-32].",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: Annotated[
        str,
        typer.Option(
            "--backend", help="auto, torch, onnx (ONNX Runtime: CPU fp32/int8) or openvino (CPU fp32/bf16)."
        ),
    ] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding threads (0: automatic).")] = 0,
    commit_every: Annotated[
        int,
        typer.Option(
            "--commit-every",
            min=1,
            help="Commit once this many files are done (and every 10 s): fewer writes, more "
            "re-embedded after a kill.",
        ),
    ] = 512,  # IndexOptions.commit_every (not imported here: the indexer loads only to index)
    reindex: Annotated[
        bool,
        typer.Option(
            "--reindex",
            help="Embed every file again (also to switch models). The new vectors are built beside "
            "the old ones, which searches keep using until the swap at the end; a stopped reindex "
            "resumes when run again.",
        ),
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
    full_decode: Annotated[
        bool,
        typer.Option(
            "--full-decode",
            help="Decode every JPEG at full size. By default a photo much larger than the model's input "
            "is decoded at a reduced scale (1/2 to 1/8, still at least twice the input): several times "
            "faster, embeddings within cosine 0.999 of a full decode.",
        ),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="PATTERN",
            help="Leave out what matches PATTERN (.gitignore rules, relative to each FOLDER; 'raw/' is a "
            "folder). Repeatable. Remembered per folder: later runs use them until --exclude is given "
            "again, which replaces them; --exclude '' forgets them. Already indexed images that are now "
            "excluded leave the index. A .clipdexignore file does the same for its folder and below.",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Decode and embed on Ray (the 'ray' extra): 'local' (an instance started here, on "
            "loopback), 'auto' (this machine's cluster) or a cluster address. Scanning and commits stay "
            "here; docs/scale-out.md.",
        ),
    ] = None,
    catalog: CatalogOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Index image folders (incremental: only new and changed files are embedded)."""
    from indexer import IndexOptions, index_folders
    from indexer.decode import DecodeOptions
    from indexer.model_choice import resolve_model_spec

    runner = None
    if ray is not None:
        from indexer.ray_runner import RayRunner

        runner = RayRunner(ray)  # refuses at once where Ray is not installed
    spec = resolve_model_spec(index_dir, model, pretrained, device, precision, backend, catalog=catalog)
    options = IndexOptions(
        catalog=catalog,
        batch_size=batch_size,
        decode_workers=workers,
        commit_every=commit_every,
        decode_timeout=timeout,
        decode=DecodeOptions(max_pixels=max_pixels, full_decode=full_decode),
        reindex=reindex,
        excludes=tuple(exclude) if exclude is not None else None,
    )
    bar = ProgressBar("img")
    with interruptible(bar) as stop:
        summary = index_folders(
            folders, index_dir, spec, options, progress=bar.update, stop=stop, runner=runner
        )
    if errors is not None:
        with open(errors, "w", encoding="utf-8", errors="backslashreplace") as f:
            for path, reason in summary.failed:
                f.write(f"{safe(path)}\t{reason}\n")
    if json_:
        data = {k: v for k, v in vars(summary).items() if k not in ("failed", "skipped")}
        data["failed"] = [{"path": p, "reason": r} for p, r in summary.failed]
        data["skipped"] = [{"path": p, "reason": r} for p, r in summary.skipped]
        data["images_per_second"] = summary.images_per_second
        print(json.dumps(data, indent=2))
    else:
        state = "interrupted" if summary.interrupted else "done"
        print(
            f"{state}: {summary.added} added, {summary.updated} updated, {summary.moved} moved, "
            f"{summary.removed} removed, {summary.unchanged} unchanged, {len(summary.failed)} failed "
            f"({summary.seconds:.1f} s; embedding {summary.images_per_second:.1f} images/s; "
            f"model {safe(summary.model)})"
        )
        for path, reason in summary.failed[:10]:
            print(f"  failed: {safe(path)}: {reason}", file=sys.stderr)
        if len(summary.failed) > 10:
            hint = f" (all in {errors})" if errors else " (use --errors FILE for the full list)"
            print(f"  ... and {len(summary.failed) - 10} more{hint}", file=sys.stderr)
        _print_skipped(summary.skipped)
        if summary.reindex_pending:
            print(
                "reindex not finished: some files could not be read; searches still use the old "
                "vectors. Run the same command again to finish it.",
                file=sys.stderr,
            )
    if summary.interrupted:
        raise typer.Exit(130)


def _print_skipped(skipped: list[tuple[str, str]], shown: int = 5) -> None:
    if not skipped:
        return
    n = len(skipped)
    what = (
        "1 folder could not be read and was skipped (its"
        if n == 1
        else (f"{n} folders could not be read and were skipped (their")
    )
    print(f"{what} indexed photos are kept):", file=sys.stderr)
    for path, reason in skipped[:shown]:
        print(f"  {safe(path)}: {reason}", file=sys.stderr)
    if n > shown:
        print(f"  ... and {n - shown} more (--json lists them all)", file=sys.stderr)


# -- query power: options shared by search, similar and classify ---------------------------
PlusOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--plus", metavar="TERM", help="Add a term: a text or an image path ('W:TERM': weight W). Repeatable."
    ),
]
MinusOpt = Annotated[
    list[str] | None,
    typer.Option("--minus", metavar="TERM", help="Subtract a term (text or image path). Repeatable."),
]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option("--templates", help="Prompt templates, one a line with {} (implies --ensemble)."),
]
InOpt = Annotated[
    list[Path] | None, typer.Option("--in", metavar="DIR", help="Only images under DIR. Repeatable.")
]
GlobOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--glob",
        metavar="PATTERN",
        help="Only paths matching PATTERN (on the file name when it has no '/'). Repeatable.",
    ),
]
AfterOpt = Annotated[
    str | None,
    typer.Option(
        "--after", metavar="DATE", help="Taken on or after DATE (YYYY-MM-DD[THH:MM]; EXIF date, else mtime)."
    ),
]
BeforeOpt = Annotated[str | None, typer.Option("--before", metavar="DATE", help="Taken before DATE.")]
TypeOpt = Annotated[
    str | None, typer.Option("--type", metavar="TYPES", help="File types, comma-separated: jpeg,png,webp,...")
]
MinWidthOpt = Annotated[int | None, typer.Option("--min-width", min=0, help="Minimum width in pixels.")]
MinHeightOpt = Annotated[int | None, typer.Option("--min-height", min=0, help="Minimum height in pixels.")]
TagOpt = Annotated[
    list[str] | None,
    typer.Option("--tag", metavar="LABEL", help="Only images tagged LABEL (classify --store). Repeatable."),
]
MinScoreOpt = Annotated[float | None, typer.Option("--min-score", help="Drop hits below this cosine.")]
WithinOpt = Annotated[
    float | None, typer.Option("--within", min=0.0, help="Keep hits within this margin of the best score.")
]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="Skip this many hits (paging).")]
PreviewOpt = Annotated[
    bool, typer.Option("--preview", help="Inline thumbnails in kitty and iTerm2 (ignored elsewhere).")
]


def _filters(
    folders: list[Path] | None,
    globs: list[str] | None,
    after: str | None,
    before: str | None,
    types: str | None,
    min_width: int | None,
    min_height: int | None,
    tags: list[str] | None = None,
):  # type: ignore[no-untyped-def]
    from retrieval.core.filters import Filters, parse_date, parse_formats

    return Filters(
        folders=tuple(str(f) for f in folders or ()),
        globs=tuple(globs or ()),
        after=None if after is None else parse_date(after, "--after"),
        before=None if before is None else parse_date(before, "--before"),
        formats=() if types is None else parse_formats(types),
        min_width=min_width,
        min_height=min_height,
        tags=tuple(tags or ()),
    )


def _templates(templates: Path | None):  # type: ignore[no-untyped-def]
    from retrieval.search.query import load_templates

    return None if templates is None else load_templates(templates)


def _add_terms(query, plus: list[str] | None, minus: list[str] | None):  # type: ignore[no-untyped-def]
    from retrieval.search.query import Term

    for value in plus or ():
        query = query.plus(Term.parse(value))
    for value in minus or ():
        query = query.minus(Term.parse(value))
    return query


@app.command()
def search(
    text: Annotated[
        list[str],
        typer.Argument(
            metavar="QUERY",
            help="What to look for: a text, an image path, or terms joined by ' + ' / ' - ' "
            "with optional 'W:' weights, e.g. '\"2:golden retriever\" + ./pool.jpg - people'.",
        ),
    ],
    k: KOpt = 10,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
    plus: PlusOpt = None,
    minus: MinusOpt = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="Embed texts through many prompt templates and average.")
    ] = False,
    templates: TemplatesOpt = None,
    folders: InOpt = None,
    globs: GlobOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    types: TypeOpt = None,
    min_width: MinWidthOpt = None,
    min_height: MinHeightOpt = None,
    tags: TagOpt = None,
    min_score: MinScoreOpt = None,
    within: WithinOpt = None,
    offset: OffsetOpt = 0,
    include_self: Annotated[
        bool, typer.Option("--include-self", help="Keep indexed query images in the results.")
    ] = False,
    preview: PreviewOpt = False,
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
    paths: PathsOpt = False,
) -> None:
    """Find images that match a text (or a combination of texts and images)."""
    from retrieval.core.locations import resolve_index_dir
    from retrieval.embedding.text_embedder import PrefetchedText

    # Start loading the text encoder now: it overlaps the imports below on another core.
    prefetched = PrefetchedText(resolve_index_dir(index_dir))
    from retrieval.search.query import Query

    tpl = _templates(templates)
    query = Query.parse_argv(text, ensemble=ensemble or tpl is not None, templates=tpl)
    query = _add_terms(query, plus, minus)
    filters = _filters(folders, globs, after, before, types, min_width, min_height, tags)
    hits = _run_query(
        index_dir, device, query, k, filters, min_score, within, offset, include_self, prefetched
    )
    print_hits(hits, _fmt(json_, jsonl, paths), preview=preview)
    _answered.set()


def _run_query(
    index_dir, device, query, k, filters, min_score, within, offset, include_self, prefetched=None
):  # type: ignore[no-untyped-def]
    """The part `search` and `similar` share: open the index, run the query."""
    from retrieval.index import ImageIndex

    with ImageIndex.open(index_dir, device=device, prefetched_text=prefetched) as idx:
        return idx.search_query(
            query,
            k,
            filters=filters,
            min_score=min_score,
            within=within,
            offset=offset,
            exclude_self=not include_self,
        )


@app.command()
def similar(
    image: Annotated[Path, typer.Argument(help="An image file, indexed or not.")],
    k: KOpt = 10,
    index_dir: IndexOpt = None,
    include_self: Annotated[
        bool, typer.Option("--include-self", help="Keep the query image in its results.")
    ] = False,
    device: DeviceOpt = "auto",
    plus: PlusOpt = None,
    minus: MinusOpt = None,
    folders: InOpt = None,
    globs: GlobOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    types: TypeOpt = None,
    min_width: MinWidthOpt = None,
    min_height: MinHeightOpt = None,
    tags: TagOpt = None,
    min_score: MinScoreOpt = None,
    within: WithinOpt = None,
    offset: OffsetOpt = 0,
    preview: PreviewOpt = False,
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
    paths: PathsOpt = False,
) -> None:
    """Find images that look like IMAGE."""
    from retrieval.search.query import Query

    query = _add_terms(Query.image(image), plus, minus)
    filters = _filters(folders, globs, after, before, types, min_width, min_height, tags)
    hits = _run_query(index_dir, device, query, k, filters, min_score, within, offset, include_self)
    print_hits(hits, _fmt(json_, jsonl, paths), preview=preview)
    _answered.set()


@app.command()
def duplicates(
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold", "-t", min=-1.0, max=1.0, help="Cosine above which two images are duplicates."
        ),
    ] = 0.95,
    index_dir: IndexOpt = None,
    preview: PreviewOpt = False,
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
    paths: PathsOpt = False,
) -> None:
    """Groups of near-duplicate images, largest first."""
    from retrieval.index import ImageIndex

    from .output import print_duplicates

    with ImageIndex.open(index_dir) as idx:
        groups = idx.duplicates(threshold)
    print_duplicates(groups, _fmt(json_, jsonl, paths), preview=preview)


LabelsOpt = Annotated[
    str | None,
    typer.Option("--labels", "-l", help="Comma-separated labels, or a file with one label (or text) a line."),
]
LabelsFileOpt = Annotated[Path | None, typer.Option("--labels-file", help="A file with one label a line.")]


def _labels(labels: str | None, labels_file: Path | None) -> list[str]:
    import os

    from retrieval.search.zeroshot import parse_labels, read_labels

    out: list[str] = []
    if labels is not None:
        out += read_labels(labels) if os.path.isfile(labels) else parse_labels(labels)
    if labels_file is not None:
        out += read_labels(labels_file)
    if not out:
        raise ClipdexError("no labels: give --labels cat,dog,... or --labels-file FILE")
    return list(dict.fromkeys(out))


@app.command()
def classify(
    labels: LabelsOpt = None,
    labels_file: LabelsFileOpt = None,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
    ensemble: Annotated[
        bool, typer.Option("--ensemble/--no-ensemble", help="Embed labels through prompt templates.")
    ] = True,
    templates: TemplatesOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Labels kept per image.")] = 1,
    min_prob: Annotated[
        float, typer.Option("--min-prob", min=0.0, max=1.0, help="Drop labels below this probability.")
    ] = 0.0,
    store: Annotated[
        bool, typer.Option("--store", help="Save the labels shown as tags (for 'search --tag LABEL').")
    ] = False,
    folders: InOpt = None,
    globs: GlobOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    types: TypeOpt = None,
    min_width: MinWidthOpt = None,
    min_height: MinHeightOpt = None,
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
) -> None:
    """Zero-shot labels for every indexed image: softmax over the labels' text embeddings."""
    from retrieval.index import ImageIndex

    from .output import print_labels

    names = _labels(labels, labels_file)
    filters = _filters(folders, globs, after, before, types, min_width, min_height)
    with ImageIndex.open(index_dir, device=device) as idx:
        results = idx.classify(
            names,
            ensemble=ensemble or templates is not None,
            templates=_templates(templates),
            filters=filters,
            top=top,
            min_probability=min_prob,
        )
        stored = idx.store_tags(results, names) if store else None
    print_labels(results, _fmt(json_, jsonl, False))
    if stored is not None:
        print(f"stored {stored} tags on {len(results)} images", file=sys.stderr)


@app.command()
def describe(
    image: Annotated[Path, typer.Argument(help="An image file, indexed or not.")],
    labels: LabelsOpt = None,
    labels_file: LabelsFileOpt = None,
    k: Annotated[
        int | None, typer.Option("-k", "--top", min=1, help="Number of texts (default all).")
    ] = None,
    index_dir: IndexOpt = None,
    device: DeviceOpt = "auto",
    ensemble: Annotated[
        bool, typer.Option("--ensemble/--no-ensemble", help="Embed the texts through prompt templates.")
    ] = False,
    templates: TemplatesOpt = None,
    json_: JsonOpt = False,
    jsonl: JsonlOpt = False,
) -> None:
    """Rank candidate texts for IMAGE (image-to-text): cosine and softmax probability."""
    from retrieval.index import ImageIndex

    from .output import print_ranked_texts

    texts = _labels(labels, labels_file)
    with ImageIndex.open(index_dir, device=device) as idx:
        ranked = idx.describe(
            image, texts, ensemble=ensemble or templates is not None, templates=_templates(templates), k=k
        )
    print_ranked_texts(ranked, _fmt(json_, jsonl, False))


@app.command()
def info(index_dir: IndexOpt = None, json_: JsonOpt = False) -> None:
    """What an index holds: model, image count, size on disk, last update."""
    from retrieval.index import ImageIndex

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
    print(f"catalog:  {safe(facts.catalog or '')}")
    print(f"model:    {model}")
    print(f"images:   {facts.images}")
    print(f"on disk:  {human_bytes(facts.bytes_on_disk)}")
    print(f"updated:  {updated}")
    if facts.vector_index == "Flat":
        print("search:   exact (Flat)")
    elif facts.vector_index:
        recall = "not measured" if facts.recall_at_10 is None else f"{facts.recall_at_10:.3f}"
        print(
            f"search:   approximate {facts.vector_index}, nprobe {facts.nprobe}, recall@10 {recall} "
            f"({facts.rerank_at_10} candidates of a top-10 re-scored exactly)"
        )


@app.command()
def verify(
    index_dir: IndexOpt = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Restore the invariants from the catalog.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Check the index: every FAISS id is one catalog row, vectors are unit-norm, files exist."""
    from retrieval.index import ImageIndex

    with ImageIndex.open(index_dir) as idx:
        report = idx.verify(repair=repair)
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
                f"{len(report.missing_files)} indexed files no longer exist (run 'clipdex index FOLDER' "
                "on their folder, or 'clipdex forget PATH' for a folder or disk that is gone):"
            )
            for path in report.missing_files[:10]:
                print(f"  {safe(path)}")
        print(f"{'ok' if report.ok else 'NOT ok'}: {report.images} images checked")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def forget(
    paths: Annotated[list[Path], typer.Argument(help="Folders or files that no longer exist.")],
    index_dir: IndexOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also forget paths that still exist (or cannot be checked).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Drop the indexed images under folders or files that are gone (an unplugged disk, a deleted
    folder). 'clipdex index' refuses a missing folder, so this is how its images leave the index."""
    from indexer.forget import forget_paths

    summary = forget_paths(index_dir, paths, allow_existing=force)
    if json_:
        data = {
            "forgotten": [{"path": p, "images": n} for p, n in summary.forgotten],
            "images": summary.images,
            "failures_forgotten": summary.failures_forgotten,
        }
        print(json.dumps(data, indent=2))
        return
    for path, n in summary.forgotten:
        if n:
            print(f"forgot {n} image{'s' if n != 1 else ''} under {safe(path)}")
        else:
            print(f"nothing indexed under {safe(path)}")


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
    except SystemExit as exc:
        if _answered.is_set() and exc.code in (None, 0):
            _exit_now()
        raise
    if _answered.is_set():
        _exit_now()


# Set by the commands that only read the index and print (search, similar): once their answer is
# out, the interpreter's teardown (freeing the text tower's session and its thread pools, module
# finalisation) is pure waiting for the user: 0.25 s of a 1.45 s cold search here.
_answered = threading.Event()


def _exit_now() -> None:
    code = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that went away (`| head`): what Python's own exit would report
            code = 120
    os._exit(code)


@app.command()
def serve(
    index_dir: IndexOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; one that is not loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="CLIPDEX_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' on every request (a browser opens /?token=TOKEN "
            "once).",
        ),
    ] = None,
) -> None:
    """Serve the index over HTTP: a web page, a JSON API (/docs) and RemoteIndex's endpoint."""
    from server.app import run as run_server

    run_server(index_dir, host=host, port=port, token=token)


from . import quality_commands  # noqa: E402  (after `app`: these commands live in their own module)

app.command("eval")(quality_commands.eval_command)
app.command("tune")(quality_commands.tune_command)

from . import import_commands  # noqa: E402

app.command("import")(import_commands.import_command)

from . import optimize_commands  # noqa: E402

app.command("optimize")(optimize_commands.optimize_command)


if __name__ == "__main__":
    run()
