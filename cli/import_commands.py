"""`clipdex import`: an index from embeddings computed elsewhere (clip-retrieval's layout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import CatalogOpt, IndexOpt, JsonOpt
from .output import ProgressBar, interruptible, safe


def import_command(
    embeddings_dir: Annotated[
        Path,
        typer.Argument(
            help="clip-retrieval output folder: img_emb/img_emb_N.npy with metadata/metadata_N.parquet."
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip architecture that made the embeddings.")
    ],
    pretrained: Annotated[
        str | None,
        typer.Option(
            "--pretrained",
            "-p",
            help="Its weights: pretrained tag, local checkpoint file/folder, or 'random' "
            "[default: the index's, else the architecture's first open_clip tag].",
        ),
    ] = None,
    index_dir: IndexOpt = None,
    path_column: Annotated[
        str,
        typer.Option(
            "--path-column",
            help="What names an image in the index: auto (url when the row has one, else image_path), "
            "image_path or url. Rows already in the index under that name are skipped.",
        ),
    ] = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Rows per transaction.")
    ] = 50_000,
    no_optimize: Annotated[
        bool, typer.Option("--no-optimize", help="Do not build the approximate index after a large import.")
    ] = False,
    catalog: CatalogOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Import image embeddings made elsewhere (clip-retrieval, LAION-style sets): checked,
    normalised, resumable (running it again adds only what is missing)."""
    from indexer.import_embeddings import ImportOptions, import_embeddings
    from indexer.model_choice import resolve_model_spec

    spec = resolve_model_spec(index_dir, model, pretrained, catalog=catalog)
    options = ImportOptions(
        batch_size=batch_size, path_column=path_column, optimize=not no_optimize, catalog=catalog
    )
    bar = ProgressBar("row", keep=True)
    with interruptible(bar) as stop:
        summary = import_embeddings(embeddings_dir, index_dir, spec, options, progress=bar.update, stop=stop)
    if json_:
        data = vars(summary).copy()
        data["rejected_examples"] = [{"where": w, "reason": r} for w, r in summary.rejected_examples]
        data["bad_shards"] = [{"file": f, "reason": r} for f, r in summary.bad_shards]
        print(json.dumps(data, indent=2))
    else:
        state = "interrupted" if summary.interrupted else "done"
        print(
            f"{state}: {summary.added} added, {summary.already} already indexed, "
            f"{summary.rejected} rejected, {len(summary.bad_shards)} shards skipped of {summary.shards} "
            f"({summary.seconds:.1f} s; model {safe(summary.model)})"
        )
        for where, reason in summary.rejected_examples:
            print(f"  rejected: {safe(where)}: {reason}", file=sys.stderr)
        for file, reason in summary.bad_shards:
            print(f"  skipped shard: {safe(file)}: {reason}", file=sys.stderr)
        if summary.optimized:
            report = summary.optimized
            print(f"vector index rebuilt: recall@10 {report.get('recall_at_10')} ({report.get('plan')})")
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.bad_shards:
        raise typer.Exit(1)
