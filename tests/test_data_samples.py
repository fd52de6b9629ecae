"""The project's sample pictures (data/): what data/README.md says, drawn again by the script,
small, each readable the way it claims, indexed without a write inside data/."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer import index_folders
from retrieval.core.images import image_extensions, load_image

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def maker() -> dict:
    # run_path compiles without writing bytecode: no __pycache__ appears in data/.
    return runpy.run_path(str(DATA / "make_samples.py"), run_name="make_samples")


def sample_files() -> set[str]:
    return {p.name for p in DATA.iterdir() if p.suffix.lower() in image_extensions()}


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_the_readme_the_script_and_the_folder_name_the_same_samples(maker):
    listed = set(re.findall(r"^\| `([^`]+)` \|", (DATA / "README.md").read_text(), re.MULTILINE))
    scripted = {s.name for s in maker["SAMPLES"]}
    assert listed == scripted == sample_files()
    assert 6 <= len(scripted) <= 10


def test_the_samples_are_small():
    assert sum((DATA / name).stat().st_size for name in sample_files()) < 300_000


def test_the_script_draws_the_same_pictures_again(maker, tmp_path):
    for path in maker["make_samples"](tmp_path):
        shipped = load_image(DATA / path.name)
        again = load_image(path)
        a = np.asarray(shipped.image, dtype=np.int16)
        b = np.asarray(again.image, dtype=np.int16)
        assert a.shape == b.shape, path.name
        if shipped.format == "JPEG":  # lossy: another libjpeg may round differently
            assert np.abs(a - b).mean() < 2.0, path.name
        else:
            assert np.array_equal(a, b), path.name


def test_each_sample_is_what_it_says():
    opened = {name: Image.open(DATA / name) for name in sample_files()}
    assert {im.format for im in opened.values()} >= {"JPEG", "PNG", "GIF", "WEBP"}
    # EXIF orientation 6: stored sideways, loaded upright
    house = opened["house_rotated.jpg"]
    assert house.getexif().get(0x0112) == 6 and house.size == (240, 320)
    upright = load_image(DATA / "house_rotated.jpg")
    assert (upright.width, upright.height) == (320, 240) and upright.image.size == (320, 240)
    assert upright.taken_at is not None
    roof = upright.image.getpixel((160, 90))  # the red roof is at the top once turned upright
    assert roof[0] > 150 and roof[1] < 80, roof
    # transparency, shown on white
    leaf = opened["leaf_alpha.png"]
    assert leaf.mode == "RGBA" and leaf.getextrema()[3] == (0, 255)
    assert load_image(DATA / "leaf_alpha.png").image.getpixel((5, 5)) == (255, 255, 255)
    # 16 bits that a plain 8-bit conversion would clip
    moon = opened["moon_16bit.png"]
    assert moon.mode.startswith("I") and moon.getextrema()[1] > 255
    assert np.asarray(load_image(DATA / "moon_16bit.png").image).min() < 30  # the dark sky stays dark
    red = load_image(DATA / "red_circle.png").image.getpixel((160, 120))
    assert red[0] > 200 and red[2] < 60, red


def test_indexing_the_samples_takes_every_one_and_writes_nothing_in_data(tmp_path, tiny_clip_model):
    before = folder_state(DATA)
    summary = index_folders([DATA], tmp_path / "index", tiny_clip_model)
    assert summary.failed == []
    assert summary.added == len(sample_files())
    assert folder_state(DATA) == before
