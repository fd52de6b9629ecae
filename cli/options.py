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
