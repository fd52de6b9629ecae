"""Typed search results."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # cosine similarity between the query and the image
    path: str
    id: int
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
