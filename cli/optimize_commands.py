"""`clipdex optimize`: the vector index the size rules choose, with its measured recall."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .options import IndexOpt, JsonOpt
from .output import human_bytes, safe


def optimize_command(
    max_memory: Annotated[
        str,
        typer.Option(
            "--max-memory",
            help="Memory the vector index may take in a search process (e.g. 512M, 2G); "
            "decides between SQ8 and PQ codes.",
        ),
    ] = "512M",
    target_recall: Annotated[
        float,
        typer.Option(
            "--target-recall",
            help="Recall@10 against exact search to reach (after exact re-ranking); picks nprobe.",
        ),
    ] = 0.95,
    exact_below: Annotated[
        int,
        typer.Option("--exact-below", min=0, help="Keep exact search below this many images."),
    ] = 50_000,
    index_dir: IndexOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Build the vector index the rules choose: exact below 50,000 images, else an IVF index
    (SQ8 or PQ codes within --max-memory) whose candidates are re-ranked exactly; measures its
    recall@10 against exact search and records it (shown by `clipdex info`)."""
    from retrieval.index import ImageIndex
    from retrieval.storage.index_rules import RECALL_K, parse_size, rerank_depth

    budget = parse_size(max_memory)
    with ImageIndex.open(index_dir) as idx:
        report = idx.optimize(max_memory=budget, target_recall=target_recall, exact_below=exact_below)
    if json_:
        print(json.dumps(report.to_dict(), indent=2))
        return
    plan = report.plan
    print(f"index:    {safe(str(idx.directory))}")
    print(f"vectors:  {plan.vectors} x {plan.dim}")
    if plan.approximate:
        memory = human_bytes(plan.index_bytes)
        print(f"built:    {plan.factory} (~{memory} in memory), nprobe {report.nprobe}")
        measured = f"{report.queries} held-out queries, target {target_recall}"
        depth = rerank_depth(RECALL_K, report.rerank_factor)
        print(f"recall@10 {report.recall_at_10:.3f} ({measured}; {depth} candidates re-scored exactly)")
    else:
        print("built:    Flat (exact search)")
    print(f"why:      {plan.reason}")
    print(f"took:     {report.seconds:.1f} s")
