"""Turning a file into an upright RGB picture, the same way for indexing and for queries.

Decoding is defensive: the pixel count is checked from the header before any pixel is decoded
(decompression bombs), truncated and foreign files raise ImageLoadError with a reason, and
modes that a plain `convert("RGB")` gets wrong (16-bit, alpha) are handled explicitly.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, features

from retrieval.core.errors import ImageLoadError

# `.jpe` is JPEG's third name (Pillow registers it as JPEG); formats that need a plugin or a
# codec are listed only where the installed Pillow can read them.
BASE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
AVIF_EXTENSIONS = frozenset({".avif"})
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: larger than any camera photo, far below a bomb

_EXIF_ORIENTATION = 0x0112
_EXIF_DATETIME = 0x0132
_EXIF_IFD = 0x8769
_EXIF_DATETIME_ORIGINAL = 0x9003
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@lru_cache(maxsize=1)
def heif_available() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@lru_cache(maxsize=1)
def avif_available() -> bool:
    # Pillow reads AVIF itself from 11.3 on, where its wheel was built with libavif.

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Pillow too old to know the feature warns, says False
        return bool(features.check("avif"))


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """The file names clipdex reads as images, lowercase with the dot: the one list for the
    indexer's scan and for query images."""
    extensions = BASE_EXTENSIONS
    if heif_available():
        extensions |= HEIF_EXTENSIONS
    if avif_available():
        extensions |= AVIF_EXTENSIONS
    return extensions


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, upright
    width: int  # of the upright original, before any reduced-scale decoding
    height: int
    format: str | None
    taken_at: float | None


def load_image(
    source: str | os.PathLike[str] | bytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> LoadedImage:
    """Decode `source` into an upright RGB image.

    `draft_size` lets JPEG decoding work at a reduced DCT scale whose result is still at
    least that many pixels on each side (much cheaper for large photos).
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        data = source if isinstance(source, bytes) else _read(source)
        if not data:
            raise ImageLoadError("empty file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"refused: {exc}") from None
        except Image.UnidentifiedImageError:
            raise ImageLoadError("not an image file (unknown format)") from None
        except Exception as exc:  # PIL raises many types for foreign data
            raise ImageLoadError(f"not a readable image ({_short(exc)})") from None
    try:
        return _finish(img, max_pixels, draft_size)
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(f"cannot decode image ({_short(exc)})") from None


def _finish(img: Image.Image, max_pixels: int, draft_size: int | None) -> LoadedImage:
    fmt = img.format
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"refused: {width}x{height} is over the {max_pixels:,}-pixel cap (decompression bomb guard)"
        )
    exif = img.getexif()
    orientation = exif.get(_EXIF_ORIENTATION, 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    taken_at = _taken_at(exif)
    if draft_size and fmt == "JPEG":
        # A square request: draft keeps both sides >= draft_size, so the shortest side (what a
        # resize to the model's input scales) is covered whichever way EXIF turns the picture.
        img.draft("RGB", (draft_size, draft_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img.load()  # raises OSError on truncated data
    return LoadedImage(_to_rgb(_upright(img, orientation)), width, height, fmt, taken_at)


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    """Turn `img` by the EXIF orientation already read. ImageOps.exif_transpose would parse the
    EXIF again, rewrite it, and copy the whole picture even when there is nothing to turn."""
    method = _TRANSPOSE.get(orientation)
    if method is None:
        return img
    turned = img.transpose(method)
    # The copied metadata still says "turn me" (EXIF, or XMP, which getexif also reads): drop it,
    # so nothing downstream turns the picture twice.
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):
        turned.info.pop(key, None)
    return turned


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # A plain convert() clips 16-bit values at 255: nearly white pictures. Scale instead.
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is 16-bit by definition (a dark picture must stay dark); 32-bit I and F carry no
        # range, so their values decide.
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels are shown on white by viewers; convert() would expose whatever
        # colour happens to sit under them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _taken_at(exif: Image.Exif) -> float | None:
    raw = None
    try:
        raw = exif.get_ifd(_EXIF_IFD).get(_EXIF_DATETIME_ORIGINAL)
    except Exception:
        raw = None
    raw = raw or exif.get(_EXIF_DATETIME)
    if not isinstance(raw, str):
        return None
    try:
        return time.mktime(time.strptime(raw.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageLoadError(exc.strerror.lower() if exc.strerror else str(exc)) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
