"""Decoding files into upright RGB pictures, defensively."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from conftest import jpeg_bytes, make_scene, quadrant_image
from PIL import Image, ImageFile

from retrieval.core.errors import ImageLoadError
from retrieval.core.images import BASE_EXTENSIONS, image_extensions, load_image


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_base_format_loads_as_rgb(format_files, fmt):
    src = make_scene(7, (120, 80))  # what the fixture saved
    loaded = load_image(format_files[fmt])
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (120, 80) and (loaded.width, loaded.height) == (120, 80)
    assert loaded.format == fmt
    diff = np.abs(pixels(loaded.image) - pixels(src)).mean()
    assert diff < {"JPEG": 4, "WEBP": 6, "GIF": 12}.get(fmt, 1e-9), diff


def test_path_bytes_and_pil_sources_agree(format_files):
    path = format_files["PNG"]
    a = load_image(path)
    b = load_image(path.read_bytes())
    c = load_image(str(path))
    d = load_image(Image.open(path))
    for other in (b, c, d):
        assert np.array_equal(np.asarray(a.image), np.asarray(other.image))


def test_exif_orientation_gives_upright_pixels(exif_rotated):
    rotated_path, upright_path = exif_rotated
    with Image.open(rotated_path) as raw:
        assert raw.size == (48, 80) and raw.getexif()[0x0112] == 6  # stored sideways
    rotated = load_image(rotated_path)
    upright = load_image(upright_path)
    assert rotated.image.size == (80, 48)
    assert (rotated.width, rotated.height) == (80, 48)
    diff = np.abs(pixels(rotated.image) - pixels(upright.image)).mean()
    assert diff < 3, diff
    ref = pixels(quadrant_image(80, 48))
    assert np.abs(pixels(rotated.image) - ref).mean() < 3
    # the other ways of turning it would be far off
    for wrong in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_LEFT_RIGHT):
        assert np.abs(pixels(rotated.image.transpose(wrong)) - ref).mean() > 50


def test_exif_date_taken(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2021:06:01 12:34:56"
    p = tmp_path / "dated.jpg"
    make_scene(1).save(p, "JPEG", exif=exif.tobytes())
    assert load_image(p).taken_at == time.mktime(time.strptime("2021:06:01 12:34:56", "%Y:%m:%d %H:%M:%S"))
    p2 = tmp_path / "undated.jpg"
    make_scene(1).save(p2, "JPEG")
    assert load_image(p2).taken_at is None


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    p = tmp_path / "deep.png"
    Image.fromarray(ramp).save(p)
    with Image.open(p) as raw:
        assert raw.mode in ("I;16", "I")  # it really is 16-bit on disk
        naive = np.asarray(raw.convert("RGB"), dtype=np.float64)
    assert naive.mean() > 240  # a plain convert would give a nearly white picture
    loaded = load_image(p)
    arr = pixels(loaded.image)
    assert loaded.image.mode == "RGB"
    assert arr[:, 0].max() == 0 and arr[:, -1].min() == 255
    np.testing.assert_allclose(arr[0, :, 0], ramp[0] / 65535 * 255, atol=1.0)
    assert 120 < arr.mean() < 135
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_dark_16_bit_png_stays_dark(tmp_path):
    p = tmp_path / "dark.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(p)  # 200/65535: nearly black
    with Image.open(p) as raw:
        assert raw.mode == "I;16"
    assert pixels(load_image(p).image).max() <= 1


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 30, 4), dtype=np.uint8)
    rgba[:, :10] = (255, 0, 0, 0)  # fully transparent red: must show white
    rgba[:, 10:20] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 20:] = (0, 0, 0, 128)  # half-transparent black: mid grey
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = pixels(load_image(p).image)
    assert (out[:, :10] == 255).all()
    assert (out[:, 10:20] == (0, 0, 255)).all()
    assert np.abs(out[:, 20:] - 127).max() <= 2


def test_palette_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (10, 0, 20, 10))
    p = tmp_path / "t.gif"
    img.save(p, transparency=0)
    out = pixels(load_image(p).image)
    assert (out[:, :10] == 255).all()  # the transparent index shows white, not black
    assert (out[:, 10:] == (255, 0, 0)).all()


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    make_scene(2, (200, 150)).save(p)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageLoadError, match="refused"):
        load_image(p, max_pixels=200 * 150 - 1)
    assert decoded == []
    assert load_image(p, max_pixels=200 * 150).image.size == (200, 150)
    assert decoded  # the spy does see a real decode


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (8-bit grey) and holds one empty IDAT chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("side", [12_000, 40_000])  # over our cap; over Pillow's own bomb limit too
def test_huge_header_is_refused_without_decoding(side):
    with pytest.raises(ImageLoadError, match="refused"):
        load_image(_png_header_only(side, side))


def test_draft_decoding_keeps_original_size(tmp_path):
    p = tmp_path / "big.jpg"
    make_scene(4, (800, 600)).save(p, "JPEG", quality=90)
    loaded = load_image(p, draft_size=100)
    w, h = loaded.image.size
    assert min(w, h) >= 100 and w < 800  # decoded at a reduced scale
    assert (loaded.width, loaded.height) == (800, 600)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_broken_files_raise_image_load_error(broken_files, kind):
    with pytest.raises(ImageLoadError) as info:
        load_image(broken_files[kind])
    assert str(info.value).strip()


def test_truncated_jpeg_bytes_raise(tmp_path):
    data = jpeg_bytes(make_scene(5, (300, 200)), quality=95)
    load_image(data)  # the whole file is fine
    for cut in (len(data) // 3, len(data) - 200):
        with pytest.raises(ImageLoadError):
            load_image(data[:cut])


def test_missing_file_raises_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError):
        load_image(tmp_path / "nope.jpg")


def test_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= set(BASE_EXTENSIONS)
    assert image_extensions() >= BASE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in image_extensions())


def count_exif_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per EXIF block parsed (Pillow's getexif caches per image; a turned copy parses again)."""
    calls: list[int] = []
    real = Image.Exif.load

    def load(self, data):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, data)

    monkeypatch.setattr(Image.Exif, "load", load)
    return calls


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_is_parsed_once(tmp_path, monkeypatch, orientation):
    p = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    make_scene(8, (120, 80)).save(p, "JPEG", exif=exif.tobytes())
    data = p.read_bytes()
    calls = count_exif_parses(monkeypatch)
    load_image(data)
    assert len(calls) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_exif_transpose_does(tmp_path, orientation):
    from PIL import ImageOps

    p = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    quadrant_image(80, 48).save(p, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(p) as raw:
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    loaded = load_image(p)
    assert np.array_equal(np.asarray(loaded.image), expected)
    assert (loaded.width, loaded.height) == loaded.image.size
    # Turned once: what the result says of itself no longer asks for another turn.
    assert loaded.image.getexif().get(0x0112, 1) == 1


def test_an_upright_rgb_picture_is_not_copied():
    img = make_scene(9, (120, 80))
    assert load_image(img).image is img  # a 12 MP decode is 36 MB: no copy for nothing
