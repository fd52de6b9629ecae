"""Reading indexed files safely, and the thumbnail cache.

Files are addressed by catalog id only. Before a byte is read the catalog's path must still
lead to the file that was indexed: a path that now goes through a symbolic link (one swapped in
after indexing, or a link the indexer followed) is only accepted when the file it reaches has
the size and modification time the catalog recorded. The final component is opened with
O_NOFOLLOW and checked on the open descriptor, so a link swapped in between the check and the
read is refused too. Thumbnails live in `<index dir>/thumbnails/`, never beside the photos.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from retrieval import ClipdexError
from retrieval.core.images import load_image
from retrieval.storage.records import ImageRecord

from .errors import ForbiddenError, NotFoundError

log = logging.getLogger("clipdex.server")

THUMBNAIL_SIZES = (128, 256, 512, 1024)
THUMBNAIL_DIR = "thumbnails"
CHUNK = 256 * 1024

_MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}


@dataclass
class OpenedFile:
    file: BinaryIO
    stat: os.stat_result

    def close(self) -> None:
        self.file.close()


def media_type(record: ImageRecord) -> str:
    return _MEDIA_TYPES.get((record.format or "").upper(), "application/octet-stream")


def open_indexed(record: ImageRecord) -> OpenedFile:
    """The indexed file of `record`, opened for reading, or NotFoundError / ForbiddenError."""
    path = record.path
    if not os.path.isabs(path):
        raise ForbiddenError(f"image {record.id}: its catalog path is not absolute")
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        raise NotFoundError(f"image {record.id}: its file no longer exists (re-index its folder)") from None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    # O_NONBLOCK: a FIFO swapped in for a photo must not hang the server on open().
    flags |= getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise NotFoundError(f"image {record.id}: its file no longer exists (re-index its folder)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link swapped in after realpath() looked
            raise ForbiddenError(f"image {record.id}: its file was replaced while being opened") from None
        raise ForbiddenError(f"image {record.id}: cannot open its file ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ForbiddenError(f"image {record.id}: its path no longer names a regular file")
        if real != path and (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
            raise ForbiddenError(
                f"image {record.id}: its path now leads through a symbolic link to a file that is not "
                "the one indexed (re-index its folder)"
            )
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return OpenedFile(os.fdopen(fd, "rb"), st)
    except BaseException:
        os.close(fd)
        raise


def check_indexed(record: ImageRecord) -> None:
    """Raise unless `record`'s file may be read (see open_indexed)."""
    open_indexed(record).close()


def stream(opened: OpenedFile) -> Iterator[bytes]:
    """The file's bytes in chunks; closes it at the end (or when the client goes away)."""
    try:
        while chunk := opened.file.read(CHUNK):
            yield chunk
    finally:
        opened.close()


@dataclass(frozen=True)
class Thumbnail:
    etag: str  # the cache file's name: changes with the photo's size and mtime
    data: bytes


def thumbnail(record: ImageRecord, size: int, index_dir: Path) -> Thumbnail:
    """An upright JPEG at most `size` pixels a side, from the cache or made now.

    Keyed by id, size, and the file's size and mtime: an edited photo gets a new thumbnail.
    Written through a temporary file and an atomic rename, so a reader never sees half a file
    and two requests making the same thumbnail do not clash."""
    if size not in THUMBNAIL_SIZES:
        raise ClipdexError(f"thumbnail size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
    folder = index_dir / THUMBNAIL_DIR
    opened = open_indexed(record)
    try:
        st = opened.stat
        name = f"{record.id}-{size}-{st.st_size}-{st.st_mtime_ns}.jpg"
        with contextlib.suppress(FileNotFoundError):
            return Thumbnail(name, (folder / name).read_bytes())
        data = opened.file.read()
    finally:
        opened.close()
    loaded = load_image(data, draft_size=size)  # EXIF rotation and the decompression-bomb guard
    image = loaded.image
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    encoded = buffer.getvalue()
    try:
        _store(folder, name, encoded)
        _drop_stale(folder, record.id, size, name)
    except OSError as exc:  # a read-only index folder: serve the thumbnail uncached
        log.warning("cannot cache thumbnails in %s: %s", folder, exc.strerror or exc)
    return Thumbnail(name, encoded)


def _store(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _drop_stale(folder: Path, image_id: int, size: int, keep: str) -> None:
    """Thumbnails of earlier versions of the same photo."""
    for old in folder.glob(f"{image_id}-{size}-*.jpg"):
        if old.name != keep:
            with contextlib.suppress(OSError):
                old.unlink()
