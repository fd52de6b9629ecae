"""Inline thumbnails for terminals that speak an image protocol (kitty, iTerm2).

Anything else (another terminal, a pipe, a file that cannot be read) gets nothing: `--preview`
never fails a command and never writes escape codes where no terminal reads them.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Mapping
from typing import TextIO

THUMB_PIXELS = 256  # longest side of the thumbnail sent to the terminal
THUMB_CELLS = 24  # width in terminal columns
_CHUNK = 4096  # kitty: base64 payload per escape sequence


def detect_protocol(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """'kitty', 'iterm' or None. Never an image protocol when `stream` is not a terminal, nor
    inside tmux or screen."""
    stream = sys.stdout if stream is None else stream
    env = os.environ if env is None else env
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    if env.get("TMUX") or env.get("TERM", "").startswith(("screen", "tmux")):
        return None  # a multiplexer would swallow or garble the sequences
    if "kitty" in env.get("TERM", "") or env.get("KITTY_WINDOW_ID"):
        return "kitty"
    if env.get("TERM_PROGRAM") == "iTerm.app":
        return "iterm"
    return None


def thumbnail_png(path: str, size: int = THUMB_PIXELS) -> bytes | None:
    """A PNG thumbnail of `path` (EXIF orientation applied), or None when it cannot be read."""
    try:
        from PIL import Image, ImageOps

        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            shown = ImageOps.exif_transpose(img) or img
            shown = shown.convert("RGB")
            shown.thumbnail((size, size))
            buf = io.BytesIO()
            shown.save(buf, "PNG")
            return buf.getvalue()
    except Exception:
        return None


def encode(png: bytes, protocol: str, cells: int = THUMB_CELLS) -> str:
    """The escape sequence that shows `png` inline, followed by a newline."""
    data = base64.standard_b64encode(png).decode("ascii")
    if protocol == "kitty":
        chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [""]
        out = []
        for n, chunk in enumerate(chunks):
            more = 1 if n < len(chunks) - 1 else 0
            head = f"a=T,f=100,c={cells},m={more}" if n == 0 else f"m={more}"
            out.append(f"\x1b_G{head};{chunk}\x1b\\")
        return "".join(out) + "\n"
    if protocol == "iterm":
        return f"\x1b]1337;File=inline=1;size={len(png)};width={cells};preserveAspectRatio=1:{data}\x07\n"
    raise ValueError(f"unknown image protocol {protocol!r}")


class Previewer:
    """Writes thumbnails to `stream` when its terminal supports it; a no-op otherwise."""

    def __init__(self, stream: TextIO | None = None, env: Mapping[str, str] | None = None):
        self.stream = sys.stdout if stream is None else stream
        self.protocol = detect_protocol(self.stream, env)

    @property
    def active(self) -> bool:
        return self.protocol is not None

    def show(self, path: str) -> bool:
        if self.protocol is None:
            return False
        png = thumbnail_png(path)
        if png is None:
            return False
        try:
            self.stream.write(encode(png, self.protocol))
            self.stream.flush()
        except (OSError, ValueError):
            return False
        return True
