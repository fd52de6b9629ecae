"""One file to one preprocessed tensor: read once, hash those bytes, decode, preprocess."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from retrieval.core.errors import ImageLoadError
from retrieval.core.images import DEFAULT_MAX_PIXELS, load_image

from .plan import EmbedJob

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: no photo is larger; a file that is would only exhaust memory


@dataclass
class Decoded:
    job: EmbedJob
    size: int
    mtime_ns: int
    content_hash: str
    pixels: Any  # torch.Tensor (3, H, W)
    width: int
    height: int
    format: str | None
    taken_at: float | None


@dataclass
class SameContent:
    """A file whose mtime changed but whose bytes did not: no need to embed it again."""

    job: EmbedJob
    size: int
    mtime_ns: int


@dataclass
class DecodeFailure:
    path: str
    reason: str
    job: EmbedJob | None = None
    # True when these very bytes cannot be used (not an image, refused, too large): recorded,
    # so an unchanged file is not tried again. Passing causes (permissions, a file being
    # written, a timeout under load) are tried again on the next run.
    permanent: bool = False
    size: int | None = None  # of the bytes that failed, when they were read
    mtime_ns: int | None = None


class FileTooLarge(ImageLoadError):
    pass


# JPEG reduced-scale decoding leaves at least this many times the model's input on the shortest
# side. 2x keeps a 12 MP photo at libjpeg's 1/4 scale for 224-256 px models: cosine 0.99999 to a
# full decode. 1/8 (DC coefficients only: 8x8 box averages) would save ~15 ms more per photo but
# puts 4x the pixel error into the model's input (README, speed section).
DRAFT_FACTOR = 2.0


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    # JPEG reduced-scale decoding (libjpeg DCT scaling) to at least this many pixels a side; None
    # until `for_input_size` picks it from the model's input size.
    draft_size: int | None = None
    full_decode: bool = False  # --full-decode: every pixel, whatever the model's input size

    def for_input_size(self, input_size: int) -> DecodeOptions:
        """These options for a model that takes `input_size`-pixel pictures."""
        if self.full_decode:
            return replace(self, draft_size=None)
        if self.draft_size is not None:
            return self
        return replace(self, draft_size=math.ceil(DRAFT_FACTOR * input_size))


def model_input_size(preprocess_cfg: dict[str, Any]) -> int:
    """The larger side of the model's input (open_clip's 'size': an int or [height, width])."""
    size = preprocess_cfg["size"]
    return int(max(size) if isinstance(size, (list, tuple)) else size)


def read_stable(path: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The file's bytes, refused if the file changed while it was being read."""
    for _attempt in range(2):
        fd = os.open(path, os.O_RDONLY)
        try:
            before = os.fstat(fd)
            if before.st_size > max_bytes:
                raise FileTooLarge(f"file too large ({before.st_size:,} bytes)")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(max_bytes + 1)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        unchanged = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
        if unchanged and len(data) == after.st_size:
            return data, after
    raise ImageLoadError("file changed while being read")


def decode_job(
    job: EmbedJob, preprocess: Callable[[Any], Any], options: DecodeOptions
) -> Decoded | SameContent | DecodeFailure:
    path = job.info.path
    try:
        data, st = read_stable(path, options.max_bytes)
    except FileTooLarge as exc:
        return DecodeFailure(
            path, str(exc), job, permanent=True, size=job.info.size, mtime_ns=job.info.mtime_ns
        )
    except ImageLoadError as exc:
        return DecodeFailure(path, str(exc), job)
    except OSError as exc:
        return DecodeFailure(path, exc.strerror.lower() if exc.strerror else str(exc), job)
    digest = _digest(job, data, st)
    if job.previous is not None and not job.force and job.previous.content_hash == digest:
        return SameContent(job, st.st_size, st.st_mtime_ns)
    try:
        draft_size = None if options.full_decode else options.draft_size
        loaded = load_image(data, max_pixels=options.max_pixels, draft_size=draft_size)
        pixels = preprocess(loaded.image)
    except ImageLoadError as exc:
        return DecodeFailure(path, str(exc), job, permanent=True, size=st.st_size, mtime_ns=st.st_mtime_ns)
    except Exception as exc:  # one bad file never stops a run
        reason = f"{type(exc).__name__}: {exc}"[:200]
        return DecodeFailure(path, reason, job, permanent=True, size=st.st_size, mtime_ns=st.st_mtime_ns)
    return Decoded(
        job,
        st.st_size,
        st.st_mtime_ns,
        digest,
        pixels,
        loaded.width,
        loaded.height,
        loaded.format,
        loaded.taken_at,
    )


def _digest(job: EmbedJob, data: bytes, st: os.stat_result) -> str:
    """sha256 of `data`; the plan's digest of this file when it hashed it already (a move
    candidate) and the file has not changed since it was scanned."""
    if job.content_hash is not None and (st.st_size, st.st_mtime_ns) == (job.info.size, job.info.mtime_ns):
        return job.content_hash
    return hashlib.sha256(data).hexdigest()
