"""What the catalog knows of images, as plain values passed between the layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """What the catalog knows of one indexed image (without its vector)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    format: str | None
    taken_at: float | None
    indexed_at: float


@dataclass(frozen=True)
class NewImage:
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int
    format: str | None
    taken_at: float | None
    vector: np.ndarray


@dataclass(frozen=True)
class Move:
    id: int
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FailureRecord:
    """A file that could not be indexed, as it was then (size and mtime)."""

    path: str
    size: int
    mtime_ns: int
    reason: str
