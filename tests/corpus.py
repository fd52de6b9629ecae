"""A photo folder full of awkward files, built in a temporary directory for the robustness tests.

`build_corpus(root)` writes every kind of file a real photo folder ends up holding: broken and
foreign files named like images, decompression bombs, every pixel mode and format Pillow reads,
each EXIF orientation, links that go nowhere or in circles, names no terminal should print
raw. It returns what the indexer must do with each: index it (`good`), report it with a reason
matching a pattern (`bad`), or pass over it silently (`ignored`).

Two entries are ordinary images that only the test can make bad: `vanishing` is deleted after
the scan and `changing` keeps growing while it is read; see test_robustness.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from conftest import jpeg_bytes, make_scene
from PIL import Image

# The limits the robustness run uses (IndexOptions(decode=DecodeOptions(...))).
MAX_PIXELS = 10_000_000
MAX_BYTES = 4 << 20

T = Image.Transpose
# EXIF orientation n: what a viewer does to the stored pixels to show them upright.
ORIENTATION_SHOW = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_270,
    7: T.TRANSVERSE,
    8: T.ROTATE_90,
}
# ... and its inverse: what a camera did to an upright scene before storing it with tag n.
ORIENTATION_STORE = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}


@dataclass
class Corpus:
    root: Path
    good: dict[str, str] = field(default_factory=dict)  # label -> path that must be indexed
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (path, reason regex)
    ignored: dict[str, str] = field(default_factory=dict)  # label -> path: not indexed, not reported
    unreadable: dict[str, str] = field(default_factory=dict)  # chmod 000: bad unless we are root
    # label -> (width, height) the catalog must record (upright, full size)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # label -> the exact upright RGB pixels the model must have been given
    expected_pixels: dict[str, Image.Image] = field(default_factory=dict)

    def bad_kinds(self) -> int:
        return len(self.bad) + len(self.unreadable)


def fs(folder: Path, name: str | bytes) -> str:
    """The path of `name` in `folder` as the indexer reports it (str, surrogate-escaped bytes)."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return os.fsdecode(os.path.join(os.fsencode(folder), raw))


def write(folder: Path, name: str | bytes, data: bytes) -> str:
    path = fs(folder, name)
    with open(os.fsencode(path), "wb") as f:
        f.write(data)
    return path


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def sha256(path: str) -> str:
    with open(os.fsencode(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- hand-made PNGs ---------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@lru_cache(maxsize=4)
def blank_bilevel_png(width: int, height: int) -> bytes:
    """A valid, fully decodable 1-bit PNG of that size: a few kilobytes that inflate into
    width*height pixels (what Pillow saves for Image.new('1', size), made 5x faster)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then all-black pixels
    comp = zlib.compressobj(1)
    parts = []
    left = height
    while left:
        n = min(left, 1000)
        parts.append(comp.compress(row * n))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """Signature and IHDR of an RGB PNG, then nothing: opens, cannot decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)


# -- the corpus -------------------------------------------------------------------------------
def build_corpus(root: Path, outside: Path) -> Corpus:
    """Write the corpus under `root`; `outside` receives a link target outside the tree."""
    root.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    c = Corpus(root)
    rng = np.random.default_rng(1234)
    scene = make_scene(11, (120, 80))

    def good(label: str, name: str | bytes, data: bytes, folder: Path = root) -> str:
        c.good[label] = write(folder, name, data)
        return c.good[label]

    def bad(label: str, name: str | bytes, data: bytes, reason: str) -> str:
        path = write(root, name, data)
        c.bad[label] = (path, reason)
        return path

    # ---- files that must be reported ------------------------------------------------------
    bad("zero_bytes", "empty.jpg", b"", r"^empty file$")
    whole = jpeg_bytes(make_scene(3, (200, 150)), quality=90)
    bad("truncated_jpeg", "truncated.jpg", whole[: len(whole) // 2], r"truncated")
    bad("random_bytes", "noise.jpg", rng.bytes(5000), r"not an image file|not a readable image")
    bad("text_as_jpeg", "notes.jpg", b"shopping list: milk, eggs\n" * 20, r"not an image file")
    bad("html_as_png", "page.png", b"<!doctype html><html><body>404</body></html>", r"not an image file")
    bad(
        "jpeg_header_garbage_body",
        "header.jpg",
        b"\xff\xd8\xff\xe0" + rng.bytes(3000),
        r"not a readable image|not an image file|cannot decode",
    )
    bad(
        "png_header_only",
        "stub.png",
        png_header_only(64, 48),
        r"not an image file|cannot decode|not a readable",
    )
    gif = encode(make_scene(4, (64, 64)), "GIF")
    bad("truncated_gif", "cut.gif", gif[: len(gif) // 3], r"cannot decode|not a readable image|truncated")
    # Decompression bombs: 400 MP is refused by Pillow's own guard at the header, 20 MP (under
    # Pillow's limit) by the indexer's --max-pixels cap; neither may be decoded.
    bad("bomb_400mp", "bomb.png", blank_bilevel_png(20_000, 20_000), r"^refused: .*(decompression bomb)")
    bad("bomb_over_cap", "bomb-cap.png", blank_bilevel_png(5000, 4000), r"^refused: 5000x4000 is over the")
    with open(os.fsencode(fs(root, "huge.jpg")), "wb") as f:  # sparse: no disk used
        f.truncate(MAX_BYTES + 1)
    c.bad["over_max_bytes"] = (fs(root, "huge.jpg"), r"^file too large")
    # Names a terminal must not interpret, on files that are bad (so they are printed).
    bad("bell_in_name", "ring\x07bell.jpg", b"not an image", r"not an image file")
    bad("non_utf8_bad_name", b"caf\xe9-\xff.jpg", b"\x00" * 64, r"not an image file|not a readable")
    # Links that go nowhere, or in circles.
    os.symlink(root / "does-not-exist.jpg", root / "dangling.jpg")
    c.bad["broken_symlink"] = (str(root / "dangling.jpg"), r"^broken symbolic link$")
    os.symlink("self-loop.jpg", root / "self-loop.jpg")
    c.bad["symlink_self_loop"] = (str(root / "self-loop.jpg"), r"^symbolic link loop$")
    (root / "nested").mkdir()
    os.symlink(root, root / "nested" / "back-to-top")
    c.bad["symlink_dir_loop"] = (str(root / "nested" / "back-to-top"), r"symbolic link loop")
    # Made bad by the test: deleted after the scan, rewritten while read.
    c.bad["deleted_after_scan"] = (
        write(root, "vanishing.png", encode(make_scene(21, (64, 48)), "PNG")),
        r"^no such file or directory$",
    )
    c.bad["changes_while_read"] = (
        write(root, "changing.png", encode(make_scene(22, (64, 48)), "PNG")),
        r"^file changed while being read$",
    )
    # Unreadable file and folder: only a non-root user is kept out.
    c.unreadable["file"] = write(root, "secret.png", encode(make_scene(23, (64, 48)), "PNG"))
    os.chmod(c.unreadable["file"], 0)
    locked = root / "locked-folder"
    locked.mkdir()
    c.unreadable["folder"] = str(locked)
    c.unreadable["file_in_folder"] = write(locked, "inside.png", encode(make_scene(24, (64, 48)), "PNG"))
    os.chmod(locked, 0)

    # ---- files that must be indexed -------------------------------------------------------
    big = make_scene(12, (300, 200)).resize((3000, 2000), Image.Resampling.BILINEAR)
    good("large_3000x2000", "large.jpg", jpeg_bytes(big, quality=80))
    c.sizes["large_3000x2000"] = (3000, 2000)
    good("cmyk_jpeg", "cmyk.jpg", jpeg_bytes(scene.convert("CMYK"), quality=92))
    good("grayscale_jpeg", "gray.jpg", jpeg_bytes(scene.convert("L"), quality=92))
    good("progressive_jpeg", "progressive.jpg", jpeg_bytes(scene, quality=90, progressive=True))
    deep = (np.asarray(scene.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    good("png_16bit", "deep.png", encode(Image.fromarray(deep), "PNG"))
    pal = scene.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    good("palette_transparency", "palette.png", encode(pal, "PNG", transparency=0))
    rgba = scene.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(scene.size))
    good("rgba_png", "rgba.png", encode(rgba, "PNG"))
    good("la_png", "la.png", encode(rgba.convert("LA"), "PNG"))
    frames = [make_scene(30 + i, (64, 64)) for i in range(3)]
    good("animated_gif", "animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    good("webp", "photo.webp", encode(scene, "WEBP", quality=90))
    good("webp_alpha", "alpha.webp", encode(rgba, "WEBP", lossless=True))
    good("tiff", "scan.tiff", encode(scene, "TIFF"))
    good("tiff_lzw", "scan-lzw.tif", encode(scene, "TIFF", compression="tiff_lzw"))
    good("bmp", "old.bmp", encode(scene, "BMP"))
    good("png_named_jpg", "actually-png.jpg", encode(make_scene(13, (64, 64)), "PNG"))
    good("upper_case_ext", "SHOUT.JPG", jpeg_bytes(make_scene(14, (64, 64))))
    good("one_pixel", "dot.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    good("thin_strip", "strip.png", encode(make_scene(15, (2000, 3)), "PNG"))
    # Names: spaces, unicode, a newline, an escape sequence, bytes that are not UTF-8.
    good("space_name", "summer holiday 2019 (1).png", encode(make_scene(16, (64, 48)), "PNG"))
    good("unicode_name", "été 写真 🌅.png", encode(make_scene(17, (64, 48)), "PNG"))
    good("newline_name", "two\nlines.png", encode(make_scene(18, (64, 48)), "PNG"))
    good("escape_name", "red\x1b[31m.png", encode(make_scene(19, (64, 48)), "PNG"))
    good("non_utf8_name", b"latin1-\xe9t\xe9.png", encode(make_scene(20, (64, 48)), "PNG"))
    # Made awkward by the test: rewritten once while read (the retry must index the new bytes).
    good("rewritten_once", "rewritten.png", encode(make_scene(25, (64, 48)), "PNG"))
    # A link to a file outside the tree is followed; a folder named like an image is a folder.
    target = outside / "target.png"
    target.write_bytes(encode(make_scene(26, (64, 48)), "PNG"))
    os.symlink(target, root / "link-to-outside.png")
    c.good["symlink_to_file"] = str(root / "link-to-outside.png")
    (root / "album.jpg").mkdir()
    good("inside_dir_named_jpg", "inner.png", encode(make_scene(27, (64, 48)), "PNG"), root / "album.jpg")
    # Every EXIF orientation, as JPEG (the usual carrier) and as PNG (lossless: exact pixels).
    upright = make_scene(40, (96, 60))  # not square, so a quarter turn changes the shape
    for n in range(1, 9):
        stored = upright.transpose(ORIENTATION_STORE[n]) if n > 1 else upright
        exif = Image.Exif()
        exif[0x0112] = n
        jpg = good(f"exif_{n}_jpeg", f"orient-{n}.jpg", jpeg_bytes(stored, quality=95, exif=exif.tobytes()))
        good(f"exif_{n}_png", f"orient-{n}.png", encode(stored, "PNG", exif=exif.tobytes()))
        # What the JPEG decodes to, turned by hand (not by exif_transpose) the way a viewer shows it.
        with Image.open(os.fsencode(jpg)) as raw:
            pixels = raw.convert("RGB")
        c.expected_pixels[f"exif_{n}_jpeg"] = pixels.transpose(ORIENTATION_SHOW[n]) if n > 1 else pixels
        c.expected_pixels[f"exif_{n}_png"] = upright
        c.sizes[f"exif_{n}_jpeg"] = c.sizes[f"exif_{n}_png"] = upright.size

    # ---- files that must be passed over silently ------------------------------------------
    c.ignored["hidden_file"] = write(root, ".hidden.png", encode(make_scene(50, (32, 32)), "PNG"))
    c.ignored["resource_fork"] = write(root, "._photo.jpg", b"\x00\x05\x16\x07 mac resource fork")
    (root / "@eaDir").mkdir()
    c.ignored["synology_thumb"] = write(root / "@eaDir", "thumb.jpg", jpeg_bytes(make_scene(51, (32, 32))))
    (root / ".Trash-1000").mkdir()
    c.ignored["trash"] = write(root / ".Trash-1000", "deleted.png", encode(make_scene(52, (32, 32)), "PNG"))
    c.ignored["not_an_image_ext"] = write(root, "readme.txt", b"hello")
    c.ignored["raw_no_ext"] = write(root, "IMG_0001", jpeg_bytes(make_scene(53, (32, 32))))
    os.mkfifo(root / "pipe.jpg")  # reading it would block forever: it must not even be opened
    c.ignored["fifo"] = str(root / "pipe.jpg")
    return c


def restore_permissions(root: Path) -> None:
    """Undo the chmod 000 so that the temporary folder can be cleaned up."""
    locked = root / "locked-folder"
    if locked.exists():
        os.chmod(locked, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
