"""Options more than one command takes, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

IndexOpt = Annotated[
    Path | None,
    typer.Option("--index", "-i", help="Index folder (default: $CLIPDEX_INDEX or the per-user data folder)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
CatalogOpt = Annotated[
    str | None,
    typer.Option(
        "--catalog",
        metavar="URL",
        help="Keep a new index's catalog in PostgreSQL (postgresql+psycopg://user@host/database; default "
        "$CLIPDEX_CATALOG), for several machines indexing into and searching one catalog. Recorded in "
        "the index folder (without the password), so later commands need no option.",
    ),
]
