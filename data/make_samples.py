"""Draw clipdex's sample pictures: `python data/make_samples.py [FOLDER]` (default: this folder).

Each picture is a simple scene drawn with Pillow from fixed shapes and colours, so the script
gives the same pixels every time (the lossy JPEGs: the same pixels for the same libjpeg). Between
them the samples cover what the indexer must handle: JPEG, PNG, GIF and lossless WEBP, an EXIF
rotation, transparency and a 16-bit greyscale picture. See data/README.md for what each shows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

W, H = 320, 240
SKY, GRASS, SUN = (110, 170, 235), (60, 150, 60), (250, 215, 40)

_EXIF_ORIENTATION = 0x0112
_EXIF_DATETIME = 0x0132


@dataclass(frozen=True)
class Sample:
    name: str
    about: str
    draw: Callable[[], Image.Image]
    save: Callable[[Image.Image, Path], None]


def red_circle() -> Image.Image:
    img = Image.new("RGB", (W, H), (35, 75, 200))
    ImageDraw.Draw(img).ellipse((W // 2 - 80, H // 2 - 80, W // 2 + 80, H // 2 + 80), fill=(220, 30, 30))
    return img


def sun_over_field() -> Image.Image:
    img = Image.new("RGB", (W, H), SKY)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, int(H * 0.62), W, H), fill=GRASS)
    draw.ellipse((210, 30, 280, 100), fill=SUN)
    return img


def stripes() -> Image.Image:
    img = Image.new("RGB", (W, H), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for x in range(0, W, 40):
        draw.rectangle((x, 0, x + 19, H), fill=(20, 30, 90))
    return img


def checkerboard() -> Image.Image:
    img = Image.new("RGB", (W, W), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    side = W // 8
    for row in range(8):
        for col in range(row % 2, 8, 2):
            x, y = col * side, row * side
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=(15, 15, 15))
    return img


def gradient_sky() -> Image.Image:
    """An evening sky: deep blue at the top to orange at the horizon."""
    t = np.linspace(0.0, 1.0, H)[:, None, None]
    top, bottom = np.array([20.0, 40.0, 120.0]), np.array([250.0, 150.0, 60.0])
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (H, W, 3))
    return Image.frombytes("RGB", (W, H), np.round(arr).astype(np.uint8).tobytes())


def house() -> Image.Image:
    """Upright: the file stores it turned, and says so in EXIF (see save_rotated)."""
    img = Image.new("RGB", (W, H), SKY)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 180, W, H), fill=GRASS)
    draw.rectangle((100, 110, 220, 190), fill=(190, 140, 90))
    draw.polygon([(85, 112), (160, 50), (235, 112)], fill=(170, 40, 40))
    draw.rectangle((145, 145, 175, 190), fill=(90, 55, 30))
    return img


def leaf() -> Image.Image:
    """A green leaf on a transparent background."""
    img = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.line((60, 190, 160, 120), fill=(90, 70, 30, 255), width=6)
    draw.ellipse((70, 60, 250, 180), fill=(50, 160, 50, 255))
    return img


def moon() -> Image.Image:
    """A bright disc fading into a dark sky, in 16-bit greyscale (values far above 255)."""
    y, x = np.mgrid[0:H, 0:W]
    r = np.hypot(x - W / 2, y - H / 2)
    arr = np.where(r < 70, 60000.0, 3000.0 + 20000.0 * np.exp(-((r - 70) / 25.0) ** 2))
    return Image.frombytes("I;16", (W, H), arr.astype("<u2").tobytes())  # I;16 is little-endian


def save_as(fmt: str, **options: object) -> Callable[[Image.Image, Path], None]:
    return lambda img, path: img.save(path, fmt, **options)


def save_rotated(img: Image.Image, path: Path) -> None:
    # Orientation 6: a viewer turns the stored picture 90 degrees clockwise, as a camera held
    # sideways writes it; so store it turned 90 degrees counter-clockwise.
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6
    exif[_EXIF_DATETIME] = "2024:05:04 10:30:00"
    img.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif.tobytes())


SAMPLES = [
    Sample("red_circle.png", "a red circle on a blue background", red_circle, save_as("PNG", optimize=True)),
    Sample("sun_over_field.jpg", "a yellow sun in a blue sky over a green field", sun_over_field,
           save_as("JPEG", quality=90)),
    Sample("stripes.png", "dark blue vertical stripes on white", stripes, save_as("PNG", optimize=True)),
    Sample("checkerboard.gif", "a black and white checkerboard (GIF)", checkerboard, save_as("GIF")),
    Sample("gradient_sky.webp", "an evening sky, blue fading to orange (lossless WEBP)", gradient_sky,
           save_as("WEBP", lossless=True)),
    Sample("house_rotated.jpg", "a house with a red roof, stored sideways with EXIF orientation 6 and a date",
           house, save_rotated),
    Sample("leaf_alpha.png", "a green leaf on a transparent background (PNG with alpha)", leaf,
           save_as("PNG", optimize=True)),
    Sample("moon_16bit.png", "a bright moon in a dark sky (16-bit greyscale PNG)", moon, save_as("PNG")),
]


def make_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in SAMPLES:
        path = folder / sample.name
        sample.save(sample.draw(), path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for p in make_samples(out):
        print(f"{p}  {p.stat().st_size:,} bytes")
